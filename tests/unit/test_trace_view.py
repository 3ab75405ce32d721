"""Trace inspection without a network: span records, the trace store, the .jsonl format, the
waterfall text and the PNG timeline, all on spans built by hand with known times."""

from __future__ import annotations

import struct
import threading
import zlib

import pytest

from moemesh.deploy.traces import view as trace_view
from moemesh.deploy.traces.records import SpanEvent, SpanRecord, TraceStore, dump_jsonl, load_jsonl
from moemesh.deploy.traces.view import (
    render_png,
    select_trace,
    show_trace,
    span_tree,
    timeline_bar,
    traces_to_report,
    waterfall,
    waterfall_rows,
)

MS = 1_000_000
T0 = 1_700_000_000_000_000_000  # an arbitrary wall-clock start, in Unix ns
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def span(
    sid: int,
    parent: int | None,
    name: str,
    start_ms: float,
    end_ms: float,
    service: str = "router",
    trace: str = TRACE,
    status: str = "UNSET",
    **attributes,
) -> SpanRecord:
    return SpanRecord(
        trace_id=trace,
        span_id=f"{sid:016x}",
        parent_span_id=None if parent is None else f"{parent:016x}",
        name=name,
        kind="INTERNAL",
        start_ns=T0 + int(start_ms * MS),
        end_ns=T0 + int(end_ms * MS),
        attributes={k.replace("__", "."): v for k, v in attributes.items()},
        resource={"service.name": service},
        status_code=status,
    )


def forward_trace() -> list[SpanRecord]:
    """client forward → router server span → gate, dispatch (→ two expert computes), combine.

    Given out of order on purpose: the tree must not depend on arrival order.
    """
    return [
        span(6, 4, "Compute", 12, 30, "expert", moemesh__host="host-1", moemesh__rows=40),
        span(3, 2, "gate", 2, 5, moemesh__layer=0, moemesh__experts=(1, 3, 5)),
        span(1, None, "forward", 0, 40, "client", moemesh__tokens=48),
        span(7, 2, "combine", 33, 36),
        span(5, 4, "Compute", 8, 31, "expert", moemesh__host="host-0", rpc__grpc__status_code=0),
        span(4, 2, "dispatch", 6, 32, rpc__system="grpc"),
        span(2, 1, "Router/Forward", 1, 38),
    ]


# --- tree order --------------------------------------------------------------------------------


def test_tree_puts_children_under_parents_by_start_time():
    rows = span_tree(forward_trace())
    got = [(r.span.name, r.span.service_name, r.depth) for r in rows]
    assert got == [
        ("forward", "client", 0),
        ("Router/Forward", "router", 1),
        ("gate", "router", 2),
        ("dispatch", "router", 2),
        ("Compute", "expert", 3),  # host-0 starts at 8 ms, before host-1 at 12 ms
        ("Compute", "expert", 3),
        ("combine", "router", 2),
    ]
    assert [r.span.attributes.get("moemesh.host") for r in rows[4:6]] == ["host-0", "host-1"]
    assert not any(r.orphan for r in rows)


def test_waterfall_rows_have_offsets_and_durations_from_the_trace_start():
    rows = {(r.span.name, r.span.span_id): r for r in waterfall_rows(forward_trace())}
    gate = rows[("gate", f"{3:016x}")]
    compute1 = rows[("Compute", f"{6:016x}")]
    assert gate.offset_ms == pytest.approx(2.0)
    assert gate.duration_ms == pytest.approx(3.0)
    assert compute1.offset_ms == pytest.approx(12.0)
    assert compute1.duration_ms == pytest.approx(18.0)
    assert all(r.trace_duration_ms == pytest.approx(40.0) for r in rows.values())


def test_waterfall_text_indents_and_shows_times_hosts_and_key_attributes():
    text = waterfall(forward_trace())
    lines = text.splitlines()
    assert lines[0].startswith(f"trace {TRACE} · forward · 7 spans · 3 services · 40.000 ms")
    body = lines[2:]
    assert body[0].startswith("forward ")
    # Indentation: two spaces per level, in tree order.
    assert body[1].startswith("  Router/Forward ")
    assert body[2].startswith("    gate ")
    assert body[4].startswith("      Compute ")
    # Host column, start offset and duration columns.
    compute0 = body[4].split()
    assert "expert@host-0" in compute0
    assert compute0[compute0.index("expert@host-0") + 1 : compute0.index("expert@host-0") + 3] == [
        "8.000",
        "23.000",
    ]
    # moemesh.* shown without the prefix, rpc.* kept, rpc.system dropped as redundant.
    assert "layer=0 experts=[1,3,5]" in body[2]
    assert "rpc.grpc.status_code=0" in body[4]
    assert "rpc.system" not in text
    assert "host=host-0" not in body[4]  # already in the host column


