"""Error-compensating options (issue #10): calibration statistics, GPTQ, SparseGPT, activation-aware low rank, and
the search / train / export / evaluate paths with them. The conformance suite (bytes, decode, undo, step-0
student, export round trip) runs over compensated examples in tests/test_techniques.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, run_cli, tiny_loaded
from torch import nn

import autocomp
from autocomp.compressors.calibration import (
    CalibrationStats,
    attach,
    calibration_key,
    gather,
    plan_needs,
)
from autocomp.compressors.compensate import gptq, output_error, sparsegpt, whitened_svd
from autocomp.compressors.lowrank import LowRankConfig
from autocomp.compressors.prune import PruneConfig, n_pruned
from autocomp.compressors.quantize import QuantConfig, quantize_matrix
from autocomp.errors import AutocompError
from autocomp.models.base import LoadedModel
from autocomp.models.introspect import introspect
from autocomp.plan import LayerPlan, Plan


def _correlated(rows: int, cols: int, n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the second moment of inputs with strongly correlated features (as real activations)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # features driven by a few latent factors (strongly correlated, as activations are) plus some noise
    x = torch.randn(n, cols // 4, generator=g) @ torch.randn(cols // 4, cols, generator=g)
    x = (x + 0.3 * torch.randn(n, cols, generator=g)) * torch.exp(0.5 * torch.randn(cols, generator=g))
    return w, (x.T @ x / n).float()


# -- statistics ------------------------------------------------------------------------------------------------------
class Fan(nn.Module):
    """a and b read the same tensor; c and d read different tensors of the same shape."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.c, self.d = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.a(x))) + self.d(torch.tanh(self.b(x)))


def test_statistics_equal_a_hand_computation_and_share_only_the_same_input():
    torch.manual_seed(0)
    m = Fan().eval()
    batches = [torch.randn(5, 8) for _ in range(3)]
    loaded = LoadedModel(module=m, name="fan", spec="x", batches=batches)
    st = gather(m, introspect(loaded, measure=False), batches)
    x = torch.cat(batches).double()
    want = {"a": x, "b": x, "c": torch.relu(m.a(x.float())).double(), "d": torch.tanh(m.b(x.float())).double()}
    for name, rows in want.items():
        assert torch.allclose(st.hessian(name), rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-6), name
    assert st.hessians["a"] is st.hessians["b"]  # q/k/v-style sharing
    assert st.hessians["c"] is not st.hessians["d"] and not torch.equal(st.hessians["c"], st.hessians["d"])
    assert st.rows == {"a": 15, "b": 15, "c": 15, "d": 15}


def test_convolutions_reading_one_tensor_share_statistics_only_if_they_unfold_it_alike(tmp_path):
    """A ResNet block's 3x3 conv and its 1x1 downsample read the same tensor: each gets the moments of its own
    patches (they were shared, so the downsample was compensated with the 3x3 conv's first 16 rows of H). A
    statistics file written so is gathered again."""
    import arch_models

    from autocomp.compressors.calibration import CalibrationStats, calibration_key, load_or_gather
    from autocomp.search.sensitivity import weights_hash

    m = arch_models.resnet()
    batches = arch_models.images()
    loaded = LoadedModel(module=m, name="r", spec="x", batches=batches, metric="mse")
    desc = introspect(loaded, measure=False)
    st = gather(m, desc, batches)
    ds, conv1 = m.layer2[0].downsample[0], m.layer2[0].conv1
    x = []
    h = conv1.register_forward_pre_hook(lambda mod, a: x.append(a[0]))
    with torch.no_grad():
        for b in batches:
            m(b)
    h.remove()
    rows = torch.cat([xi[:, :, ::2, ::2].permute(0, 2, 3, 1).reshape(-1, 16) for xi in x]).double()  # 1x1, stride 2
    name = "layer2.0.downsample.0"
    assert st.hessians[name].shape == (16, 16) and st.hessians["layer2.0.conv1"].shape == (144, 144)
    assert torch.allclose(st.hessian(name), rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)
    # a file from before: the downsample aliased to the 3x3 conv
    key = calibration_key(m, batches, weights_hash(m), "mse")
    stale = CalibrationStats({**st.hessians, name: st.hessians["layer2.0.conv1"]}, key, st.rows, weights=weights_hash(m))
    stale.save(tmp_path / f"{key}.safetensors")
    again = load_or_gather(m, desc, batches, tmp_path, metric="mse")
    assert again.hessians[name].shape == (16, 16)
    assert CalibrationStats.load(tmp_path / f"{key}.safetensors", key).hessians[name].shape == (16, 16)  # rewritten


def test_conv_statistics_are_the_unfolded_patches():
    from conftest import tiny_loaded as tl

    loaded = tl("tiny_conv", "conv_calib")
    desc = introspect(loaded)
    st = gather(loaded.module, desc, loaded.batches)
    conv = loaded.module.conv2
    ins = []
    h = conv.register_forward_pre_hook(lambda mod, a: ins.append(a[0]))
    with torch.no_grad():
        for b in loaded.batches:
            loaded.module(b)
    h.remove()
    cols = torch.cat([torch.nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 16 * 9)
                      for x in ins]).double()
    assert st.hessian("conv2").shape == (144, 144)
    assert torch.allclose(st.hessian("conv2"), cols.T @ cols / cols.shape[0], rtol=1e-5, atol=1e-7)
    assert "fc" in st.hessians  # the Linear head too


