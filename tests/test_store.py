"""The weight store: compressed weights on disk, shared between processes and runs, exact and bounded."""

from __future__ import annotations

import os
import time

import pytest
import torch
from conftest import TINY, run_cli, tiny_loaded

import autocomp
from autocomp.compressors import apply as apply_mod
from autocomp.compressors import store as store_mod
from autocomp.compressors.apply import PlanApplier
from autocomp.compressors.lowrank import LowRankConfig
from autocomp.compressors.prune import PruneConfig
from autocomp.compressors.quantize import QuantConfig
from autocomp.compressors.store import WeightStore
from autocomp.models.introspect import introspect
from autocomp.plan import LayerPlan, Plan


@pytest.fixture
def write_all(monkeypatch):
    """Write every weight, however cheap (the tiny model's take microseconds)."""
    monkeypatch.setattr(store_mod, "MIN_MS_PER_MB", 0.0)


def _plan(desc) -> Plan:
    return Plan(layers={"emb": LayerPlan(QuantConfig(4, 8)),
                        "fc1": LayerPlan(LowRankConfig(8), QuantConfig(3, 16)),
                        "fc2": LayerPlan(PruneConfig("unstructured", 0.5), QuantConfig(4, 0, False)),
                        "head": LayerPlan(QuantConfig(2, 8))}, fingerprint=desc.fingerprint)


def _subsets(loaded) -> dict:
    return {"emb": torch.unique(torch.cat([b.flatten() for b in loaded.batches]))}


def _weights(applier: PlanApplier, plan: Plan) -> dict:
    out = {}
    for name in applier.modules:
        w, b = applier.compressed(plan, name)
        if w is not None:
            out[name] = (w.clone(), None if b is None else b.clone())
    return out


