"""`moemesh up` / `status` / `down` as a user runs them, on an embedded local Ray instance.

This process never connects to that Ray instance itself: when `up` exits, its Ray goes away, and a
connected driver would be terminated with it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("ray")

from moemesh.client import Client  # noqa: E402

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "moemesh.deploy.cli"]


def test_up_status_down(tmp_path):
    # A user's override of the accelerator table: here the A100 is said to be twice an H100.
    overrides = tmp_path / "accelerators.yaml"
    overrides.write_text("A100-80G:\n  relative_speed: 2.0\n")
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

        with Client(address) as client:
            topo = client.topology()
            out = client.forward(torch.randn(8, 64), layer=0)
        assert len(topo.hosts) == 2 and out.shape == (8, 64)
        assert sorted(round(h.relative_speed, 3) for h in topo.hosts) == [1.0, 2.0]  # H100, overridden A100

        down = subprocess.run(
            [*CLI, "down", "--address", "auto"], capture_output=True, text=True, timeout=120
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert up.wait(timeout=120) == 0  # `up` sees its router removed and exits cleanly
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
