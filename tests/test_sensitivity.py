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


def tiny_search(capsys, studies, study, *extra, budget="40%", trials=12):
    """Run `autocomp search --json` on the tiny model; -> (parsed result, the study's trials)."""
    code, out, err = run_cli(["search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib", "--budget", budget,
                              "--trials", str(trials), *extra, "--studies-dir", str(studies), "--study", study,
                              "--json"], capsys)
    assert code == 0, err
    trials_ = optuna.load_study(study_name=study, storage=f"sqlite:///{studies}/{study}.db").trials
    return json.loads(out), trials_


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
    result, trials = tiny_search(capsys, studies, "s", "--seeds", "ilp")
    refs = [t.user_attrs.get("reference", "") for t in trials]
    assert refs[0] == "ilp-1.00" and any(r.startswith("uniform-") for r in refs)
    assert list((studies / "sensitivity").glob("*.json"))
    assert result["pareto"]


def test_both_sensitivities_seed_from_each_table(capsys, studies, setup, tmp_path):
    """--sensitivity both: Fisher's integer-program plans first, then the measured table's (a plan both give is
    queued once); both tables are profiled and cached."""
    from autocomp.search.config import SearchConfig
    from autocomp.search.seeds import enqueue_seeds, ilp_seeds
    from autocomp.search.sensitivity import Sensitivity

    _, trials = tiny_search(capsys, studies, "b", "--sensitivity", "both")
    assert trials[0].user_attrs["reference"] == "ilp-1.00"
    assert len(list((studies / "sensitivity").glob("*.json"))) == 2  # one file per estimate
    # the queueing, with two tables that disagree (the tiny model's two estimates give the same plans)
    loaded, desc, space, ev = setup
    fisher = profile(space, ev, tmp_path / "cache", {"m": "tiny"})
    other = Sensitivity({p: {o: (10 * v if p.startswith("fc1") else v) for o, v in row.items()}
                         for p, row in fisher.table.items()}, fisher.base, 0.0, 0)
    fisher.others = {"measured": other}
    study = optuna.create_study(directions=["minimize", "minimize"])
    budget = int(0.6 * desc.fp32_bytes)
    smallest = plan_bytes(desc, space.decode(space.smallest_assignment()))
    enqueue_seeds(study, SearchConfig(budget="40%", trials=100), space, fisher, budget, smallest, {}, [])
    queued = {t.user_attrs["reference"]: tuple(sorted(t.system_attrs["fixed_params"].items())) for t in study.trials}
    labels = list(queued)
    first = [r for r in labels if r.startswith("ilp-") and not r.startswith("ilp-measured-")]
    second = [r for r in labels if r.startswith("ilp-measured-")]
    assert first and second and labels.index(first[-1]) < labels.index(second[0])
    ilp_plans = [v for k, v in queued.items() if k.startswith("ilp")]
    assert len(ilp_plans) == len(set(ilp_plans))  # no plan queued twice
    mine = {tuple(sorted(a.items())) for _, a in ilp_seeds(space, other, budget, smallest, {}, n=5)}
    assert mine - {queued[r] for r in first}  # the tables disagree somewhere
    assert {queued[r] for r in second} <= mine and {queued[r] for r in second} | {queued[r] for r in first} >= mine


def test_partial_evaluations_add_up_to_the_full_proxy(setup):
    loaded, desc, space, ev = setup
    plan = space.decode({p: o[-1] for p, o in space.params.items()})
    n0, d0 = ev.partial(plan, [0])
    n1, d1 = ev.partial(plan, range(1, len(ev.batches)))
    assert ev.finish(n0 + n1, d0 + d1) == pytest.approx(ev(plan), rel=1e-12)


def test_refiner_mutates_front_plans(capsys, studies):
    _, trials = tiny_search(capsys, studies, "r", "--sampler", "refine", trials=24)
    seeded = [t for t in trials if "reference" in t.user_attrs]
    proposed = [t for t in trials if "reference" not in t.user_attrs and t.params]
    assert proposed, "the refiner should propose after the seeds"
    # a proposal differs from some seed/earlier plan in only a few choices (level switches, then repair)
    earlier = [t.params for t in seeded]
    diffs = [min(sum(a[p] != b[p] for p in a) for b in earlier) for a in (t.params for t in proposed[:3])]
    assert min(diffs) <= 6


