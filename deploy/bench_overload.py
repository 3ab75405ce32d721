"""`moemesh bench --overload`: the mesh (processes backend) under C clients at T tokens with a
deadline on every call, against its own unloaded one-client throughput measured in the same run.

Reports goodput (tokens/s of OK calls) as a ratio to the unloaded throughput, calls per status,
how fast RESOURCE_EXHAUSTED answers come, and the resident memory of the router and each host
before the load and at its peak (VmHWM from /proc; psutil's RSS where /proc is absent).
"""

from __future__ import annotations

import asyncio

import torch

from . import bench_report as report
from .bench import CHECK_TOKENS, BenchConfig, Progress, check, json_head, measure_async


def _rss_mb(pid: int, field_name: str) -> float:
    """VmHWM (peak) or VmRSS (now) of a process from /proc, MiB; psutil's RSS where /proc is absent."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:
        return float("nan")


def run_overload(cfg: BenchConfig, layer: int, hidden_size: int, info: dict, out) -> int:
    """Start the mesh, check it, measure it unloaded and overloaded, print (and write) the figure."""
    from .bench_baselines import Mesh, SingleProcess

    t, c = cfg.tokens[0], cfg.clients[0]
    progress = Progress(1)
    hidden = torch.randn(t, hidden_size)
    progress.show(f"starting the mesh: {cfg.model}, {cfg.hosts} hosts")
    single = SingleProcess(cfg.model, layer, cfg.device)
    mesh = Mesh("processes", cfg.model, layer, cfg.hosts, cfg.device)
    try:
        probe = torch.randn(CHECK_TOKENS, hidden_size)
        verdict = check(mesh, probe, single.forward(probe).to(torch.float32))
        single.close()
        print(f"mesh vs single: {verdict}", file=out, flush=True)
        if not verdict["ok"]:
            return 1
        pids = {"router": mesh.mesh.router.proc.pid, **{ch.name: ch.proc.pid for ch in mesh.mesh.children}}
        progress.show(f"unloaded: 1 client, T={t}")
        quiet = asyncio.run(measure_async(mesh, hidden, 1, min(cfg.seconds, 5.0)))
        start_rss = {name: _rss_mb(pid, "VmRSS") for name, pid in pids.items()}
        progress.show(f"overload: {c} clients, T={t}, deadline {cfg.deadline_s:g} s, {cfg.seconds:g} s")
        loaded = asyncio.run(
            measure_async(mesh, hidden, c, cfg.seconds, timeout=cfg.deadline_s, warmup=False)
        )
        peak_rss = {name: _rss_mb(pid, "VmHWM") for name, pid in pids.items()}
        progress.step("done")
    finally:
        progress.close()
        mesh.close()
    rejected = [lat for status, lat in loaded.outcomes if status == "RESOURCE_EXHAUSTED"]
    result = report.Overload(
        tokens=t,
        clients=c,
        deadline_s=cfg.deadline_s,
        unloaded=report.summarize("mesh-processes", t, 1, quiet.outcomes, quiet.seconds),
        loaded=report.summarize("mesh-processes", t, c, loaded.outcomes, loaded.seconds),
        rejected_p50_ms=report.percentile_ms(rejected, 50),
        rejected_p99_ms=report.percentile_ms(rejected, 99),
        peak_rss_mb=peak_rss,
        start_rss_mb=start_rss,
    )
    print("\n" + report.overload_text(result), file=out, flush=True)
    if cfg.json_path:
        report.write_json(
            cfg.json_path,
            {
                **json_head(cfg, info),
                "check": verdict,
                "overload": report.overload_json(result),
            },
        )
    return 0