def test_statistics_cache_round_trips_and_a_damaged_file_is_a_miss(tmp_path):
    from autocomp.compressors.calibration import load_or_gather

    loaded = tiny_loaded()
    desc = introspect(loaded)
    st = load_or_gather(loaded.module, desc, loaded.batches, tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    again = CalibrationStats.load(path, st.key)
    assert again is not None and set(again.hessians) == set(st.hessians)
    assert all(torch.equal(again.hessians[n], st.hessians[n]) for n in st.hessians)
    assert CalibrationStats.load(path, "another-key") is None
    path.write_bytes(b"garbage")
    fresh = load_or_gather(loaded.module, desc, loaded.batches, tmp_path)  # recomputed, file replaced
    assert torch.equal(fresh.hessians["fc2"], st.hessians["fc2"]) and CalibrationStats.load(path, st.key) is not None
    other = [b[:, :3] for b in loaded.batches]
    assert calibration_key(loaded.module, other) != st.key


# -- the methods -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group,sym", [(3, 0, True), (4, 16, False), (2, 32, True)])
def test_gptq_with_identity_statistics_is_round_to_nearest_on_the_clipped_grid(bits, group, sym):
    """Uncorrelated inputs leave nothing to compensate: GPTQ is then exactly the ``/mse`` quantizer (round to
    nearest on each group's least-error clipping range)."""
    from autocomp.compressors.quantize import mse_clip

    w, _ = _correlated(12, 64)
    deq, codes, scale, zp = gptq(w, torch.eye(64), bits, group, sym)
    r_deq, r_codes, r_scale, r_zp = quantize_matrix(mse_clip(w, bits, group, sym), bits, group, sym)
    assert torch.equal(deq, r_deq) and torch.equal(codes, r_codes) and torch.equal(scale, r_scale)
    assert (zp is None) == (r_zp is None) and (zp is None or torch.equal(zp, r_zp))


@pytest.mark.parametrize("bits,group,sym", [(3, 0, True), (4, 16, False), (3, 32, True), (4, 48, True)])
def test_gptq_lowers_the_output_error_in_the_same_format(bits, group, sym):
    w, h = _correlated(16, 96)
    deq, codes, scale, zp = gptq(w, h, bits, group, sym)
    rtn = quantize_matrix(w, bits, group, sym)[0]
    assert output_error(w, deq, h) < 0.6 * output_error(w, rtn, h)
    g = group or 96
    s = scale.float().repeat_interleave(g, 1)[:, :96]
    q = codes - (2 ** (bits - 1) if sym else zp.repeat_interleave(g, 1)[:, :96])
    assert torch.equal(q * s, deq)  # the stored codes and scales decode to exactly the evaluated weights
    assert int(codes.min()) >= 0 and int(codes.max()) < 2**bits


def test_gptq_drives_masked_entries_to_zero():
    w, h = _correlated(8, 64)
    mask = torch.rand(8, 64, generator=torch.Generator().manual_seed(3)) > 0.5
    deq = gptq(w, h, 4, 16, False, mask)[0]
    assert torch.all(deq[~mask] == 0)
    plain = quantize_matrix(w * mask, 4, 16, False)[0]  # pruned, then rounded: no compensation of either
    assert output_error(w, deq, h) < 0.8 * output_error(w, plain, h)


@pytest.mark.parametrize("kind,sparsity", [("unstructured", 0.5), ("unstructured", 0.37), ("2:4", 0.0)])
def test_sparsegpt_counts_exactly_and_beats_magnitude(kind, sparsity):
    from autocomp.compressors.prune import magnitude_mask, nm_mask

    w, h = _correlated(10, 300)
    values, mask = sparsegpt(w, h, kind, sparsity)
    assert torch.all(values[~mask] == 0)
    if kind == "2:4":
        assert torch.all(mask.reshape(10, -1, 4).sum(-1) == 2)
        ref = w * nm_mask(w)
    else:
        assert int((~mask).sum()) == n_pruned(w.numel(), sparsity)  # the size model's count, exactly
        ref = w * magnitude_mask(w, sparsity)
    assert output_error(w, values, h) < 0.7 * output_error(w, ref, h)


def test_activation_aware_low_rank_beats_plain_svd_on_the_inputs():
    from autocomp.compressors.base import LayerContext, Part
    from autocomp.compressors.lowrank import LowRank

    w, h = _correlated(40, 48)
    stats = CalibrationStats({"x": h}, "k", {"x": 400})
    ctx = LayerContext("x", stats=stats)
    aa = LowRank().apply([Part(values=w)], LowRankConfig(8, "aa"), ctx)
    svd = LowRank().apply([Part(values=w)], LowRankConfig(8), LayerContext("y"))
    err_aa = output_error(w, aa[0].values @ aa[1].values, h)
    assert err_aa < 0.5 * output_error(w, svd[0].values @ svd[1].values, h)
    u, s, vh, lo = whitened_svd(w, h)
    assert torch.allclose(u @ torch.diag(s) @ vh, w.double() @ lo, atol=1e-8)


def test_a_compensated_option_without_statistics_is_one_clear_error():
    from autocomp.compressors.apply import PlanApplier

    loaded = tiny_loaded()
    desc = introspect(loaded)
    plan = Plan(layers={"fc1": LayerPlan(QuantConfig(4, method="gptq"))}, fingerprint=desc.fingerprint)
    with pytest.raises(AutocompError, match="need calibration statistics.*autocomp.calibrate"), \
            PlanApplier(loaded.module, desc).applied(plan):
        pass


def test_embedding_tables_take_compensated_options_but_grouped_convolutions_do_not():
    from autocomp.compressors.base import technique
    from autocomp.desc import LayerDesc

    desc = introspect(tiny_loaded())
    grouped = LayerDesc(name="dw", type="Conv2d", rows=8, cols=9, groups=8)
    for name, label in (("quantize", "4g16/gptq"), ("prune", "u50/sparsegpt"), ("lowrank", "r0.5/aa")):
        t = technique(name)
        for layer in (desc.by_name["emb"], desc.by_name["fc2"]):
            assert t.bind(t.parse(label), layer, [(layer.rows, layer.cols)]) is not None, (name, layer.name)
        assert t.bind(t.parse(label), grouped, [(grouped.rows, grouped.cols)]) is None


class Lookup(nn.Module):
    """A table read through a fixed linear map: the output-side statistic of the table is ``A^T A``."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 8)
        self.head = nn.Linear(8, 6, bias=False)
        self.out = nn.Linear(8, 40, bias=False) if tied else None
        if tied:
            self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.head(self.emb(ids))
        return h if self.out is None else torch.cat([h, self.out(self.emb(ids))], -1)


def test_a_tables_statistic_is_its_output_side_gauss_newton_matrix():
    """mse metric, y = A e: E[J^T r r^T J] = A^T A for Gaussian probes r; estimated from 4,000 rows it is within
    a few percent, and GPTQ on the table with it beats round to nearest on the model's output."""
    torch.manual_seed(0)
    m = Lookup().eval()
    batches = [torch.randint(0, 40, (50, 20)) for _ in range(4)]
    loaded = LoadedModel(module=m, name="lookup", spec="x", batches=batches, metric="mse")
    desc = introspect(loaded, measure=False)
    st = gather(m, desc, batches, metric="mse")
    a = m.head.weight.detach().double()
    want = a.T @ a
    assert st.rows["emb"] == 4000 and st.hessian("emb").shape == (8, 8)
    assert float((st.hessian("emb") - want).norm() / want.norm()) < 0.06
    w = m.emb.weight.detach()
    deq, *_ = gptq(w, st.hessian("emb"), 2, 0, False)
    plain, *_ = quantize_matrix(w, 2, 0, False)
    assert output_error(w, deq, want) < 0.8 * output_error(w, plain, want)


class InPlace(nn.Module):
    """Adds to its embeddings in place (as some models do), or detaches them."""

    def __init__(self, detach: bool = False) -> None:
        super().__init__()
        self.emb, self.pos, self.head, self.detach = nn.Embedding(30, 8), nn.Embedding(6, 8), nn.Linear(8, 4), detach

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x += self.pos(torch.arange(ids.shape[1]))
        return self.head(x.detach() if self.detach else x)


@pytest.mark.parametrize("detach", [False, True])
def test_table_statistics_survive_in_place_adds_and_detached_tables(detach):
    torch.manual_seed(2)
    m = InPlace(detach).eval()
    batches = [torch.randint(0, 30, (8, 6)) for _ in range(2)]
    desc = introspect(LoadedModel(module=m, name="inplace", spec="x", batches=batches, metric="mse"), measure=False)
    st = gather(m, desc, batches, metric="mse")
    if detach:
        assert st.plain == {"emb", "pos"} and not st.has("emb")
        assert torch.equal(st.hessian("emb", width=8), torch.eye(8, dtype=torch.float64))
    else:
        a = m.head.weight.detach().double()
        want = a.T @ a / (a.T @ a).trace()
        assert st.plain == set() and st.rows["emb"] == 96 and st.rows["pos"] == 12
        h = st.hessian("emb")
        assert float((h / h.trace() - want).norm() / want.norm()) < 0.3  # 96 probe rows of an 8x8 matrix
        # the position table's output is shared by the batch: its rows' gradients are summed over the 8
        # sequences, so G comes out ~8x larger (the scale does not matter to the methods), with 12 rows
        assert 6 < float(st.hessian("pos").trace() / (a.T @ a).trace()) < 12


@pytest.mark.parametrize("detach", [False, True])
def test_input_and_table_statistics_come_from_one_forward_pass_per_batch(detach):
    """The Linear layers' H rides on the tables' forward-and-backward pass: one forward per batch, and every
    batch counts for H even when no gradient reaches the tables (a detached model)."""
    torch.manual_seed(3)
    m = InPlace(detach).eval()
    batches = [torch.randint(0, 30, (8, 6)) for _ in range(3)]
    desc = introspect(LoadedModel(module=m, name="inplace", spec="x", batches=batches, metric="mse"), measure=False)
    calls = []
    h = m.register_forward_pre_hook(lambda mod, a: calls.append(1))
    st = gather(m, desc, batches, metric="mse")
    h.remove()
    assert len(calls) == len(batches)
    with torch.no_grad():
        x = torch.cat([(m.emb(b) + m.pos(torch.arange(b.shape[1]))).reshape(-1, 8) for b in batches]).double()
    assert st.rows["head"] == 144
    assert torch.allclose(st.hessian("head"), x.T @ x / 144, rtol=1e-5, atol=1e-7)
    assert st.has("emb") != detach


def test_a_tied_table_has_no_statistic_and_its_gptq_is_the_clipped_grid():
    from autocomp.compressors.apply import PlanApplier
    from autocomp.compressors.quantize import mse_clip

    torch.manual_seed(1)
    m = Lookup(tied=True).eval()
    batches = [torch.randint(0, 40, (10, 6)) for _ in range(2)]
    loaded = LoadedModel(module=m, name="lookup", spec="x", batches=batches, metric="mse")
    desc = introspect(loaded, measure=False)
    st = gather(m, desc, batches, metric="mse")
    assert not st.has("emb") and st.plain == {"emb"}
    attach(m, st)
    plan = Plan(layers={"emb": LayerPlan(QuantConfig(3, 8, False, method="gptq"))}, fingerprint=desc.fingerprint)
    w = m.emb.weight.detach().clone()
    with PlanApplier(m, desc).applied(plan):
        got = m.emb.weight.detach().clone()
    assert torch.equal(got, quantize_matrix(mse_clip(w, 3, 8, False), 3, 8, False)[0])


def test_gptq_labels_choose_the_column_order_and_the_clip_weighting():
    from autocomp.compressors.base import technique

    t = technique("quantize")
    desc = introspect(tiny_loaded())
    fc = desc.by_name["fc2"]
    act = t.bind(t.parse("4g16/gptq"), fc, [(fc.rows, fc.cols)])
    plain = t.bind(t.parse("4g16/gptq-plain"), fc, [(fc.rows, fc.cols)])
    cols = t.bind(t.parse("4g16/gptq-columns"), fc, [(fc.rows, fc.cols)])
    assert (act.order, plain.order, cols.order) == ("act", "act", "columns")
    assert (act.clip_weight, plain.clip_weight, cols.clip_weight) == ("act", "none", "none")
    assert act.method == plain.method == cols.method == "gptq"
    assert [t.label(c) for c in (act, plain, cols)] == ["4g16/gptq", "4g16/gptq-plain", "4g16/gptq-columns"]
    assert t.bind(t.parse("int8f"), fc, [(fc.rows, fc.cols)]) == QuantConfig(8, 0, True, 8, reduce_range=False)
    with pytest.raises(ValueError, match="order"):
        QuantConfig(4, 16, method="mse", order="act")
    with pytest.raises(ValueError, match="clip_weight"):
        QuantConfig(4, 16, method="gptq", order="columns", clip_weight="act")


def test_a_weighted_clipped_grid_minimizes_the_weighted_error_per_group():
    """mse_clip with column weights: each group's ratio is the grid's least weighted squared error, so with
    weights h_jj of a diagonal H it has the least output error of every ratio, the unweighted choice too."""
    from autocomp.compressors.quantize import CLIP_GRID, _clamp_groups, _group_range, _grouped, mse_clip

    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 64, generator=g) * torch.rand(16, 64, generator=g).pow(3) * 4
    hd = torch.rand(64, generator=g).pow(4) * 10  # very unequal input energies
    lo, hi = _group_range(_grouped(w, 16), False)

    def out_err(v):
        deq = quantize_matrix(v, 3, 16, False)[0]
        return _grouped((deq - w) ** 2 * hd, 16).sum(-1)

    weighted, plain = out_err(mse_clip(w, 3, 16, False, col_weight=hd)), out_err(mse_clip(w, 3, 16, False))
    every = torch.stack([out_err(_clamp_groups(w, 16, lo, hi, a)) for a in CLIP_GRID])
    assert torch.allclose(weighted, every.min(0).values, rtol=1e-6)
    assert (weighted <= plain * (1 + 1e-6)).all() and float(weighted.sum()) < 0.97 * float(plain.sum())


