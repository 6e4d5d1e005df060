"""Block outputs reused across proxy evaluations (autocomp/evaluators/reuse.py): the proxy with reuse is bit for
bit the proxy without it, on every kind of block a model has, and reuse happens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from autocomp.evaluators.proxy import ProxyEvaluator
from autocomp.models import load_model
from autocomp.models.introspect import introspect
from autocomp.space import SearchSpace

HERE = Path(__file__).parent
ME = str(Path(__file__))


# -- models with the awkward cases -----------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.a = nn.Linear(dim, 2 * dim)
        self.b = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.a(x)))


class Tied(nn.Module):
    """Embedding tied to the head (the head runs last, its option changes what every block reads); a block run
    twice; the caller writing a block's output in place."""

    def __init__(self, head_first: bool = False) -> None:
        super().__init__()
        if head_first:  # registered first: the description lists the head, and the table computes with its option
            self.head = nn.Linear(16, 30, bias=False)
        self.emb = nn.Embedding(30, 16)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        if not head_first:
            self.head = nn.Linear(16, 30, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = self.blocks[0](h)
        h = self.blocks[0](h)  # the same block again: its second call is another entry
        for blk in self.blocks[1:]:
            h = blk(h)
            h.mul_(0.9)  # in place on what the block returned
        return self.head(h)


class Silent(nn.Module):
    """``pre``'s hook never fires (the parent multiplies with its weight) and it runs before the blocks; a block
    also runs a layer registered outside it (``shared``), so that block is never reused."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(8, 16)
        self.shared = nn.Linear(16, 16)
        self.blocks = nn.Sequential(Block(), Block(), Block())
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.pre.weight, self.pre.bias)
        h = self.blocks[0](h)
        h = self.blocks[1](h) + self.shared(h)
        return self.out(self.blocks[2](h))


class Borrow(nn.Module):
    def __init__(self, shared: nn.Linear) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self._borrowed = [shared]  # not registered: the block runs a layer that is not its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self._borrowed[0](x)


class Borrowing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(16, 16)
        self.blocks = nn.ModuleList([Borrow(self.shared), Block()])
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks[1](self.blocks[0](x)))


def tied() -> nn.Module:
    torch.manual_seed(0)
    return Tied().eval()


def tied_head_first() -> nn.Module:
    torch.manual_seed(0)
    return Tied(head_first=True).eval()


def silent() -> nn.Module:
    torch.manual_seed(0)
    return Silent().eval()


def borrowing() -> nn.Module:
    torch.manual_seed(0)
    return Borrowing().eval()


def ids() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 30, (4, 5), generator=g) for _ in range(2)]


def feats8() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(4, 8, generator=g) for _ in range(2)]


def feats16() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 16, generator=g) for _ in range(2)]


# -- a search-like walk: random plans, then chains of small moves ----------------------------------------------
def walk(space: SearchSpace, n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    params = list(space.params)
    out = [{p: rng.choice(o) for p, o in space.params.items()}]
    for i in range(n - 1):
        a = dict(out[rng.randrange(len(out))] if i % 3 else out[-1])
        for p in rng.sample(params, min(len(params), rng.choice((1, 1, 2, 3)))):
            a[p] = rng.choice(space.params[p])
        out.append(a)
    return out


def same_with_and_without(loaded, assignments, space, **kw) -> ProxyEvaluator:
    desc = introspect(loaded)
    plain = ProxyEvaluator(loaded, desc, reuse_bytes=0)
    fast = ProxyEvaluator(loaded, desc, applier=plain.applier, **kw)
    for a in assignments:
        plan = space.decode(a)
        assert fast(plan) == plain(plan), a  # bit for bit
    assert plain.reuse.hits == 0
    return fast


@pytest.mark.parametrize("spec,data", [
    (f"{ME}:tied", f"{ME}:ids"),
    (f"{ME}:tied_head_first", f"{ME}:ids"),
    (f"{ME}:silent", f"{ME}:feats8"),
    (f"{HERE / 'tiny_models.py'}:char_lm", f"{HERE / 'tiny_models.py'}:char_calib"),
    (f"{HERE / 'tiny_models.py'}:char_lm_prenorm", f"{HERE / 'tiny_models.py'}:char_calib"),
    (f"{HERE / 'arch_models.py'}:resnet", f"{HERE / 'arch_models.py'}:images"),
    (f"{HERE / 'arch_models.py'}:vit", f"{HERE / 'arch_models.py'}:images"),
])
def test_reuse_is_bit_identical_and_happens(spec, data):
    loaded = load_model(spec, data=data)
    space = SearchSpace.from_yaml("transformer", introspect(loaded))
    fast = same_with_and_without(loaded, walk(space, 40), space)
    assert fast.reuse.blocks and fast.reuse.hits > 0
    assert 0 < fast.reuse.nbytes <= fast.reuse.limit


def test_every_layer_alone_moves_the_proxy_as_without_reuse():
    """From one plan, change one layer at a time (each to every other option): the silent layer before the blocks,
    the tied head, each block's layers. A key missing any of them would return stale blocks."""
    for spec, data in ((f"{ME}:tied", f"{ME}:ids"), (f"{ME}:tied_head_first", f"{ME}:ids"), (f"{ME}:silent", f"{ME}:feats8")):
        loaded = load_model(spec, data=data)
        space = SearchSpace.from_yaml("transformer", introspect(loaded))
        base = {p: o[len(o) // 2] for p, o in space.params.items()}
        moves = [base] + [{**base, p: c} for p, o in space.params.items() for c in o if c != base[p]]
        moves = [m for pair in zip(moves[1:], [base] * len(moves)) for m in pair]  # back to base between moves
        fast = same_with_and_without(loaded, moves, space)
        assert fast.reuse.hits > 0


def test_silent_and_tied_layers_are_keyed():
    loaded = load_model(f"{ME}:silent", data=f"{ME}:feats8")
    ev = ProxyEvaluator(loaded, introspect(loaded))
    assert ev.reuse.silent == ["pre"] and [b[0] for b in ev.reuse.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    loaded = load_model(f"{ME}:tied", data=f"{ME}:ids")
    ev = ProxyEvaluator(loaded, introspect(loaded))
    assert "head" not in {layer.name for layer in introspect(loaded).layers}  # described as the table alone
    assert ev.reuse.uses["head"] == ev.reuse.uses["emb"] == ("emb",)
    loaded = load_model(f"{ME}:tied_head_first", data=f"{ME}:ids")
    assert "emb" not in {layer.name for layer in introspect(loaded).layers}
    assert ProxyEvaluator(loaded, introspect(loaded)).reuse.uses["emb"] == ("head",)


def test_a_block_running_a_layer_not_its_own_is_not_reused():
    loaded = load_model(f"{ME}:borrowing", data=f"{ME}:feats16")
    space = SearchSpace.from_yaml("transformer", introspect(loaded))
    fast = same_with_and_without(loaded, walk(space, 30, seed=3), space)
    assert fast.reuse.uncacheable == {"blocks.0"}
    assert fast.reuse.hits > 0  # blocks.1 still is


def test_a_small_bound_evicts_and_stays_exact():
    loaded = load_model(f"{ME}:tied", data=f"{ME}:ids")
    space = SearchSpace.from_yaml("transformer", introspect(loaded))
    limit = 4 * 4 * 5 * 16 * 4  # four block outputs
    fast = same_with_and_without(loaded, walk(space, 40, seed=1), space, reuse_bytes=limit)
    assert fast.reuse.nbytes <= limit and len(fast.reuse.entries) <= 4


def test_minilm_reuse_is_bit_identical(minilm, minilm_desc):
    space = SearchSpace.from_yaml("default", minilm_desc)
    plain = ProxyEvaluator(minilm, minilm_desc, reuse_bytes=0)
    fast = ProxyEvaluator(minilm, minilm_desc, applier=plain.applier)
    assert [b[0] for b in fast.reuse.blocks] == [f"bert.encoder.layer.{i}" for i in range(6)]
    names = list(space.params)
    base = {p: o[len(o) // 2] for p, o in space.params.items()}
    late = {**base, names[-4]: space.params[names[-4]][0]}  # a layer of the last block
    early = {**base, names[0]: space.params[names[0]][-1]}  # the word table
    values = []
    for a in (base, late, base, early):
        plan = space.decode(a)
        values.append(fast(plan))
        assert values[-1] == plain(plan)
    assert len(set(values)) == 3
    # `late` reuses blocks 0-4 of both batches, `base` again all six, `early` none
    assert fast.reuse.hits == 2 * 5 + 2 * 6 and fast.reuse.misses == 2 * 6 + 2 + 2 * 6


@pytest.mark.parametrize("kind", ["bert", "gpt2", "clip"])
def test_hugging_face_models_reuse_exactly(kind, tmp_path):
    """Hugging Face layers (GPT-2: Conv1D, a tied head and a KV cache the blocks fill as a side effect; CLIP: two
    towers, scored by alignment) through `hf:DIR`: bit for bit the proxy without reuse, and reuse happens."""
    from test_architectures import _hf_dir

    loaded = load_model(_hf_dir(tmp_path, kind))
    space = SearchSpace.from_yaml("transformer", introspect(loaded))
    fast = same_with_and_without(loaded, walk(space, 30, seed=2), space)
    assert fast.reuse.blocks and fast.reuse.hits > 0
