"""A host whose device breaks exits (so Ray restarts it); a healthy one keeps running. No Ray started."""

from __future__ import annotations

import threading

import torch

from moemesh.deploy.ray_mesh import DeviceWatchdog
from moemesh.experts.device import device_healthy


def test_broken_device_makes_the_host_exit():
    exited = threading.Event()
    codes = []
    checks = iter([True, True, False])
    dog = DeviceWatchdog(
        lambda: next(checks), interval_s=0.01, exit_fn=lambda code: (codes.append(code), exited.set())
    )
    dog.start()
    assert exited.wait(5)
    dog.join(5)
    assert codes == [DeviceWatchdog.EXIT_CODE]


def test_healthy_device_keeps_running():
    calls = []
    dog = DeviceWatchdog(
        lambda: calls.append(1) or True, interval_s=0.01, exit_fn=lambda code: calls.append(code)
    )
    dog.start()
    while len(calls) < 5:
        threading.Event().wait(0.01)
    dog.stop()
    dog.join(5)
    assert DeviceWatchdog.EXIT_CODE not in calls


def test_device_health_check_runs_on_the_cpu():
    assert device_healthy(torch.device("cpu"))
