"""Run the experts of a `transformers` MoE model on the mesh.

    model = MixtralForCausalLM.from_pretrained(path)
    remote = offload_experts(model)              # starts an embedded local mesh with its experts
    logits = model(input_ids).logits            # experts now run on the mesh
    remote.close()

With `address=` the helper connects to a running router that serves the same checkpoint instead.
Supported: every family `moemesh.experts.model` parses (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V3).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

from torch import nn

from moemesh.experts.model import spec_from_config
from moemesh.router.gating import RoutingPolicy

from .client import Client
from .remote import RemoteMoE

# Attribute that holds the sparse block inside a decoder layer, by family.
_BLOCK_ATTR = {"mixtral": "mlp", "qwen2_moe": "mlp", "qwen3_moe": "mlp", "olmoe": "mlp", "deepseek_v3": "mlp"}


@dataclass
class RemoteExperts:
    """What `offload_experts` set up; `close()` stops an embedded mesh it started."""

    client: Client
    layers: tuple[int, ...]
    mesh: object | None = None
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return self.client.address

    def close(self) -> None:
        self.client.close()
        if self.mesh is not None:
            self.mesh.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RemoteExperts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: expected decoder layers at .model.layers")
    return layers


def offload_experts(
    model: nn.Module,
    address: str | None = None,
    num_hosts: int = 3,
    device: str = "auto",
    dtype: str = "float32",
    policy: RoutingPolicy | None = None,
    timeout: float | None = 60.0,
) -> RemoteExperts:
    """Swap every sparse MoE block of `model` for a `RemoteMoE`, in place.

    With no `address`, the model's own weights are written to a temporary checkpoint and an
    embedded mesh of `num_hosts` expert hosts serves them (the router computes gates and shared
    experts). The local model keeps its dense parts only.
    """
    spec = spec_from_config(model.config.to_dict(), type(model).__name__)
    attr = _BLOCK_ATTR[spec.family]
    mesh = tmp = None
    if address is None:
        from moemesh.deploy.local import EmbeddedMesh, MeshConfig

        tmp = tempfile.TemporaryDirectory(prefix="moemesh-ckpt-")
        model.save_pretrained(tmp.name)
        mesh = EmbeddedMesh(MeshConfig(tmp.name, num_hosts, device, dtype)).start()
        address = mesh.address
    client = Client(address, timeout=timeout)
    decoder = _decoder_layers(model)
    for index in spec.layer_indices:
        setattr(decoder[index], attr, RemoteMoE(client, index, policy))
    return RemoteExperts(client, tuple(spec.layer_indices), mesh, tmp)
