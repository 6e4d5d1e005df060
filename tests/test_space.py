from __future__ import annotations

import itertools
import random

import pytest

from autocomp import AutocompError
from autocomp.cost.size import plan_bytes
from autocomp.models.introspect import introspect
from autocomp.search.repair import Limit, repair, size_limit
from autocomp.space import SPACES_DIR, SearchSpace, reference_assignments
from conftest import tiny_loaded


@pytest.fixture(scope="module")
def desc():
    return introspect(tiny_loaded())


def write(tmp_path, text):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
def test_shipped_spaces_parse(name, desc):
    assert name in {"default", "transformer", "cnn", "multimodal", "compensated", "codebook"}
    if name == "multimodal":  # more in test_multimodal.py
        from autocomp.models import load_model
        from conftest import TINY

        d = introspect(load_model(f"{TINY}:tiny_dual", data=f"{TINY}:dual_calib"))
        sp = SearchSpace.from_yaml(name, d)
        assert sp.groups and all(g.importance in ("weight", "fisher") for g in sp.groups.values())
    elif name == "cnn":
        from autocomp.models import load_model
        from conftest import TINY

        d = introspect(load_model(f"{TINY}:tiny_conv", data=f"{TINY}:conv_calib"))
        sp = SearchSpace.from_yaml(name, d)
    else:
        sp = SearchSpace.from_yaml(name, desc)
    assert sp.params


