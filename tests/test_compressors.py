"""One conformance suite over every compressor, plus each technique against a simple reference."""

from __future__ import annotations

import copy

import pytest
import torch

from autocomp import PlanMismatchError, apply_plan
from autocomp.compressors.apply import PlanApplier
from autocomp.compressors.base import LayerContext, registered
from autocomp.compressors.codebook import CodebookConfig
from autocomp.compressors.pipeline import reconstruct, run_pipeline
from autocomp.compressors.prune import magnitude_mask, nm_mask
from autocomp.compressors.quantize import quantize_matrix
from autocomp.evaluators.proxy import ProxyEvaluator
from autocomp.models.base import run_batch
from autocomp.models.introspect import introspect
from autocomp.plan import LayerPlan, Plan, StructuredGroup
from conftest import tiny_loaded

# one plan per registered technique, and all of them combined
TECHNIQUE_CHOICE = {
    "codebook": LayerPlan(CodebookConfig(4, 16)),
    "lowrank": LayerPlan(rank=8),
    "prune": LayerPlan(prune="unstructured", sparsity=0.5),
    "quantize": LayerPlan(bits=3, group_size=16, symmetric=False),
}


def test_every_registered_compressor_has_a_conformance_case():
    assert {c.name for c in registered()} == set(TECHNIQUE_CHOICE)


@pytest.mark.parametrize("technique", [*TECHNIQUE_CHOICE, "combined", "structured"])
def test_apply_then_undo_restores_bit_for_bit(technique):
    loaded = tiny_loaded()
    desc = introspect(loaded)
    model = loaded.module
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    choice = TECHNIQUE_CHOICE.get(technique, LayerPlan(rank=8, prune="2:4", bits=4, group_size=16))
    structured = {}
    if technique == "structured":
        structured = {"g": StructuredGroup("neurons", 64, 1, 40, ("fc1",), ("fc2",))}
    plan = Plan(layers={n: choice for n in ("fc1", "fc2", "head")}, structured=structured,
                fingerprint=desc.fingerprint)
    batch = loaded.batches[0]
    with torch.no_grad():
        ref = model(batch)
        with PlanApplier(model, desc).applied(plan):
            changed = model(batch)
            assert not torch.equal(changed, ref)
        after = model(batch)
    assert torch.equal(after, ref)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.data_ptr() == ptrs[n], n


def test_undo_happens_even_if_the_forward_fails():
    loaded = tiny_loaded()
    desc = introspect(loaded)
    w = loaded.module.fc1.weight.detach().clone()
    plan = Plan(layers={"fc1": LayerPlan(bits=2)}, fingerprint=desc.fingerprint)
    with pytest.raises(RuntimeError):
        with PlanApplier(loaded.module, desc).applied(plan):
            raise RuntimeError("boom")
    assert torch.equal(loaded.module.fc1.weight, w)


@pytest.mark.parametrize("choice", [*TECHNIQUE_CHOICE.values(), LayerPlan(prune="2:4", bits=5)])
def test_deterministic(choice):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    a = reconstruct(run_pipeline(w, choice, LayerContext("x")))
    b = reconstruct(run_pipeline(w.clone(), choice, LayerContext("x")))
    assert torch.equal(a, b)


def test_pipeline_does_not_modify_its_input():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    w0 = w.clone()
    run_pipeline(w, LayerPlan(rank=8, prune="unstructured", sparsity=0.5, bits=3), LayerContext("x"))
    assert torch.equal(w, w0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_quantization_error_within_half_a_step(bits, sym):
    w = torch.randn(16, 48, generator=torch.Generator().manual_seed(bits))
    deq, codes, scale, zp = quantize_matrix(w, bits, 16, sym)
    step = scale.float().repeat_interleave(16, dim=1)
    assert (deq - w).abs().le(step / 2 + 1e-6).all()
    assert codes.min() >= 0 and codes.max() < 2**bits
    assert codes.reshape(16, 3, 16).unique().numel() <= 2**bits * 48
    assert scale.dtype == torch.float16 and (zp is None) == sym


def test_unstructured_prunes_exactly_the_smallest():
    w = torch.randn(10, 10, generator=torch.Generator().manual_seed(3))
    mask = magnitude_mask(w, 0.37)
    assert int((~mask).sum()) == 37
    assert w.abs()[~mask].max() <= w.abs()[mask].min()


def test_two_four_pattern():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    mask = nm_mask(w)
    groups = mask.reshape(8, 4, 4)
    assert (groups.sum(-1) == 2).all()
    kept_min = (w.abs() * mask).reshape(8, 4, 4).where(groups, torch.tensor(float("inf"))).amin(-1)
    dropped_max = (w.abs() * ~mask).reshape(8, 4, 4).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_lowrank_equals_truncated_svd():
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(5))
    approx = reconstruct(run_pipeline(w, LayerPlan(rank=8), LayerContext("x")))
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    ref = (u[:, :8] * s[:8]) @ vh[:8]
    assert torch.allclose(approx.double(), ref, atol=1e-5)
    assert torch.linalg.matrix_rank(approx) == 8


