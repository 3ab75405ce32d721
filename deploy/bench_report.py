"""What `moemesh bench` reports: per-cell figures, their ratios to the single process, the table,
the JSON and the plot. Pure arithmetic and formatting; nothing here starts a system.

A cell is one (system, T tokens per request, C concurrent clients) measurement. Ratios are the
headline:

- `vs_single`: tokens/s over the single process's tokens/s at the same T (one caller);
- `vs_merged`: for C > 1, tokens/s over the single process's tokens/s at T·C, when that T was
  measured: the compute limit of the C requests merged into one batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .bench_baselines import SYSTEMS

OK = "OK"


@dataclass(frozen=True)
class Cell:
    """One measurement. tokens: T per request; clients: C concurrent callers; requests: calls that
    returned OK in the window; errors: other outcomes by status name; latencies of OK calls."""

    system: str
    tokens: int
    clients: int
    requests: int
    seconds: float
    tokens_per_s: float
    p50_ms: float
    p99_ms: float
    errors: Mapping[str, int] = field(default_factory=dict)


def percentile_ms(latencies_s: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation) of latencies in seconds, in ms; nan when empty."""
    return float(np.percentile(np.asarray(latencies_s) * 1e3, q)) if len(latencies_s) else float("nan")


def summarize(
    system: str, tokens: int, clients: int, outcomes: Sequence[tuple[str, float]], seconds: float
) -> Cell:
    """outcomes: (status, latency s) per call that finished in a window of `seconds` wall time.
    tokens/s counts only OK calls (goodput)."""
    ok = [lat for status, lat in outcomes if status == OK]
    errors: dict[str, int] = {}
    for status, _ in outcomes:
        if status != OK:
            errors[status] = errors.get(status, 0) + 1
    return Cell(
        system=system,
        tokens=tokens,
        clients=clients,
        requests=len(ok),
        seconds=seconds,
        tokens_per_s=len(ok) * tokens / seconds if seconds > 0 else 0.0,
        p50_ms=percentile_ms(ok, 50),
        p99_ms=percentile_ms(ok, 99),
        errors=errors,
    )


@dataclass(frozen=True)
class Ratios:
    vs_single: float | None  # over single at the same T
    vs_merged: float | None  # over single at T·C (C > 1, when measured)


def ratios(cells: Iterable[Cell]) -> dict[tuple[str, int, int], Ratios]:
    """(system, T, C) -> its ratios to the single process (None where there is no such figure)."""
    cells = list(cells)
    single = {c.tokens: c.tokens_per_s for c in cells if c.system == "single" and c.clients == 1}

    def over(value: float, base: float | None) -> float | None:
        return value / base if base else None

    return {
        (c.system, c.tokens, c.clients): Ratios(
            vs_single=over(c.tokens_per_s, single.get(c.tokens)),
            vs_merged=over(c.tokens_per_s, single.get(c.tokens * c.clients)) if c.clients > 1 else None,
        )
        for c in cells
    }


def _order(cells: Iterable[Cell]) -> list[Cell]:
    rank = {name: i for i, name in enumerate(SYSTEMS)}
    return sorted(cells, key=lambda c: (c.tokens, c.clients, rank.get(c.system, len(rank)), c.system))


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}×"


def _ms(value: float) -> str:
    return "–" if value != value else f"{value:,.1f}"  # nan: no call returned OK


