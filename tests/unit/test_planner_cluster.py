"""Cluster descriptions for the placement planner (no Ray, no network): the accelerator table,
cluster files and their validation, and clusters read from Ray-style node dicts."""

from __future__ import annotations

import json

import pytest

from moemesh.deploy.accelerators import (
    GB,
    KNOWN_ACCELERATORS,
    lookup_accelerator,
    merge_accelerators,
    speed_from_specs,
)
from moemesh.deploy.cluster import (
    ClusterSpec,
    NodeGroup,
    bundled_clusters,
    load_accelerator_overrides,
    load_cluster,
)
from moemesh.deploy.discovery import cluster_from_ray_resources
from moemesh.deploy.lpt import plan_placement
from moemesh.deploy.plan_command import synthetic_spec
from tests.unit.plan_checks import MIXTRAL_64, check_plan, mixed_cluster

# --------------------------------------------------------------------------------------------
# Accelerator table
# --------------------------------------------------------------------------------------------


def test_table_uses_ray_type_strings_and_aliases():
    for key in ("H100", "H200", "A100-80G", "A100-40G", "L40S", "A10G", "T4", "V100"):
        assert KNOWN_ACCELERATORS[key].vendor == "nvidia"
    assert lookup_accelerator("MI300X").name == "AMD-Instinct-MI300X-OAM"
    assert lookup_accelerator("AMD-Instinct-MI300X-HF").name == "AMD-Instinct-MI300X-OAM"
    assert lookup_accelerator("mi250x").name == "AMD-Instinct-MI250X"
    assert lookup_accelerator("Intel-GAUDI").kind == "hpu"
    assert lookup_accelerator("Gaudi3").torch_device == "hpu"
    assert lookup_accelerator("Intel-GPU-Max-1550").torch_device == "xpu"
    # Ray labels both A100 sizes "A100": the smaller is assumed so a plan never overfills.
    assert lookup_accelerator("A100").name == "A100-40G"
    with pytest.raises(KeyError, match="unknown accelerator 'B9000'.*H100"):
        lookup_accelerator("B9000")


def test_relative_speeds_follow_public_figures():
    speed = {k: a.relative_speed for k, a in KNOWN_ACCELERATORS.items()}
    assert speed["H100"] == 1.0
    assert speed["H200"] > speed["H100"] > speed["A100-80G"] > speed["A100-40G"] > speed["T4"]
    assert speed["AMD-Instinct-MI300X-OAM"] > speed["H100"]
    assert speed["Intel-GAUDI3"] > speed["Intel-GAUDI2"]
    assert min(speed, key=speed.get) == "CPU"
    assert speed_from_specs(312.0, 2.039) == pytest.approx(speed["A100-80G"], abs=1e-4)


def test_merge_accelerators_overrides_by_alias_and_adds_entries():
    table = merge_accelerators(
        {
            "MI300X": {"relative_speed": 1.1},
            "Acme-NPU": {"kind": "gpu", "bf16_tflops": 494.5, "memory_tbps": 3.35, "memory_gb": 32},
        }
    )
    assert table["AMD-Instinct-MI300X-OAM"].relative_speed == 1.1
    assert (
        table["AMD-Instinct-MI300X-OAM"].memory_bytes
        == KNOWN_ACCELERATORS["AMD-Instinct-MI300X-OAM"].memory_bytes
    )
    npu = table["Acme-NPU"]
    assert (npu.torch_device, npu.memory_bytes) == ("cuda", 32 * GB)
    assert npu.relative_speed == pytest.approx(0.5**0.5)
    assert (
        KNOWN_ACCELERATORS["AMD-Instinct-MI300X-OAM"].relative_speed != 1.1
    )  # the table itself is untouched
    with pytest.raises(ValueError, match="missing.*memory_bytes"):
        merge_accelerators({"Acme-NPU": {"kind": "gpu", "relative_speed": 0.5}})
    with pytest.raises(ValueError, match="unknown field"):
        merge_accelerators({"H100": {"speed": 2}})


# --------------------------------------------------------------------------------------------
# Cluster descriptions
# --------------------------------------------------------------------------------------------


