"""`moemesh` command line. Arguments are parsed once here into typed configs; nothing below reads
the environment (except the OpenTelemetry SDK's own OTEL_* variables).

    moemesh demo                      # local mesh, one batch end to end, a short report
    moemesh up --model tiny-mixtral   # local mesh in the foreground until Ctrl-C
    moemesh serve-expert ...          # one expert host
    moemesh serve-router ...          # one router
    moemesh models                    # presets
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from moemesh.experts.weights import PRESETS
from moemesh.services.bootstrap import DEFAULT_MAX_MESSAGE_BYTES, RunningServer, ServerConfig

from .placement import parse_experts

DTYPES = ("float32", "float16", "bfloat16")


def _server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(host=args.host, port=args.port, max_message_bytes=args.max_message_mb * 1024 * 1024)


def _write_ready(path: str | None, info: dict) -> None:
    """Atomically publish the bound address for whoever started us (port 0 → real port)."""
    if not path:
        return
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


async def _serve_until_signal(server: RunningServer, stop) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await stop()


async def _serve_expert(args: argparse.Namespace) -> None:
    from moemesh.services.launch import ExpertHostConfig, start_expert_host

    config = ExpertHostConfig(
        model=args.model,
        host_id=args.host_id,
        experts=parse_experts(args.experts),
        device=args.device,
        dtype=args.dtype,
        server=_server_config(args),
    )
    host = await start_expert_host(config)
    _write_ready(args.ready_file, {"address": host.address, "host_id": args.host_id, "pid": os.getpid()})
    print(f"expert host {args.host_id} serving {len(config.experts)} experts on {host.address}", flush=True)
    await _serve_until_signal(host.server, host.stop)


async def _serve_router(args: argparse.Namespace) -> None:
    from moemesh.services.launch import RouterConfig, start_router

    hosts = tuple(a.strip() for a in args.experts_at.split(",") if a.strip())
    config = RouterConfig(model=args.model, hosts=hosts, server=_server_config(args))
    router = await start_router(config)
    _write_ready(args.ready_file, {"address": router.address, "pid": os.getpid()})
    print(f"router serving {args.model} on {router.address} over {len(hosts)} expert hosts", flush=True)
    await _serve_until_signal(router.server, router.stop)


def _up(args: argparse.Namespace) -> int:
    from moemesh.client import Client

    from .local import MeshConfig, ProcessMesh
    from .report import print_topology

    config = MeshConfig(
        args.model,
        args.hosts,
        args.device,
        args.dtype,
        args.host,
        args.port,
        args.max_message_mb * 1024 * 1024,
    )
    with ProcessMesh(config, on_event=lambda m: print(f"  {m}", flush=True)) as mesh:
        with Client(mesh.address) as client:
            print_topology(client.topology())
        print(f"\nrouter listening on {mesh.address}; Ctrl-C to stop", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
        print("stopping", flush=True)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    return run_demo(
        DemoConfig(
            model=args.model,
            num_hosts=args.hosts,
            tokens=args.tokens,
            batches=args.batches,
            dtype=args.dtype,
            device=args.device,
            seed=args.seed,
        )
    )


def _models(args: argparse.Namespace) -> int:
    from moemesh.experts.weights import open_source

    for name in PRESETS:
        spec = open_source(name).spec
        ls = spec.layers[0]
        print(
            f"{name:18s} {spec.family:12s} layers={[x.layer for x in spec.layers]} hidden={ls.hidden_size} "
            f"experts={ls.num_experts} top_k={spec.routing.top_k} shared={ls.shared_intermediate_size > 0}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moemesh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

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

    def device_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", help="cpu, cuda[:N], xpu, mps or auto (default: auto)")
        p.add_argument(
            "--dtype", default="float32", choices=DTYPES, help="expert compute dtype (default: float32)"
        )

    p = sub.add_parser("serve-expert", help="serve the FFNs of some experts")
    model_args(p)
    device_args(p)
    p.add_argument("--host-id", required=True, help="stable name of this host in the routing table")
    p.add_argument("--experts", required=True, help="LAYER:FIRST-LAST[+...],... e.g. 0:0-3,1:0-3")
    threads_arg(p)
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.set_defaults(run=lambda a: asyncio.run(_serve_expert(a)) or 0)

    p = sub.add_parser("serve-router", help="serve the router over running expert hosts")
    model_args(p, port_default=50051)
    p.add_argument("--experts-at", required=True, help="comma-separated expert host addresses host:port")
    threads_arg(p)
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.set_defaults(run=lambda a: asyncio.run(_serve_router(a)) or 0)

    p = sub.add_parser("up", help="start a whole local mesh (one process per host) in the foreground")
    model_args(p, port_default=50051)
    device_args(p)
    p.add_argument("--hosts", type=int, default=3, help="expert hosts (default: 3)")
    p.set_defaults(run=_up)

    p = sub.add_parser("demo", help="start a local mesh, run batches end to end, print a report")
    p.add_argument(
        "--model", default="tiny-mixtral", help="preset or checkpoint directory (default: tiny-mixtral)"
    )
    device_args(p)
    p.add_argument("--hosts", type=int, default=3, help="expert hosts (default: 3)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per batch (default: 512)")
    p.add_argument("--batches", type=int, default=20, help="batches timed for tokens/s (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random hidden states (default: 0)")
    p.set_defaults(run=_demo)

    p = sub.add_parser("models", help="list the presets")
    p.set_defaults(run=_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
