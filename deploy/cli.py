"""`moemesh` command line. Arguments are parsed once here into typed configs; nothing below reads
the environment (except the OpenTelemetry SDK's own OTEL_* variables).

    moemesh demo                      # local mesh, one batch end to end, a short report
    moemesh up --model tiny-mixtral   # the mesh on an embedded local Ray, until Ctrl-C
    moemesh status / down             # inspect / remove a running mesh
    moemesh plan --cluster FILE       # placement on a (possibly imaginary) cluster, offline
    moemesh serve-expert ...          # one expert host
    moemesh serve-router ...          # one router
    moemesh models                    # presets
    moemesh bench                     # the mesh vs one process, naive Ray and Ray Serve, side by side
    moemesh trace serve / show / list # receive OTLP traces, print one as a waterfall or a PNG

Tracing is on in a process when OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set;
`--metrics-port` serves Prometheus metrics.
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
from moemesh.protos.spec import parse_experts
from moemesh.services.admission import HostLimits, RouterLimits
from moemesh.services.bootstrap import RunningServer
from moemesh.services.telemetry import HOST_ATTRIBUTE, TelemetryConfig, configure_tracing, start_telemetry

from .backend import Backend
from .cli_args import (
    device_args,
    limit_args,
    limits,
    mesh_config,
    metrics_arg,
    model_args,
    otel_env,
    server_config,
    threads_arg,
)


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


async def _serve(spec, ready_file: str | None) -> None:
    """Serve what one `ProcessSpec` describes until SIGINT/SIGTERM; publish the address when bound."""
    from moemesh.services.launch import start_expert_host, start_router

    if spec.expert is not None:
        cfg = spec.expert
        telemetry = start_telemetry(
            TelemetryConfig(
                "moemesh-expert", ((HOST_ATTRIBUTE, cfg.host_id),), cfg.server.host, spec.metrics_port
            )
        )
        running = await start_expert_host(cfg, telemetry=telemetry)
        what, info = f"expert host {cfg.host_id} serving {len(cfg.experts)} experts", {"host_id": cfg.host_id}
    else:
        cfg = spec.router
        telemetry = start_telemetry(TelemetryConfig("moemesh-router", (), cfg.server.host, spec.metrics_port))
        running = await start_router(cfg, telemetry=telemetry)
        what, info = f"router serving {cfg.model} over {len(cfg.hosts)} expert hosts", {}
    _write_ready(ready_file, {"address": running.address, "pid": os.getpid(), **info})
    print(f"{what} on {running.address}", flush=True)
    _print_metrics(telemetry)
    await _serve_until_signal(running.server, running.stop)


def _serve_expert(args: argparse.Namespace) -> int:
    from moemesh.services.launch import ExpertHostConfig

    from .local import ProcessSpec

    config = ExpertHostConfig(
        model=args.model,
        host_id=args.host_id,
        experts=parse_experts(args.experts),
        device=args.device,
        dtype=args.dtype,
        server=server_config(args),
        limits=limits(HostLimits, args),
    )
    asyncio.run(_serve(ProcessSpec(expert=config, metrics_port=args.metrics_port), args.ready_file))
    return 0


def _serve_router(args: argparse.Namespace) -> int:
    from moemesh.services.launch import RouterConfig

    from .local import ProcessSpec

    hosts = tuple(a.strip() for a in args.experts_at.split(",") if a.strip())
    config = RouterConfig(
        model=args.model, hosts=hosts, server=server_config(args), limits=limits(RouterLimits, args)
    )
    asyncio.run(_serve(ProcessSpec(router=config, metrics_port=args.metrics_port), args.ready_file))
    return 0


def _serve_spec(args: argparse.Namespace) -> int:
    import torch

    from .local import ProcessSpec

    spec = ProcessSpec.from_json(Path(args.spec).read_bytes())
    if spec.threads:
        torch.set_num_threads(spec.threads)
    asyncio.run(_serve(spec, args.ready_file))
    return 0


def _print_metrics(telemetry) -> None:
    if telemetry.metrics_server is not None:
        print(f"metrics on {telemetry.metrics_server.url}", flush=True)


def _wait_for_stop(still_up=lambda: True) -> None:
    """Block until SIGINT/SIGTERM, or until `still_up()` turns false (e.g. `moemesh down`)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0) and still_up():
        pass