def test_weighted_gptq_clips_with_the_inputs_rms_and_old_act_order_plans_keep_their_weights():
    """``/gptq`` (quantize version 5) clips its static groups with column weights sqrt(H_jj); an act-order plan
    written by versions 3-4 (no clip_weight) computes the unweighted grid it computed then."""
    from autocomp.compressors import compensate
    from autocomp.compressors.apply import PlanApplier
    from autocomp.compressors.compensate import act_order, clip_weights

    loaded = tiny_loaded()
    desc = introspect(loaded)
    st = gather(loaded.module, desc, loaded.batches)
    attach(loaded.module, st)
    h = st.hessian("fc1")
    w = loaded.module.fc1.weight.detach().clone()
    assert torch.equal(clip_weights(h), h.diagonal().sqrt().float())
    weighted = gptq(w, h, 3, 16, False, order=act_order(h), weighted=True)[0]
    plain = gptq(w, h, 3, 16, False, order=act_order(h))[0]
    assert not torch.equal(weighted, plain)
    seen = []
    real = compensate.clip_weights
    try:
        compensate.clip_weights = lambda hh: seen.append(1) or real(hh)
        assert torch.equal(gptq(w, h, 3, 16, False, order=act_order(h), weighted=True)[0], weighted)
    finally:
        compensate.clip_weights = real
    assert seen == [1]
    new = Plan(layers={"fc1": LayerPlan(QuantConfig(3, 16, False, method="gptq", order="act", clip_weight="act"))},
               fingerprint=desc.fingerprint)
    d = json.loads(json.dumps(new.to_dict()))
    assert d["techniques"] == {"quantize": 5} and d["layers"]["fc1"]["quantize"]["clip_weight"] == "act"
    old = json.loads(json.dumps(d))
    old["techniques"]["quantize"] = 4
    del old["layers"]["fc1"]["quantize"]["clip_weight"]
    for plan_dict, want in ((d, weighted), (old, plain)):
        with PlanApplier(loaded.module, desc).applied(Plan.from_dict(plan_dict)):
            assert torch.equal(loaded.module.fc1.weight.detach(), want)
    assert Plan.from_dict(old).layer("fc1").label() == "3g16a/gptq-plain"
    attach(loaded.module, None)