def test_load_cluster_reads_the_bundled_examples():
    assert {"mixed-gpu", "local-cpu"} <= set(bundled_clusters())
    devices = mixed_cluster().devices()
    kinds: dict[str, int] = {}
    for slot in devices:
        kinds[slot.accelerator.name] = kinds.get(slot.accelerator.name, 0) + 1
    assert kinds == {"H100": 4, "A100-80G": 4, "AMD-Instinct-MI300X-OAM": 2, "CPU": 8}
    cpu = [s for s in devices if s.accelerator.kind == "cpu"]
    assert len({s.node for s in cpu}) == 8
    assert all(s.memory_bytes == int(64 * GB * 0.9) and s.resource is None for s in cpu)
    h100 = [s for s in devices if s.accelerator.name == "H100"]
    assert [s.label for s in h100] == [f"h100/cuda:{i}" for i in range(4)]
    assert all(s.resource == "GPU" and s.memory_bytes == int(80 * GB * 0.9) for s in h100)
    local = load_cluster("local-cpu").devices()
    assert len(local) == 3 and all(s.accelerator.name == "CPU" for s in local)


def test_load_cluster_reads_json_and_applies_accelerator_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {
                "reserve_fraction": 0.0,
                "accelerators": {"H100": {"relative_speed": 0.8}},
                "nodes": [{"name": "n", "accelerator": "h100", "devices_per_node": 2, "memory_gb": 10}],
            }
        )
    )
    cluster = load_cluster(path)
    assert cluster.name == "c"
    slots = cluster.devices()
    assert [(s.speed, s.memory_bytes) for s in slots] == [(0.8, 10 * GB)] * 2
    # Overrides at planning time go over the file's.
    assert cluster.devices({"H100": {"relative_speed": 0.5}})[0].speed == 0.5


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"nodes": [{"name": "a", "accelerator": "H100"}, {"name": "b", "accelerator": "T4", "count": 0}]},
            r"nodes\[1\].*count",
        ),
        ({"nodes": [{"name": "a", "accelerator": "Z80"}]}, "unknown accelerator 'Z80'"),
        ({"nodes": [{"name": "a", "accelerator": "H100", "gpus": 2}]}, r"nodes\[0\].*unknown key.*gpus"),
        ({"nodes": []}, "non-empty list"),
        ({"nodes": [{"name": "a", "accelerator": "H100"}], "reserve_fraction": 1.5}, "reserve_fraction"),
        ({"nodes": [{"name": "a", "accelerator": "H100"}, {"name": "a", "accelerator": "T4"}]}, "unique"),
        ([{"name": "a", "accelerator": "H100"}], "expected a mapping, got list"),
        ({"nodes": [{"accelerator": "H100"}]}, r"nodes\[0\]\.name: required"),
        ({"nodes": [{"name": "a", "accelerator": "H100", "memory_gb": True}]}, r"nodes\[0\]\.memory_gb"),
        ({"nodes": [{"name": "a", "accelerator": "H100", "node_id": 7}]}, r"nodes\[0\]\.node_id"),
        (
            {"nodes": [{"name": "a", "accelerator": "H100"}], "gpus": 2},
            r"unknown key 'gpus'; known: \['name'",
        ),
        (
            {"nodes": [{"name": "a", "accelerator": "H100"}], "accelerators": {"H100": {"speed": 2}}},
            r"accelerators\.H100: unknown field",
        ),
    ],
)
def test_cluster_errors_name_the_field(data, message):
    with pytest.raises(ValueError, match=message) as err:
        ClusterSpec.from_dict(data, source="test.yaml")
    assert str(err.value).startswith("test.yaml: ")


def test_node_groups_built_in_code_are_validated_too():
    assert NodeGroup(name="a", accelerator="H100").count == 1
    with pytest.raises(ValueError, match="count"):
        NodeGroup(name="a", accelerator="H100", count=0)
    with pytest.raises(ValueError, match="gpus"):
        NodeGroup(name="a", accelerator="H100", gpus=2)