def table(cells: Iterable[Cell]) -> str:
    """A markdown table: one row per cell, grouped by (T, C), systems in SYSTEMS order."""
    cells = _order(cells)
    r = ratios(cells)
    lines = [
        "| system | T | C | tokens/s | p50 ms | p99 ms | × single (T) | × single (T·C) | failed calls |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in cells:
        ratio = r[(c.system, c.tokens, c.clients)]
        failed = ", ".join(f"{n} {status}" for status, n in sorted(c.errors.items()))
        lines.append(
            f"| {c.system} | {c.tokens} | {c.clients} | {c.tokens_per_s:,.0f} | {_ms(c.p50_ms)} | "
            f"{_ms(c.p99_ms)} | {_x(ratio.vs_single)} | {_x(ratio.vs_merged)} | {failed} |"
        )
    return "\n".join(lines)


def cells_json(cells: Iterable[Cell]) -> list[dict]:
    """Every figure of every cell, with its ratios."""
    cells = _order(cells)
    r = ratios(cells)
    return [
        {
            **asdict(c),
            "errors": dict(c.errors),
            "vs_single": r[(c.system, c.tokens, c.clients)].vs_single,
            "vs_single_merged": r[(c.system, c.tokens, c.clients)].vs_merged,
        }
        for c in cells
    ]


def write_json(path: str | Path, report: Mapping) -> None:
    """`report` as JSON (nan as null, so that any JSON reader takes it)."""

    def clean(x):
        if isinstance(x, float) and x != x:
            return None
        if isinstance(x, Mapping):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    Path(path).write_text(json.dumps(clean(report), indent=2) + "\n")


def plot(cells: Iterable[Cell], path: str | Path, title: str) -> None:
    """tokens/s against clients, one panel per T, one line per system; the single process as the
    dashed line at that T and, dotted, at T·C (the merged-batch limit) where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _order(cells)
    token_counts = sorted({c.tokens for c in cells})
    single = {c.tokens: c.tokens_per_s for c in cells if c.system == "single" and c.clients == 1}
    fig, axes = plt.subplots(
        1, len(token_counts), figsize=(4.2 * len(token_counts), 3.8), squeeze=False, sharey=False
    )
    for ax, t in zip(axes[0], token_counts, strict=True):
        here = [c for c in cells if c.tokens == t]
        clients = sorted({c.clients for c in here})
        for name in dict.fromkeys(c.system for c in here if c.system != "single"):
            pts = sorted((c.clients, c.tokens_per_s) for c in here if c.system == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if t in single:
            ax.axhline(single[t], color="black", linestyle="--", linewidth=1, label="single (T)")
        merged = [(c, single[t * c]) for c in clients if c > 1 and t * c in single]
        if merged:
            ax.plot(*zip(*merged), color="gray", linestyle=":", marker="x", label="single (T·C)")
        ax.set_ylim(bottom=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_title(f"T = {t} tokens per request")
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("tokens/s")
    legend = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=len(legend), fontsize="small")
    fig.suptitle(title, fontsize="small")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class Overload:
    """The overload figure: goodput under C clients at T with a deadline, against one client unloaded."""

    tokens: int
    clients: int
    deadline_s: float
    unloaded: Cell  # one client, sequential, no deadline
    loaded: Cell  # C clients, each call with the deadline
    rejected_p50_ms: float  # latency of RESOURCE_EXHAUSTED answers
    rejected_p99_ms: float
    peak_rss_mb: Mapping[str, float]  # process name -> peak resident set, MiB
    start_rss_mb: Mapping[str, float]  # process name -> resident set before the load, MiB

    @property
    def goodput_ratio(self) -> float:
        base = self.unloaded.tokens_per_s
        return self.loaded.tokens_per_s / base if base else float("nan")

    @property
    def calls(self) -> int:
        return self.loaded.requests + sum(self.loaded.errors.values())


def overload_text(o: Overload) -> str:
    loaded, calls = o.loaded, max(o.calls, 1)
    counts = {OK: loaded.requests, **loaded.errors}
    lines = [
        f"unloaded, 1 client, T={o.tokens}: {o.unloaded.tokens_per_s:,.0f} tokens/s "
        f"(p50 {_ms(o.unloaded.p50_ms)} ms)",
        f"{o.clients} clients, T={o.tokens}, deadline {o.deadline_s:g} s, {loaded.seconds:.1f} s: "
        f"goodput {loaded.tokens_per_s:,.0f} tokens/s = {o.goodput_ratio:.2f}× unloaded",
        "calls: " + ", ".join(f"{status} {n} ({n / calls:.1%})" for status, n in sorted(counts.items())),
        f"OK latency p50 {_ms(loaded.p50_ms)} ms, p99 {_ms(loaded.p99_ms)} ms; "
        f"RESOURCE_EXHAUSTED answered in p50 {_ms(o.rejected_p50_ms)} ms, p99 {_ms(o.rejected_p99_ms)} ms",
        "resident memory, MiB (before load → peak): "
        + ", ".join(
            f"{name} {o.start_rss_mb.get(name, float('nan')):,.0f} → {peak:,.0f}"
            for name, peak in o.peak_rss_mb.items()
        ),
    ]
    return "\n".join(lines)


def overload_json(o: Overload) -> dict:
    return {
        "tokens": o.tokens,
        "clients": o.clients,
        "deadline_s": o.deadline_s,
        "unloaded": {**asdict(o.unloaded), "errors": dict(o.unloaded.errors)},
        "loaded": {**asdict(o.loaded), "errors": dict(o.loaded.errors)},
        "goodput_ratio": o.goodput_ratio,
        "rejected_p50_ms": o.rejected_p50_ms,
        "rejected_p99_ms": o.rejected_p99_ms,
        "peak_rss_mb": dict(o.peak_rss_mb),
        "start_rss_mb": dict(o.start_rss_mb),
    }