def test_orphans_are_shown_at_top_level_and_marked():
    spans = forward_trace()
    lost = span(9, 0xDEAD, "late-retry", 20, 25, "expert", moemesh__retry=1)
    child_of_lost = span(10, 9, "queue", 21, 22, "expert")
    rows = span_tree([*spans, lost, child_of_lost])
    by_name = {r.span.name: r for r in rows}
    assert by_name["late-retry"].depth == 0 and by_name["late-retry"].orphan
    assert by_name["queue"].depth == 1 and not by_name["queue"].orphan
    # Top-level rows come by start time: forward (0 ms) then the orphan (20 ms), orphan's child after it.
    top_names = [r.span.name for r in rows if r.depth == 0]
    assert top_names == ["forward", "late-retry"]
    assert rows.index(by_name["queue"]) == rows.index(by_name["late-retry"]) + 1
    lines = waterfall([*spans, lost, child_of_lost]).splitlines()
    assert any(line.startswith("late-retry (orphan) ") for line in lines)
    assert any(line.startswith("  queue ") for line in lines)


def test_a_parent_cycle_loses_no_span():
    a = span(1, 2, "a", 0, 10)
    b = span(2, 1, "b", 1, 9)
    rows = span_tree([a, b])
    assert sorted(r.span.name for r in rows) == ["a", "b"]
    assert rows[0].orphan and rows[0].span.name == "a" and rows[1].depth == 1


def test_several_traces_render_one_after_another():
    other = "0" * 31 + "1"
    spans = [*forward_trace(), span(1, None, "other-root", 100, 101, trace=other)]
    rows = waterfall_rows(spans)
    assert [r.span.trace_id for r in rows] == [TRACE] * 7 + [other]
    assert rows[-1].offset_ms == 0.0  # offsets count from each trace's own start
    text = waterfall(spans)
    assert text.count("\ntrace ") + text.startswith("trace ") == 2


def test_timeline_bar_places_the_span_in_the_trace():
    assert timeline_bar(0, 40, 40, width=20) == "█" * 20
    second_half = timeline_bar(20, 20, 40, width=20)
    assert second_half == " " * 10 + "█" * 10
    tiny = timeline_bar(39.99, 0.001, 40, width=20)
    assert tiny.count("█") == 1 and tiny.endswith("█")  # a short hop stays visible
    assert len(timeline_bar(3, 5, 40, width=17)) == 17


def test_long_attributes_are_truncated():
    s = span(1, None, "x", 0, 1, moemesh__experts=tuple(range(200)), moemesh__note="y" * 500)
    line = waterfall([s], max_attr_chars=60).splitlines()[-1]
    attrs = line.split("|")[-1].strip()
    assert len(attrs) == 60 and attrs.endswith("…")


def test_error_status_is_shown_first():
    s = span(1, None, "Compute", 0, 1, status="ERROR", moemesh__layer=2)
    s = SpanRecord(**{**s.__dict__, "status_message": "no replica alive"})
    assert (
        waterfall([s]).splitlines()[-1].split("|")[-1].strip().startswith("ERROR(no replica alive) layer=2")
    )


# --- store, summaries, .jsonl ------------------------------------------------------------------


def test_store_summarizes_traces_and_keeps_a_retried_span_once():
    store = TraceStore()
    spans = forward_trace()
    store.add(spans[:4])
    store.add(spans)  # an exporter retry sends the first spans again
    assert len(store) == 7
    (summary,) = store.traces()
    assert summary.trace_id == TRACE
    assert summary.root_name == "forward" and summary.has_root
    assert summary.span_count == 7
    assert summary.duration_ns == 40 * MS
    assert summary.services == ("client", "expert", "router")
    assert [s.name for s in store.spans(TRACE)][:2] == ["forward", "Router/Forward"]
    assert store.spans("f" * 32) == []


def test_summary_without_root_names_the_earliest_orphan():
    store = TraceStore()
    store.add([span(3, 2, "gate", 2, 5), span(4, 2, "dispatch", 6, 30, status="ERROR")])
    (summary,) = store.traces()
    assert summary.root_name == "gate" and not summary.has_root
    assert summary.error_count == 1


