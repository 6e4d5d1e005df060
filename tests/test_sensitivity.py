"""Sensitivity database (cache, invalidation), the additive ILP against brute force, and --seeds ilp."""

from __future__ import annotations

import itertools
import json

import optuna
import pytest

from autocomp.cost.size import plan_bytes
from autocomp.evaluators.proxy import ProxyEvaluator
from autocomp.models.introspect import introspect
from autocomp.search.repair import repair, size_limit
from autocomp.search.sensitivity import ilp_assignment, profile
from autocomp.space import SearchSpace
from conftest import TINY, run_cli, tiny_loaded

SMALL = "version: 1\nlayers:\n  - types: [Linear]\n    quant: [keep, 8c, 4g16, 2c]\n    prune: [none, u50]\n"


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "s.yaml").write_text(SMALL)
    loaded = tiny_loaded()
    desc = introspect(loaded)
    return loaded, desc, SearchSpace.from_yaml(tmp_path / "s.yaml", desc), ProxyEvaluator(loaded, desc)


def test_profile_is_cached_and_invalidated(setup, tmp_path):
    loaded, desc, space, ev = setup
    calls = []

    def counting(plan):
        calls.append(plan)
        return ev(plan)

    s1 = profile(space, counting, tmp_path / "cache", {"weights": "w1"})
    n = len(calls)
    assert n == 1 + sum(len(o) - 1 for o in space.params.values())  # linear in choices x options
    assert all(v >= 0 for row in s1.table.values() for v in row.values())
    assert s1.table["fc1:q"]["2c"] > s1.table["fc1:q"]["8c"]  # 2-bit hurts more than 8-bit
    s2 = profile(space, counting, tmp_path / "cache", {"weights": "w1"})
    assert len(calls) == n and s2.table == s1.table  # reused, no evaluation
    profile(space, counting, tmp_path / "cache", {"weights": "w2"})  # another model: profiled again
    assert len(calls) == 2 * n


def test_ilp_matches_brute_force(setup, tmp_path):
    loaded, desc, space, ev = setup
    sens = profile(space, ev, tmp_path / "cache", {"weights": "x"})
    sizes = []
    for combo in itertools.product(*space.params.values()):
        a = dict(zip(space.params, combo))
        sizes.append((plan_bytes(desc, space.decode(a)), sens.of(a)))
    smallest, largest = min(s for s, _ in sizes), max(s for s, _ in sizes)
    for frac in (0.1, 0.4, 0.7):
        budget = int(smallest + frac * (largest - smallest))
        best = min(v for s, v in sizes if s <= budget)
        a = ilp_assignment(space, sens, budget)
        assert plan_bytes(desc, space.decode(a)) <= budget
        assert sens.of(a) == pytest.approx(best, abs=1e-12)
    assert ilp_assignment(space, sens, smallest - 1) is None


def test_sensitivity_guided_repair_adds_less_sensitivity(setup, tmp_path):
    loaded, desc, space, ev = setup
    sens = profile(space, ev, tmp_path / "cache", {"weights": "x"})
    a = space.largest_assignment()
    budget = int(plan_bytes(desc, space.decode(a)) * 0.5)
    plain, t1 = repair(space, a, [size_limit(space, budget)])
    guided, t2 = repair(space, a, [size_limit(space, budget)], sens.table)
    assert t1["size"] <= budget and t2["size"] <= budget
    assert sens.of(guided) <= sens.of(plain)


def test_search_with_ilp_seeds(capsys, studies):
    code, out, err = run_cli(["search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib", "--budget", "40%",
                              "--trials", "12", "--seeds", "ilp", "--studies-dir", str(studies), "--study", "s",
                              "--json"], capsys)
    assert code == 0, err
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{studies}/s.db").trials
    refs = [t.user_attrs.get("reference", "") for t in trials]
    assert refs[0] == "ilp-1.00" and any(r.startswith("uniform-") for r in refs)
    assert list((studies / "sensitivity").glob("*.json"))
    assert json.loads(out)["pareto"]