def test_staged_evaluation_skips_dominated_candidates(capsys, studies):
    _, trials = tiny_search(capsys, studies, "st", "--sampler", "random", "--staged", budget="60%", trials=20)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    staged = [t for t in trials if str(t.user_attrs.get("skipped", "")).startswith("staged")]
    assert len(complete) == 20 and staged, "random proposals at 60% include clearly dominated ones"
    for t in staged:
        assert t.state == optuna.trial.TrialState.PRUNED and not t.values  # never stored as a value
    # stored values are full-set values: re-evaluating a complete trial's plan gives the same proxy
    from autocomp.plan import Plan

    ev = ProxyEvaluator(tiny_loaded(), introspect(tiny_loaded()))
    t = complete[-1]
    assert ev(Plan.from_dict(t.user_attrs["plan"])) == pytest.approx(t.values[0], rel=1e-9)


def test_ilp_search_json_stdout_is_one_object(studies):
    """C libraries (HiGHS) must not write into the --json stdout: check it at the file-descriptor level."""
    import subprocess
    import sys

    from conftest import ROOT

    res = subprocess.run([sys.executable, "-m", "autocomp.cli", "search", "--model", f"{TINY}:tiny", "--data",
                          f"{TINY}:calib", "--budget", "40%", "--trials", "6", "--seeds", "ilp", "--studies-dir",
                          str(studies), "--json"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["pareto"]


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_fisher_estimate_tracks_measured(tmp_path, metric):
    """The squared-gradient estimate needs no forward pass per option and ranks options like the
    measured database; at small perturbations it is close in value too (second-order regime)."""
    from scipy.stats import spearmanr

    from autocomp.search.sensitivity import fisher_profile

    (tmp_path / "s.yaml").write_text("version: 1\nlayers:\n  - types: [Linear]\n"
                                     "    quant: [keep, 8c, 6c, 4g16, 3c, int8]\n    prune: [none, u10, u30]\n")
    loaded = tiny_loaded()
    loaded.metric = metric
    desc = introspect(loaded)
    space = SearchSpace.from_yaml(tmp_path / "s.yaml", desc)
    ev = ProxyEvaluator(loaded, desc)
    measured = profile(space, ev, tmp_path / "m", {"weights": "w"})
    fisher = fisher_profile(space, ev, tmp_path / "f", {"weights": "w"}, probes=32, measure_share=2.0)  # all estimated
    pairs = [(measured.table[p][o], fisher.table[p][o]) for p in space.params for o in space.params[p]
             if measured.table[p][o] > 0]
    rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
    assert rho > 0.8, pairs
    small = [(a, b) for a, b in pairs if a < 1e-3]
    assert small and all(0.3 < b / a < 3 for a, b in small), small
    assert all(p.grad is None for p in loaded.module.parameters())  # the model is left as found
    again = fisher_profile(space, ev, tmp_path / "f", {"weights": "w"}, probes=32, measure_share=2.0)
    assert again.table == fisher.table  # cached


def test_fisher_profile_measures_the_biggest_choices(tmp_path):
    """Choices holding >= measure_share of the bytes get measured values (the same numbers `profile` gives);
    the others keep their estimates."""
    from autocomp.search.sensitivity import fisher_profile

    (tmp_path / "s.yaml").write_text("version: 1\nlayers:\n  - types: [Linear]\n"
                                     "    quant: [keep, 8c, 4g16, 3c]\n    prune: [none, u30]\n")
    loaded = tiny_loaded()
    desc = introspect(loaded)
    space = SearchSpace.from_yaml(tmp_path / "s.yaml", desc)
    ev = ProxyEvaluator(loaded, desc)
    measured = profile(space, ev, tmp_path / "m", {"weights": "w"})
    estimated = fisher_profile(space, ev, tmp_path / "e", {"weights": "w"}, measure_share=2.0)
    shares = {n: desc.by_name[n].nbytes / desc.fp32_bytes for n in space.members}
    share = sorted(shares.values())[-1]  # only the biggest layer qualifies
    hybrid = fisher_profile(space, ev, tmp_path / "h", {"weights": "w"}, measure_share=share)
    capped = fisher_profile(space, ev, tmp_path / "c", {"weights": "w"}, measure_share=0.0, measure_max=1)
    assert capped.table == hybrid.table  # every choice qualifies by share; only the biggest one is measured
    assert hybrid.evals == estimated.evals + sum(len(space.params[p]) - 1 for p in space.params
                                                 if shares[p.rpartition(":")[0]] >= share)
    for p in space.params:
        want = measured if shares[p.rpartition(":")[0]] >= share else estimated
        assert hybrid.table[p] == pytest.approx(want.table[p], rel=1e-6, abs=1e-12), p
    assert any(hybrid.table[p] != pytest.approx(measured.table[p], rel=1e-3) for p in space.params)


@pytest.mark.parametrize("tie", [None, "'{block}'"])
def test_deep_model_stays_searchable(capsys, studies, tmp_path, tie):
    """211 layers: the space binds, the sensitivity database and ILP seeds are computed, the search runs, and
    tied blocks share one choice."""
    rule = "  - types: [Linear]\n    quant: [keep, 8c, 4g16, 2c]\n    prune: [none, u50]\n"
    (tmp_path / "deep.yaml").write_text("version: 1\nlayers:\n" + rule + (f"    tie: {tie}\n" if tie else ""))
    code, out, err = run_cli(["search", "--model", f"{TINY}:deep", "--data", f"{TINY}:deep_calib", "--budget", "40%",
                              "--trials", "8", "--space", str(tmp_path / "deep.yaml"), "--seeds", "ilp",
                              "--studies-dir", str(studies), "--study", "deep", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["pareto"] and all(e["size_bytes"] <= r["budget_bytes"] for e in r["pareto"])
    trials = optuna.load_study(study_name="deep", storage=f"sqlite:///{studies}/deep.db").trials
    params = trials[-1].params
    if tie:
        assert len(params) == 2 * 71  # one (quant, prune) choice per block, plus the head
    else:
        assert len(params) == 2 * 211
    assert any(t.user_attrs.get("reference", "").startswith("ilp-") for t in trials)


def test_ilp_holds_a_latency_limit(tmp_path):
    """Seeds respect a latency (any additive) budget: the program picks faster options where it must."""
    from autocomp.cost.device import parse_device
    from autocomp.cost.latency import CostModel, Workload
    from autocomp.search.repair import Limit
    from autocomp.search.sensitivity import Sensitivity

    (tmp_path / "s.yaml").write_text("version: 1\nlayers:\n  - types: [Linear]\n"
                                     "    quant: [keep, int8, 4g16]\n    rank: [full, r0.5]\n")
    desc = introspect(tiny_loaded())
    space = SearchSpace.from_yaml(tmp_path / "s.yaml", desc)
    dev = parse_device({"name": "toy", "peak_ops": {"fp32": {"value": 1e9, "source": "s"},
                                                    "int8": {"value": 4e9, "source": "s"}},
                        "memory_bandwidth": {"value": 1e8, "source": "s"}, "layer_overhead_s": {"value": 1e-6, "source": "s"},
                        "efficiency": {"compute": {"value": 1.0, "source": "s"}, "memory": {"value": 1.0, "source": "s"}},
                        "default_dtype": "fp32", "accelerates": {"int8": True, "weight_only_bits": [], "sparse_2_4": False}},
                       "toy.yaml")
    cost = CostModel(dev, desc, Workload(1, None))

    def seconds(n, a):
        layer, choice, rows, cols = space.layer_plan(n, a)
        return cost.layer(layer, choice, rows, cols)[0]

    # 4-bit weights cost the least drift but run no faster here (no weight-only kernels); int8 and rank do
    sens = Sensitivity({p: ({"keep": 0.0, "int8": 0.5, "4g16": 0.1} if p.endswith(":q") else {"full": 0.0, "r0.5": 1.0})
                        for p in space.params}, 0.0, 0.0, 0)
    free = ilp_assignment(space, sens, desc.fp32_bytes)  # no size pressure: everything stays uncompressed
    limit = Limit("latency", seconds, cost.other_cost()[0], 0.0)
    slow = limit.total(space, free)
    limit = Limit("latency", seconds, cost.other_cost()[0], 0.8 * slow)
    held = ilp_assignment(space, sens, desc.fp32_bytes, limits=[limit])
    assert held is not None and limit.total(space, held) <= limit.budget < slow
    assert sens.of(held) > sens.of(free)  # it paid drift for speed


def test_the_profile_works_in_the_search_applier_and_its_table_does_not_change(tmp_path):
    """The Fisher profile compresses every option with the search's applier, whose embedding rows are all the
    calibration batches' (a superset of the profiled first batch's): the table is the one an applier of its own
    gives, bit for bit, and the search starts with those options compressed."""
    import dataclasses

    from autocomp.search.config import SearchConfig
    from autocomp.search.seeds import sensitivity_database
    from autocomp.search.sensitivity import fisher_profile

    loaded = tiny_loaded()
    desc = introspect(loaded)
    space = SearchSpace.from_yaml("default", desc)
    ev = ProxyEvaluator(loaded, desc)
    assert len(ev.applier.row_subsets["emb"]) > len(ProxyEvaluator(dataclasses.replace(
        loaded, batches=loaded.batches[:1]), desc).applier.row_subsets["emb"])
    cfg = SearchConfig(budget="40%", studies_dir=tmp_path / "studies", sensitivity="fisher")
    shared = sensitivity_database(cfg, loaded, desc, space, ev, lambda kind, data: None)
    assert len(ev.applier._weights) > 0  # the search's applier holds what the profile compressed
    sliced = dataclasses.replace(loaded, batches=loaded.batches[:1], metric=ev.metric)
    own = fisher_profile(space, ProxyEvaluator(sliced, desc), tmp_path / "own", {"other": 1})
    assert shared.table == own.table


def test_fisher_estimate_of_a_choice_leaves_out_fixed_choices_elsewhere(tmp_path):
    """A layer compressed by a rule with one option (a fixed choice) is in every decoded plan: its error must
    not be charged to the other choices' options (an offset on the compressed options only, not on 'keep',
    would bias the seeds toward leaving layers uncompressed)."""
    from autocomp.search.sensitivity import fisher_profile

    loaded = tiny_loaded()
    desc = introspect(loaded)
    ev = ProxyEvaluator(loaded, desc)
    (tmp_path / "fixed.yaml").write_text("version: 1\nlayers:\n  - match: 'head'\n    quant: [3c]\n"
                                         "  - types: [Linear]\n    quant: [keep, 8c, 3c]\n")
    (tmp_path / "free.yaml").write_text("version: 1\nlayers:\n  - match: 'head'\n    quant: [keep]\n"
                                        "  - types: [Linear]\n    quant: [keep, 8c, 3c]\n")
    fixed = SearchSpace.from_yaml(tmp_path / "fixed.yaml", desc)
    free = SearchSpace.from_yaml(tmp_path / "free.yaml", desc)
    assert fixed.fixed["head:q"] == "3c" and set(fixed.params) == set(free.params) == {"fc1:q", "fc2:q"}
    a = fisher_profile(fixed, ev, tmp_path / "a", {"weights": "w"}, measure_share=2.0)
    b = fisher_profile(free, ev, tmp_path / "b", {"weights": "w"}, measure_share=2.0)
    assert a.table["fc1:q"]["3c"] > 0
    for p in free.params:
        assert a.table[p] == pytest.approx(b.table[p], rel=1e-9, abs=0), p