def _ray_nodes() -> list[dict]:
    return [
        {
            "NodeID": "b" * 56,
            "Alive": True,
            "NodeName": "10.0.0.2",
            "Resources": {"CPU": 64.0, "GPU": 8.0, "accelerator_type:H100": 1.0, "memory": 1e12},
            "Labels": {"ray.io/accelerator-type": "H100"},
        },
        {
            # Detected "A100" plus the size label added by hand: the specific one wins.
            "NodeID": "c" * 56,
            "Alive": True,
            "NodeName": "10.0.0.3",
            "Resources": {
                "CPU": 32.0,
                "GPU": 4.0,
                "accelerator_type:A100": 1.0,
                "accelerator_type:A100-80G": 1.0,
            },
        },
        {
            "NodeID": "d" * 56,
            "Alive": True,
            "NodeName": "10.0.0.4",
            "Resources": {"CPU": 64.0, "GPU": 2.0, "accelerator_type:AMD-Instinct-MI300X-OAM": 1.0},
        },
        {
            "NodeID": "e" * 56,
            "Alive": True,
            "NodeName": "10.0.0.5",
            "Resources": {"CPU": 32.0, "HPU": 8.0, "accelerator_type:Intel-GAUDI2": 1.0},
        },
        {
            "NodeID": "f" * 56,
            "Alive": True,
            "NodeName": "10.0.0.6",
            "Resources": {"CPU": 16.0, "memory": 32e9},
        },
        # Dead node and a head node with no CPUs for workers: neither hosts experts.
        {"NodeID": "0" * 56, "Alive": False, "NodeName": "10.0.0.7", "Resources": {"CPU": 8.0, "GPU": 1.0}},
        {
            "NodeID": "1" * 56,
            "Alive": True,
            "NodeName": "10.0.0.1",
            "Resources": {"node:__internal_head__": 1.0},
        },
        # A local simulation: custom resources stand for device types, two nodes on one address.
        {
            "NodeID": "2" * 56,
            "Alive": True,
            "NodeName": "127.0.0.1",
            "Resources": {"CPU": 2.0, "device:H100": 2.0, "device:CPU": 1.0, "memory": 8e9},
        },
        {
            "NodeID": "3" * 56,
            "Alive": True,
            "NodeName": "127.0.0.1",
            "Resources": {"CPU": 2.0, "fast_box": 1.0},
        },
    ]


def test_cluster_from_ray_resources_reads_types_counts_and_custom_resources():
    cluster = cluster_from_ray_resources(_ray_nodes(), device_resources={"fast_box": "MI300X"})
    slots = cluster.devices()
    by_node: dict[str, list] = {}
    for s in slots:
        by_node.setdefault(s.node, []).append(s)
    summary = {node: (len(ss), ss[0].accelerator.name, ss[0].resource) for node, ss in by_node.items()}
    assert summary == {
        "10.0.0.2": (8, "H100", "GPU"),
        "10.0.0.3": (4, "A100-80G", "GPU"),
        "10.0.0.4": (2, "AMD-Instinct-MI300X-OAM", "GPU"),
        "10.0.0.5": (8, "Intel-GAUDI2", "HPU"),
        "10.0.0.6": (1, "CPU", None),
        "127.0.0.1-22222222/CPU": (1, "CPU", "device:CPU"),
        "127.0.0.1-22222222/H100": (2, "H100", "device:H100"),
        "127.0.0.1-33333333": (1, "AMD-Instinct-MI300X-OAM", "fast_box"),
    }
    assert by_node["10.0.0.2"][0].node_id == "b" * 56
    assert by_node["10.0.0.6"][0].memory_bytes == int(32e9 * 0.9)
    assert by_node["127.0.0.1-22222222/CPU"][0].memory_bytes == int(8e9 * 0.9)
    # Node order in the input does not matter.
    assert (
        cluster_from_ray_resources(list(reversed(_ray_nodes())), device_resources={"fast_box": "MI300X"})
        == cluster
    )
    # The result plans like any other cluster.
    spec = synthetic_spec(MIXTRAL_64)
    check_plan(plan_placement(spec, cluster), spec)


def test_cluster_from_ray_resources_rejects_unknown_gpu_types():
    nodes = [
        {
            "NodeID": "a",
            "Alive": True,
            "NodeName": "n",
            "Resources": {"GPU": 1.0, "accelerator_type:K80": 1.0},
        }
    ]
    with pytest.raises(ValueError, match="K80.*accelerators"):
        cluster_from_ray_resources(nodes)
    overridden = cluster_from_ray_resources(
        nodes, accelerators={"K80": {"kind": "gpu", "relative_speed": 0.03, "memory_gb": 12}}
    )
    slot = overridden.devices()[0]
    assert (slot.accelerator.name, slot.speed, slot.memory_bytes) == ("K80", 0.03, int(12 * GB * 0.9))


def test_accelerator_overrides_file_changes_speeds_and_rejects_bad_entries(tmp_path):
    good = tmp_path / "acc.yaml"
    good.write_text("accelerators:\n  MI300X: {relative_speed: 0.5}\n")
    overrides = load_accelerator_overrides(good)
    nodes = [{"NodeID": "n1", "Alive": True, "NodeName": "n1", "Resources": {"CPU": 8, "device:MI300X": 1}}]
    (slot,) = cluster_from_ray_resources(nodes, accelerators=overrides).devices(overrides)
    assert slot.speed == 0.5
    bad = tmp_path / "bad.json"
    bad.write_text('{"NewChip": {"kind": "gpu"}}')
    with pytest.raises(ValueError, match="NewChip"):
        load_accelerator_overrides(bad)