@pytest.mark.parametrize("text,fragment", [
    ("version: 1\nlayers:\n  - quant: [keep, 9c]\n", r"layers\[0\].quant: .*bits must be 2..8"),
    ("version: 1\nlayers:\n  - quant: [keep, 4x]\n", r"layers\[0\].quant"),
    ("version: 1\nlayers:\n  - qaunt: [keep, 4c]\n", r"unknown key 'qaunt'"),
    ("version: 1\nlayers:\n  - match: '(['\n", r"layers\[0\].match: invalid regex"),
    ("version: 1\nlayers:\n  - types: [Dense]\n", r"unknown type 'Dense'"),
    ("version: 1\nlayerz: []\n", r"unknown key 'layerz'"),
    ("version: 1\nlayers: []\n", r"'layers' must be a non-empty list"),
    ("version: 2\nlayers:\n  - quant: [4c]\n", r"version 2 is not supported"),
    ("- just a list\n", r"must be a mapping"),
    ("version: 1\nlayers: [\n", r"not valid YAML"),
    ("version: 1\nlayers:\n  - prune: [u150]\n", r"prune"),
    ("version: 1\nlayers:\n  - rank: [r1.5]\n", r"rank"),
    ("version: 1\nlayers:\n  - quant: [4c]\nstructured:\n  - kind: blocks\n    producers: [a]\n    consumers: [b]\n",
     r"structured\[0\].kind"),
    ("version: 1\nlayers:\n  - types: [Conv2d]\n    quant: [keep, 4c]\n", r"offers no choice"),
])
def test_malformed_space_names_key_and_file(tmp_path, desc, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(AutocompError, match=fragment) as e:
        SearchSpace.from_yaml(path, desc)
    assert str(path) in str(e.value)


def test_unknown_space_name(desc):
    with pytest.raises(AutocompError, match="not found.*default"):
        SearchSpace.from_yaml("nope", desc)


def test_only_options_that_save_bytes(tmp_path, desc):
    # head is 10x32: rank 0.5 -> 4, factors 4*(10+32)=168 < 320 saves; rank 0.25 -> 0 is dropped;
    # 2:4 on emb (32 inputs) is fine, a u1 would not save (bitmask costs 1/32 of fp32)
    sp = SearchSpace.from_yaml(write(tmp_path, "version: 1\nlayers:\n  - quant: [keep, 8c]\n    prune: [none, u1, u50]\n"
                                              "    rank: [full, r0.5, r0.1]\n"), desc)
    assert sp.params["head:r"] == ("full", "r0.5")
    assert "u1" not in sp.params["fc1:p"]
    assert all("r0.1" not in opts for opts in sp.params.values())  # rank 0.1 * 32 -> 0: never saves
    for p, opts in sp.params.items():
        for o in opts:
            a = {**sp.largest_assignment(), p: o}
            layer = p.rpartition(":")[0]
            base = sp.layer_bytes(layer, sp.largest_assignment()) if o != opts[0] else None
            if base is not None and p.endswith((":p", ":r")):
                assert sp.layer_bytes(layer, a) < base, (p, o)


def test_tie_shares_one_choice(tmp_path, desc):
    sp = SearchSpace.from_yaml(write(tmp_path, "version: 1\nlayers:\n  - types: [Linear]\n    quant: [keep, 8c, 4g16]\n"
                                              "    tie: 'linear'\n"), desc)
    assert list(sp.params) == ["linear:q"]
    plan = sp.decode({"linear:q": "4g16"})
    assert {n: c.label() for n, c in plan.layers.items()} == {"fc1": "4g16", "fc2": "4g16", "head": "4g16"}


def test_smallest_assignment_is_exact(tmp_path, desc):
    sp = SearchSpace.from_yaml(write(tmp_path,
        "version: 1\nlayers:\n  - quant: [keep, 8c, 4g16, 2c]\n    prune: [none, u50, '2:4']\n    rank: [full, r0.5]\n"
        "structured:\n  - kind: neurons\n    producers: [fc1]\n    consumers: [fc2]\n    keep: [1.0, 0.5]\n"), desc)
    best = min(plan_bytes(desc, sp.decode(dict(zip(sp.params, combo))))
               for combo in itertools.product(*sp.params.values()))
    assert plan_bytes(desc, sp.decode(sp.smallest_assignment())) == best


@pytest.mark.parametrize("seed", range(10))
def test_repair_fits_and_is_deterministic(tmp_path, desc, seed):
    sp = SearchSpace.from_yaml("default", desc)
    rng = random.Random(seed)
    a = {p: rng.choice(o) for p, o in sp.params.items()}
    size = plan_bytes(desc, sp.decode(a))
    smallest = plan_bytes(desc, sp.decode(sp.smallest_assignment()))
    budget = smallest + (size - smallest) // 3
    fixed, totals = repair(sp, a, [size_limit(sp, budget)])
    assert totals["size"] == plan_bytes(desc, sp.decode(fixed)) <= budget
    assert repair(sp, a, [size_limit(sp, budget)]) == (fixed, totals)


def test_repair_meets_two_budgets_at_once(desc):
    """Size and a second additive cost (here: weight bits x MACs) are both brought under their limits."""
    sp = SearchSpace.from_yaml("default", desc)

    def bits_cost(n, a):
        layer, choice, rows, cols = sp.layer_plan(n, a)
        return choice.summary().get("bits", 32) * rows * cols

    a = sp.largest_assignment()
    full = Limit("bits", bits_cost, 0.0, 1.0).total(sp, a)
    limits = [size_limit(sp, int(plan_bytes(desc, sp.decode(a)) * 0.6)), Limit("bits", bits_cost, 0.0, full * 0.2)]
    fixed, totals = repair(sp, a, limits)
    assert totals["size"] <= limits[0].budget and totals["bits"] <= limits[1].budget


def test_repair_ends_when_two_budgets_pull_apart(desc):
    """Two budgets no plan meets together (bytes, and a cost that grows as bits shrink): each step must lower
    the summed overshoot of both, so the repair stops instead of trading one for the other forever."""
    import threading

    sp = SearchSpace.from_yaml("default", desc)

    def fewer_bits_cost(n, a):
        layer, choice, rows, cols = sp.layer_plan(n, a)
        return 32 / choice.summary().get("bits", 32) * rows * cols

    a = sp.largest_assignment()
    wide = Limit("wide", fewer_bits_cost, 0.0, 1.0).total(sp, a)
    limits = [size_limit(sp, int(plan_bytes(desc, sp.decode(a)) * 0.3)), Limit("wide", fewer_bits_cost, 0.0, wide * 1.05)]
    sens = {p: {o: float(i) for i, o in enumerate(opts)} for p, opts in sp.params.items()}
    done = []
    for table in (None, sens):
        worker = threading.Thread(target=lambda t=table: done.append(repair(sp, a, limits, t)), daemon=True)
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "repair cycles between the two budgets"
    for fixed, totals in done:
        over = sum(max(0.0, totals[lim.name] - lim.budget) / lim.budget for lim in limits)
        start = sum(max(0.0, lim.total(sp, a) - lim.budget) / lim.budget for lim in limits)
        assert over < start  # it still got as close as it could


def test_reference_plans_are_uniform(desc):
    sp = SearchSpace.from_yaml("default", desc)
    refs = reference_assignments(sp)
    assert "uniform-8c" in refs and "uniform-4g128" in refs
    plan = sp.decode(refs["uniform-8c"])
    assert {c.label() for c in plan.layers.values()} == {"8c"}
    assert len(plan.layers) == len(desc.layers)


def test_structured_groups_on_a_transformers_bert(tmp_path):
    """The transformer space finds FFN-neuron and attention-head groups in a real (tiny) BertModel."""
    transformers = pytest.importorskip("transformers")
    from autocomp.models.base import LoadedModel

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64)
    model = transformers.BertModel(cfg).eval()
    import torch

    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    desc = introspect(LoadedModel(module=model, name="bert", spec="x", batches=[{"input_ids": ids}],
                                  info={"num_attention_heads": 4}))
    sp = SearchSpace.from_yaml("transformer", desc)
    kinds = sorted(g.kind for g in sp.groups.values())
    assert kinds == ["heads", "heads", "neurons", "neurons"]
    heads = next(g for g in sp.groups.values() if g.kind == "heads")
    assert heads.units == 4 and heads.unit_size == 8 and len(heads.producers) == 3
    assert "0.attention:q" in sp.params and "0.ffn:q" in sp.params


