"""`moemesh trace`: look at traces without any other software.

This module owns how a trace is shown and the plain functions the CLI calls:

- `span_tree` / `waterfall_rows`: the spans of a trace in tree order (children under their
  parent, by start time), with depth, offset from the trace start and duration;
- `waterfall(spans) -> str`: that tree as indented text, one line per span (name, service@host,
  start offset, duration, a bar showing where the span sits in the trace, key attributes);
- `render_png(spans, path)`: the same tree as a timeline (Gantt) image, one row per span,
  coloured by service (matplotlib, imported only when a PNG is asked for);
- `serve_receiver`, `show_trace`, `list_traces`: the `moemesh trace` subcommands.

Spans are `records.SpanRecord`s, received live (`receiver`) or loaded from the .jsonl file that
`serve_receiver --out` writes. To use Jaeger or Tempo instead, point the processes'
OTEL_EXPORTER_OTLP_ENDPOINT at that backend's OTLP/gRPC port; nothing here is then needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from moemesh.services.telemetry import HOST_ATTRIBUTE

from .receiver import start_receiver
from .records import SpanRecord, StoreLimits, TraceStore, TraceSummary, load_jsonl

BAR_FILL = "█"
# Shown in the waterfall's attribute column, in this order; the rest stays in the .jsonl.
KEY_PREFIXES = ("moemesh.", "rpc.")
# Said by the span name or the service@host column already (gRPC semantic conventions name RPC
# spans "service/method"), or the same on every server span (the gRPC library's user agent).
REDUNDANT_ATTRIBUTES = frozenset(
    {"rpc.system", "rpc.service", "rpc.method", "rpc.user_agent", HOST_ATTRIBUTE}
)

NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class TreeRow:
    """A span at its place in the tree. orphan: its parent is not among the spans given."""

    span: SpanRecord
    depth: int
    orphan: bool


@dataclass(frozen=True)
class WaterfallRow:
    """One line of a waterfall: a tree row plus its times relative to its trace's first span."""

    span: SpanRecord
    depth: int
    orphan: bool
    offset_ms: float
    duration_ms: float
    trace_duration_ms: float


def _by_start(s: SpanRecord) -> tuple[int, int, str]:
    # Ties: the longer span first, so that a parent that starts with its child stays above it.
    return (s.start_ns, -s.end_ns, s.name)


def _group_by_trace(spans: Iterable[SpanRecord]) -> list[list[SpanRecord]]:
    """Spans per trace, traces ordered by their first span."""
    groups: dict[str, list[SpanRecord]] = {}
    for s in spans:
        groups.setdefault(s.trace_id, []).append(s)
    return sorted(groups.values(), key=lambda g: min(s.start_ns for s in g))


def _walk(
    top: SpanRecord, children: Mapping[str, list[SpanRecord]], seen: set[str], rows: list[TreeRow]
) -> None:
    """Append `top` and everything under it to `rows`, depth first, children by start time."""
    # Iterative: a deep trace must not hit the recursion limit.
    stack = [(top, 0)]
    while stack:
        span, depth = stack.pop()
        if span.span_id in seen:
            continue
        seen.add(span.span_id)
        rows.append(TreeRow(span, depth, orphan=depth == 0 and span.parent_span_id is not None))
        kids = sorted(children.get(span.span_id, ()), key=_by_start)
        stack.extend((k, depth + 1) for k in reversed(kids))


