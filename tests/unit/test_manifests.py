"""Deployment manifests parse and describe mixed-accelerator worker groups."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_kuberay_cluster_has_worker_groups_of_different_accelerators():
    cluster = yaml.safe_load((DEPLOY / "manifests" / "kuberay-raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster"
    groups = cluster["spec"]["workerGroupSpecs"]
    limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups]
    vendors = {key for lim in limits for key in lim if key.endswith("/gpu") or key.endswith("/gaudi")}
    assert {"nvidia.com/gpu", "amd.com/gpu", "habana.ai/gaudi"} <= vendors
    assert any(set(lim) <= {"cpu", "memory"} for lim in limits)  # a CPU-only group too


def test_rayjob_and_launcher_configs_run_moemesh_up():
    docs = list(yaml.safe_load_all((DEPLOY / "manifests" / "kuberay-rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["spec"]["entrypoint"].startswith("moemesh up --address auto")
    launcher = yaml.safe_load((DEPLOY / "manifests" / "ray-cluster.yaml").read_text())
    types = launcher["available_node_types"]
    accelerators = {
        k for t in types.values() for k in t.get("resources", {}) if k.startswith("accelerator_type:")
    }
    assert len(accelerators) >= 2


def test_job_submit_script_is_valid_bash():
    script = DEPLOY / "manifests" / "job-submit.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "ray job submit" in script.read_text()


def _panels(node: dict) -> list[dict]:
    """Every panel of a dashboard, those inside rows included; rows themselves are not panels."""
    found = []
    for panel in node.get("panels", []):
        if panel.get("type") != "row":
            found.append(panel)
        found.extend(_panels(panel))
    return found


def test_every_dashboard_panel_queries_metrics_the_code_registers():
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry

    from moemesh.services.metrics import Metrics

    exposed = Metrics(CollectorRegistry()).exposed_names()
    paths = sorted((DEPLOY / "dashboards").glob("*.json"))
    assert paths
    for path in paths:
        panels = _panels(json.loads(path.read_text()))
        assert panels, path.name
        for panel in panels:
            names = [
                set(re.findall(r"\bmoemesh_[a-z0-9_]+", t.get("expr", ""))) for t in panel.get("targets", [])
            ]
            # at least one target that queries moemesh metrics, every one of them registered
            assert any(n and n <= exposed for n in names), (
                f"{path.name}: panel {panel.get('title')!r} has no target whose metrics all exist: "
                f"{[sorted(n - exposed) for n in names]}"
            )