def _up(args: argparse.Namespace) -> int:
    from moemesh.client import Client

    from .backend import make_backend
    from .report import print_topology

    say = lambda m: print(f"  {m}", flush=True)  # noqa: E731
    configure_tracing("moemesh-cli")  # this process's own calls; the servers configure their own
    mesh = make_backend(args.backend, mesh_config(args), on_event=say).start()
    try:
        with Client(mesh.address) as client:
            print_topology(client.topology())
        if mesh.detached:
            print(f"\nrouter listening on {mesh.address}; `moemesh down` removes the mesh", flush=True)
            return 0
        print(f"\nrouter listening on {mesh.address}; Ctrl-C or `moemesh down` to stop", flush=True)
        _wait_for_stop(mesh.alive)
        print("stopping", flush=True)
    finally:
        if not mesh.detached:
            mesh.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    from moemesh.client import Client

    from .ray_mesh import find_router
    from .report import print_status

    address = args.router or find_router(args.address)
    with Client(address) as client:
        print_status(client.topology(), address)
    return 0


def _down(args: argparse.Namespace) -> int:
    import ray

    from .ray_mesh import NAMESPACE, remove

    ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=False)
    removed = remove(NAMESPACE)
    print(f"removed {len(removed)} actors: {', '.join(removed)}" if removed else "no moemesh actors found")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .plan_command import run_plan

    return run_plan(args.model, args.cluster, args.replicas, args.json)


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    configure_tracing("moemesh-demo")
    fields = ("model", "hosts", "tokens", "batches", "dtype", "device", "seed")
    return run_demo(DemoConfig(*(getattr(args, f) for f in fields), env=otel_env()))  # DemoConfig's order


def _models(args: argparse.Namespace) -> int:
    from moemesh.experts.weights import open_source

    for name in PRESETS:
        spec = open_source(name).spec
        ls = spec.layers[0]
        print(
            f"{name:18s} {spec.family:12s} layers={[x.layer for x in spec.layers]} hidden={ls.hidden_size} "
            f"experts={ls.num_experts} top_k={ls.gate.top_k} shared={ls.shared_intermediate_size > 0}"
        )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import config_from_args, run_bench

    return run_bench(config_from_args(args))


def _trace(args: argparse.Namespace) -> int:
    from .traces import view as trace_view
    from .traces.records import StoreLimits

    if args.trace_command == "serve":
        limits = StoreLimits.from_mb(args.max_spans, args.max_mb)
        return trace_view.serve_receiver(
            args.host, args.port, args.out or None, args.print_traces, limits=limits
        )
    if args.trace_command == "show":
        return trace_view.show_trace(args.file, args.trace_id, args.png)
    return trace_view.list_traces(args.file)