def test_structured_pruning_equals_a_physically_smaller_model():
    """Masking 24 of fc1's 64 neurons (and fc2's matching inputs) == a model whose layers are smaller."""
    loaded = tiny_loaded()
    desc = introspect(loaded)
    model = loaded.module
    plan = Plan(layers={}, structured={"g": StructuredGroup("neurons", 64, 1, 40, ("fc1",), ("fc2",))},
                fingerprint=desc.fingerprint)
    score = model.fc1.weight.pow(2).sum(1).double() + model.fc2.weight.pow(2).sum(0).double()
    keep = torch.sort(torch.sort(score, descending=True, stable=True).indices[:40]).values
    small = copy.deepcopy(model)
    small.fc1 = torch.nn.Linear(32, 40)
    small.fc2 = torch.nn.Linear(40, 32)
    with torch.no_grad():
        small.fc1.weight.copy_(model.fc1.weight[keep])
        small.fc1.bias.copy_(model.fc1.bias[keep])
        small.fc2.weight.copy_(model.fc2.weight[:, keep])
        small.fc2.bias.copy_(model.fc2.bias)
    batch = loaded.batches[0]
    with torch.no_grad(), PlanApplier(model, desc).applied(plan):
        masked = model(batch)
    assert torch.allclose(masked, small(batch), atol=1e-6)


def test_fast_evaluator_matches_deepcopy_reference():
    """Swap-in evaluation == deep-copy the model, write the compressed weights, run, compare."""
    loaded = tiny_loaded()
    desc = introspect(loaded)
    plan = Plan(layers={"emb": LayerPlan(bits=3, group_size=8), "fc1": LayerPlan(rank=8, bits=4),
                        "fc2": LayerPlan(prune="2:4", bits=6), "head": LayerPlan(prune="unstructured", sparsity=0.6)},
                fingerprint=desc.fingerprint)
    fast = ProxyEvaluator(loaded, desc)(plan)
    ref_model = copy.deepcopy(loaded.module)
    with torch.no_grad():
        for name, choice in plan.layers.items():
            mod = dict(ref_model.named_modules())[name]
            mod.weight.copy_(reconstruct(run_pipeline(mod.weight.detach().clone(), choice, LayerContext(name))))
        num = den = 0.0
        for b in loaded.batches:
            t, s = loaded.module(b), ref_model(b)
            num += float((s - t).pow(2).sum())
            den += float(t.pow(2).sum())
    assert fast == pytest.approx(num / den, rel=1e-5)
    assert fast > 0


def test_embedding_row_subset_is_exact():
    """Compressing only the looked-up embedding rows gives the same outputs as compressing all rows."""
    loaded = tiny_loaded()
    desc = introspect(loaded)
    plan = Plan(layers={"emb": LayerPlan(bits=3, group_size=8, prune="unstructured", sparsity=0.4, rank=16)},
                fingerprint=desc.fingerprint)
    rows = torch.unique(torch.cat([b.reshape(-1) for b in loaded.batches]))
    full = PlanApplier(loaded.module, desc)
    subset = PlanApplier(loaded.module, desc, row_subsets={"emb": rows})
    with torch.no_grad():
        with full.applied(plan):
            a = [run_batch(loaded.module, b) for b in loaded.batches]
        with subset.applied(plan):
            b_ = [run_batch(loaded.module, b) for b in loaded.batches]
    assert all(torch.equal(x, y) for x, y in zip(a, b_))


def test_a_row_subset_table_caches_its_rows_alone_and_alternating_options_stay_exact():
    """A table with a row subset is cached as those rows (not a full dense copy per option) and written into
    one working copy: going back to an option after another one gives its exact rows again, and the rows
    outside the subset stay the original ones."""
    loaded = tiny_loaded()
    desc = introspect(loaded)
    rows = torch.unique(torch.cat([b.reshape(-1) for b in loaded.batches]))
    applier = PlanApplier(loaded.module, desc, row_subsets={"emb": rows})
    full = PlanApplier(loaded.module, desc)
    original = loaded.module.emb.weight.detach().clone()
    plans = [Plan(layers={"emb": c}, fingerprint=desc.fingerprint)
             for c in (LayerPlan(bits=3, group_size=8), LayerPlan(bits=2, group_size=8, prune="unstructured", sparsity=0.5))]
    expect = [full.compressed(p, "emb")[0].clone() for p in plans]
    outside = torch.ones(original.shape[0], dtype=torch.bool)
    outside[rows] = False
    for p, want in [(plans[0], expect[0]), (plans[1], expect[1]), (plans[0], expect[0]), (plans[1], expect[1])]:
        w, b = applier.compressed(p, "emb")
        assert b is None and torch.equal(w[rows], want[rows]) and torch.equal(w[outside], original[outside])
    assert applier._weights_bytes == 2 * len(rows) * original.shape[1] * 4  # two options, the subset rows each
    assert torch.equal(loaded.module.emb.weight, original)  # the module's own weight is never written


def test_plan_for_another_model_is_refused():
    loaded = tiny_loaded()
    desc = introspect(loaded)
    with pytest.raises(PlanMismatchError, match="fingerprint"):
        with apply_plan(loaded.module, Plan(layers={}, fingerprint="0123456789abcdef", model_spec="other")):
            pass
    with pytest.raises(PlanMismatchError, match="does not have"):
        with apply_plan(loaded.module, Plan(layers={"nope": LayerPlan(bits=4)})):
            pass
    with apply_plan(loaded.module, Plan(layers={"fc1": LayerPlan(bits=4)}, fingerprint=desc.fingerprint)):
        pass