def span_tree(spans: Iterable[SpanRecord]) -> list[TreeRow]:
    """Spans in tree order: each trace's roots and orphans by start time, each followed by its
    children (by start time), depth first. Several traces come one after another.

    Every span appears exactly once, even with a corrupt parent cycle (shown as orphans).
    """
    rows: list[TreeRow] = []
    for group in _group_by_trace(spans):
        by_id = {s.span_id: s for s in group}
        children: dict[str, list[SpanRecord]] = {}
        for s in group:
            if s.parent_span_id is not None and s.parent_span_id in by_id:
                children.setdefault(s.parent_span_id, []).append(s)
        tops = sorted(
            (s for s in group if s.parent_span_id is None or s.parent_span_id not in by_id), key=_by_start
        )
        seen: set[str] = set()
        for top in tops:
            _walk(top, children, seen, rows)
        # Spans only reachable through a parent cycle: show them rather than drop them.
        for s in sorted(group, key=_by_start):
            if s.span_id not in seen:
                _walk(s, children, seen, rows)
    return rows


def waterfall_rows(spans: Iterable[SpanRecord]) -> list[WaterfallRow]:
    """`span_tree` with each span's start offset and duration in ms, relative to the earliest
    span of its own trace."""
    spans = list(spans)
    bounds: dict[str, tuple[int, int]] = {}
    for s in spans:
        lo, hi = bounds.get(s.trace_id, (s.start_ns, s.end_ns))
        bounds[s.trace_id] = (min(lo, s.start_ns), max(hi, s.end_ns))
    out = []
    for row in span_tree(spans):
        lo, hi = bounds[row.span.trace_id]
        out.append(
            WaterfallRow(
                span=row.span,
                depth=row.depth,
                orphan=row.orphan,
                offset_ms=(row.span.start_ns - lo) / NS_PER_MS,
                duration_ms=row.span.duration_ns / NS_PER_MS,
                trace_duration_ms=max(0, hi - lo) / NS_PER_MS,
            )
        )
    return out


def timeline_bar(offset_ms: float, duration_ms: float, total_ms: float, width: int = 30) -> str:
    """`width` characters; the filled cells cover [offset, offset + duration] of [0, total].

    A span always gets at least one cell, so that short hops remain visible.
    """
    if total_ms <= 0:
        return BAR_FILL * width
    first = min(width - 1, max(0, int(offset_ms / total_ms * width)))
    # The epsilon keeps float noise (15.000000001) from spilling a span into the next cell.
    last = min(width, max(first + 1, math.ceil((offset_ms + duration_ms) / total_ms * width - 1e-9)))
    return " " * first + BAR_FILL * (last - first) + " " * (width - last)


def span_host(span: SpanRecord) -> str:
    """`service@host`: the resource's service.name and the moemesh.host attribute (span first,
    then resource) when there is one."""
    host = span.attributes.get(HOST_ATTRIBUTE, span.resource.get(HOST_ATTRIBUTE))
    service = span.service_name or "?"
    return f"{service}@{host}" if host not in (None, "") else service


