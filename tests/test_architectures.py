"""Every standard torch module (issue #11): nn.MultiheadAttention split into layers, every parameter accounted
for, FLOPs that do not depend on hooks firing, causal-LM logits scored with KL, and a conformance set of
architectures taken through search -> exact size -> export -> load -> 2 training steps."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import autocomp
from autocomp.compressors.apply import PlanApplier
from autocomp.cost.size import plan_bytes
from autocomp.errors import AutocompError
from autocomp.models import load_model
from autocomp.models.attention import SplitAttention, merge_attention, split_attention
from autocomp.models.base import run_batch
from autocomp.models.introspect import introspect

HERE = Path(__file__).parent
ARCH = str(HERE / "arch_models.py")
TINY = str(HERE / "tiny_models.py")


# -- nn.MultiheadAttention, split -------------------------------------------------------------------------------
CONFIGS = list(itertools.product([True, False], [True, False], [None, 24], [False, True], [False, True]))


@pytest.mark.parametrize("batch_first,bias,kdim,bias_kv,zero_attn", CONFIGS)
def test_split_attention_computes_what_torch_computes(batch_first, bias, kdim, bias_kv, zero_attn):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, bias=bias, kdim=kdim, vdim=kdim, batch_first=batch_first,
                                add_bias_kv=bias_kv, add_zero_attn=zero_attn).eval()
    holder = nn.Sequential(copy.deepcopy(mha))
    assert split_attention(holder) == 1 and isinstance(holder[0], SplitAttention)
    split = holder[0]
    kd = kdim or 32
    q = torch.randn(3, 5, 32) if batch_first else torch.randn(5, 3, 32)
    k = torch.randn(3, 7, kd) if batch_first else torch.randn(7, 3, kd)
    kpm = torch.rand(3, 7) > 0.6
    kpm[:, 0] = False
    causal = torch.triu(torch.ones(5, 7, dtype=torch.bool), 1)
    for kw in ({}, {"key_padding_mask": kpm}, {"attn_mask": causal}, {"attn_mask": causal.float() * -1e4},
               {"attn_mask": causal, "key_padding_mask": kpm}, {"average_attn_weights": False}):
        for need in (True, False):
            want, want_w = mha(q, k, k, need_weights=need, **kw)
            got, got_w = split(q, k, k, need_weights=need, **kw)
            assert torch.allclose(got, want, atol=1e-6), kw
            assert (got_w is None) == (want_w is None)
            if want_w is not None:
                assert torch.allclose(got_w, want_w, atol=1e-6)
    # the four projections are Linear layers holding exactly the packed slices
    if kdim is None:
        assert torch.equal(torch.cat([split.q_proj.weight, split.k_proj.weight, split.v_proj.weight]),
                           mha.in_proj_weight)
    else:
        assert torch.equal(split.k_proj.weight, mha.k_proj_weight) and split.k_proj.in_features == kdim
    # and merging gives back an nn.MultiheadAttention with the same outputs
    merge_attention(holder)
    assert isinstance(holder[0], nn.MultiheadAttention)
    assert torch.allclose(holder[0](q, k, k)[0], mha(q, k, k)[0], atol=1e-6)


def test_split_attention_inside_torch_transformer_layers_and_unbatched():
    torch.manual_seed(0)
    for norm_first, batch_first in itertools.product([False, True], [True, False]):
        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first,
                                                               norm_first=norm_first), 2, enable_nested_tensor=False)
        enc.eval()
        x = torch.randn(2, 6, 32) if batch_first else torch.randn(6, 2, 32)
        mask = nn.Transformer.generate_square_subsequent_mask(6)
        with torch.no_grad():
            want = enc(x, mask=mask, is_causal=True)  # eval mode: torch's fused fast path where it applies
            split = copy.deepcopy(enc)
            assert split_attention(split) == 2
            got = split(x, mask=mask, is_causal=True)
        assert torch.allclose(got, want, atol=1e-5)
    mha = nn.MultiheadAttention(32, 4).eval()
    x = torch.randn(6, 32)
    holder = nn.Sequential(copy.deepcopy(mha))
    split_attention(holder)
    assert torch.allclose(holder[0](x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        holder[0](x, x, x, is_causal=True)


# -- every weight accounted for --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,data", [(f"{TINY}:char_lm", f"{TINY}:char_calib"), (f"{ARCH}:seq2seq", f"{ARCH}:seq2seq_data"),
                                       (f"{ARCH}:vit", f"{ARCH}:images"), (f"{ARCH}:resnet", f"{ARCH}:images"),
                                       (f"{ARCH}:conv1d", f"{ARCH}:signals")])
def test_layers_and_kept_parameters_add_up_to_the_fp32_bytes(spec, data):
    loaded = load_model(spec, data=data)
    desc = introspect(loaded)
    kept = desc.info["kept"]
    assert sum(layer.nbytes for layer in desc.layers) + sum(k["bytes"] for k in kept) == desc.fp32_bytes
    assert not any(isinstance(m, nn.MultiheadAttention) for m in loaded.module.modules())
    assert not any("in_proj" in k["name"] or "proj_weight" in k["name"] for k in kept)
    for k in kept:  # every kept parameter says why
        assert k["reason"] and k["bytes"] == math.prod(k["shape"]) * 4
        if len(k["shape"]) >= 2:
            assert "no unit" in k["reason"]


def test_the_char_lm_attention_is_compressible_and_its_smallest_plan_shrinks(tmp_path):
    from autocomp.space import SearchSpace

    loaded = load_model(f"{TINY}:char_lm", data=f"{TINY}:char_calib")
    desc = introspect(loaded)
    names = {layer.name for layer in desc.layers}
    for i in range(2):
        assert {f"encoder.layers.{i}.self_attn.{p}_proj" for p in ("q", "k", "v", "out")} <= names
    space = SearchSpace.from_yaml("transformer", desc)
    assert any(g.kind == "heads" for g in space.groups.values()) and any(g.kind == "neurons" for g in space.groups.values())
    plan = space.decode(space.smallest_assignment())
    assert all(not plan.layer(n).is_identity for n in names if ".self_attn." in n)
    # before the split, the packed q/k/v weights alone (kept in fp32) were 29% of this model
    in_proj = 2 * 3 * 32 * 32 * 4
    assert in_proj > 0.28 * desc.fp32_bytes and plan_bytes(desc, plan) < 0.15 * desc.fp32_bytes


def test_head_pruning_removes_exactly_the_dropped_heads():
    """Pruning heads of a split nn.MultiheadAttention equals the original module with those heads' output
    columns removed (their q/k/v rows are zero, so nothing else changes)."""
    from autocomp.space import SearchSpace

    loaded = load_model(f"{TINY}:char_lm", data=f"{TINY}:char_calib")
    desc = introspect(loaded)
    space = SearchSpace.from_yaml("transformer", desc)
    key = "heads@encoder.layers.0.self_attn.q_proj"
    assignment = {p: o[0] for p, o in space.params.items()}
    assignment[f"{key}:keep"] = "k0.5"
    plan = space.decode(assignment)
    group = plan.structured[key]
    assert group.keep == 2 and group.units == 4
    x = loaded.batches[0]
    applier = PlanApplier(loaded.module, desc)
    with torch.no_grad():
        with applier.applied(plan):
            got = loaded.module(x)
            q = loaded.module.encoder.layers[0].self_attn.q_proj.weight
            dropped = [h for h in range(4) if q[h * 8:(h + 1) * 8].abs().sum() == 0]
        assert len(dropped) == 2
        ref = copy.deepcopy(loaded.module)
        out_w = ref.encoder.layers[0].self_attn.out_proj.weight
        for h in dropped:
            out_w[:, h * 8:(h + 1) * 8] = 0
        assert torch.allclose(ref(x), got, atol=1e-5)


# -- FLOPs without hooks -------------------------------------------------------------------------------------------
def test_encoder_layer_flops_counted_equal_a_hand_count():
    desc = introspect(load_model(f"{ARCH}:one_encoder_layer", data=f"{ARCH}:tokens"))
    t, d, ff = 10, 32, 64
    linear = 2 * t * (4 * d * d) + 2 * t * (2 * d * ff)  # q, k, v, out projections + FFN, per sample
    attention = 2 * t * t * d * 2  # Q K^T and P V
    flops = {layer.name.rpartition(".")[2]: layer.flops_per_sample for layer in desc.layers}
    assert flops == {"q_proj": 2 * t * d * d, "k_proj": 2 * t * d * d, "v_proj": 2 * t * d * d,
                     "out_proj": 2 * t * d * d, "linear1": 2 * t * d * ff, "linear2": 2 * t * ff * d}
    assert sum(flops.values()) == linear
    assert desc.info["other_flops_per_sample"] == attention


def test_a_weight_used_outside_its_forward_is_still_priced():
    desc = introspect(load_model(f"{ARCH}:parent_uses_weight", data=f"{ARCH}:tokens"))
    by = desc.by_name
    assert by["proj"].flops_per_sample == 2 * 10 * 32 * 48 and by["proj"].positions == 10
    assert by["out"].flops_per_sample == 2 * 10 * 48 * 4


# -- causal LMs -------------------------------------------------------------------------------------------------------
def test_token_logits_default_to_kl_and_classifier_scores_stay_mse():
    from autocomp.evaluators.proxy import ProxyEvaluator

    lm = load_model(f"{TINY}:char_lm", data=f"{TINY}:char_calib")
    assert ProxyEvaluator(lm, introspect(lm)).metric == "kl"
    s2s = load_model(f"{ARCH}:seq2seq", data=f"{ARCH}:seq2seq_data")
    assert ProxyEvaluator(s2s, introspect(s2s)).metric == "kl"
    clf = load_model(f"{TINY}:tiny", data=f"{TINY}:calib")
    assert ProxyEvaluator(clf, introspect(clf)).metric == "mse"
    forced = load_model(f"{TINY}:char_lm", data=f"{TINY}:char_calib", metric="mse")
    assert ProxyEvaluator(forced, introspect(forced)).metric == "mse"


def test_top_k_teacher_bounds_memory_and_never_exceeds_the_full_kl():
    from autocomp.evaluators.proxy import TOPK, TopKTeacher, distortion

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 16, 3000, generator=g) * 3
    student = teacher + 0.5 * torch.randn(4, 16, 3000, generator=g)
    full, n = distortion("kl", teacher, student)
    top = TopKTeacher(teacher)
    approx, n2 = distortion("kl", top, student)
    assert n == n2 == 64
    assert 0 < approx <= full + 1e-6
    assert approx > 0.5 * full  # a peaked teacher keeps most of its mass in the top-k
    assert top.logp.shape == (4, 16, TOPK) and top.logp.numel() * 8 < teacher.numel() * 4 / 10
    same, _ = distortion("kl", top, teacher)
    assert abs(same) < 1e-4
    with pytest.raises(AutocompError, match="only the kl metric"):
        distortion("mse", top, student)


def test_perplexity_task_matches_a_hand_computation():
    from autocomp.deploy import make_task

    loaded = load_model(f"{TINY}:char_lm", data=f"{TINY}:char_calib")
    name, fn = make_task(loaded, "perplexity")
    assert name == "perplexity"
    nll, count = 0.0, 0
    with torch.no_grad():
        value = fn(loaded.module)
        for ids in loaded.batches:
            lp = torch.log_softmax(loaded.module(ids)[:, :-1], -1)
            nll -= float(lp.gather(-1, ids[:, 1:, None]).sum())
            count += ids[:, 1:].numel()
    assert value == pytest.approx(math.exp(nll / count), rel=1e-5)
    img = load_model(f"{ARCH}:vit", data=f"{ARCH}:images")
    with pytest.raises(AutocompError, match="integer token ids"):
        make_task(img, "perplexity")[1](img.module)


# -- the conformance set -----------------------------------------------------------------------------------------
ARCHITECTURES = {
    "encoder-postnorm": (f"{TINY}:char_lm", f"{TINY}:char_calib", "transformer"),
    "encoder-prenorm-seqfirst": (f"{TINY}:char_lm_prenorm", f"{TINY}:char_calib", "transformer"),
    "decoder-cross-attention": (f"{ARCH}:seq2seq", f"{ARCH}:seq2seq_data", "transformer"),
    "vit": (f"{ARCH}:vit", f"{ARCH}:images", "transformer"),
    "resnet": (f"{ARCH}:resnet", f"{ARCH}:images", "cnn"),
    "conv1d": (f"{ARCH}:conv1d", f"{ARCH}:signals", "default"),
}


def _conformance(spec: str, data: str | None, space: str, tmp_path: Path, budget: str = "35%") -> None:
    from autocomp.engine import SearchConfig, open_study, plan_of, run_search
    from autocomp.training import train

    studies = tmp_path / "studies"
    cfg = SearchConfig(budget=budget, model=spec, data=data, study="c", space=space, trials=10, seeds="uniform",
                       studies_dir=studies)
    result = run_search(cfg)
    assert result["pareto"] and all(e["size_bytes"] <= result["budget_bytes"] for e in result["pareto"])
    handle = open_study("c", None, studies)
    plans = [plan_of(t, handle) for t in handle.study.best_trials]
    plan = min(plans, key=lambda p: p.metrics["proxy"])
    loaded = load_model(spec, data=data)
    desc = introspect(loaded)
    assert plan.metrics["size_bytes"] == plan_bytes(desc, plan)
    out = tmp_path / "p.acz.safetensors"
    r = autocomp.export(loaded.module, plan, out, spec=spec, data_spec=data)
    assert r["payload_bytes"] == r["predicted_bytes"] == plan.metrics["size_bytes"]
    batch = loaded.batches[0]

    def first(o):
        from autocomp.models.base import extract_output

        return extract_output(o)[0]

    with torch.no_grad():
        with PlanApplier(loaded.module, desc).applied(plan):
            sim = first(run_batch(loaded.module, batch))
        back = first(run_batch(autocomp.load(out), batch))
    assert torch.allclose(back, sim, atol=1e-5 * float(sim.abs().max()) + 1e-6)
    res = train(loaded, plan, desc, 2, tmp_path / "t.safetensors", loaded.batches[:2], clip="minmax")
    assert res["steps"] == 2 and math.isfinite(res["final_loss"]["loss"])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_searches_exports_loads_and_trains(arch, tmp_path):
    spec, data, space = ARCHITECTURES[arch]
    _conformance(spec, data, space, tmp_path)


def _hf_dir(tmp_path: Path, kind: str) -> str:
    transformers = pytest.importorskip("transformers")
    from autocomp.models.minilm import load_tokenizer

    torch.manual_seed(0)
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64))
    elif kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=30522, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    else:
        model = transformers.CLIPModel(transformers.CLIPConfig(
            text_config={"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "intermediate_size": 64, "max_position_embeddings": 32},
            vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                           "image_size": 16, "patch_size": 4, "num_channels": 3}, projection_dim=16))
    path = tmp_path / kind
    model.save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return f"hf:{path}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "gpt2", "clip"])
def test_hf_architecture_searches_exports_loads_and_trains(kind, tmp_path, monkeypatch):
    from autocomp.evaluators import proxy

    spec = _hf_dir(tmp_path, kind)
    loaded = load_model(spec)
    ev = proxy.ProxyEvaluator(loaded, introspect(loaded))
    assert ev.metric == {"bert": "mse", "gpt2": "kl", "clip": "alignment"}[kind]
    if kind == "gpt2":  # 30522 classes: full logits while they fit TEACHER_BYTES, the top-k beyond
        assert not isinstance(ev.teacher[0], proxy.TopKTeacher)
        monkeypatch.setattr(proxy, "TEACHER_BYTES", 1 << 20)
        small = proxy.ProxyEvaluator(loaded, introspect(loaded))
        assert all(isinstance(t, proxy.TopKTeacher) for t in small.teacher)
    _conformance(spec, None, "transformer", tmp_path, budget="40%")


def test_runtime_runs_split_attention_with_int8_kernels_and_cut_heads():
    """The real-kernel runtime (`autocomp hardware validate`): W8A8 projections run torch's int8 Linear, cut
    heads make q/k/v and out_proj physically smaller, and the output follows the simulation."""
    from autocomp.runtime import build_runtime_model
    from autocomp.space import SearchSpace

    loaded = load_model(f"{TINY}:char_lm", data=f"{TINY}:char_calib")
    desc = introspect(loaded)
    space = SearchSpace.from_yaml("transformer", desc)
    assignment = {p: o[0] for p, o in space.params.items()}
    assignment.update({"0.attention:q": "int8", "1.attention:q": "int8",
                       "heads@encoder.layers.1.self_attn.q_proj:keep": "k0.5"})
    plan = space.decode(assignment)
    rt = build_runtime_model(loaded.module, desc, plan)
    attn = rt.encoder.layers[1].self_attn
    assert attn.num_heads == 2 and attn.q_proj.weight().shape[0] == 16  # a dynamic int8 Linear, 2 heads of 8
    assert "quantized" in type(rt.encoder.layers[0].self_attn.k_proj).__module__
    x = loaded.batches[0]
    with torch.no_grad():
        with PlanApplier(loaded.module, desc).applied(plan):
            sim = loaded.module(x)
        real = rt(x)
    assert (real - sim).abs().max() <= 0.05 * sim.abs().max()


def test_a_module_without_a_unit_is_named_never_skipped_silently(tmp_path):
    from autocomp.engine import SearchConfig, run_search

    spec, data = f"{ARCH}:recurrent", f"{ARCH}:token_ids"
    desc = introspect(load_model(spec, data=data))
    kept = {k["name"]: k for k in desc.info["kept"]}
    assert "LSTM.weight_ih_l0" in kept["lstm.weight_ih_l0"]["reason"] and "no unit" in kept["lstm.weight_hh_l0"]["reason"]
    events = []
    run_search(SearchConfig(budget="90%", model=spec, data=data, study="r", trials=3, seeds="uniform",
                            studies_dir=tmp_path), on_event=lambda kind, d: events.append((kind, d)))
    warnings = [d["message"] for kind, d in events if kind == "warning"]
    assert any("lstm.weight_ih_l0" in w and "stay as they are" in w for w in warnings)


# -- memory for large models ----------------------------------------------------------------------------------
def test_layer_cache_is_bounded_and_least_recently_used_goes_first():
    from autocomp.compressors.apply import LayerCache

    cache = LayerCache(limit=3 * 4000)
    for i in range(3):
        cache[i] = torch.zeros(1000)  # 4000 bytes each
    assert cache.get(0) is not None  # 0 is now the most recent
    cache[3] = (torch.zeros(500), torch.zeros(500))  # tuples count too
    assert 1 not in cache and set(cache) == {0, 2, 3} and cache.nbytes == 12000
    cache[2] = torch.zeros(10)  # replacing an entry updates the count
    assert cache.nbytes == 8040


def test_magnitude_selection_prunes_exactly_what_the_stable_sort_prunes():
    from autocomp.compressors.prune import magnitude_mask

    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 1024, generator=g).half().float()  # fp16 values: many ties
    w[0, :300] = 0.0
    for sparsity in (0.1, 0.3, 0.5, 0.7):
        order = torch.sort(w.reshape(-1).abs(), stable=True).indices
        assert torch.equal(magnitude_mask(w, sparsity), magnitude_mask(w, sparsity, order))


def test_bracketed_selection_finds_kthvalue_on_random_tied_and_patterned_vectors():
    from autocomp.compressors.prune import SAMPLE, _bracketed_kth

    g = torch.Generator().manual_seed(2)
    n = 8 * SAMPLE
    random = torch.randn(n, generator=g).abs()
    tied = torch.randint(0, 5, (n,), generator=g).float()  # every bracket edge a tie
    ramp = torch.arange(n, dtype=torch.float32)  # the strided sample sees every step-th value only
    stairs = torch.arange(n).div(n // 3, rounding_mode="floor").float()  # three plateaus: ranks deep in ties
    comb = torch.full((n,), 10.0)
    comb[:: n // SAMPLE] = torch.rand(SAMPLE, generator=g)  # the sample sees only the teeth: the fallback runs
    for mag in (random, tied, ramp, stairs, ramp.flip(0), comb):  # (kthvalue itself takes seconds on flip(0))
        ranked = mag.sort().values
        for k in (1, 7, n // 3, n // 3 + 1, n // 2, n - 5, n):
            assert float(_bracketed_kth(mag, k)) == float(ranked[k - 1]), k


def test_fisher_in_pieces_with_bfloat16_estimates_the_same_diagonal(monkeypatch):
    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.search import sensitivity

    loaded = load_model(f"{TINY}:char_lm", data=f"{TINY}:char_calib")
    ev = ProxyEvaluator(loaded, introspect(loaded))
    whole, _, _, den = sensitivity._fisher_diag(ev, 16, 0)
    monkeypatch.setattr(sensitivity, "FISHER_BF16_ABOVE", 0)  # the large-model path on a small model
    monkeypatch.setattr(sensitivity, "FISHER_CHUNK_ROWS", 1)
    pieces, _, _, den2 = sensitivity._fisher_diag(ev, 16, 0)
    assert den2 == den and all(v.dtype == torch.bfloat16 for v in pieces.values())
    for name in whole:  # the same expectation: per-layer totals agree within sampling noise
        a, b = float(whole[name].sum()), float(pieces[name].float().sum())
        assert 0.5 < b / a < 2.0, name


def test_gram_svd_gives_the_same_truncations_as_lapack():
    from autocomp.compressors.lowrank import gram_svd

    g = torch.Generator().manual_seed(0)
    for shape in ((64, 256), (256, 64)):
        w = torch.randn(*shape, generator=g) * torch.logspace(0, -3, shape[1])  # a spread spectrum
        u, s, vh = gram_svd(w)
        uu, ss, vv = torch.linalg.svd(w.double(), full_matrices=False)
        assert torch.allclose(s, ss, rtol=1e-9, atol=1e-12)
        for r in (8, 32):
            assert torch.allclose((u[:, :r] * s[:r]) @ vh[:r], (uu[:, :r] * ss[:r]) @ vv[:r], atol=1e-10)


def test_cached_magnitude_threshold_gives_the_sort_mask_and_survives_eviction():
    from autocomp.compressors.apply import LayerCache
    from autocomp.compressors.base import LayerContext, Part
    from autocomp.compressors.prune import Prune, PruneConfig, magnitude_mask, magnitude_threshold

    g = torch.Generator().manual_seed(1)
    w = torch.randn(2048, 512, generator=g).half().float()  # fp16 values: many ties
    order = torch.sort(w.reshape(-1).abs(), stable=True).indices
    assert torch.equal(magnitude_mask(w, 0.4, threshold=magnitude_threshold(w, 0.4)), magnitude_mask(w, 0.4, order))
    cache = LayerCache(1)  # evicts everything but the newest entry
    ctx = LayerContext("l", cache=cache)
    for _ in range(2):
        (part,) = Prune().apply([Part(values=w)], PruneConfig("unstructured", 0.4), ctx)
        cache["big"] = torch.zeros(100)
        assert torch.equal(part.mask, magnitude_mask(w, 0.4, order))
    assert list(cache.small) == [("absthr", "l", ctx.structured_key, ctx.upstream, 0, 0.4)]
