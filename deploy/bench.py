"""`moemesh bench`: the mesh next to the single process and the plain alternatives, in one run on one
machine, on the same weights (systems: bench_baselines.py; figures and ratios: bench_report.py).

    start systems ─▶ check each against `single` (max |Δ| ≤ 1e-4, float32) ─▶ for every T, C:
    every system in turn: warm-up (one call per client) ─▶ C clients back to back for `seconds`
    ─▶ table (ratios to single), JSON, PNG

A cell's window lasts `seconds`, then every client finishes the call it has started; tokens/s is
the tokens of OK calls over the whole window including that drain, so a cell whose calls are long
lasts longer than `seconds`. `single` runs one caller only (C = 1): it computes one request at a
time, more callers would only queue.

`--overload`: the mesh (processes backend) under C clients at T with a deadline, against its own
unloaded one-client throughput measured in the same run; goodput, calls per status, how fast a
RESOURCE_EXHAUSTED answer comes, peak resident memory of the router and hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import random
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from moemesh.experts.weights import open_source

from . import bench_report as report
from .bench_baselines import RAY_SYSTEMS, SYSTEMS, AsyncSystem, SyncSystem, start_ray, start_system, stop_ray

TOLERANCE = 1e-4  # float32: same math, different summation order
CHECK_TOKENS = 64
OVERLOAD_MODEL, OVERLOAD_TOKENS, OVERLOAD_CLIENTS, OVERLOAD_SECONDS = "medium-mixtral", 2048, 128, 30.0


@dataclass(frozen=True)
class BenchConfig:
    """Parsed once by the CLI. tokens / clients: the grid of T and C; seconds: each cell's window."""

    model: str = "bench-mixtral"
    tokens: tuple[int, ...] = (1, 16, 128, 512)
    clients: tuple[int, ...] = (1, 8, 32, 128)
    systems: tuple[str, ...] = SYSTEMS
    seconds: float = 3.0
    hosts: int = 2
    device: str = "cpu"
    json_path: str | None = None
    png_path: str | None = None
    overload: bool = False
    deadline_s: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
        if not self.tokens or min(self.tokens) < 1 or not self.clients or min(self.clients) < 1:
            raise ValueError("--tokens and --clients take positive integers, e.g. 1,16,128")
        if self.seconds <= 0 or self.hosts < 1 or self.deadline_s <= 0:
            raise ValueError("--seconds, --hosts and --deadline must be positive")
        if self.device != "cpu" and not self.overload and any(s in RAY_SYSTEMS for s in self.systems):
            raise ValueError(
                f"--device {self.device}: only single and mesh-processes run off the CPU here "
                "(pass --systems single,mesh-processes)"
            )
        # `single` is the reference of every check and ratio: always measured, always first.
        systems = ("single", *(s for s in SYSTEMS if s in self.systems and s != "single"))
        object.__setattr__(self, "systems", systems)

    def command(self) -> str:
        """The exact command that repeats this run, every setting spelled out."""
        ints = lambda xs: ",".join(map(str, xs))  # noqa: E731
        q = shlex.quote
        if self.overload:
            parts = ["moemesh bench --overload", f"--model {q(self.model)}", f"--hosts {self.hosts}"]
            parts += [f"--tokens {self.tokens[0]}", f"--clients {self.clients[0]}"]
            parts += [f"--seconds {self.seconds:g}", f"--deadline {self.deadline_s:g}"]
        else:
            parts = ["moemesh bench", f"--model {q(self.model)}", f"--hosts {self.hosts}"]
            parts += [f"--tokens {ints(self.tokens)}", f"--clients {ints(self.clients)}"]
            parts += [f"--systems {','.join(self.systems)}", f"--seconds {self.seconds:g}"]
        if self.device != "cpu":
            parts.append(f"--device {self.device}")
        parts += [f"--json {q(self.json_path)}"] if self.json_path else []
        parts += [f"--png {q(self.png_path)}"] if self.png_path else []
        return " ".join(parts)


