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


class Offloaded:
    """An offload: the model integration (`RemoteExperts` or `RoutedExperts`) plus what it owns,
    its client, embedded mesh and checkpoint. The integration's attributes (`layers`, `client`,
    `address`) read through; `close()` gives the model back, then stops the rest."""

    def __init__(self, integrate, client: Client, mesh=None, tmp=None):
        self.client, self.mesh, self._tmp = client, mesh, tmp
        try:
            self.integration = integrate(client)
        except BaseException:
            self._release()
            raise

    def __getattr__(self, name: str):
        if name == "integration":  # not set yet: the integration failed
            raise AttributeError(name)
        return getattr(self.integration, name)

    def close(self) -> None:
        try:
            self.integration.close()
        finally:
            self._release()

    def _release(self) -> None:
        self.client.close()
        if self.mesh is not None:
            self.mesh.close()
            self.mesh = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Offloaded:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
) -> Offloaded:
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
        return Offloaded(
            lambda c: RemoteExperts(model, c, policy), Client(address, timeout=timeout), mesh, tmp
        )
    if policy is not None:
        raise ValueError(
            f"policy: {config.model_type} models route in the caller; a routing policy does not apply"
        )
    described = describe_experts(model)  # UnsupportedModel before any work
    mesh = tmp = None
    if address is None:
        tmp, mesh = _start(lambda d: write_experts_checkpoint(described, d, config), num_hosts, device, dtype)
        address = mesh.address
    client = Client(address, timeout=timeout)
    return Offloaded(lambda c: RoutedExperts(model, c, described.experts), client, mesh, tmp)
