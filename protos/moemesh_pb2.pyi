from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]

class RoutingMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTING_MODE_UNSPECIFIED: _ClassVar[RoutingMode]
    ROUTING_MODE_TOP_K: _ClassVar[RoutingMode]
    ROUTING_MODE_TOP_P: _ClassVar[RoutingMode]
    ROUTING_MODE_THRESHOLD: _ClassVar[RoutingMode]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT32: DType
ROUTING_MODE_UNSPECIFIED: RoutingMode
ROUTING_MODE_TOP_K: RoutingMode
ROUTING_MODE_TOP_P: RoutingMode
ROUTING_MODE_THRESHOLD: RoutingMode

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RoutingOverride(_message.Message):
    __slots__ = ("mode", "top_k", "top_p", "threshold", "max_k")
    MODE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    mode: RoutingMode
    top_k: int
    top_p: float
    threshold: float
    max_k: int
    def __init__(self, mode: _Optional[_Union[RoutingMode, str]] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., threshold: _Optional[float] = ..., max_k: _Optional[int] = ...) -> None: ...

class Routing(_message.Message):
    __slots__ = ("experts", "weights")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    experts: Tensor
    weights: Tensor
    def __init__(self, experts: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("layer", "hidden", "routing", "return_routing")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    RETURN_ROUTING_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: Tensor
    routing: RoutingOverride
    return_routing: bool
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., routing: _Optional[_Union[RoutingOverride, _Mapping]] = ..., return_routing: _Optional[bool] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden", "routing")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    routing: Routing
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., routing: _Optional[_Union[Routing, _Mapping]] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("layer", "hidden", "routing")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: Tensor
    routing: RoutingOverride
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., routing: _Optional[_Union[RoutingOverride, _Mapping]] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("routing",)
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    routing: Routing
    def __init__(self, routing: _Optional[_Union[Routing, _Mapping]] = ...) -> None: ...

class DispatchRequest(_message.Message):
    __slots__ = ("layer", "hidden", "routing")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: Tensor
    routing: Routing
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., routing: _Optional[_Union[Routing, _Mapping]] = ...) -> None: ...

class DispatchResponse(_message.Message):
    __slots__ = ("hidden",)
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GetTopologyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("layer", "num_experts", "hidden_size", "top_k", "routing_family", "shared_experts", "intermediate_size", "tokens_routed")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FAMILY_FIELD_NUMBER: _ClassVar[int]
    SHARED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_ROUTED_FIELD_NUMBER: _ClassVar[int]
    layer: int
    num_experts: int
    hidden_size: int
    top_k: int
    routing_family: str
    shared_experts: int
    intermediate_size: int
    tokens_routed: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., num_experts: _Optional[int] = ..., hidden_size: _Optional[int] = ..., top_k: _Optional[int] = ..., routing_family: _Optional[str] = ..., shared_experts: _Optional[int] = ..., intermediate_size: _Optional[int] = ..., tokens_routed: _Optional[_Iterable[int]] = ...) -> None: ...

class ExpertRef(_message.Message):
    __slots__ = ("layer", "expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class HostInfo(_message.Message):
    __slots__ = ("host_id", "address", "device", "dtype", "experts", "node", "relative_speed", "healthy")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_SPEED_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    address: str
    device: str
    dtype: str
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    node: str
    relative_speed: float
    healthy: bool
    def __init__(self, host_id: _Optional[str] = ..., address: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., node: _Optional[str] = ..., relative_speed: _Optional[float] = ..., healthy: _Optional[bool] = ...) -> None: ...

class GetTopologyResponse(_message.Message):
    __slots__ = ("model", "layers", "hosts")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    hosts: _containers.RepeatedCompositeFieldContainer[HostInfo]
    def __init__(self, model: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., hosts: _Optional[_Iterable[_Union[HostInfo, _Mapping]]] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("layer", "expert", "row_start", "row_count")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    row_start: int
    row_count: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., row_start: _Optional[int] = ..., row_count: _Optional[int] = ...) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("segments", "rows")
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    rows: Tensor
    def __init__(self, segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ComputeResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: Tensor
    def __init__(self, rows: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("host_id", "device", "dtype", "experts", "model", "node", "relative_speed")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_SPEED_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    device: str
    dtype: str
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    model: str
    node: str
    relative_speed: float
    def __init__(self, host_id: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., model: _Optional[str] = ..., node: _Optional[str] = ..., relative_speed: _Optional[float] = ...) -> None: ...
