"""Files written before techniques became plug-ins (plan format 1; tests/data/v1/README.md) still work: plans load
as the same plans with the same keys, the old export and training checkpoint load and compute what the old
code computed, and the old study resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import autocomp
from autocomp.compressors.apply import PlanApplier
from autocomp.models.introspect import introspect
from autocomp.plan import LayerPlan, Plan, StructuredGroup
from conftest import TINY, tiny_loaded

V1 = Path(__file__).resolve().parent / "data" / "v1"


@pytest.fixture(scope="module")
def reference():
    return load_file(str(V1 / "reference-outputs.safetensors"))


def test_version_1_plan_files_load_as_the_same_plans_with_the_same_keys():
    keys = json.loads((V1 / "keys.json").read_text())
    for name in ("all-techniques", "best"):
        raw = json.loads((V1 / f"{name}-plan.json").read_text())
        assert raw["_version"] == 1
        plan = Plan.load(V1 / f"{name}-plan.json")
        assert plan.key() == keys[name]["key"] and plan.digest() == keys[name]["sha256_16"]
        assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # and round-trips as version 2
    plan = Plan.load(V1 / "all-techniques-plan.json")
    assert plan.layers == {
        "emb": LayerPlan(bits=3, group_size=16, symmetric=False, prune="unstructured", sparsity=0.5),
        "fc1": LayerPlan(bits=4, group_size=16, rank=8, prune="2:4"),
        "fc2": LayerPlan(bits=8, act_bits=8), "head": LayerPlan(prune="unstructured", sparsity=0.3)}
    assert plan.structured == {"neurons@fc1": StructuredGroup("neurons", 64, 1, 48, ("fc1",), ("fc2",))}


def test_version_1_plans_compute_what_they_computed(reference):
    loaded = tiny_loaded()
    desc = introspect(loaded)
    b = loaded.batches[0]
    for name in ("all-techniques", "best"):
        plan = Plan.load(V1 / f"{name}-plan.json")
        with torch.no_grad(), PlanApplier(loaded.module, desc).applied(plan):
            assert torch.equal(loaded.module(b), reference[f"{name}.applied"]), name


def test_version_1_export_and_checkpoint_load(reference, tmp_path):
    from autocomp.compressors.student import finalize
    from autocomp.training import load_student
    from tiny_models import tiny

    loaded = tiny_loaded()
    desc = introspect(loaded)
    b = loaded.batches[0]
    with torch.no_grad():
        assert torch.equal(autocomp.load(V1 / "all-techniques.acz.safetensors", model=tiny())(b),
                           reference["all-techniques.loaded"])
    plan = Plan.load(V1 / "all-techniques-plan.json")
    student, meta = load_student(loaded.module, plan, desc, V1 / "all-techniques-trained.safetensors")
    assert meta["clip"] == "learned"
    with torch.no_grad():
        assert (finalize(student)(b) - reference["all-techniques.trained"]).abs().max() <= 1e-6


def test_version_1_study_resumes_and_reads(tmp_path):
    import optuna

    from autocomp.search.config import SearchConfig
    from autocomp.search.engine import run_search
    from autocomp.search.study import open_study, plan_of

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(V1 / "v1-tiny.db", studies / "v1-tiny.db")
    url = f"sqlite:///{studies / 'v1-tiny.db'}"
    study = optuna.load_study(study_name="v1-tiny", storage=url)
    meta = study.user_attrs["autocomp"]  # made in another folder: the same command, run from this checkout
    study.set_user_attr("autocomp", {**meta, "model_spec": f"{TINY}:tiny", "data_spec": f"{TINY}:calib"})
    old = {t.number: t.values for t in study.trials if t.values}
    assert all(t.user_attrs["plan"]["_version"] == 1 for t in study.trials if "plan" in t.user_attrs)
    result = run_search(SearchConfig(budget="40%", model=f"{TINY}:tiny", data=f"{TINY}:calib", study="v1-tiny",
                                     trials=16, studies_dir=studies))
    assert result["trials_complete"] == 16
    trials = optuna.load_study(study_name="v1-tiny", storage=url).trials
    assert all(trials[n].values == v for n, v in old.items())  # nothing finished was redone
    handle = open_study("v1-tiny", None, studies)
    plans = [plan_of(t, handle) for t in trials if t.values]
    assert len(plans) == 16 and {p.to_dict()["_version"] for p in plans} == {2}
    assert all(Path(e["plan_path"]).is_file() for e in result["pareto"])