def test_wait_for_returns_when_spans_arrive_from_another_thread():
    store = TraceStore()
    spans = forward_trace()
    feeder = threading.Thread(target=lambda: [store.add([s]) for s in spans])
    feeder.start()
    try:
        got = store.wait_for(TRACE, count=7, timeout=10)
        computes = store.wait_for(lambda s: s.name == "Compute", count=2, timeout=10)
    finally:
        feeder.join()
    assert len(got) == 7
    assert {s.attributes["moemesh.host"] for s in computes} == {"host-0", "host-1"}
    with pytest.raises(TimeoutError, match="found 0"):
        store.wait_for("0" * 32, count=1, timeout=0.05)


def test_jsonl_round_trip_keeps_every_field(tmp_path):
    rich = SpanRecord(
        trace_id=TRACE,
        span_id="00f067aa0ba902b7",
        parent_span_id=None,
        name="Compute",
        kind="SERVER",
        start_ns=T0,
        end_ns=T0 + 5 * MS,
        attributes={"moemesh.experts": (1, 2), "moemesh.meta": {"a": (True, 1.5)}, "b": "x"},
        resource={"service.name": "expert", "moemesh.host": "h0"},
        status_code="ERROR",
        status_message="boom",
        events=(SpanEvent("retry", T0 + MS, {"moemesh.replica": 1}),),
        scope="moemesh.services",
    )
    path = tmp_path / "spans.jsonl"
    dump_jsonl([rich, *forward_trace()], path)
    loaded = load_jsonl(path)
    assert loaded.spans(TRACE)[0] == rich
    assert sorted(loaded.spans(TRACE), key=lambda s: s.span_id) == sorted(
        [rich, *forward_trace()], key=lambda s: s.span_id
    )


def test_jsonl_skips_a_truncated_last_line_but_not_a_bad_middle_line(tmp_path):
    path = tmp_path / "spans.jsonl"
    dump_jsonl(forward_trace(), path)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"trace_id": "4bf9')  # what a receiver killed mid-write leaves
    assert len(load_jsonl(path)) == 7
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n" + forward_trace()[0].to_json() + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        load_jsonl(bad)


def test_select_trace_by_prefix_and_latest():
    store = TraceStore()
    early = "abc1" + "0" * 28
    late = "abc2" + "0" * 28
    store.add([span(1, None, "early", 0, 1, trace=early), span(1, None, "late", 50, 51, trace=late)])
    assert select_trace(store) == late
    assert select_trace(store, "ABC1") == early
    assert select_trace(store, early) == early
    with pytest.raises(LookupError, match="2 trace ids"):
        select_trace(store, "abc")
    with pytest.raises(LookupError, match="no trace id starts with"):
        select_trace(store, "ff")


def test_traces_are_reported_once_quiet_and_again_after_late_spans():
    last = {"a": 10.0, "b": 10.8}
    counts = {"a": 3, "b": 2}
    assert traces_to_report(last, counts, {}, now=11.0, idle_s=1.0) == ["a"]
    assert traces_to_report(last, counts, {"a": 3}, now=12.0, idle_s=1.0) == ["b"]
    assert traces_to_report(last, {"a": 4, "b": 2}, {"a": 3, "b": 2}, now=12.0, idle_s=1.0) == ["a"]
    assert traces_to_report(last, counts, {"a": 3, "b": 2}, now=99.0, idle_s=1.0) == []


# --- PNG -----------------------------------------------------------------------------------------


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, checking its CRC: the file is a real PNG."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert zlib.crc32(kind + body) == crc
    return struct.unpack(">II", body[:8])


def test_render_png_writes_an_image_of_the_requested_width(tmp_path):
    pytest.importorskip("matplotlib")
    spans = [*forward_trace(), span(9, 0xDEAD, "late-retry", 20, 25, "expert", status="ERROR")]
    path = render_png(spans, tmp_path / "trace.png", title="forward", width_px=900, dpi=100)
    data = path.read_bytes()
    width, height = _png_size(data)
    assert width == 900
    assert height >= 100 + 28 * len(spans)  # ~0.28 in per row at 100 dpi plus margins
    # The image is not blank: a flat image compresses to far less than this.
    assert len(data) > 5_000
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:
        im.verify()


def test_show_trace_prints_and_draws_a_recorded_trace(tmp_path):
    pytest.importorskip("matplotlib")
    jsonl = tmp_path / "spans.jsonl"
    dump_jsonl(forward_trace(), jsonl)
    png = tmp_path / "out.png"
    assert show_trace(jsonl, TRACE[:6], str(png)) == 0
    assert _png_size(png.read_bytes())[0] == 1200
    assert show_trace(jsonl, "ffff", None) == 1
    assert show_trace(tmp_path / "missing.jsonl", None, None) == 1
    assert trace_view.list_traces(jsonl) == 0
