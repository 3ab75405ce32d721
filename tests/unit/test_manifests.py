"""Deployment manifests parse and describe mixed-accelerator worker groups."""

from __future__ import annotations

import json
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


def test_dashboards_are_valid_json():
    for path in (DEPLOY / "dashboards").glob("*.json"):
        assert json.loads(path.read_text())["panels"]
