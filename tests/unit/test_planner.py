"""Placement planner on simulated clusters (no Ray, no network): every expert placed, memory and
one-copy-per-device respected, replicas on the hottest experts, deterministic, never worse than
round-robin; cluster descriptions from files and from Ray-style node dicts."""

from __future__ import annotations

import json
import random

import pytest
import torch

from moemesh.deploy.accelerators import (
    GB,
    KNOWN_ACCELERATORS,
    lookup_accelerator,
    merge_accelerators,
    speed_from_specs,
)
from moemesh.deploy.planner import (
    ClusterSpec,
    ExpertLoad,
    PlacementError,
    PlacementPlan,
    bundled_clusters,
    cluster_from_ray_resources,
    expert_bytes,
    load_cluster,
    model_spec,
    plan_placement,
    plan_report,
    round_robin_placement,
    run_plan,
    synthetic_spec,
)
from moemesh.experts.model import ModelSpec
from moemesh.experts.weights import preset_config

MIXTRAL_64 = "synthetic:layers=1,experts=64,hidden=4096,intermediate=14336"
# Tolerance for "not worse": the two makespans are sums of the same floats in different orders.
REL = 1e-9


def _mixed() -> ClusterSpec:
    return load_cluster("mixed-gpu")


def _skewed_counts(spec: ModelSpec, seed: int = 0, power: float = 4.0) -> torch.Tensor:
    """[moe_layers, experts] token counts with a few hot experts (Zipf-like)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(len(spec.layers), spec.layers[0].num_experts, generator=gen) ** power * 1000


def _check_plan(plan: PlacementPlan, spec: ModelSpec, dtype_bytes: int = 2) -> None:
    """What every plan must satisfy: placed, within memory, one copy per device, loads add up."""
    size = {ls.layer: expert_bytes(ls, dtype_bytes) for ls in spec.layers}
    for dev in plan.devices:
        assert len(set(dev.experts)) == len(dev.experts), f"{dev.slot.label} hosts an expert twice"
        assert dev.memory_used == sum(size[layer] for layer, _ in dev.experts)
        assert dev.memory_used <= dev.slot.memory_bytes, f"{dev.slot.label} over its memory"
        assert all(s >= 0 for s in dev.served)
    for ls in spec.layers:
        for e in range(ls.num_experts):
            copies = plan.replicas(ls.layer, e)
            assert copies, f"expert {ls.layer}:{e} not placed"
            assert len({s.label for s in copies}) == len(copies)
            served = sum(
                dev.served[dev.experts.index((ls.layer, e))]
                for dev in plan.devices
                if (ls.layer, e) in dev.experts
            )
            assert served == pytest.approx(plan.load.share(ls.layer, e), rel=1e-9, abs=1e-12)
    assert plan.total_load == pytest.approx(len(spec.layers))


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
    devices = _mixed().devices()
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
    ],
)
def test_cluster_errors_name_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        ClusterSpec.from_dict(data, source="test.yaml")


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
    _check_plan(plan_placement(spec, cluster), spec)


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


# --------------------------------------------------------------------------------------------
# Loads and models
# --------------------------------------------------------------------------------------------


def test_expert_load_from_counts():
    spec = synthetic_spec("synthetic:layers=2,experts=4,hidden=8,intermediate=16")
    load = ExpertLoad.from_counts(spec, torch.tensor([[1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert [load.share(0, e) for e in range(4)] == [0.25, 0.25, 0.5, 0.0]
    assert [load.share(1, e) for e in range(4)] == [0.25] * 4  # no tokens seen: uniform
    same = ExpertLoad.from_counts(spec, {1: [0, 0, 0, 0], 0: torch.tensor([1, 1, 2, 0])})
    assert same.shares == load.shares
    with pytest.raises(ValueError, match="missing \\[1\\]"):
        ExpertLoad.from_counts(spec, {0: [1, 1, 1, 1]})
    with pytest.raises(ValueError, match="expected 4 values"):
        ExpertLoad.from_counts(spec, {0: [1, 1, 1], 1: [1, 1, 1, 1]})
    with pytest.raises(ValueError, match=">= 0"):
        ExpertLoad.from_counts(spec, {0: [1, -1, 1, 1], 1: [1, 1, 1, 1]})


def test_synthetic_and_config_models(tmp_path):
    spec = synthetic_spec("synthetic:layers=3,experts=64,hidden=4096,intermediate=14336,top_k=4")
    assert [ls.layer for ls in spec.layers] == [0, 1, 2]
    assert expert_bytes(spec.layers[0]) == 3 * 4096 * 14336 * 2
    assert spec.routing.top_k == 4
    for bad, message in [
        ("synthetic:experts=64,hidden=4096", "missing.*intermediate"),
        ("synthetic:experts=4,hidden=8,intermediate=8,top_k=5", "top_k=5 exceeds"),
        ("synthetic:experts=4,hidden=8,intermediate=8,depth=2", "depth=2"),
        ("synthetic:experts=0,hidden=8,intermediate=8", "positive integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            synthetic_spec(bad)
    # A checkpoint directory needs only its config.json for planning.
    (tmp_path / "config.json").write_text(json.dumps(preset_config("tiny-deepseek-v3")))
    from_dir = model_spec(str(tmp_path))
    assert from_dir.family == "deepseek_v3" and from_dir.layer_indices == (1, 2)
    assert model_spec("tiny-mixtral").layers[0].num_experts == 8


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


def test_mixed_cluster_64_experts_beats_round_robin():
    spec = synthetic_spec(MIXTRAL_64)
    cluster = _mixed()
    for load in (None, ExpertLoad.from_counts(spec, _skewed_counts(spec))):
        plan = plan_placement(spec, cluster, load)
        baseline = round_robin_placement(spec, cluster, load)
        _check_plan(plan, spec)
        _check_plan(baseline, spec)
        ratio = plan.makespan / baseline.makespan
        print(f"makespan planned={plan.makespan:.3f} round_robin={baseline.makespan:.3f} ratio={ratio:.2f}")
        assert plan.makespan <= baseline.makespan * (1 + REL)
        assert plan.lower_bound <= plan.makespan * (1 + REL)
        # Round-robin puts experts on the CPU nodes; a speed-aware plan keeps the slowest device
        # within a small factor of the ideal.
        assert plan.makespan < 1.25 * plan.lower_bound
        assert baseline.makespan > 10 * plan.makespan
        assert "planned / round-robin" in plan_report(plan, baseline)


def test_faster_devices_get_more_load():
    spec = synthetic_spec(MIXTRAL_64)
    plan = plan_placement(spec, _mixed())
    per_kind: dict[str, list[float]] = {}
    for dev in plan.devices:
        per_kind.setdefault(dev.slot.accelerator.name, []).append(dev.load)
    mean = {k: sum(v) / len(v) for k, v in per_kind.items()}
    assert mean["AMD-Instinct-MI300X-OAM"] > mean["H100"] > mean["A100-80G"] > mean["CPU"]
    # Every device that hosts load finishes within 25% of the slowest one.
    busy = [dev.time for dev in plan.devices if dev.load > 0]
    assert min(busy) > 0.75 * plan.makespan


def test_replicas_go_to_the_hottest_experts():
    spec = synthetic_spec("synthetic:layers=2,experts=32,hidden=256,intermediate=512")
    counts = torch.ones(2, 32)
    counts[0, 5] = 40.0
    counts[0, 9] = 20.0
    counts[1, 30] = 30.0
    load = ExpertLoad.from_counts(spec, counts)
    cluster = ClusterSpec.from_dict({"nodes": [{"name": "g", "accelerator": "H100", "devices_per_node": 8}]})
    plan = plan_placement(spec, cluster, load, replicas_budget=6)
    _check_plan(plan, spec)
    copies = {k: n for k, n in plan.replica_counts.items() if n > 1}
    assert sum(n - 1 for n in copies.values()) == plan.extra_replicas == 6
    # Shares: 1:30 = 30/61, 0:5 = 40/90, 0:9 = 20/90. EPLB gives each copy to the highest load
    # per copy: 1:30 (.49), 0:5 (.44), 1:30 (.25), 0:5 (.22), 0:9 (.22), 1:30 (.16).
    assert copies == {(1, 30): 4, (0, 5): 3, (0, 9): 2}
    # The hot expert's copies share its load, so no device carries all of it.
    assert max(dev.load for dev in plan.devices) < load.share(0, 5)
    assert plan.makespan <= round_robin_placement(spec, cluster, load).makespan * (1 + REL)


def test_a_slow_replica_serves_less_than_a_fast_one():
    # One hot expert with a copy forced onto a CPU node (only two devices): the plan must not
    # charge the CPU half of it, as an even split would.
    spec = synthetic_spec("synthetic:layers=1,experts=4,hidden=64,intermediate=128")
    load = ExpertLoad.from_counts(spec, torch.tensor([[97.0, 1.0, 1.0, 1.0]]))
    cluster = ClusterSpec.from_dict(
        {
            "nodes": [
                {"name": "gpu", "accelerator": "H100"},
                {"name": "cpu", "accelerator": "CPU", "memory_gb": 4},
            ]
        }
    )
    plan = plan_placement(spec, cluster, load, replicas_budget=1)
    _check_plan(plan, spec)
    assert len(plan.replicas(0, 0)) == 2
    gpu, cpu = plan.devices
    assert gpu.served[gpu.experts.index((0, 0))] > 10 * cpu.served[cpu.experts.index((0, 0))]
    assert plan.makespan <= round_robin_placement(spec, cluster, load).makespan * (1 + REL)


def test_small_cpu_only_cluster():
    spec = model_spec("tiny-mixtral")
    cluster = load_cluster("local-cpu")
    plan = plan_placement(spec, cluster)
    baseline = round_robin_placement(spec, cluster)
    _check_plan(plan, spec)
    print(
        f"makespan planned={plan.makespan:.3f} round_robin={baseline.makespan:.3f} ratio={plan.makespan / baseline.makespan:.2f}"
    )
    assert plan.makespan <= baseline.makespan * (1 + REL)
    assert len(plan.hosts()) == 3  # equal devices: all of them serve


def test_round_robin_puts_expert_i_on_device_i_mod_n():
    spec = synthetic_spec("synthetic:layers=1,experts=10,hidden=64,intermediate=128")
    cluster = ClusterSpec.from_dict({"nodes": [{"name": "g", "accelerator": "T4", "devices_per_node": 4}]})
    plan = round_robin_placement(spec, cluster)
    assert [dev.experts for dev in plan.devices] == [
        ((0, 0), (0, 4), (0, 8)),
        ((0, 1), (0, 5), (0, 9)),
        ((0, 2), (0, 6)),
        ((0, 3), (0, 7)),
    ]
    assert plan.extra_replicas == 0


def test_too_little_memory_names_the_shortfall():
    spec = synthetic_spec(MIXTRAL_64)  # 352 MB per expert
    # One T4: 16 GB less 10% holds 40 experts of 352 MB.
    cluster = ClusterSpec.from_dict({"nodes": [{"name": "t4", "accelerator": "T4"}]})
    with pytest.raises(PlacementError, match=r"room for 40 experts; short by 24 experts \(8\.5 GB\)"):
        plan_placement(spec, cluster)
    with pytest.raises(PlacementError, match="short by 24 experts"):
        round_robin_placement(spec, cluster)
    # Two T4s hold every expert once, but not 20 more copies.
    two = ClusterSpec.from_dict({"nodes": [{"name": "t4", "accelerator": "T4", "count": 2}]})
    _check_plan(plan_placement(spec, two, replicas_budget=16), spec)
    with pytest.raises(PlacementError, match="room for 16 extra expert copies.*short by 4 copies"):
        plan_placement(spec, two, replicas_budget=20)
    # The default budget (7: 10% of 64) shrinks to what fits, and says so.
    size_gb = expert_bytes(spec.layers[0]) / GB
    tight = ClusterSpec.from_dict(
        {"nodes": [{"name": "t4", "accelerator": "T4", "count": 2, "memory_gb": 33.5 * size_gb / 0.9}]}
    )
    plan = plan_placement(spec, tight)
    _check_plan(plan, spec)
    assert plan.extra_replicas == 2 and any("capped at 2" in n for n in plan.notes)


def test_plans_are_deterministic():
    spec = synthetic_spec("synthetic:layers=2,experts=64,hidden=1024,intermediate=2048")
    counts = _skewed_counts(spec, seed=3)
    first = plan_placement(spec, _mixed(), ExpertLoad.from_counts(spec, counts))
    # Same cluster written with keys and groups' fields in another order; counts as a mapping.
    data = _mixed().to_dict()
    shuffled = {
        "nodes": [dict(reversed(list(g.items()))) for g in data["nodes"]],
        "reserve_fraction": data["reserve_fraction"],
        "name": data["name"],
    }
    load = ExpertLoad.from_counts(spec, {1: counts[1].tolist(), 0: counts[0]})
    second = plan_placement(spec, ClusterSpec.from_dict(shuffled), load)
    assert second.to_dict() == first.to_dict()
    assert second.to_table() == first.to_table()


def test_never_worse_than_round_robin_on_random_clusters():
    rng = random.Random(1234)
    names = sorted(KNOWN_ACCELERATORS)
    checked = 0
    for _ in range(40):
        experts = rng.choice([4, 8, 16, 64])
        layers = rng.choice([1, 2])
        spec = synthetic_spec(f"synthetic:layers={layers},experts={experts},hidden=64,intermediate=128")
        groups = []
        for g in range(rng.randint(1, 4)):
            group = {"name": f"g{g}", "accelerator": rng.choice(names), "count": rng.randint(1, 3)}
            group["devices_per_node"] = rng.randint(1, 3)
            if rng.random() < 0.3:  # room for a handful of experts only
                group["memory_gb"] = expert_bytes(spec.layers[0]) * rng.randint(1, 20) / GB / 0.9
            groups.append(group)
        cluster = ClusterSpec.from_dict({"nodes": groups})
        counts = _skewed_counts(spec, seed=rng.randint(0, 999), power=rng.choice([0.0, 2.0, 8.0]))
        load = ExpertLoad.from_counts(spec, counts)
        try:
            baseline = round_robin_placement(spec, cluster, load)
        except PlacementError:
            continue
        for budget in (0, 3, None):
            try:
                plan = plan_placement(spec, cluster, load, replicas_budget=budget)
            except PlacementError:
                continue  # an explicit budget memory cannot hold
            _check_plan(plan, spec)
            assert plan.makespan <= baseline.makespan * (1 + REL), (groups, budget)
            checked += 1
    assert checked > 60


def test_table_json_and_run_plan(capsys, tmp_path):
    spec = synthetic_spec(MIXTRAL_64)
    plan = plan_placement(spec, _mixed(), replicas_budget=4)
    table = plan.to_table()
    header = table.splitlines()[1].split()
    assert header[:5] == ["device", "node", "accelerator", "speed", "experts"]
    assert len(table.splitlines()) == 2 + 1 + 18 + 2  # title, header, rule, devices, summary, replicated
    data = json.loads(plan.to_json())
    assert len(data["devices"]) == 18
    assert sorted(tuple(k) for d in data["devices"] for k in d["expert_list"]) == sorted(
        (0, e) for e in range(64) for _ in range(len(plan.replicas(0, e)))
    )
    assert data["extra_replicas"] == 4

    assert run_plan(MIXTRAL_64, "mixed-gpu", 4, json_out=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["makespan"] == pytest.approx(plan.makespan)
    assert out["makespan_ratio"] == pytest.approx(plan.makespan / out["round_robin"]["makespan"])

    assert run_plan(MIXTRAL_64, str(tmp_path / "missing.yaml"), None, json_out=False) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_accelerator_overrides_file_changes_speeds_and_rejects_bad_entries(tmp_path):
    from moemesh.deploy.planner import load_accelerator_overrides

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