@pytest.mark.parametrize("bits,group,sym", [(3, 0, True), (4, 16, False), (2, 32, False)])
def test_act_order_keeps_the_stored_groups_and_lowers_the_output_error(bits, group, sym):
    """Columns swept by decreasing input second moment, each group's range fixed from the original weights:
    the codes and scales describe the same stored format (decoding them gives the weights), and on correlated
    inputs the output error is lower than in stored order."""
    from autocomp.compressors.compensate import act_order
    from autocomp.compressors.quantize import quantize_fixed

    w, h = _correlated(24, 64, seed=3)
    d = torch.linspace(0.2, 3.0, 64).sqrt()  # unequal input scales: an order to exploit
    h = d[:, None] * h * d[None, :]
    deq, codes, scale, zp = gptq(w, h, bits, group, sym, order=act_order(h))
    again, again_codes = quantize_fixed(deq, scale, zp, bits, group, sym)
    assert torch.equal(again, deq) and torch.equal(again_codes, codes)
    plain, *_ = gptq(w, h, bits, group, sym)
    assert output_error(w, deq, h) < output_error(w, plain, h)


@pytest.mark.parametrize("bits,group,sym", [(3, 16, True), (4, 16, False), (2, 24, False), (4, 0, True)])
def test_act_order_groups_take_the_clipped_range_of_their_original_weights(bits, group, sym):
    """Static groups: each group's scale (and zero point) is the one round to nearest on the clipped grid
    gives that group of the original weights alone -- also where the groups are clipped in one call (the
    groups tile the columns) and for a ragged last group (64 columns in groups of 24)."""
    from autocomp.compressors.compensate import act_order
    from autocomp.compressors.quantize import group_params, mse_clip

    w, h = _correlated(24, 64, seed=5)
    _, _, scale, zp = gptq(w, h, bits, group, sym, order=act_order(h))
    g = group or 64
    for gi, c0 in enumerate(range(0, 64, g)):
        sc, z = group_params(mse_clip(w[:, c0:c0 + g], bits, 0, sym), bits, sym)
        assert torch.equal(scale[:, gi], sc)
        assert (zp is None and z is None) or torch.equal(zp[:, gi], z)
    whole = mse_clip(w, bits, g, sym) if 64 % g == 0 else None  # one call: the same values as one per group
    if whole is not None:
        assert torch.equal(whole, torch.cat([mse_clip(w[:, c:c + g], bits, 0, sym) for c in range(0, 64, g)], 1))