def _scan_repair(sp, assignment, limits, sensitivity=None):
    """The repair as a plain scan of every (parameter, option) each step: what the array version must equal."""
    a = dict(assignment)
    totals = {lim.name: lim.total(sp, a) for lim in limits}

    def excess(t):
        return sum(max(0.0, t[lim.name] - lim.budget) / lim.budget for lim in limits)

    def delta(p, opt):
        layers, masks, cur = sp.param_layers(p), p.endswith(":keep"), a[p]
        before = {lim.name: sum(lim.layer_cost(n, a) for n in layers) + (lim.masks(sp, a) if masks else 0) for lim in limits}
        a[p] = opt
        after = {lim.name: sum(lim.layer_cost(n, a) for n in layers) + (lim.masks(sp, a) if masks else 0) for lim in limits}
        a[p] = cur
        return {k: after[k] - before[k] for k in before}

    while (now := excess(totals)) > 0:
        violated = [lim for lim in limits if totals[lim.name] > lim.budget]
        best = None
        for p in sp.params:
            step = None
            for opt in sp.params[p]:
                if opt == a[p]:
                    continue
                d = delta(p, opt)
                moved = {lim.name: totals[lim.name] + d[lim.name] for lim in limits}
                gain = sum((totals[lim.name] - moved[lim.name]) / lim.budget for lim in violated)
                if gain <= 0 or excess(moved) >= now - 1e-12:
                    continue
                if sensitivity is not None:
                    score = gain / (max(0.0, sensitivity[p][opt] - sensitivity[p][a[p]]) + 1e-9)
                    if step is None or score > step[0]:
                        step = (score, opt)
                elif step is None or gain < step[0]:
                    step = (gain, opt)
            if step is not None and (best is None or step[0] > best[0]):
                best = (step[0], p, step[1])
        if best is None:
            break
        a[best[1]] = best[2]
        totals = {lim.name: lim.total(sp, a) for lim in limits}
    return a, totals


@pytest.mark.parametrize("seed", range(6))
def test_repair_takes_the_steps_of_a_plain_scan(desc, seed):
    """One budget or two, with and without a sensitivity table: the same assignment and totals as the scan."""
    sp = SearchSpace.from_yaml("default", desc)
    rng = random.Random(seed)
    a = {p: rng.choice(o) for p, o in sp.params.items()}
    size = plan_bytes(desc, sp.decode(a))

    def bits_cost(n, x):
        layer, choice, rows, cols = sp.layer_plan(n, x)
        return choice.summary().get("bits", 32) * rows * cols

    limits = [size_limit(sp, int(size * 0.5))]
    two = [*limits, Limit("bits", bits_cost, 0.0, Limit("bits", bits_cost, 0.0, 1.0).total(sp, a) * 0.45)]
    sens = {p: {o: rng.choice([0.0, rng.random(), rng.random() * 1e-3]) for o in opts} for p, opts in sp.params.items()}
    for lims, table in ((limits, None), (limits, sens), (two, None), (two, sens)):
        assert repair(sp, a, lims, table) == _scan_repair(sp, a, lims, table)
