"""The proxy's padding-free encoder blocks: the same values to the bit, on fewer rows, or not at all."""

from __future__ import annotations

import random

import pytest
import torch

from autocomp.evaluators import unpadded
from autocomp.evaluators.proxy import ProxyEvaluator
from autocomp.models import load_model
from autocomp.models.introspect import introspect
from autocomp.space import SearchSpace


def _rows_seen(ev: ProxyEvaluator, plan, names: list[str]) -> list[int]:
    """Rows each named Linear multiplies over the calibration batches when ``ev`` scores ``plan``."""
    mods = dict(ev.model.named_modules())
    seen = dict.fromkeys(names, 0)
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, seen[n] + i[0].numel() // i[0].shape[-1]))
             for n in names]
    try:
        ev(plan)
    finally:
        for h in hooks:
            h.remove()
    return [seen[n] for n in names]


def test_minilm_scores_real_rows_only_and_the_same(minilm, minilm_desc):
    plain = ProxyEvaluator(minilm, minilm_desc, reuse_bytes=0, unpadded=False)
    fast = ProxyEvaluator(minilm, minilm_desc, applier=plain.applier)  # with block reuse, as a search runs
    rows = ProxyEvaluator(minilm, minilm_desc, applier=plain.applier, reuse_bytes=0)  # every block runs
    assert fast.unpadded.enabled and len(fast.unpadded.blocks) == 6 and fast.unpadded.checked == 2
    assert not plain.unpadded.blocks
    real = sum(int(b["attention_mask"].sum()) for b in minilm.batches)
    padded = sum(b["attention_mask"].numel() for b in minilm.batches)
    assert real < padded
    space = SearchSpace.from_yaml("default", minilm_desc)
    rng = random.Random(0)
    w8a8 = [p for p, o in space.params.items() if "int8" in o and ".encoder.layer." in p]
    names = [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(6)]
    for i in range(8):
        a = {p: rng.choice([c for c in o if c != "int8"]) for p, o in space.params.items()}
        if i % 2:  # W8A8 reads pad rows into its activation scale: blocks up to its own run padded
            a[rng.choice(w8a8)] = "int8"
        plan = space.decode(a)
        assert fast(plan) == plain(plan), a  # bit for bit
        last = max((int(p.split(".")[3]) for p in a if a[p] == "int8" and ".encoder.layer." in p), default=-1)
        assert _rows_seen(rows, plan, names) == [padded if b <= last else real for b in range(6)], last
        assert _rows_seen(plain, plan, names) == [padded] * 6


def test_a_rewrite_that_differs_or_fails_is_not_used(minilm, minilm_desc, monkeypatch):
    space = SearchSpace.from_yaml("default", minilm_desc)
    plan = space.decode({p: o[min(3, len(o) - 1)] for p, o in space.params.items()})
    reference = ProxyEvaluator(minilm, minilm_desc, reuse_bytes=0, unpadded=False)(plan)

    def off_by_a_little(sa, q, k, v, mask, **kw):
        return unpadded._eager(sa, q * (1 + 2 ** -20), k, v, mask)

    monkeypatch.setattr(unpadded, "_attention_function", lambda sa: off_by_a_little)
    ev = ProxyEvaluator(minilm, minilm_desc, reuse_bytes=0)
    assert ev.unpadded.blocks and not ev.unpadded.enabled
    assert ev(plan) == reference

    def broken(sa, q, k, v, mask, **kw):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(unpadded, "_attention_function", lambda sa: broken)
    ev = ProxyEvaluator(minilm, minilm_desc, reuse_bytes=0)
    assert not ev.unpadded.enabled and ev(plan) == reference


def test_only_padding_masks_are_unpadded():
    neg = torch.finfo(torch.float32).min
    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    additive = torch.where(keep, 0.0, neg)[:, None, None, :]
    assert unpadded._real_rows(additive, (2, 4)).tolist() == [0, 1, 2, 4, 5]
    assert unpadded._real_rows(additive.expand(2, 1, 4, 4), (2, 4)).tolist() == [0, 1, 2, 4, 5]
    assert unpadded._real_rows(keep[:, None, None, :], (2, 4)).tolist() == [0, 1, 2, 4, 5]  # boolean: True attends
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None, None].expand(2, 1, 4, 4)
    assert unpadded._real_rows(torch.where(causal, 0.0, neg), (2, 4)) is None
    assert unpadded._real_rows(torch.zeros(2, 1, 1, 4), (2, 4)) is None  # no pad rows: nothing to gain
    assert unpadded._real_rows(None, (2, 4)) is None
    assert unpadded._real_rows(torch.zeros(2, 4), (2, 4)) is None  # a 2-d mask: not what the block was given


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hugging_face_encoders_sdpa_included_and_decoders_left_alone(kind, tmp_path):
    from test_architectures import _hf_dir
    from test_reuse import walk

    loaded = load_model(_hf_dir(tmp_path, kind))
    desc = introspect(loaded)
    plain = ProxyEvaluator(loaded, desc, reuse_bytes=0, unpadded=False)
    fast = ProxyEvaluator(loaded, desc, applier=plain.applier)
    if kind == "bert":
        assert loaded.module.config._attn_implementation == "sdpa"
        assert fast.unpadded.enabled and len(fast.unpadded.blocks) == 2
    else:
        assert not fast.unpadded.blocks and not fast.unpadded.enabled
    space = SearchSpace.from_yaml("transformer", desc)
    for a in walk(space, 12, seed=4):
        plan = space.decode(a)
        assert fast(plan) == plain(plan)


def test_decoder_and_cross_attention_layers_are_not_eligible():
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    enc = transformers.BertModel(transformers.BertConfig(**cfg, attn_implementation="eager"))
    assert unpadded.eligible_block(enc.encoder.layer[0])
    dec = transformers.BertModel(transformers.BertConfig(**cfg, is_decoder=True, add_cross_attention=True))
    assert not unpadded.eligible_block(dec.encoder.layer[0])
    chunked = transformers.BertModel(transformers.BertConfig(**cfg, chunk_size_feed_forward=4))
    assert not unpadded.eligible_block(chunked.encoder.layer[0])
    assert not unpadded.eligible_block(torch.nn.Linear(4, 4))


def test_own_eager_attention_takes_boolean_and_additive_masks_alike():
    class Self:
        scaling = 0.5

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 8, generator=g) for _ in range(3))
    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)[:, None, None, :]
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    a, _ = unpadded._eager(Self(), q, k, v, additive)
    b, _ = unpadded._eager(Self(), q, k, v, keep)
    assert torch.equal(a, b) and a.shape == (2, 4, 3, 8)
    assert torch.allclose(a[1, 0, 0], (torch.softmax(q[1, 0, 0] @ k[1, 0, :2].T * 0.5, -1) @ v[1, 0, :2]))


def test_the_search_says_its_blocks_run_on_real_tokens(minilm, minilm_desc):
    ev = ProxyEvaluator(minilm, minilm_desc, reuse_bytes=0)
    assert ev.unpadded.describe(minilm.batches) == ("proxy: 6 encoder blocks run on their real tokens only (548 of "
                                                    "752 token rows), checked bit for bit against the padded model")
    full = [{k: v[:, :5] for k, v in b.items()} for b in minilm.batches[:1]]  # the first 5 tokens: no padding
    assert all(bool(b["attention_mask"].all()) for b in full) and ev.unpadded.describe(full) == ""
    assert ProxyEvaluator(minilm, minilm_desc, reuse_bytes=0, unpadded=False).unpadded.describe(minilm.batches) == ""