def _bits(t: torch.Tensor | None) -> bytes | None:
    return None if t is None else t.contiguous().numpy().tobytes()


def test_several_act_order_options_in_one_sweep_are_each_option_alone(monkeypatch):
    """gptq_many sweeps a layer's options together; each result is the option computed alone, byte for byte
    (signed zeros included): symmetric and asymmetric, per channel, ragged groups, a mask beside unmasked jobs,
    150 columns (a ragged block and inner block), and jobs split over several stacks."""
    from autocomp.compressors import compensate
    from autocomp.compressors.compensate import act_order, gptq_many, inverse_cholesky

    w, h = _correlated(20, 150, seed=7)
    d = torch.linspace(0.2, 3.0, 150).sqrt()
    h = d[:, None] * h * d[None, :]
    mask = torch.rand(20, 150, generator=torch.Generator().manual_seed(1)) > 0.4
    jobs = [(w, None, 3, 32, False, True), (w, None, 4, 0, True, False), (w, mask, 2, 16, False, True),
            (w * 0.5, None, 4, 64, True, False), (w, None, 8, 50, False, True), (w, None, 3, 32, False, False)]
    order = act_order(h)
    u = inverse_cholesky(h.double()[order][:, order])
    alone = [gptq(wj, h, b, g, s, m, u, order, wt) for wj, m, b, g, s, wt in jobs]
    for stack in (compensate.STACK_BYTES, 2 * 20 * 150 * 8):  # all in one sweep; two jobs a sweep
        monkeypatch.setattr(compensate, "STACK_BYTES", stack)
        together = gptq_many(jobs, h, u, order)
        assert len(together) == len(jobs)
        for got, want in zip(together, alone):
            assert [_bits(t) for t in got] == [_bits(t) for t in want]
    assert not together[2][0][~mask].any()  # the masked job still drives its pruned entries to zero


def test_several_sparsegpt_options_in_one_sweep_are_each_option_alone(monkeypatch):
    """sparsegpt_many: each option's weights and mask are the option computed alone, byte for byte, whatever
    shares its sweep (one sweep or one job a sweep); counts stay exact."""
    from autocomp.compressors import compensate
    from autocomp.compressors.compensate import inverse_cholesky, sparsegpt_many

    w, h = _correlated(20, 152, seed=9)
    jobs = [("unstructured", 0.5), ("2:4", 0.5), ("unstructured", 0.3), ("unstructured", 0.7)]
    u = inverse_cholesky(h)
    alone = [sparsegpt(w, h, kind, sp, u) for kind, sp in jobs]
    for stack in (compensate.STACK_BYTES, 20 * 152 * 8):
        monkeypatch.setattr(compensate, "STACK_BYTES", stack)
        together = sparsegpt_many(w, h, jobs, u)
        for (values, mask), (want_v, want_m) in zip(together, alone):
            assert _bits(values) == _bits(want_v) and torch.equal(mask, want_m)
    for (kind, sp), (_, mask) in zip(jobs, together):
        if kind == "2:4":
            assert (mask.reshape(20, -1, 4).sum(-1) == 2).all()
        else:
            assert int((~mask).sum()) == n_pruned(20 * 152, sp)


def test_a_search_computes_a_layers_compensated_options_in_one_sweep_and_the_same_weights(monkeypatch):
    """With the space's choices as peers, the first GPTQ (SparseGPT) option a layer is asked for computes its
    other plain act-order GPTQ (SparseGPT) options in the same sweep; each weight is the one an applier without
    peers computes, and a choice with an upstream step (pruned, then GPTQ) is computed alone."""
    from autocomp.compressors import compensate
    from autocomp.compressors.apply import PlanApplier

    loaded = tiny_loaded()
    desc = introspect(loaded)
    autocomp.calibrate(loaded.module, loaded.batches, desc)
    options = [LayerPlan(QuantConfig(b, g, s, method="gptq", order="act")) for b, g, s in
               [(4, 16, False), (3, 0, True), (2, 8, False)]]
    others = [LayerPlan(QuantConfig(4, 16)), LayerPlan(PruneConfig("unstructured", 0.5), QuantConfig(4, 16, method="gptq", order="act")),
              LayerPlan(PruneConfig("2:4", method="sparsegpt")), LayerPlan(PruneConfig("unstructured", 0.3, method="sparsegpt"))]
    calls, pruned = [], []
    real, real_sp = compensate.gptq_many, compensate.sparsegpt_many
    monkeypatch.setattr(compensate, "gptq_many", lambda jobs, *a, **k: calls.append(len(jobs)) or real(jobs, *a, **k))
    monkeypatch.setattr(compensate, "sparsegpt_many", lambda w, h, jobs, *a: pruned.append(len(jobs)) or real_sp(w, h, jobs, *a))
    with_peers = PlanApplier(loaded.module, desc)
    with_peers.peers = {"fc1": tuple(options + others)}
    alone = PlanApplier(loaded.module, desc)
    for choice in options + others:
        plan = Plan(layers={"fc1": choice}, fingerprint=desc.fingerprint)
        assert _bits(with_peers.compressed(plan, "fc1")[0]) == _bits(alone.compressed(plan, "fc1")[0])
    # peers: one sweep of the three plain options, then the pruned one alone; without peers: one sweep each
    assert calls[:1] == [3] and calls.count(3) == 1
    assert pruned == [2, 1, 1]  # the two SparseGPT choices in one sweep (with peers), then one each (without)
    assert not [k for k in with_peers.cache if k[0] in ("gptq-peer", "sparsegpt-peer")]  # each taken once used