def machine() -> dict:
    """What the figures depend on: cores, torch threads, CPU model, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class Progress:
    """One line on stderr, rewritten in place on a terminal (a line per step otherwise)."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream, self.t0 = total, 0, stream, time.monotonic()
        self.tty = stream.isatty()

    def show(self, what: str) -> None:
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{time.monotonic() - self.t0:5.0f}s  {what}"
        )
        self.stream.write(f"\r{line:<100}" if self.tty else line + "\n")
        self.stream.flush()

    def step(self, what: str = "") -> None:
        self.done += 1
        self.show(what)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# -- measuring -----------------------------------------------------------------------------------


@dataclass
class Window:
    """What one cell's clients saw: (status, latency s) per call, and the window's wall time."""

    outcomes: list[tuple[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _status(err: BaseException) -> str:
    code = getattr(err, "code", None)  # moemesh.client.MoeMeshError
    if code is not None and hasattr(code, "name"):
        return code.name
    return "DEADLINE_EXCEEDED" if isinstance(err, asyncio.TimeoutError) else type(err).__name__


BACKOFF_MULTIPLIER, MAX_BACKOFF_S = 2.0, 2.0


def json_head(cfg: BenchConfig, info: dict) -> dict:
    """What every JSON report starts with: the machine, the command that repeats the run, the model."""
    return {"machine": info, "command": cfg.command(), "model": cfg.model, "hosts": cfg.hosts}


def backoff(hint_s: float, refused: int, rng: random.Random) -> float:
    """How long a client waits after its `refused`-th refusal in a row: the server's hint, doubled
    for every further refusal (capped), with ±50% jitter so that clients do not come back together
    (gRFC A6: exponential backoff with jitter, the server's pushback as the base)."""
    return min(hint_s * BACKOFF_MULTIPLIER ** (refused - 1), MAX_BACKOFF_S) * rng.uniform(0.5, 1.5)


def measure_sync(
    forward: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, clients: int, seconds: float
) -> Window:
    """`clients` threads, each calling `forward` back to back for `seconds` after one warm-up call
    each, all at once."""
    window, lock = Window(), threading.Lock()
    bounds = [0.0, 0.0]  # window start, end: set once every client is warm, before any measures

    def open_window() -> None:
        bounds[0] = time.perf_counter()
        bounds[1] = bounds[0] + seconds

    start = threading.Barrier(clients, action=open_window)

    def client() -> None:
        with contextlib.suppress(Exception):  # a failed warm-up is counted when it recurs
            forward(hidden)  # warm-up
        start.wait()
        while time.perf_counter() < bounds[1]:
            t = time.perf_counter()
            try:
                forward(hidden)
                status = report.OK
            except Exception as err:
                status = _status(err)
            with lock:
                window.outcomes.append((status, time.perf_counter() - t))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    window.seconds = time.perf_counter() - bounds[0]
    return window


async def measure_async(
    system: AsyncSystem,
    hidden: torch.Tensor,
    clients: int,
    seconds: float,
    timeout: float | None = None,
    warmup: bool = True,
) -> Window:
    """`clients` asyncio tasks, each awaiting calls back to back for `seconds` (after one warm-up call
    each, all at once); after a refusal with a retry hint (RESOURCE_EXHAUSTED) a client backs off
    first (`backoff`), as gRPC clients with a retry policy do. `timeout`: every call's deadline."""
    window = Window()
    async with system.session() as call:
        if warmup:
            # A refused warm-up call is counted when it happens again in the window.
            await asyncio.gather(*(call(hidden, None) for _ in range(clients)), return_exceptions=True)
        t0 = time.perf_counter()
        end = t0 + seconds

        async def client(seed: int) -> None:
            jitter, refused = random.Random(seed), 0
            while time.perf_counter() < end:
                t = time.perf_counter()
                pause = 0.0
                try:
                    await call(hidden, timeout)
                    status, refused = report.OK, 0
                except Exception as err:
                    status = _status(err)
                    hint = getattr(err, "retry_after_s", None)
                    if hint is not None:  # refused for now: back off as gRPC's retry policy does
                        refused += 1
                        pause = backoff(hint, refused, jitter)
                window.outcomes.append((status, time.perf_counter() - t))
                if pause:
                    await asyncio.sleep(min(pause, max(0.0, end - time.perf_counter())))

        await asyncio.gather(*(client(i) for i in range(clients)))
        window.seconds = time.perf_counter() - t0
    return window


def measure(system, hidden: torch.Tensor, clients: int, seconds: float) -> Window:
    if isinstance(system, SyncSystem):
        return measure_sync(system.forward, hidden, clients, seconds)
    return asyncio.run(measure_async(system, hidden, clients, seconds))


def one_call(system, hidden: torch.Tensor) -> torch.Tensor:
    if isinstance(system, SyncSystem):
        return system.forward(hidden)

    async def go() -> torch.Tensor:
        async with system.session() as call:
            return await call(hidden, None)

    return asyncio.run(go())


def check(system, hidden: torch.Tensor, expected: torch.Tensor) -> dict:
    """The system's output for `hidden` against the single process's: max |Δ| and whether it passes."""
    try:
        got = one_call(system, hidden)
        diff = (got.to(torch.float32) - expected).abs().max().item()
        return {"max_abs_diff": diff, "ok": bool(diff <= TOLERANCE), "tolerance": TOLERANCE}
    except Exception as err:
        return {"max_abs_diff": None, "ok": False, "error": f"{type(err).__name__}: {err}"}


# -- the run -------------------------------------------------------------------------------------


def _start(cfg: BenchConfig, name: str, layer: int, say: Callable[[str], None]):
    """System `name`, started; None (reported) when a baseline fails to start."""
    say(f"starting {name}")
    try:
        return start_system(name, cfg.model, layer, cfg.hosts, max(cfg.clients), cfg.device)
    except Exception as err:
        if name == "single":
            raise
        print(f"{name}: failed to start ({type(err).__name__}: {err}); left out", file=sys.stderr)
        return None


def _close(name: str, system) -> None:
    try:
        system.close()
    except Exception as err:
        print(f"{name}: failed to stop cleanly ({type(err).__name__}: {err})", file=sys.stderr)


def run_bench(cfg: BenchConfig, out=sys.stdout) -> int:
    """Run the grid (or the overload figure), print the report; 0 when every system was correct."""
    torch.manual_seed(cfg.seed)
    source = open_source(cfg.model)
    layer = source.spec.layers[0].layer
    hidden_size = source.spec.layers[0].hidden_size
    info = machine()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with "
        f"{info['torch_threads']} threads{', GPU ' + info['gpu'] if 'gpu' in info else ''}",
        file=out,
    )
    print(f"command: {cfg.command()}", file=out)
    ls = source.spec.layers[0]
    print(
        f"model: {cfg.model} layer {layer}: hidden {ls.hidden_size}, FFN {ls.intermediate_size}, "
        f"{ls.num_experts} experts, top-{ls.gate.top_k}, float32, {cfg.hosts} expert hosts",
        file=out,
        flush=True,
    )
    if cfg.overload:
        from .bench_overload import run_overload

        return run_overload(cfg, layer, hidden_size, info, out)
    progress = Progress(len(cfg.systems) + len(cell_order(cfg, cfg.systems)))
    checks: dict[str, dict] = {}
    describe: dict[str, str] = {}
    cells: list[report.Cell] = []
    probe = torch.randn(CHECK_TOKENS, hidden_size, generator=torch.Generator().manual_seed(cfg.seed))
    hidden = {t: torch.randn(t, hidden_size) for t in cfg.tokens}
    expected = None
    ray_up = False
    try:
        # One system at a time, alone on the machine (nothing of another system idles beside it),
        # `single` first: its output is what every other system is checked against.
        for name in cfg.systems:
            if name in RAY_SYSTEMS and not ray_up:
                progress.show("starting a local Ray")
                start_ray(cfg.hosts)
                ray_up = True
            system = _start(cfg, name, layer, progress.show)
            if system is None:
                continue
            try:
                describe[name] = getattr(system, "describe", "")
                if expected is None:
                    expected = one_call(system, probe).to(torch.float32)
                checks[name] = check(system, probe, expected)
                progress.step(f"checked {name}")
                if checks[name]["ok"]:
                    cells += _cells(cfg, name, system, hidden, progress)
            finally:
                _close(name, system)
    finally:
        progress.close()
        if ray_up:
            stop_ray()

    for name in cfg.systems:
        c = checks.get(name, {"ok": False})
        verdict = "ok" if c["ok"] else "WRONG, not reported" if name in checks else "did not start"
        detail = f"max |Δ| vs single {c['max_abs_diff']:.1e}" if c.get("max_abs_diff") is not None else ""
        print(f"  {name:15s} {verdict:20s} {detail} {c.get('error', '')}".rstrip(), file=out)
    print("\n" + report.table(cells), file=out, flush=True)
    if cfg.json_path:
        report.write_json(
            cfg.json_path,
            {
                **json_head(cfg, info),
                "tolerance": TOLERANCE,
                "systems": {
                    n: {"describe": describe.get(n, ""), "check": checks.get(n)} for n in cfg.systems
                },
                "cells": report.cells_json(cells),
            },
        )
    if cfg.png_path:
        report.plot(cells, cfg.png_path, f"{cfg.model}, {cfg.hosts} hosts — {info['cores']} cores")
    return 0 if all(checks.get(n, {}).get("ok") for n in cfg.systems) else 1


def cell_order(cfg: BenchConfig, systems: Sequence[str]) -> list[tuple[int, int, str]]:
    """(T, C, system) in the order measured: system by system, each alone on the machine; `single`
    once per T with one caller (the reference of every ratio, whatever C the grid holds)."""
    return [
        (t, c, name)
        for name in systems
        for t in cfg.tokens
        for c in ((1,) if name == "single" else cfg.clients)
    ]


def _cells(cfg: BenchConfig, name: str, system, hidden: dict, progress: Progress) -> list[report.Cell]:
    cells = []
    for t, c, _ in cell_order(cfg, [name]):
        progress.show(f"{name} T={t} C={c}")
        window = measure(system, hidden[t], c, cfg.seconds)
        cells.append(report.summarize(name, t, c, window.outcomes, window.seconds))
        progress.step(f"{name} T={t} C={c}: {cells[-1].tokens_per_s:,.0f} tokens/s")
    return cells


def config_from_args(args) -> BenchConfig:
    """The typed config of `moemesh bench` from its parsed flags (overload defaults where unset)."""

    def ints(text: str | None, default: Sequence[int]) -> tuple[int, ...]:
        if text is None:
            return tuple(default)
        try:
            return tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise SystemExit(f"moemesh bench: expected comma-separated integers, got {text!r}") from None

    base = BenchConfig()
    overload = bool(args.overload)
    try:
        cfg = BenchConfig(
            model=args.model or (OVERLOAD_MODEL if overload else base.model),
            tokens=ints(args.tokens, (OVERLOAD_TOKENS,) if overload else base.tokens),
            clients=ints(args.clients, (OVERLOAD_CLIENTS,) if overload else base.clients),
            systems=tuple(s.strip() for s in args.systems.split(",") if s.strip())
            if args.systems
            else SYSTEMS,
            seconds=args.seconds or (OVERLOAD_SECONDS if overload else base.seconds),
            hosts=args.hosts,
            device=args.device,
            json_path=args.json,
            png_path=args.png,
            overload=overload,
            deadline_s=args.deadline,
        )
    except ValueError as err:
        raise SystemExit(f"moemesh bench: {err}") from None
    return replace(cfg, tokens=cfg.tokens[:1], clients=cfg.clients[:1]) if overload else cfg