def _short(value: Any, limit: int = 32) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, tuple | list):
        text = "[" + ",".join(_short(v, limit) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ",".join(f"{k}:{_short(v, limit)}" for k, v in value.items()) + "}"
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def key_attributes(span: SpanRecord, max_chars: int = 100) -> str:
    """The attributes worth a glance, compact: `moemesh.*` (prefix dropped), then `rpc.*`, and
    the error status first when there is one; cut at `max_chars` with `…`."""
    parts: list[str] = []
    if span.status_code == "ERROR":
        parts.append(f"ERROR({_short(span.status_message, 40)})" if span.status_message else "ERROR")
    for prefix in KEY_PREFIXES:
        for key, value in span.attributes.items():
            if not key.startswith(prefix) or key in REDUNDANT_ATTRIBUTES:
                continue
            shown = key.removeprefix("moemesh.")
            parts.append(f"{shown}={_short(value)}")
    text = " ".join(parts)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _trace_header(rows: Sequence[WaterfallRow]) -> str:
    top = rows[0]
    services = sorted({r.span.service_name for r in rows if r.span.service_name})
    errors = sum(r.span.status_code == "ERROR" for r in rows)
    err = f" · {errors} errors" if errors else ""
    return (
        f"trace {top.span.trace_id} · {top.span.name} · {len(rows)} spans · "
        f"{len(services)} services · {top.trace_duration_ms:.3f} ms{err}"
    )


def waterfall(
    spans: Iterable[SpanRecord], *, bar_width: int = 30, max_attr_chars: int = 100, max_name_chars: int = 60
) -> str:
    """The spans as indented text, one trace after another:

        trace 4bf9… · moemesh.forward · 7 spans · 3 services · 41.230 ms
        span                       service@host     start ms     dur ms  timeline  attributes
        moemesh.forward            client              0.000     41.230  |██████|  layer=0 tokens=48
          moemesh.v1.Router/Forward router            0.410     39.800  | ████ |  rpc.grpc.status_code=0

    Children sit two spaces under their parent; a span whose parent is missing is at the top
    level and marked `(orphan)`. Offsets count from the trace's earliest span.
    """
    rows = waterfall_rows(spans)
    if not rows:
        return "(no spans)"
    labels = ["  " * r.depth + r.span.name + (" (orphan)" if r.orphan else "") for r in rows]
    name_w = min(max_name_chars, max(len("span"), *(len(x) for x in labels)))
    hosts = [span_host(r.span) for r in rows]
    host_w = min(28, max(len("service@host"), *(len(h) for h in hosts)))
    head = f"{'span':<{name_w}}  {'service@host':<{host_w}}  {'start ms':>10}  {'dur ms':>10}  {'timeline':<{bar_width + 2}}  attributes"
    lines: list[str] = []
    for i, (row, label, host) in enumerate(zip(rows, labels, hosts)):
        if i == 0 or row.span.trace_id != rows[i - 1].span.trace_id:
            if lines:
                lines.append("")
            lines.append(_trace_header([r for r in rows if r.span.trace_id == row.span.trace_id]))
            lines.append(head)
        bar = timeline_bar(row.offset_ms, row.duration_ms, row.trace_duration_ms, bar_width)
        line = (
            f"{_cut(label, name_w):<{name_w}}  {_cut(host, host_w):<{host_w}}  "
            f"{row.offset_ms:>10.3f}  {row.duration_ms:>10.3f}  |{bar}|  "
            f"{key_attributes(row.span, max_attr_chars)}"
        )
        lines.append(line.rstrip())
    return "\n".join(lines)


def summary_line(summary: TraceSummary) -> str:
    """One line per trace: start time, id, root, spans, errors, duration, services."""
    when = datetime.fromtimestamp(summary.start_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    root = summary.root_name if summary.has_root else f"{summary.root_name} (no root)"
    errors = f" {summary.error_count} errors" if summary.error_count else ""
    return (
        f"{when}  {summary.trace_id}  {summary.span_count:4d} spans{errors}  "
        f"{summary.duration_ns / NS_PER_MS:10.3f} ms  {root}  [{', '.join(summary.services)}]"
    )


def render_png(
    spans: Iterable[SpanRecord],
    path: str | Path,
    title: str | None = None,
    *,
    width_px: int = 1200,
    dpi: int = 100,
) -> Path:
    """Draw the spans as a timeline: one row per span in tree order (top to bottom), a bar from
    its start to its end in ms from the earliest span, coloured by service, error spans hatched.

    The image is `width_px` wide; its height grows with the number of spans.
    Needs matplotlib (Agg, no display); raises ImportError naming the package otherwise.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as err:
        raise ImportError("writing a PNG needs matplotlib: pip install matplotlib") from err

    rows = span_tree(spans)
    if not rows:
        raise ValueError("no spans to draw")
    t0 = min(r.span.start_ns for r in rows)
    services = list(dict.fromkeys(r.span.service_name or "?" for r in rows))
    palette = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b",
        "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#d62728",
    ]  # fmt: skip
    colour = {svc: palette[i % len(palette)] for i, svc in enumerate(services)}

    # An Agg canvas on a bare Figure: no pyplot, so no global backend switch and no GUI.
    # Height: ~0.28 in per row plus room for title and axis; capped below Agg's size limit.
    height_in = min(1.6 + 0.28 * len(rows), 30000 / dpi)
    fig = Figure(figsize=(width_px / dpi, height_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = list(range(len(rows)))
    starts = [(r.span.start_ns - t0) / NS_PER_MS for r in rows]
    widths = [r.span.duration_ns / NS_PER_MS for r in rows]
    total = max(s + w for s, w in zip(starts, widths)) or 1.0
    bars = ax.barh(
        y,
        widths,
        left=starts,
        height=0.7,
        color=[colour[r.span.service_name or "?"] for r in rows],
        edgecolor=["#d62728" if r.span.status_code == "ERROR" else "none" for r in rows],
        linewidth=1.2,
    )
    for bar, row in zip(bars, rows):
        if row.span.status_code == "ERROR":
            bar.set_hatch("//")
    for yi, s, w in zip(y, starts, widths):
        ax.text(s + w + total * 0.005, yi, f"{w:.2f} ms", va="center", fontsize=7)
    names = [_cut("  " * r.depth + r.span.name + (" (orphan)" if r.orphan else ""), 48) for r in rows]
    name_w = max(len(n) for n in names)
    labels = [f"{n:<{name_w}}  {_cut(span_host(r.span), 24)}" for n, r in zip(names, rows)]
    # Left-aligned monospace labels so that the indentation shows the tree; the pad (points)
    # pushes them left by the widest label (a monospace character is ~0.6 em wide).
    ax.set_yticks(y, labels, fontsize=7, family="monospace", ha="left")
    ax.tick_params(axis="y", pad=8 + 0.62 * 7 * max(len(x) for x in labels))
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first span on top
    ax.set_xlim(0, total * 1.12)  # room for the duration labels of the last spans
    ax.set_xlabel("ms from trace start")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(
        handles=[Patch(color=colour[s], label=s) for s in services],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),  # outside the axes: never over a bar
        fontsize=7,
        title="service",
        title_fontsize=7,
    )
    if title is None:
        first = rows[0].span
        title = f"trace {first.trace_id[:16]}… · {first.name} · {len(rows)} spans · {total:.2f} ms"
    ax.set_title(title, fontsize=9)
    path = Path(path)
    # No bbox_inches="tight": it would change the image size away from width_px.
    fig.savefig(path, dpi=dpi, format="png")
    return path


def select_trace(store: TraceStore, trace_id: str | None = None) -> str:
    """The trace id that `trace_id` names: an exact id or a unique prefix (case-insensitive);
    None picks the trace that started last. Raises LookupError saying why none fits."""
    traces = store.traces()
    if not traces:
        raise LookupError("no traces")
    if trace_id is None:
        return max(traces, key=lambda t: t.start_ns).trace_id
    want = trace_id.strip().lower()
    ids = [t.trace_id for t in traces]
    if want in ids:
        return want
    hits = [i for i in ids if i.startswith(want)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise LookupError(f"no trace id starts with {want!r} ({len(ids)} traces)")
    shown = ", ".join(h[: len(want) + 4] + "…" for h in hits[:5])
    raise LookupError(f"{want!r} is the start of {len(hits)} trace ids ({shown}); give more digits")


def traces_to_report(
    last_received: Mapping[str, float],
    span_counts: Mapping[str, int],
    reported: Mapping[str, int],
    now: float,
    idle_s: float,
) -> list[str]:
    """Trace ids that went quiet (no span for `idle_s`) with spans not reported yet (a trace is
    reported again when late spans arrive), in the order they went quiet."""
    due = [
        tid
        for tid, t in last_received.items()
        if now - t >= idle_s and span_counts.get(tid, 0) != reported.get(tid, 0)
    ]
    return sorted(due, key=lambda tid: last_received[tid])


def _report(store: TraceStore, reported: dict[str, int], print_traces: bool, quiet_before: float) -> None:
    counts = store.span_counts()  # every trace; only those to report are summarised
    for tid in reported.keys() - counts.keys():  # dropped from the bounded store
        del reported[tid]
    for tid in traces_to_report(store.last_received(), counts, reported, quiet_before, 0.0):
        again = " (updated)" if tid in reported else ""
        print(summary_line(store.summary(tid)) + again, flush=not print_traces)
        reported[tid] = counts[tid]
        if print_traces:
            print(waterfall(store.spans(tid)) + "\n", flush=True)


async def _serve(
    host: str, port: int, jsonl_path: str | None, print_traces: bool, idle_s: float, limits: StoreLimits
) -> int:
    server, bound, store = await start_receiver(host, port, TraceStore(limits), jsonl_path)
    shown_host = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    print(
        f"OTLP/gRPC trace receiver on {host}:{bound}; export to it with "
        f"OTEL_EXPORTER_OTLP_ENDPOINT=http://{shown_host}:{bound}; keeping at most {limits} in memory",
        flush=True,
    )
    if jsonl_path:
        print(f"appending spans to {jsonl_path} (show them with `moemesh trace show`)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Windows event loops have no signal handlers; Ctrl-C then ends asyncio.run instead.
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    reported: dict[str, int] = {}
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=min(0.25, idle_s))
            _report(store, reported, print_traces, time.monotonic() - idle_s)
    finally:
        _report(store, reported, print_traces, float("inf"))  # traces in flight at Ctrl-C: as they are
        await server.stop(1.0)
    print(f"stopped: {store.usage()}", flush=True)
    return 0


def serve_receiver(
    host: str = "127.0.0.1",
    port: int = 4317,
    jsonl_path: str | None = None,
    print_traces: bool = False,
    idle_s: float = 1.0,
    limits: StoreLimits | None = None,
) -> int:
    """`moemesh trace serve`: receive OTLP/gRPC traces in the foreground until SIGINT/SIGTERM.

    A trace quiet for `idle_s` seconds gets a summary line (and its waterfall with `print_traces`).
    Spans are appended to `jsonl_path` when given, and kept in memory up to `limits` (default
    `StoreLimits()`, the least recently updated traces dropped). Returns the exit status.
    """
    try:
        return asyncio.run(_serve(host, port, jsonl_path, print_traces, idle_s, limits or StoreLimits()))
    except OSError as err:
        print(f"moemesh trace serve: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _load(jsonl_path: str | Path, command: str) -> TraceStore | None:
    try:
        return load_jsonl(jsonl_path)
    except (OSError, ValueError) as err:
        print(f"moemesh trace {command}: {err}", file=sys.stderr)
        return None


def show_trace(jsonl_path: str | Path, trace_id: str | None = None, png: str | Path | None = None) -> int:
    """`moemesh trace show`: print one trace of a .jsonl file as a waterfall, optionally also
    draw it to `png`. trace_id: a full id or a unique prefix; None = the trace that started last.
    Returns the process exit status (1: no such file or trace, or no matplotlib for the PNG)."""
    store = _load(jsonl_path, "show")
    if store is None:
        return 1
    try:
        tid = select_trace(store, trace_id)
    except LookupError as err:
        print(f"moemesh trace show: {jsonl_path}: {err}", file=sys.stderr)
        return 1
    spans = store.spans(tid)
    print(waterfall(spans))
    if png:
        try:
            written = render_png(spans, png)
        except ImportError as err:
            print(f"moemesh trace show: {err}", file=sys.stderr)
            return 1
        print(f"wrote {written}")
    return 0


def list_traces(jsonl_path: str | Path) -> int:
    """`moemesh trace list`: one summary line per trace in a .jsonl file, oldest first."""
    store = _load(jsonl_path, "list")
    if store is None:
        return 1
    traces = store.traces()
    if not traces:
        print(f"no traces in {jsonl_path}")
    for summary in traces:
        print(summary_line(summary))
    return 0