@pytest.mark.parametrize("label", ["keep/gptq", "keep/mse", "none/sparsegpt", "full/aa", "4g128/awq", "u50/gptq",
                                   "4g128/gptq-act", "keep/gptq-columns"])
def test_bad_method_labels_are_refused(label):
    from autocomp.compressors.base import technique

    name = {"kee": "quantize", "4g1": "quantize", "non": "prune", "u50": "prune", "ful": "lowrank"}[label[:3]]
    with pytest.raises(ValueError):
        technique(name).parse(label)


# -- plans -----------------------------------------------------------------------------------------------------------
def test_plans_without_compensated_options_are_written_as_before():
    plan = Plan(layers={"fc1": LayerPlan(bits=4, group_size=16, prune="unstructured", sparsity=0.5, rank=8)})
    d = plan.to_dict()
    assert d["techniques"] == {"lowrank": 1, "prune": 1, "quantize": 1}
    assert all("method" not in c for c in d["layers"]["fc1"].values())
    comp = Plan(layers={"fc1": LayerPlan(QuantConfig(4, 16, method="gptq"), PruneConfig("2:4", method="sparsegpt"))})
    cd = comp.to_dict()
    assert cd["techniques"] == {"prune": 2, "quantize": 2}
    back = Plan.from_dict(json.loads(json.dumps(cd)))
    # a /gptq plan written before act order (quantize version 2) keeps its column order, labelled as such
    assert back.key() == comp.key() and back.layer("fc1").label() == "2:4/sparsegpt+4g16/gptq-columns"
    assert comp.key() != Plan(layers={"fc1": LayerPlan(QuantConfig(4, 16), PruneConfig("2:4"))}).key()
    act = Plan(layers={"fc1": LayerPlan(QuantConfig(4, 16, method="gptq", order="act"))})
    ad = act.to_dict()
    assert ad["techniques"] == {"quantize": 3} and ad["layers"]["fc1"]["quantize"]["order"] == "act"
    # an act-order plan of versions 3-4 keeps its unweighted clipped grid, labelled as such
    assert Plan.from_dict(json.loads(json.dumps(ad))).layer("fc1").label() == "4g16/gptq-plain"
    assert act.key() != comp.key()
    cd["techniques"]["quantize"] = QuantConfig.VERSION + 1  # written by a newer autocomp
    with pytest.raises(AutocompError, match=f"stores quantize configs of version {QuantConfig.VERSION + 1}"):
        Plan.from_dict(cd)


# -- search, train, export, evaluate ---------------------------------------------------------------------------------
SPACE = ("version: 1\nlayers:\n  - types: [Embedding]\n    quant: [keep, 4g16]\n"
         "  - types: [Linear]\n    quant: [keep, 4g16, 3g16/gptq, 4g16/gptq]\n"
         "    prune: [none, u50/sparsegpt, '2:4/sparsegpt']\n    rank: [full, r0.5/aa]\n")


