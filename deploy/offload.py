"""`offload_experts`: a transformers MoE model's experts on an embedded mesh, in one call.

    with offload_experts(model, num_hosts=3) as remote:   # writes a checkpoint, starts the mesh
        logits = model(input_ids).logits                 # experts ran on the mesh
    # the model's own blocks are back; the mesh is stopped

Two paths, one call:
- the families moemesh parses (experts/model.py `SUPPORTED_FAMILIES`) swap each sparse block for a
  `RemoteMoE`: the router runs the gate and the shared experts (`Forward`);
- every other family whose experts use transformers' experts interface keeps its own routers in
  this process and sends only the experts' work (`Dispatch`) through the `moemesh` experts
  implementation (client/hf_experts.py); the checkpoint is the experts' fused tensors plus a
  `moemesh.json` description read from the live modules (deploy/describe.py).

With `address=` it connects to a running router that serves the same checkpoint instead.
"""

from __future__ import annotations

import tempfile

from torch import nn

from moemesh.client import Client, RemoteExperts
from moemesh.client.hf_experts import RoutedExperts
from moemesh.experts.model import SUPPORTED_FAMILIES, spec_from_config
from moemesh.protos.spec import RoutingPolicy

from .describe import describe_experts, write_experts_checkpoint
from .local import EmbeddedMesh, MeshConfig


class _Owned:
    """What an offload owns besides the model integration: its client, mesh and checkpoint."""

    def _own(self, mesh, tmp) -> None:
        self.mesh = mesh
        self._tmp = tmp

    def _release(self) -> None:
        self.client.close()
        if self.mesh is not None:
            self.mesh.close()
            self.mesh = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class OffloadedExperts(_Owned, RemoteExperts):
    """`RemoteExperts` (blocks swapped for `RemoteMoE`) that also owns its client, mesh and checkpoint."""

    def __init__(self, model, client, policy, mesh=None, tmp=None):
        try:
            RemoteExperts.__init__(self, model, client, policy)
        except BaseException:
            client.close()
            raise
        self._own(mesh, tmp)

    def close(self) -> None:
        super().close()
        self._release()


class OffloadedRoutedExperts(_Owned, RoutedExperts):
    """`RoutedExperts` (the experts interface through `Dispatch`) that also owns its client, mesh
    and checkpoint."""

    def __init__(self, model, client, experts, mesh=None, tmp=None):
        try:
            RoutedExperts.__init__(self, model, client, experts)
        except BaseException:
            client.close()
            raise
        self._own(mesh, tmp)

    def close(self) -> None:
        super().close()
        self._release()


def _start(write, num_hosts: int, device: str, dtype: str):
    """(temporary checkpoint, embedded mesh serving it); `write(directory)` fills the checkpoint."""
    tmp = tempfile.TemporaryDirectory(prefix="moemesh-ckpt-")
    try:
        write(tmp.name)
        mesh = EmbeddedMesh(MeshConfig(tmp.name, num_hosts, device, dtype)).start()
    except BaseException:
        tmp.cleanup()
        raise
    return tmp, mesh


def offload_experts(
    model: nn.Module,
    address: str | None = None,
    num_hosts: int = 3,
    device: str = "auto",
    dtype: str = "float32",
    policy: RoutingPolicy | None = None,
    timeout: float | None = 60.0,
) -> OffloadedExperts | OffloadedRoutedExperts:
    """Run the experts of `model` on a mesh, in place, until `close()`.

    With no `address`, the model's own weights are written to a temporary checkpoint and an
    embedded mesh of `num_hosts` expert hosts serves them. The local model keeps its dense parts
    (and, for families outside `SUPPORTED_FAMILIES`, its routers) only. UnsupportedModel when the
    model is neither a parsed family nor has experts moemesh can compute.
    """
    config = model.config
    if getattr(config, "model_type", None) in SUPPORTED_FAMILIES:
        spec_from_config(config.to_dict(), type(model).__name__)  # ValueError before any work
        mesh = tmp = None
        if address is None:
            tmp, mesh = _start(model.save_pretrained, num_hosts, device, dtype)
            address = mesh.address
        return OffloadedExperts(model, Client(address, timeout=timeout), policy, mesh, tmp)
    if policy is not None:
        raise ValueError(
            f"policy: {config.model_type} models route in the caller; a routing policy does not apply"
        )
    described = describe_experts(model)  # UnsupportedModel before any work
    mesh = tmp = None
    if address is None:
        tmp, mesh = _start(lambda d: write_experts_checkpoint(described, d, config), num_hosts, device, dtype)
        address = mesh.address
    return OffloadedRoutedExperts(model, Client(address, timeout=timeout), described.experts, mesh, tmp)