def _no_compression(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("computed a weight the store holds")

    monkeypatch.setattr(apply_mod, "run_pipeline", refuse)


def test_round_trip_is_exact_and_a_damaged_file_is_a_miss(tmp_path):
    s = WeightStore(tmp_path / "w")
    w, b = torch.randn(7, 5), torch.randn(7)
    s.put("k1", w, b, seconds=1.0)
    s.put("k2", w, None, seconds=1.0)
    w1, b1 = s.get("k1")
    assert torch.equal(w1, w) and torch.equal(b1, b)
    w2, b2 = s.get("k2")
    assert torch.equal(w2, w) and b2 is None
    assert s.get("k3") is None
    (tmp_path / "w" / "k1.safetensors").write_bytes(b"\x00" * 40)  # e.g. a crash before the data reached the disk
    assert s.get("k1") is None
    assert not (tmp_path / "w" / "k1.safetensors").exists()
    assert (s.hits, s.misses) == (2, 2)


def test_cheap_weights_are_not_written(tmp_path):
    s = WeightStore(tmp_path)
    w = torch.zeros(256, 1024)  # 1 MB
    s.put("cheap", w, seconds=0.001)  # 1 ms for a megabyte: recomputing is cheaper than the write
    s.put("dear", w, seconds=0.05)
    assert s.get("cheap") is None and s.get("dear") is not None
    assert (s.writes, s.skipped) == (1, 1)


def test_the_folder_stays_within_its_bound_and_keeps_what_was_used(tmp_path):
    w = torch.zeros(64, 64)  # 16 KiB (+ a small header)
    s = WeightStore(tmp_path, limit=6 * 16_500)
    for i in range(4):
        s.put(f"k{i}", w, seconds=1.0)
    past = time.time() - 100
    for i in range(4):
        os.utime(tmp_path / f"k{i}.safetensors", (past + i, past + i))
    assert s.get("k0") is not None  # read now: the most recently used of the four
    for i in range(4, 7):
        s.put(f"k{i}", w, seconds=1.0)
    assert s.nbytes() <= 0.8 * s.limit
    assert s.get("k0") is not None, "a recently read weight was evicted before older ones"
    assert [s.get(f"k{i}") is None for i in range(1, 7)] == [True] * 3 + [False] * 3
    for i in range(7, 40):
        s.put(f"k{i}", w, seconds=1.0)
        assert s.nbytes() <= s.limit
    (tmp_path / ".999999999.x.tmp").write_bytes(b"x")  # a temp file whose writer is gone
    s.trim()
    assert not (tmp_path / ".999999999.x.tmp").exists()


def test_an_unwritable_folder_only_turns_the_store_off(tmp_path):
    (tmp_path / "file").write_text("x")
    s = WeightStore(tmp_path / "file" / "w")
    s.put("k", torch.ones(3), seconds=1.0)
    assert s.get("k") is None and s.writes == 0


def test_a_failing_write_turns_the_store_off_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise safetensors.SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    s = WeightStore(tmp_path)
    s.put("k", torch.ones(3), seconds=1.0)
    s.put("k2", torch.ones(3), seconds=1.0)
    assert s.writes == 0 and s.get("k") is None and not list(tmp_path.iterdir())


def test_a_second_applier_reads_every_weight_bit_for_bit(tmp_path, write_all, monkeypatch):
    loaded = tiny_loaded()
    desc = introspect(loaded)
    plan = _plan(desc)
    a = PlanApplier(loaded.module, desc, row_subsets=_subsets(loaded))
    a.store = WeightStore(tmp_path)
    first = _weights(a, plan)
    assert a.store.writes == 4
    fresh = tiny_loaded()  # another process's model
    b = PlanApplier(fresh.module, desc, row_subsets=_subsets(fresh))
    b.store = WeightStore(tmp_path)
    _no_compression(monkeypatch)
    second = _weights(b, plan)
    assert b.store.hits == 4
    assert first.keys() == second.keys()
    for name, (w, bias) in first.items():
        assert torch.equal(second[name][0], w), name
    with torch.no_grad(), b.applied(plan):  # and the model computes with them
        out = fresh.module(fresh.batches[0])
    with torch.no_grad(), a.applied(plan):
        assert torch.equal(loaded.module(loaded.batches[0]), out)


def test_other_weights_rows_or_statistics_are_misses(tmp_path, write_all):
    loaded = tiny_loaded()
    desc = introspect(loaded)
    plan = _plan(desc)
    a = PlanApplier(loaded.module, desc, row_subsets=_subsets(loaded))
    a.store = WeightStore(tmp_path)
    _weights(a, plan)

    other = tiny_loaded()  # same layout, one weight changed
    with torch.no_grad():
        other.module.head.weight[0, 0] += 1.0
    b = PlanApplier(other.module, desc, row_subsets=_subsets(other))
    b.store = WeightStore(tmp_path)
    _weights(b, plan)
    assert b.store.hits == 0

    rows = PlanApplier(tiny_loaded().module, desc, row_subsets={"emb": torch.arange(5)})  # other looked-up rows
    rows.store = WeightStore(tmp_path)
    _weights(rows, plan)
    assert rows.store.hits == 3  # every layer but the table

    gptq = Plan(layers={"fc1": LayerPlan(QuantConfig(4, 16, method="gptq")), "head": LayerPlan(QuantConfig(4, 8))},
                fingerprint=desc.fingerprint)
    seen = []
    for data in (loaded.batches, loaded.batches[:2], loaded.batches):
        m = tiny_loaded().module
        autocomp.calibrate(m, data, desc)
        c = PlanApplier(m, desc)
        c.store = WeightStore(tmp_path)
        w = _weights(c, gptq)
        seen.append((c.store.hits, w["fc1"][0]))
    assert [h for h, _ in seen] == [0, 1, 2]  # the round-to-nearest head is shared; GPTQ only on the same data
    assert not torch.equal(seen[0][1], seen[1][1]) and torch.equal(seen[0][1], seen[2][1])


def test_the_key_follows_the_techniques_code(tmp_path, write_all, monkeypatch):
    loaded = tiny_loaded()
    desc = introspect(loaded)
    a = PlanApplier(loaded.module, desc)
    a.store = WeightStore(tmp_path)
    _weights(a, _plan(desc))
    monkeypatch.setattr(store_mod, "_CODE", "an edited technique")
    b = PlanApplier(tiny_loaded().module, desc)
    b.store = WeightStore(tmp_path)
    _weights(b, _plan(desc))
    assert b.store.hits == 0


def test_a_search_shares_the_store_and_finds_the_same_values(tmp_path, capsys, write_all, monkeypatch):
    import optuna

    def search(name: str, *extra: str) -> list:
        args = ["search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib", "--budget", "40%", "--trials", "12",
                "--studies-dir", str(tmp_path), "--study", name, "--seeds", "uniform", "--json", *extra]
        code, _, err = run_cli(args, capsys)
        assert code == 0, err
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/{name}.db")
        return [t.values for t in study.trials]

    first = search("a")
    files = list((tmp_path / "weights").glob("*.safetensors"))
    assert files
    calls = []
    real = apply_mod.run_pipeline
    monkeypatch.setattr(apply_mod, "run_pipeline", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert search("b") == first  # the same plans, every weight read back
    assert not calls
    assert search("c", "--weights-cache", "0") == first  # and the same values without the store
    assert calls


@pytest.mark.parametrize("value", ["lots", "10%", "-1GB"])
def test_a_bad_weights_cache_is_one_line(tmp_path, capsys, value):
    code, _, err = run_cli(["search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib", "--budget", "40%",
                              "--studies-dir", str(tmp_path), "--weights-cache", value], capsys)
    assert code == 2 and "--weights-cache" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written



def test_a_ray_actor_uses_the_drivers_store(tmp_path, monkeypatch):
    """An actor built as the driver builds it reads and writes the same folder (here in this process)."""
    from autocomp.raybackend import _Worker
    from autocomp.search.config import SearchConfig
    from autocomp.search.engine import parse_store_bytes

    cfg = SearchConfig(budget="40%", model=f"{TINY}:tiny", data=f"{TINY}:calib", studies_dir=tmp_path)
    limit = parse_store_bytes(cfg.weights_cache)
    assert limit == 2 << 30 and parse_store_bytes("0") == 0 and parse_store_bytes("500MB") == 500_000_000
    w = _Worker(cfg.model, cfg.data, "auto", 1, None, (str(tmp_path / "weights"), limit))
    store = w.evaluator.applier.store
    assert isinstance(store, WeightStore) and store.root == tmp_path / "weights" and store.limit == limit
    monkeypatch.setattr(store_mod, "MIN_MS_PER_MB", 0.0)
    desc = w.evaluator.applier.desc
    w.evaluate(Plan(layers={"fc1": LayerPlan(QuantConfig(4, 16))}, fingerprint=desc.fingerprint).to_dict())
    assert store.writes == 1 and len(list((tmp_path / "weights").glob("*.safetensors"))) == 1


def test_studies_lists_what_the_caches_hold(tmp_path, capsys, write_all):
    run_cli(["search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib", "--budget", "40%", "--trials", "3",
             "--studies-dir", str(tmp_path), "--seeds", "uniform", "--json"], capsys)
    n = len(list((tmp_path / "weights").glob("*.safetensors")))
    code, out, _ = run_cli(["studies", "--studies-dir", str(tmp_path)], capsys)
    assert code == 0 and n and "weights/" in out and f"({n} files)" in out and "safe to delete" in out
    code, out, _ = run_cli(["studies", "--studies-dir", str(tmp_path), "--json"], capsys)
    assert code == 0 and "weights" not in out  # the JSON list of studies is unchanged
