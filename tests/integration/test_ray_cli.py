"""`moemesh up` / `status` / `down` as a user runs them, on an embedded local Ray instance.

This process never connects to that Ray instance itself: when `up` exits, its Ray goes away, and a
connected driver would be terminated with it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("ray")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from moemesh.client import Client  # noqa: E402
from moemesh.deploy.traces.receiver import ReceiverThread  # noqa: E402

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "moemesh.deploy.cli"]


def test_up_status_down(tmp_path):
    # A user's override of the accelerator table: here the A100 is said to be twice an H100.
    overrides = tmp_path / "accelerators.yaml"
    overrides.write_text("A100-80G:\n  relative_speed: 2.0\n")
    # The README's tracing steps: the actors export to a receiver. Their batches leave only every
    # 60 s here, so the spans arrive only if `down` lets the actors flush before it kills them.
    receiver = ReceiverThread().__enter__()
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "60000"}
    up = subprocess.Popen(
        [
            *CLI,
            "up",
            "--accelerators",
            str(overrides),
            "--model",
            "tiny-qwen2-moe",
            "--devices",
            "H100:1,A100-80G:1",
            "--device",
            "cpu",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        # The foreground command prints the router's address once the mesh is up.
        address, deadline = None, time.monotonic() + 240
        for line in up.stdout:
            found = re.search(r"router listening on (\S+?);", line)
            if found or time.monotonic() > deadline:
                address = found and found.group(1)
                break
        assert address, "moemesh up did not come up"

        status = subprocess.run(
            [*CLI, "status", "--address", "auto"], capture_output=True, text=True, timeout=120
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert address in status.stdout

        provider = TracerProvider()
        mine = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(mine))
        with Client(address, tracer_provider=provider) as client:
            topo = client.topology()
            out = client.forward(torch.randn(8, 64), layer=0)
        forward = next(s for s in mine.get_finished_spans() if s.name.endswith("Router/Forward"))
        trace_id = f"{forward.context.trace_id:032x}"
        assert len(topo.hosts) == 2 and out.shape == (8, 64)
        assert sorted(round(h.relative_speed, 3) for h in topo.hosts) == [1.0, 2.0]  # H100, overridden A100

        down = subprocess.run(
            [*CLI, "down", "--address", "auto"], capture_output=True, text=True, timeout=120
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert up.wait(timeout=120) == 0  # `up` sees its router removed and exits cleanly
        # router: server span, 4 stages, one client span per host; each host: server, queue_wait, compute
        spans = receiver.store.wait_for(trace_id, count=1 + 4 + 2 + 3 * 2, timeout=30)
        assert {s.service_name for s in spans} == {"moemesh-router", "moemesh-expert"}
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        receiver.__exit__(None, None, None)
