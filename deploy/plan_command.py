"""The `moemesh plan` command, and the model argument it (and `moemesh up`) plans for.

A model argument is a preset name, a checkpoint directory or config.json path (planning reads no
weights), or a synthetic spec ("synthetic:layers=1,experts=64,hidden=4096,intermediate=14336")
for planning big models offline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moemesh.experts.model import spec_from_config
from moemesh.protos.spec import GateConfig, ModelSpec, MoELayerSpec, ScoreFunction

from .cluster import load_cluster
from .lpt import plan_placement
from .plan import plan_report, round_robin_placement

SYNTHETIC_PREFIX = "synthetic:"
_SYNTHETIC_KEYS = ("layers", "experts", "hidden", "intermediate", "top_k")


def synthetic_spec(text: str) -> ModelSpec:
    """A ModelSpec without weights from "synthetic:layers=1,experts=64,hidden=4096,intermediate=14336[,top_k=2]".

    For planning big models offline; the layers are Mixtral-style (SwiGLU, softmax top-k),
    numbered 0..layers-1. layers defaults to 1, top_k to min(2, experts).
    """
    body = text[len(SYNTHETIC_PREFIX) :] if text.startswith(SYNTHETIC_PREFIX) else text
    values: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _SYNTHETIC_KEYS:
            raise ValueError(f"{text!r}: expected KEY=INT with KEY in {_SYNTHETIC_KEYS}, got {part!r}")
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"{text!r}: {key} must be a positive integer, got {value.strip()!r}")
        values[key] = int(value)
    missing = [k for k in ("experts", "hidden", "intermediate") if k not in values]
    if missing:
        raise ValueError(
            f"{text!r}: missing {missing}; e.g. synthetic:layers=1,experts=64,hidden=4096,intermediate=14336"
        )
    experts = values["experts"]
    top_k = values.get("top_k", min(2, experts))
    if top_k > experts:
        raise ValueError(f"{text!r}: top_k={top_k} exceeds experts={experts}")
    gate = GateConfig(
        num_experts=experts, top_k=top_k, score_function=ScoreFunction.SOFTMAX, norm_topk_prob=True
    )
    layers = tuple(
        MoELayerSpec(
            layer=i,
            hidden_size=values["hidden"],
            intermediate_size=values["intermediate"],
            activation="silu",
            gate=gate,
        )
        for i in range(values.get("layers", 1))
    )
    return ModelSpec(name=text, family="mixtral", layers=layers)


def model_spec(model: str) -> ModelSpec:
    """The ModelSpec of "synthetic:...", a preset, a checkpoint directory or a config.json path.

    A directory needs only its config.json here (planning reads no weights).
    """
    if model.startswith(SYNTHETIC_PREFIX):
        return synthetic_spec(model)
    path = Path(model)
    config = path / "config.json" if path.is_dir() else path
    if config.is_file() and config.suffix == ".json":
        with open(config, encoding="utf-8") as fh:
            return spec_from_config(json.load(fh), model)
    from moemesh.experts.weights import open_source

    return open_source(model).spec


def run_plan(model: str, cluster_path: str, replicas: int | None, json_out: bool) -> int:
    """`moemesh plan`: print the plan (table, or JSON with --json) and the comparison with round-robin.

    Returns 0, or 2 after printing the reason to stderr when the model, the cluster file or the
    fit is wrong.
    """
    try:
        spec = model_spec(model)
        cluster = load_cluster(cluster_path)
        plan = plan_placement(spec, cluster, replicas_budget=replicas)
        baseline = round_robin_placement(spec, cluster)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        print(f"moemesh plan: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    if json_out:
        out = {
            "plan": plan.to_dict(),
            "round_robin": {"makespan": baseline.makespan},
            "makespan_ratio": plan.makespan / baseline.makespan,
        }
        print(json.dumps(out, indent=2))
    else:
        print(plan.to_table())
        print()
        print(plan_report(plan, baseline))
    return 0
