"""The layering the README promises, checked on the import graph of the source."""

from __future__ import annotations

import pytest

from tests import import_graph as graph

# What each layer must never import (prefixes of absolute module names).
FORBIDDEN = {
    # pure cores: torch only, plus the contract's Python types
    "router": ("grpc", "ray", "opentelemetry", "google.protobuf", "moemesh.protos.moemesh_pb2",
               "moemesh.protos.wire", "moemesh.services", "moemesh.client", "moemesh.deploy",
               "moemesh.experts"),
    "experts": ("grpc", "ray", "opentelemetry", "google.protobuf", "moemesh.protos.moemesh_pb2",
                "moemesh.protos.wire", "moemesh.services", "moemesh.client", "moemesh.deploy",
                "moemesh.router"),
    # the contract depends on nothing of moemesh
    "protos": ("ray", "opentelemetry", "moemesh.router", "moemesh.experts", "moemesh.services",
               "moemesh.client", "moemesh.deploy"),
    # the SDK: the contract, grpc and torch; no servers, no deployment
    "client": ("ray", "grpc_health", "grpc_reflection", "moemesh.services", "moemesh.deploy",
               "moemesh.router", "moemesh.experts"),
    "services": ("ray", "moemesh.deploy"),
}  # fmt: skip
# services/ shares only the client side of RPC tracing with the SDK.
SERVICES_MAY_USE_FROM_CLIENT = "moemesh.client.tracing"


def _hits(imported: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in imported if any(n == f or n.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports_only_what_it_may(package):
    bad = {
        module: hits
        for module, imported in graph.package_imports(package).items()
        if (hits := _hits(imported, FORBIDDEN[package]))
    }
    assert not bad, f"{package}/ imports what its layer must not: {bad}"


def test_services_use_only_the_sdks_tracing():
    bad = {
        module: sorted(
            n
            for n in imported
            if n.startswith("moemesh.client") and not n.startswith(SERVICES_MAY_USE_FROM_CLIENT)
        )
        for module, imported in graph.package_imports("services").items()
    }
    assert not {m: n for m, n in bad.items() if n}


def test_no_package_cycle():
    assert graph.find_cycle(graph.package_graph()) is None


def test_the_checks_see_violations():
    # The graph reader resolves relative and lazy imports, and the cycle finder finds a cycle.
    fake = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert graph.find_cycle(fake) == ["a", "b", "c", "a"]
    assert graph.find_cycle({"a": {"b"}, "b": set()}) is None
    deploy = graph.package_imports("deploy")
    assert "moemesh.deploy.local.EmbeddedMesh" in deploy["moemesh.deploy.offload"]  # a relative import
    assert _hits({"grpc.aio", "torch"}, ("grpc",)) == ["grpc.aio"]


def test_every_package_says_what_it_owns():
    for package in graph.PACKAGES:
        init = graph.ROOT / package / "__init__.py"
        text = init.read_text().strip()
        assert text.startswith('"""') and len(text.split('"""')[1].split()) >= 8, (
            f"{package}/__init__.py needs a docstring that says what the package owns"
        )
