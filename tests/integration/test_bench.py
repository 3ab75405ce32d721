"""`moemesh bench` as a user runs it, on a tiny layer: every system starts, passes its check against
the single process, and every cell of the grid has a figure. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")

pytestmark = pytest.mark.integration

SYSTEMS = ("single", "mesh-processes", "naive-ray", "ray-serve")


def test_bench_reports_every_cell_of_every_correct_system(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "moemesh.deploy.cli", "bench", "--model", "tiny-mixtral"]
        + ["--tokens", "4", "--clients", "2", "--seconds", "0.3", "--systems", ",".join(SYSTEMS)]
        + ["--json", str(out), "--png", str(tmp_path / "bench.png")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["machine"]["cores"] >= 1 and report["command"].startswith("moemesh bench")
    for name in SYSTEMS:
        check = report["systems"][name]["check"]
        assert check["ok"] and check["max_abs_diff"] <= report["tolerance"], (name, check)

    cells = {(c["system"], c["tokens"], c["clients"]): c for c in report["cells"]}
    # `single` is measured with one caller at every T (the reference), the others at every C.
    assert set(cells) == {("single", 4, 1)} | {(name, 4, 2) for name in SYSTEMS[1:]}
    for key, c in cells.items():
        assert c["tokens_per_s"] > 0 and c["requests"] > 0 and not c["errors"], (key, c)
        assert 0 < c["p50_ms"] <= c["p99_ms"]
        assert c["vs_single"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_overload_reports_goodput_statuses_and_memory(tmp_path):
    out = tmp_path / "overload.json"
    run = subprocess.run(
        [sys.executable, "-m", "moemesh.deploy.cli", "bench", "--overload", "--model", "tiny-mixtral"]
        + ["--tokens", "8", "--clients", "4", "--seconds", "0.5", "--deadline", "5", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["check"]["ok"]
    overload = report["overload"]
    assert (overload["tokens"], overload["clients"], overload["deadline_s"]) == (8, 4, 5.0)
    assert overload["unloaded"]["tokens_per_s"] > 0 and overload["unloaded"]["clients"] == 1
    assert overload["loaded"]["requests"] + sum(overload["loaded"]["errors"].values()) > 0
    assert (
        overload["goodput_ratio"] == overload["loaded"]["tokens_per_s"] / overload["unloaded"]["tokens_per_s"]
    )
    assert set(overload["peak_rss_mb"]) == {"router", "host-0", "host-1"}
    assert all(overload["peak_rss_mb"][p] >= overload["start_rss_mb"][p] > 0 for p in overload["peak_rss_mb"])
