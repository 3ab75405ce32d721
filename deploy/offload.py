"""`offload_experts`: a transformers MoE model's experts on an embedded mesh, in one call.

    with offload_experts(model, num_hosts=3) as remote:   # writes a checkpoint, starts the mesh
        logits = model(input_ids).logits                 # experts ran on the mesh
    # the model's own blocks are back; the mesh is stopped

With `address=` it connects to a running router that serves the same checkpoint instead.
"""

from __future__ import annotations

import tempfile

from torch import nn

from moemesh.client import Client, RemoteExperts
from moemesh.experts.model import spec_from_config
from moemesh.protos.spec import RoutingPolicy

from .local import EmbeddedMesh, MeshConfig


class OffloadedExperts(RemoteExperts):
    """`RemoteExperts` that also owns its client, and the embedded mesh and checkpoint it started."""

    def __init__(self, model, client, policy, mesh=None, tmp=None):
        try:
            super().__init__(model, client, policy)
        except BaseException:
            client.close()
            raise
        self.mesh = mesh
        self._tmp = tmp

    def close(self) -> None:
        super().close()
        self.client.close()
        if self.mesh is not None:
            self.mesh.close()
            self.mesh = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def offload_experts(
    model: nn.Module,
    address: str | None = None,
    num_hosts: int = 3,
    device: str = "auto",
    dtype: str = "float32",
    policy: RoutingPolicy | None = None,
    timeout: float | None = 60.0,
) -> OffloadedExperts:
    """Swap every sparse MoE block of `model` for a `RemoteMoE`, in place, until `close()`.

    With no `address`, the model's own weights are written to a temporary checkpoint and an
    embedded mesh of `num_hosts` expert hosts serves them (the router computes gates and shared
    experts). The local model keeps its dense parts only.
    """
    spec_from_config(model.config.to_dict(), type(model).__name__)  # UnsupportedModel before any work
    mesh = tmp = None
    if address is None:
        tmp = tempfile.TemporaryDirectory(prefix="moemesh-ckpt-")
        try:
            model.save_pretrained(tmp.name)
            mesh = EmbeddedMesh(MeshConfig(tmp.name, num_hosts, device, dtype)).start()
        except BaseException:
            tmp.cleanup()
            raise
        address = mesh.address
    return OffloadedExperts(model, Client(address, timeout=timeout), policy, mesh, tmp)