def serve_args(p: argparse.ArgumentParser, run, host: bool) -> None:
    """What serve-expert and serve-router share: their limits, threads, metrics and ready file."""
    limit_args(p, host=host, router=not host)
    threads_arg(p)
    metrics_arg(p)
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moemesh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve-expert", help="serve the FFNs of some experts")
    model_args(p)
    device_args(p)
    p.add_argument("--host-id", required=True, help="stable name of this host in the routing table")
    p.add_argument("--experts", required=True, help="LAYER:FIRST-LAST[+...],... e.g. 0:0-3,1:0-3")
    serve_args(p, _serve_expert, host=True)

    p = sub.add_parser("serve-router", help="serve the router over running expert hosts")
    model_args(p, port_default=50051)
    p.add_argument("--experts-at", required=True, help="comma-separated expert host addresses host:port")
    serve_args(p, _serve_router, host=False)

    p = sub.add_parser(
        "serve", help="serve what a ProcessSpec JSON file describes (used by --backend processes)"
    )
    p.add_argument(
        "--spec", required=True, help="ProcessSpec JSON: an expert host or a router, threads, metrics port"
    )
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.set_defaults(run=_serve_spec)

    p = sub.add_parser("up", help="deploy the mesh on Ray (embedded local instance unless --address)")
    model_args(p, port_default=50051)
    device_args(p)
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (ray://host:10001 or auto); default: start an embedded local Ray",
    )
    p.add_argument("--hosts", type=int, default=3, help="embedded Ray: CPU expert hosts (default: 3)")
    p.add_argument(
        "--devices",
        default=None,
        help="embedded Ray: devices to simulate, e.g. H100:1,A100-80G:2 (compute stays on --device)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="extra replicas of the hottest experts (default: planner's)",
    )
    p.add_argument(
        "--max-restarts", type=int, default=3, help="Ray restarts of a dead expert host (default: 3)"
    )
    p.add_argument(
        "--accelerators",
        default=None,
        help="YAML/JSON overrides of the accelerator table, e.g. {MI300X: {relative_speed: 1.2}}",
    )
    p.add_argument(
        "--backend",
        choices=[b.value for b in Backend],
        default=Backend.RAY.value,
        help="ray (default); processes: one plain OS process per host, no Ray; embedded: all in this process",
    )
    limit_args(p, host=True, router=True)
    metrics_arg(p, " for the router, PORT+1+i for expert host i")
    p.set_defaults(run=_up)

    p = sub.add_parser("status", help="print the running mesh: experts, replicas, nodes, devices, load")
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--router", default=None, help="router host:port (skips the Ray lookup)")
    p.set_defaults(run=_status)

    p = sub.add_parser("down", help="remove the mesh's Ray actors")
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.set_defaults(run=_down)

    p = sub.add_parser("plan", help="print the placement of a model on a cluster description, offline")
    p.add_argument(
        "--model",
        default="tiny-mixtral",
        help="preset, checkpoint directory, or synthetic:layers=1,experts=64,hidden=4096,intermediate=14336",
    )
    p.add_argument("--cluster", required=True, help="cluster YAML/JSON (see deploy/clusters/)")
    p.add_argument("--replicas", type=int, default=None, help="extra replicas of the hottest experts")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=_plan)

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

    p = sub.add_parser(
        "bench", help="tokens/s and latency of the mesh, one process, naive Ray and Ray Serve, side by side"
    )
    p.add_argument(
        "--model",
        default=None,
        help="preset or checkpoint (default: bench-mixtral; overload: medium-mixtral)",
    )
    p.add_argument(
        "--tokens", default=None, help="tokens per request T, comma-separated (default: 1,16,128,512)"
    )
    p.add_argument(
        "--clients", default=None, help="concurrent clients C, comma-separated (default: 1,8,32,128)"
    )
    p.add_argument(
        "--systems",
        default=None,
        help="comma-separated, from single,mesh-processes,mesh-ray,naive-ray,ray-serve (default: all; single always)",
    )
    p.add_argument("--seconds", type=float, default=None, help="window per cell (default: 3; overload: 30)")
    p.add_argument(
        "--hosts", type=int, default=2, help="expert hosts of every distributed system (default: 2)"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="device of single and mesh-processes; Ray systems need cpu (default: cpu)",
    )
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    p.add_argument("--png", default=None, help="draw tokens/s against clients per T into this PNG file")
    p.add_argument(
        "--overload",
        action="store_true",
        help="the overload figure: T=2048, 128 clients with a deadline, goodput vs unloaded (processes mesh)",
    )
    p.add_argument(
        "--deadline", type=float, default=1.0, help="overload: each call's deadline, s (default: 1)"
    )
    p.set_defaults(run=_bench)

    p = sub.add_parser("trace", help="receive OTLP traces and show them, with no other software")
    p.set_defaults(run=_trace)
    trace_sub = p.add_subparsers(dest="trace_command", required=True)
    t = trace_sub.add_parser(
        "serve", help="an OTLP/gRPC trace receiver in the foreground; point OTEL_EXPORTER_OTLP_ENDPOINT at it"
    )
    t.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    t.add_argument("--port", type=int, default=4317, help="port to bind, 0 = any (default: 4317)")
    t.add_argument(
        "--out",
        default="spans.jsonl",
        help="append received spans to this file, '' = none (default: spans.jsonl)",
    )
    t.add_argument(
        "--print",
        dest="print_traces",
        action="store_true",
        help="print each trace's waterfall when it completes",
    )
    t.add_argument(
        "--max-spans",
        type=int,
        default=200_000,
        help="spans kept in memory; over it the least recently updated traces go (default: 200000)",
    )
    t.add_argument(
        "--max-mb",
        type=float,
        default=256,
        help="MiB of spans kept in memory (an estimate), same policy (default: 256)",
    )
    t = trace_sub.add_parser("show", help="print one trace as an indented waterfall (and a PNG timeline)")
    t.add_argument(
        "trace_id", nargs="?", default=None, help="trace id or a unique prefix (default: the latest)"
    )
    t.add_argument(
        "--file", default="spans.jsonl", help="spans written by `trace serve` (default: spans.jsonl)"
    )
    t.add_argument("--png", default=None, help="also draw the trace as a timeline into this PNG file")
    t = trace_sub.add_parser("list", help="one line per trace in a spans file")
    t.add_argument(
        "--file", default="spans.jsonl", help="spans written by `trace serve` (default: spans.jsonl)"
    )
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
    except USER_ERRORS as err:
        # What a user can act on gets one line; --log-level DEBUG shows the traceback.
        if args.log_level == "DEBUG":
            raise
        print(f"moemesh {args.command}: {err}", file=sys.stderr)
        return 1


def _user_errors() -> tuple[type[BaseException], ...]:
    from moemesh.client import MoeMeshError

    return (MoeMeshError, OSError, TimeoutError, ValueError, KeyError)


USER_ERRORS = _user_errors()


if __name__ == "__main__":
    sys.exit(main())
