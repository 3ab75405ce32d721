"""Argument groups that several `moemesh` subcommands share, and the typed configs parsed from
them (deploy/cli.py builds the parser)."""

from __future__ import annotations

import argparse
import dataclasses
import os

from moemesh.experts.weights import PRESETS
from moemesh.protos.spec import FLOAT_DTYPES
from moemesh.protos.wire import DEFAULT_MAX_MESSAGE_BYTES
from moemesh.services.admission import HostLimits, RouterLimits
from moemesh.services.bootstrap import ServerConfig


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The server config of `serve-expert` / `serve-router`: bind address, message and call limits."""
    return ServerConfig(
        host=args.host,
        port=args.port,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        max_concurrent_rpcs=args.max_concurrent_rpcs or None,
    )


def limits(cls, args: argparse.Namespace):
    """`cls` (HostLimits or RouterLimits) from the flags of the same names."""
    try:
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})
    except ValueError as err:
        raise SystemExit(f"moemesh {args.command}: {err}") from None


def model_args(p: argparse.ArgumentParser, port_default: int = 0) -> None:
    p.add_argument(
        "--model",
        default="tiny-mixtral",
        help=f"preset ({', '.join(PRESETS)}) or checkpoint directory (default: tiny-mixtral)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=port_default, help=f"port to bind, 0 = any (default: {port_default})"
    )
    p.add_argument(
        "--max-message-mb",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES // (1024 * 1024),
        help="largest gRPC message accepted or sent, MiB (default: %(default)s)",
    )


def threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads, 0 = torch's default (default: 0). Processes sharing "
        "a machine should split its cores: oversubscribed torch threads spin and stall",
    )


def metrics_arg(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help=f"serve Prometheus /metrics on this port{what}, 0 = off (default: 0)",
    )


def limit_args(p: argparse.ArgumentParser, host: bool, router: bool) -> None:
    """Admission limits: beyond them a call gets RESOURCE_EXHAUSTED at once (README: memory bound)."""
    kinds = [HostLimits] * host + [RouterLimits] * router
    for limit in (f for kind in kinds for f in dataclasses.fields(kind)):
        p.add_argument(
            "--" + limit.name.replace("_", "-"),
            type=int,
            default=limit.default,
            help=f"{limit.metadata['help']} (default: {limit.default})",
        )
    default_rpcs = ServerConfig.max_concurrent_rpcs or 0
    p.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=default_rpcs,
        help=f"calls each server runs at once, 0 = no limit (default: {default_rpcs})",
    )


def device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda[:N], xpu, mps or auto (default: auto)")
    p.add_argument(
        "--dtype", default="float32", choices=FLOAT_DTYPES, help="expert compute dtype (default: float32)"
    )


def parse_devices(text: str) -> dict[str, float]:
    """ "H100:1,A100-80G:2,CPU:3" -> Ray resources {"device:H100": 1, ...} for an embedded instance."""
    from .discovery import DEVICE_RESOURCE_PREFIX

    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.rpartition(":")
        if not sep or not name or not count.isdigit() or int(count) < 1:
            raise ValueError(f"--devices: expected ACCELERATOR:COUNT[,...], got {part!r}")
        out[DEVICE_RESOURCE_PREFIX + name] = float(count)
    if not out:
        raise ValueError("--devices: no devices given")
    return out


def otel_env() -> dict[str, str]:
    """The standard OTEL_* settings of this process, for the actors it starts to report alike."""
    return {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}


def mesh_config(args: argparse.Namespace):
    """The typed config of `moemesh up`, for the chosen backend (Ray adds its own settings)."""
    from .backend import Backend, MeshConfig

    common = {
        "model": args.model,
        "num_hosts": args.hosts,
        "device": args.device,
        "dtype": args.dtype,
        "router_port": args.port,
        "max_message_bytes": args.max_message_mb * 1024 * 1024,
        "metrics_port": args.metrics_port,
        "replicas": args.replicas,
        "env": otel_env(),
        "host_limits": limits(HostLimits, args),
        "router_limits": limits(RouterLimits, args),
        "max_concurrent_rpcs": args.max_concurrent_rpcs or None,
    }
    if Backend(args.backend) is not Backend.RAY:
        return MeshConfig(host=args.host, **common)

    from .cluster import load_accelerator_overrides
    from .ray_mesh import RayMeshConfig

    embedded = args.address is None
    return RayMeshConfig(
        address=args.address,
        num_cpus=(os.cpu_count() or 1) if embedded else None,
        resources=parse_devices(args.devices or f"CPU:{args.hosts}") if embedded else {},
        max_restarts=args.max_restarts,
        accelerators=load_accelerator_overrides(args.accelerators) if args.accelerators else {},
        **common,
    )