def test_search_train_export_evaluate_with_compensated_options(tmp_path, capsys, monkeypatch):
    space = tmp_path / "comp.yaml"
    space.write_text(SPACE)
    studies = tmp_path / "studies"
    code, out, err = run_cli(["search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib", "--budget", "45%",
                              "--space", str(space), "--trials", "16", "--studies-dir", str(studies), "--study", "c",
                              "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    (cache,) = (studies / "calibration").glob("*.safetensors")
    plans = [Plan.load(e["plan_path"]) for e in res["pareto"]]
    comp = [p for p in plans if plan_needs(p)]
    assert comp, "no front plan uses a compensated option"
    plan_path = next(e["plan_path"] for e in res["pareto"] if plan_needs(Plan.load(e["plan_path"])))
    plan = Plan.load(plan_path)
    assert plan.meta["calibration"] == cache.stem
    # export: exactly the predicted bytes; the file decodes to what the search scored
    out_file = tmp_path / "m.acz.safetensors"
    code, out, err = run_cli(["export", "--plan", plan_path, "--data", f"{TINY}:calib", "--out", str(out_file),
                              "--studies-dir", str(studies), "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["payload_bytes"] == r["predicted_bytes"] == plan.metrics["size_bytes"]
    loaded = tiny_loaded()
    desc = introspect(loaded)
    autocomp.calibrate(loaded.module, loaded.batches, desc)
    with torch.no_grad(), autocomp.apply_plan(loaded.module, plan, desc):
        sim = torch.cat([loaded.module(b) for b in loaded.batches])
    with torch.no_grad():
        back = torch.cat([autocomp.load(out_file)(b) for b in loaded.batches])
    assert torch.equal(back, sim)
    # evaluate scores the plan with the same statistics (the task: agreement with the original's top class)
    code, out, err = run_cli(["evaluate", "--plan", plan_path, "--data", f"{TINY}:calib", "--task",
                              f"{TINY}:agreement", "--studies-dir", str(studies), "--json"], capsys)
    assert code == 0, err
    assert 0.0 <= json.loads(out)["value"] <= 1.0 and json.loads(out)["fp32_value"] == 1.0
    # train 2 steps from the compensated weights, export the trained student at the same bytes
    ck = tmp_path / "t.safetensors"
    monkeypatch.setenv("AUTOCOMP_STUDIES", str(studies))  # train reads the search's statistics by their key
    code, out, err = run_cli(["train", "--plan", plan_path, "--data", f"{TINY}:train_data", "--steps", "2", "--out",
                              str(ck), "--json"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["export", "--plan", plan_path, "--weights", str(ck), "--data", f"{TINY}:calib",
                              "--out", str(tmp_path / "t.acz.safetensors"), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["payload_bytes"] == plan.metrics["size_bytes"]
    # the statistics are not where the search left them and the data differ: refused, nothing written
    bad = tmp_path / "bad.acz.safetensors"
    code, out, err = run_cli(["export", "--plan", plan_path, "--data", f"{TINY}:train_data", "--out", str(bad),
                              "--studies-dir", str(tmp_path / "elsewhere")], capsys)
    assert code == 2 and "computed on other calibration data" in err and "--data the search used" in err
    assert not bad.exists()


def test_untrained_student_equals_the_proxy_bit_for_bit_with_compensated_options():
    from autocomp.compressors.apply import PlanApplier
    from autocomp.compressors.student import prepare_for_training

    loaded = tiny_loaded()
    desc = introspect(loaded)
    autocomp.calibrate(loaded.module, loaded.batches, desc)
    choice = LayerPlan(LowRankConfig(8, "aa"), PruneConfig("unstructured", 0.3, "sparsegpt"), QuantConfig(4, 16, method="gptq"))
    plan = Plan(layers={"fc1": choice, "fc2": LayerPlan(PruneConfig("2:4", method="sparsegpt"), QuantConfig(3, 8)),
                        "head": LayerPlan(QuantConfig(3, 0, False, method="gptq"))}, fingerprint=desc.fingerprint)
    student = prepare_for_training(loaded.module, plan, desc)
    b = loaded.batches[0]
    with torch.no_grad():
        with PlanApplier(loaded.module, desc).applied(plan):
            proxy = loaded.module(b)
        assert torch.equal(student(b), proxy)


def test_a_table_with_gptq_exports_at_the_predicted_bytes_and_trains_from_the_proxy(tmp_path):
    """An embedding table quantized by GPTQ on its output-side statistic (act order), next to an act-order and
    a stored-order Linear: the untrained student is the proxy bit for bit, and the packed file decodes to it
    at exactly the predicted bytes."""
    from autocomp.compressors.apply import PlanApplier
    from autocomp.compressors.student import prepare_for_training

    loaded = tiny_loaded()
    desc = introspect(loaded)
    stats = autocomp.calibrate(loaded.module, loaded.batches, desc)
    assert stats.has("emb") and stats.hessian("emb").shape == (desc.by_name["emb"].cols,) * 2
    plan = Plan(layers={"emb": LayerPlan(QuantConfig(3, 8, False, method="gptq", order="act")),
                        "fc1": LayerPlan(QuantConfig(4, 16, method="gptq", order="act")),
                        "fc2": LayerPlan(QuantConfig(4, 16, method="gptq"))}, fingerprint=desc.fingerprint,
                model_spec=f"{TINY}:tiny")
    with torch.no_grad(), PlanApplier(loaded.module, desc).applied(plan):
        proxy = [loaded.module(b) for b in loaded.batches]
    student = prepare_for_training(loaded.module, plan, desc)
    with torch.no_grad():
        assert all(torch.equal(student(b), p) for b, p in zip(loaded.batches, proxy))
    r = autocomp.export(loaded.module, plan, tmp_path / "m.acz.safetensors", spec=f"{TINY}:tiny",
                        data_spec=f"{TINY}:calib")
    assert r["payload_bytes"] == r["predicted_bytes"] == autocomp.plan_bytes(desc, plan)
    back = autocomp.load(tmp_path / "m.acz.safetensors")
    with torch.no_grad():
        assert all(torch.equal(back(b), p) for b, p in zip(loaded.batches, proxy))


def test_fisher_estimate_credits_compensation():
    """With statistics the Fisher profile uses its Kronecker form: a GPTQ option's estimate is below the
    round-to-nearest one at the same bits, as its measured drift is."""
    import dataclasses

    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.search.sensitivity import fisher_profile
    from autocomp.space import SearchSpace

    loaded = tiny_loaded()
    desc = introspect(loaded)
    autocomp.calibrate(loaded.module, loaded.batches, desc)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        space_file = Path(d) / "s.yaml"
        space_file.write_text("version: 1\nlayers:\n  - types: [Linear]\n    quant: [keep, 3g16, 3g16/gptq]\n")
        space = SearchSpace.from_yaml(space_file, desc)
        ev = ProxyEvaluator(dataclasses.replace(loaded, metric="mse"), desc)
        sens = fisher_profile(space, ev, Path(d), {"t": 1}, measure_max=0)
    for name in ("fc1", "fc2"):
        row = sens.table[f"{name}:q"]
        assert row["3g16/gptq"] < row["3g16"], (name, row)


# -- structured cuts with a least-squares refit of the consumer ---------------------------------------------------
def _refit_plan(desc, refit: bool, choice: LayerPlan | None = None) -> Plan:
    from autocomp.plan import StructuredGroup

    layers = {"fc2": choice} if choice is not None else {}
    return Plan(layers=layers, structured={"g": StructuredGroup("neurons", 64, 1, 32, ("fc1",), ("fc2",), refit=refit)},
                fingerprint=desc.fingerprint, model_spec=f"{TINY}:tiny", model_name="tiny")


def test_structured_refit_lowers_the_consumers_error_and_keeps_shapes_and_bytes(tmp_path):
    from autocomp.compressors.apply import PlanApplier
    from autocomp.compressors.student import prepare_for_training
    from autocomp.cost.size import plan_bytes

    loaded = tiny_loaded()
    desc = introspect(loaded)
    stats = autocomp.calibrate(loaded.module, loaded.batches, desc)
    plain, fit = _refit_plan(desc, False), _refit_plan(desc, True)
    assert plan_needs(fit) and not plan_needs(plain)
    assert plan_bytes(desc, fit) == plan_bytes(desc, plain)
    assert fit.key() != plain.key() and Plan.from_dict(json.loads(json.dumps(fit.to_dict()))).key() == fit.key()
    assert "refit" not in plain.to_dict()["structured"]["g"]
    applier = PlanApplier(loaded.module, desc)
    w = loaded.module.fc2.weight.detach()
    h = stats.hessian("fc2")
    errs = {}
    for name, plan in (("plain", plain), ("fit", fit)):
        wq, _ = applier.compressed(plan, "fc2")
        errs[name] = output_error(w, wq, h)
        assert wq.shape == w.shape
    _, cols, _ = applier.kept_indices(fit, "fc2")
    removed = torch.ones(64, dtype=torch.bool)
    removed[cols] = False
    assert torch.all(applier.compressed(fit, "fc2")[0][:, removed] == 0)  # the cut columns stay cut
    assert errs["fit"] < 0.8 * errs["plain"]
    # with techniques on top: the untrained student equals the proxy, and the export is the predicted size
    plan = _refit_plan(desc, True, LayerPlan(QuantConfig(4, 16, method="gptq")))
    student = prepare_for_training(loaded.module, plan, desc)
    b = loaded.batches[0]
    with torch.no_grad():
        with applier.applied(plan):
            proxy = loaded.module(b)
        assert torch.equal(student(b), proxy)
    r = autocomp.export(student, plan, tmp_path / "r.acz.safetensors", spec=f"{TINY}:tiny", data_spec=f"{TINY}:calib")
    assert r["payload_bytes"] == r["predicted_bytes"] == plan_bytes(desc, plan)
    with torch.no_grad():
        assert torch.equal(autocomp.load(tmp_path / "r.acz.safetensors")(b), proxy)


def test_refit_in_a_search_space(tmp_path):
    from autocomp.compressors.calibration import space_needs
    from autocomp.space import SearchSpace

    desc = introspect(tiny_loaded())
    text = ("version: 1\nlayers:\n  - types: [Linear]\n    quant: [keep, 4g16]\nstructured:\n  - kind: neurons\n"
            "    producers: ['fc1']\n    consumers: ['fc2']\n    keep: [1.0, 0.5]\n    refit: REFIT\n")
    path = tmp_path / "s.yaml"
    path.write_text(text.replace("REFIT", "true"))
    space = SearchSpace.from_yaml(path, desc)
    assert space_needs(space)
    a = {p: opts[-1] for p, opts in space.params.items()}
    plan = space.decode(a)
    assert [g.refit for g in plan.structured.values()] == [True]
    assert not any(g.refit for g in space.decode({p: opts[0] for p, opts in space.params.items()}).structured.values())
    path.write_text(text.replace("REFIT", "'yes'"))
    with pytest.raises(AutocompError, match="refit: true or false"):
        SearchSpace.from_yaml(path, desc)


def test_mse_grid_applies_to_embeddings_and_is_trained_and_exported_exactly(tmp_path):
    """``/mse`` needs no data, so embedding tables take it; the student starts on the clipped grid (step 0 equals
    the proxy, also through ``export`` of the untrained plan, which builds its student without a clip option)."""
    from autocomp.compressors.apply import PlanApplier
    from autocomp.compressors.base import technique
    from autocomp.compressors.student import prepare_for_training
    from autocomp.cost.size import plan_bytes

    loaded = tiny_loaded()
    desc = introspect(loaded)
    emb = desc.by_name["emb"]
    q = technique("quantize")
    c = q.bind(q.parse("3g16/mse"), emb, [(emb.rows, emb.cols)])
    assert c == QuantConfig(3, 16, True, method="mse") and not plan_needs(Plan(layers={"emb": LayerPlan(c)}))
    plan = Plan(layers={"emb": LayerPlan(PruneConfig("unstructured", 0.4), c), "fc1": LayerPlan(QuantConfig(3, 0, method="mse"))},
                fingerprint=desc.fingerprint, model_spec=f"{TINY}:tiny", model_name="tiny")
    applier = PlanApplier(loaded.module, desc)
    w = loaded.module.fc1.weight.detach()
    rtn = quantize_matrix(w, 3, 0, True)[0]
    assert ((applier.compressed(plan, "fc1")[0] - w) ** 2).sum() < ((rtn - w) ** 2).sum()  # less weight error
    b = loaded.batches[0]
    with torch.no_grad(), applier.applied(plan):
        proxy = loaded.module(b)
    with torch.no_grad():
        assert torch.equal(prepare_for_training(loaded.module, plan, desc)(b), proxy)
    r = autocomp.export(loaded.module, plan, tmp_path / "e.acz.safetensors", data_spec=f"{TINY}:calib")
    assert r["payload_bytes"] == r["predicted_bytes"] == plan_bytes(desc, plan)
    with torch.no_grad():
        assert torch.equal(autocomp.load(tmp_path / "e.acz.safetensors")(b), proxy)


def test_statistics_of_the_first_format_still_load(tmp_path):
    """Plans made before tables had statistics recorded /1 files: those still serve them."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    loaded = tiny_loaded()
    st = gather(loaded.module, introspect(loaded), loaded.batches, key="k1")
    st.save(tmp_path / "k1.safetensors")
    with safe_open(str(tmp_path / "k1.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
    meta["format"] = "autocomp.calibration/1"
    meta.pop("plain")
    save_file(load_file(str(tmp_path / "k1.safetensors")), str(tmp_path / "k1.safetensors"), metadata=meta)
    old = CalibrationStats.load(tmp_path / "k1.safetensors", "k1")
    assert old is not None and old.plain == set() and set(old.hessians) == set(st.hessians)
