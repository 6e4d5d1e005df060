from __future__ import annotations

import json

import pytest

from autocomp import AutocompError, LayerPlan, Plan, StructuredGroup, parse_budget
from autocomp.plan import atomic_write_text


@pytest.mark.parametrize("text,expected", [
    ("200MB", 200 * 10**6), ("1.5GB", 1_500_000_000), ("30MiB", 30 * 2**20), ("512KiB", 512 * 1024),
    ("1000", 1000), ("10 mb", 10 * 10**6), ("25%", 250), ("100%", 1000), ("150%", 1500),
])
def test_parse_budget(text, expected):
    assert parse_budget(text, fp32_bytes=1000) == expected


@pytest.mark.parametrize("text,fragment", [
    ("-5MB", "positive"), ("0MB", "positive"), ("abc", "not a size"), ("12XB", "unknown unit"),
    ("", "not a size"), ("5MB10", "not a size"), ("1e999MB", "not a finite size"), ("inf", "not a size"),
    ("nan%", "not a size"), ("1e30GB", "larger than any model"), ("0.1B", "less than one byte"),
])
def test_parse_budget_errors(text, fragment):
    with pytest.raises(AutocompError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_budget(text, fp32_bytes=1000)


def _plan() -> Plan:
    return Plan(
        layers={"a.fc": LayerPlan(bits=4, group_size=128, symmetric=False, prune="unstructured", sparsity=0.3, rank=8),
                "b": LayerPlan(bits=8)},
        structured={"neurons@a.fc": StructuredGroup("neurons", 64, 1, 48, ("a.fc",), ("b",))},
        model_spec="x.py:f", model_name="f", fingerprint="abc", metrics={"proxy": 0.1}, meta={"trial": 3},
    )


def test_plan_round_trip(tmp_path):
    p = _plan()
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    path = p.save(tmp_path / "sub" / "plan.json")
    assert Plan.load(path) == p
    assert [x.name for x in path.parent.iterdir()] == ["plan.json"]  # no temp file left behind
    assert p.key() == Plan.load(path).key()


def test_plan_key_ignores_metrics_and_identity_layers():
    p = _plan()
    q = Plan(layers={**p.layers, "c": LayerPlan()}, structured=p.structured, metrics={"proxy": 9})
    assert p.key() == q.key()


@pytest.mark.parametrize("mutate,fragment", [
    (lambda d: d.update(_version=99), "version 99"),
    (lambda d: d.update(_type="other"), "not an autocomp plan"),
    (lambda d: d["layers"]["b"]["quantize"].update(bits=40), "bits must be"),
    (lambda d: d["layers"]["b"]["quantize"].update(bits="eight"), "bits must be"),
    (lambda d: d["layers"]["b"]["quantize"].update(bits=1), "bits must be"),
    (lambda d: d["layers"]["a.fc"].update(prune={"kind": "weird"}), "prune must be"),
    (lambda d: d["layers"]["b"]["quantize"].update(colour=1), "layer 'b'.*no field 'colour'; allowed: bits"),
    (lambda d: d["layers"]["b"].update(cluster={"k": 4}), "technique 'cluster' is not registered"),
    (lambda d: d["techniques"].update(quantize=7), "quantize configs of version 7"),
    (lambda d: d.update(layers=[1, 2]), "malformed"),
])
def test_plan_validation(mutate, fragment):
    d = _plan().to_dict()
    mutate(d)
    with pytest.raises(AutocompError, match=fragment):
        Plan.from_dict(d)


def _v1(p: Plan) -> dict:
    """The version-1 form of a plan of the built-in techniques (what studies and plan files hold from before)."""
    d = p.to_dict()
    d["_version"] = 1
    del d["techniques"]
    d["layers"] = {k: v.v1() for k, v in p.layers.items()}
    return d


def test_version_1_plans_load_as_the_same_plan():
    p = _plan()
    d = _v1(p)
    assert d["layers"]["a.fc"] == {"bits": 4, "group_size": 128, "symmetric": False, "prune": "unstructured",
                                   "sparsity": 0.3, "rank": 8, "act_bits": None}
    q = Plan.from_dict(json.loads(json.dumps(d)))
    assert q == p and q.key() == p.key() and q.to_dict()["_version"] == 2


@pytest.mark.parametrize("mutate,fragment", [
    (lambda d: d["layers"]["b"].update(bits=40), "bits must be"),
    (lambda d: d["layers"]["b"].update(bits="eight"), "bits must be"),
    (lambda d: d["layers"]["b"].update(prune="weird"), "prune must be"),
    (lambda d: d["layers"]["b"].update(colour=1), "layer 'b'.*unknown layer field 'colour'; allowed: bits"),
])
def test_version_1_plan_validation(mutate, fragment):
    d = _v1(_plan())
    mutate(d)
    with pytest.raises(AutocompError, match=fragment):
        Plan.from_dict(d)


def test_plan_load_errors(tmp_path):
    with pytest.raises(AutocompError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AutocompError, match="not valid JSON"):
        Plan.load(bad)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old")
    import os

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
