"""`moemesh bench` arithmetic on made-up figures: ratios, the table, the JSON cells, the config."""

from __future__ import annotations

import math

import pytest
import torch

from moemesh.deploy.bench import BenchConfig, cell_order, check, config_from_args
from moemesh.deploy.bench_baselines import SyncSystem
from moemesh.deploy.bench_report import Cell, Overload, cells_json, ratios, summarize, table
from moemesh.deploy.cli import build_parser


def cell(system: str, tokens: int, clients: int, tps: float, **kw) -> Cell:
    return Cell(
        system, tokens, clients, requests=10, seconds=1.0, tokens_per_s=tps, p50_ms=2.0, p99_ms=9.0, **kw
    )


CELLS = [
    cell("single", 16, 1, 1000.0),
    cell("single", 512, 1, 5000.0),
    cell("mesh-processes", 16, 1, 900.0),
    cell("mesh-processes", 16, 32, 4000.0),
    cell("naive-ray", 16, 8, 1500.0),  # T·C = 128: not measured
    cell("ray-serve", 128, 1, 700.0),  # no single at T = 128
]


def test_ratios_to_single_at_same_t_and_at_merged_t():
    r = ratios(CELLS)
    assert r[("single", 16, 1)].vs_single == 1.0 and r[("single", 16, 1)].vs_merged is None
    assert r[("mesh-processes", 16, 1)].vs_single == pytest.approx(0.9)
    assert r[("mesh-processes", 16, 1)].vs_merged is None  # C = 1: no merged batch
    assert r[("mesh-processes", 16, 32)].vs_single == pytest.approx(4.0)
    assert r[("mesh-processes", 16, 32)].vs_merged == pytest.approx(0.8)  # 4000 / single at 512
    assert r[("naive-ray", 16, 8)].vs_single == pytest.approx(1.5)
    assert r[("naive-ray", 16, 8)].vs_merged is None
    assert r[("ray-serve", 128, 1)] == type(r[("ray-serve", 128, 1)])(None, None)


def test_table_rows_in_cell_order_with_ratios():
    lines = table(CELLS).splitlines()
    assert lines[0].startswith("| system | T | C | tokens/s | p50 ms | p99 ms |")
    rows = [[f.strip() for f in line.strip("|").split("|")] for line in lines[2:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("single", "16", "1"),
        ("mesh-processes", "16", "1"),
        ("naive-ray", "16", "8"),
        ("mesh-processes", "16", "32"),
        ("ray-serve", "128", "1"),
        ("single", "512", "1"),
    ]
    mesh32 = rows[3]
    assert mesh32[3:8] == ["4,000", "2.0", "9.0", "4.00×", "0.80×"]


def test_summarize_counts_only_ok_calls_and_keeps_errors():
    outcomes = [("OK", 0.010), ("OK", 0.020), ("OK", 0.030), ("RESOURCE_EXHAUSTED", 0.001)]
    outcomes += [("DEADLINE_EXCEEDED", 1.0)] * 2
    c = summarize("mesh-processes", 100, 4, outcomes, seconds=2.0)
    assert c.requests == 3 and c.tokens_per_s == pytest.approx(150.0)
    assert c.p50_ms == pytest.approx(20.0) and c.p99_ms == pytest.approx(29.8)
    assert c.errors == {"RESOURCE_EXHAUSTED": 1, "DEADLINE_EXCEEDED": 2}
    empty = summarize("naive-ray", 100, 1, [("TimeoutError", 3.0)], seconds=3.0)
    assert empty.tokens_per_s == 0.0 and math.isnan(empty.p50_ms)
    assert "1 TimeoutError" in table([empty])


def test_json_cells_carry_every_figure_and_ratio():
    rows = {(r["system"], r["tokens"], r["clients"]): r for r in cells_json(CELLS)}
    mesh = rows[("mesh-processes", 16, 32)]
    assert mesh["tokens_per_s"] == 4000.0 and mesh["p99_ms"] == 9.0 and mesh["requests"] == 10
    assert mesh["vs_single"] == pytest.approx(4.0) and mesh["vs_single_merged"] == pytest.approx(0.8)


def test_overload_goodput_ratio():
    o = Overload(
        tokens=2048,
        clients=128,
        deadline_s=1.0,
        unloaded=cell("mesh-processes", 2048, 1, 10000.0),
        loaded=cell("mesh-processes", 2048, 128, 8500.0, errors={"RESOURCE_EXHAUSTED": 90}),
        rejected_p50_ms=1.0,
        rejected_p99_ms=4.0,
        peak_rss_mb={"router": 400.0},
        start_rss_mb={"router": 350.0},
    )
    assert o.goodput_ratio == pytest.approx(0.85) and o.calls == 100


def test_config_single_first_and_always_measured_at_one_client():
    cfg = BenchConfig(tokens=(4, 8), clients=(2, 4), systems=("naive-ray", "mesh-processes"))
    assert cfg.systems == ("single", "mesh-processes", "naive-ray")
    plan = cell_order(cfg, cfg.systems)  # system by system, single once per T with one caller
    assert plan[:4] == [
        (4, 1, "single"),
        (8, 1, "single"),
        (4, 2, "mesh-processes"),
        (4, 4, "mesh-processes"),
    ]
    assert plan[-1] == (8, 4, "naive-ray")
    assert len(plan) == 2 * (1 + 2 * 2)
    with pytest.raises(ValueError, match="unknown"):
        BenchConfig(systems=("mesh-grpc",))


@pytest.mark.parametrize("overload", [False, True])
def test_printed_command_repeats_the_run(overload):
    argv = ["bench", "--tokens", "16,128", "--clients", "1,32", "--seconds", "2", "--json", "out.json"]
    argv += ["--overload"] if overload else ["--systems", "mesh-ray"]
    cfg = config_from_args(build_parser().parse_args(argv))
    again = config_from_args(build_parser().parse_args(cfg.command().split()[1:]))
    assert again == cfg
    if overload:
        assert (cfg.model, cfg.tokens, cfg.clients) == ("medium-mixtral", (16,), (1,))


class _Offset(SyncSystem):
    """A made-up system that adds `delta` to the right answer (the identity here)."""

    name, describe = "offset", "identity + delta"

    def __init__(self, delta: float):
        self.delta = delta

    def forward(self, hidden):
        return hidden + self.delta


def test_check_refuses_a_system_beyond_float32_tolerance():
    x = torch.randn(8, 4)
    assert check(_Offset(0.0), x, x)["ok"]
    assert check(_Offset(5e-5), x, x)["ok"]
    wrong = check(_Offset(1e-3), x, x)
    assert not wrong["ok"] and wrong["max_abs_diff"] == pytest.approx(1e-3, rel=1e-2)
