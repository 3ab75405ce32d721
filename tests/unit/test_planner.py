"""Placement planner on simulated clusters (no Ray, no network): every expert placed, memory and
one-copy-per-device respected, replicas on the hottest experts, deterministic, never worse than
round-robin; expected loads and the models planned for."""

from __future__ import annotations

import json
import random

import pytest
import torch

from moemesh.deploy.accelerators import GB, KNOWN_ACCELERATORS
from moemesh.deploy.cluster import ClusterSpec, load_cluster
from moemesh.deploy.load import ExpertLoad
from moemesh.deploy.lpt import plan_placement
from moemesh.deploy.plan import PlacementError, expert_bytes, plan_report, round_robin_placement
from moemesh.deploy.plan_command import model_spec, run_plan, synthetic_spec
from moemesh.experts.weights import preset_config
from tests.unit.plan_checks import MIXTRAL_64, REL, check_plan, mixed_cluster, skewed_counts

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
    assert all(ls.gate.top_k == 4 for ls in spec.layers)
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
    cluster = mixed_cluster()
    for load in (None, ExpertLoad.from_counts(spec, skewed_counts(spec))):
        plan = plan_placement(spec, cluster, load)
        baseline = round_robin_placement(spec, cluster, load)
        check_plan(plan, spec)
        check_plan(baseline, spec)
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
    plan = plan_placement(spec, mixed_cluster())
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
    check_plan(plan, spec)
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
    check_plan(plan, spec)
    assert len(plan.replicas(0, 0)) == 2
    gpu, cpu = plan.devices
    assert gpu.served[gpu.experts.index((0, 0))] > 10 * cpu.served[cpu.experts.index((0, 0))]
    assert plan.makespan <= round_robin_placement(spec, cluster, load).makespan * (1 + REL)


def test_small_cpu_only_cluster():
    spec = model_spec("tiny-mixtral")
    cluster = load_cluster("local-cpu")
    plan = plan_placement(spec, cluster)
    baseline = round_robin_placement(spec, cluster)
    check_plan(plan, spec)
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
    check_plan(plan_placement(spec, two, replicas_budget=16), spec)
    with pytest.raises(PlacementError, match="room for 16 extra expert copies.*short by 4 copies"):
        plan_placement(spec, two, replicas_budget=20)
    # The default budget (7: 10% of 64) shrinks to what fits, and says so.
    size_gb = expert_bytes(spec.layers[0]) / GB
    tight = ClusterSpec.from_dict(
        {"nodes": [{"name": "t4", "accelerator": "T4", "count": 2, "memory_gb": 33.5 * size_gb / 0.9}]}
    )
    plan = plan_placement(spec, tight)
    check_plan(plan, spec)
    assert plan.extra_replicas == 2 and any("capped at 2" in n for n in plan.notes)


def test_plans_are_deterministic():
    spec = synthetic_spec("synthetic:layers=2,experts=64,hidden=1024,intermediate=2048")
    counts = skewed_counts(spec, seed=3)
    first = plan_placement(spec, mixed_cluster(), ExpertLoad.from_counts(spec, counts))
    # Same cluster written with keys and groups' fields in another order; counts as a mapping.
    data = mixed_cluster().to_dict()
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
        counts = skewed_counts(spec, seed=rng.randint(0, 999), power=rng.choice([0.0, 2.0, 8.0]))
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
            check_plan(plan, spec)
            assert plan.makespan <= baseline.makespan * (1 + REL), (groups, budget)
            checked += 1
    assert checked > 60


def test_table_json_and_run_plan(capsys, tmp_path):
    spec = synthetic_spec(MIXTRAL_64)
    plan = plan_placement(spec, mixed_cluster(), replicas_budget=4)
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
