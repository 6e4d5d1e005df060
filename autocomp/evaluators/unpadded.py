"""Padding-free forward passes of BERT-style encoder blocks for the proxy: the same numbers, ~25% less work.

Calibration text comes in padded batches (MiniLM's: 548 tokens in 752 positions), and every Linear layer of
a Hugging Face encoder computes the pad rows too, though the attention mask keeps them from every real row
and the pooling or the token mask drops them. :class:`UnpaddedBlocks` runs each eligible block on its real
rows only: it gathers them once, runs the query / key / value projections, the attention output, the
intermediate and the output layers (with their norms and residuals) on the packed rows, and puts the rows
back in place only for the attention product itself, for which it calls the attention function the block's
own module calls (Hugging Face's eager or SDPA attention). Pad rows of the block's output keep the block's
input: nothing reads them.

It is an exact rewrite, not an approximation, under one condition of the machine: a row of a matrix product
must come out the same whatever the number of rows around it (true of the CPU GEMMs measured here). So it is
**checked, not assumed**: :meth:`UnpaddedBlocks.verify` compares the original model's outputs with the
padding-free ones on every calibration batch, to the bit (where a token mask applies, on the real tokens),
and the proxy uses the padding-free path only if they are equal. The proxy values, and with them every
stored study, sensitivity profile and resumed search, are therefore unchanged.

Eligible blocks (duck-typed, so Bert, RoBERTa, Electra and the other copies of Bert's layer qualify):
``attention.self`` with ``query`` / ``key`` / ``value`` and eager or SDPA attention; ``attention.output``,
``intermediate`` and ``output`` submodules; no cross-attention, no decoder, no feed-forward chunking; eval
mode. At call time a block runs as it is when its mask is not a 4-d additive (float) or boolean mask shared
by every query row (causal masks are not), or when it has no pad rows.

Pad rows do matter to one kind of layer: a forward pre-hook on a layer's inputs, which W8A8 plans use to
quantize activations with a per-tensor scale over every row, pad rows included. Since a padding-free block
leaves other values in its pad rows than the original does, a pass runs padding-free only the blocks after
the last block holding such a hook (all of them run as they are if a hook sits outside the blocks).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["UnpaddedBlocks", "eligible_block"]


def _attention_function(sa: Any) -> Any:
    """The attention function the block's own module calls (Hugging Face's interface for its implementation),
    or None where the module does not expose one (then eager attention is computed here, as Bert's is)."""
    module = sys.modules.get(type(sa).__module__)
    eager = getattr(module, "eager_attention_forward", None)
    registry = getattr(module, "ALL_ATTENTION_FUNCTIONS", None)
    impl = getattr(getattr(sa, "config", None), "_attn_implementation", None)
    if eager is None or registry is None or not hasattr(registry, "get_interface"):
        return None
    return registry.get_interface(impl, eager) if impl not in (None, "eager") else eager


def eligible_block(block: Any) -> bool:
    """Whether ``block`` has the structure of a Hugging Face BERT encoder layer the rewrite reproduces."""
    attn = getattr(block, "attention", None)
    sa = getattr(attn, "self", None)
    if sa is None or not all(hasattr(sa, a) for a in ("query", "key", "value", "scaling", "attention_head_size")):
        return False
    if not all(hasattr(x, "forward") for x in (getattr(attn, "output", None), getattr(block, "intermediate", None),
                                               getattr(block, "output", None))):
        return False
    if getattr(block, "add_cross_attention", False) or getattr(block, "is_decoder", False):
        return False
    if getattr(block, "chunk_size_feed_forward", 0) or getattr(sa, "is_causal", False):
        return False
    impl = getattr(getattr(sa, "config", None), "_attn_implementation", None)
    return impl in (None, "eager") or (impl == "sdpa" and _attention_function(sa) is not None)


def _real_rows(mask: Any, shape: Any) -> Any:
    """Flat indices of the real (unmasked) positions, or None where the rewrite does not apply: no mask, a
    mask that is not 4-d additive (float) or boolean (True: attend), or one whose query rows differ (causal)."""
    import torch

    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or not (mask.is_floating_point() or mask.dtype == torch.bool):
        return None
    b, length = shape[0], shape[1]
    if mask.shape[0] != b or mask.shape[-1] != length or mask.shape[1] != 1:
        return None
    first = mask[:, :, :1, :]
    if mask.shape[2] != 1 and not bool((mask == first).all()):
        return None  # query rows see different keys (a causal mask): not padding alone
    valid = first.reshape(b, length)
    valid = valid if valid.dtype == torch.bool else valid == 0
    if bool(valid.all()):
        return None
    return valid.reshape(-1).nonzero().squeeze(1)


def _eager(sa: Any, q: Any, k: Any, v: Any, mask: Any, **_: Any) -> tuple[Any, None]:
    """Bert's eager attention, for modules that expose no attention function of their own."""
    import torch

    scores = torch.matmul(q, k.transpose(2, 3)) * sa.scaling
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    probs = torch.nn.functional.softmax(scores, dim=-1)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), None


def _unpadded_forward(block: Any, original: Any, last: list[Any]) -> Any:
    """``last``: [mask, real rows, hidden shape] of the previous block, shared by the blocks of one pass (they
    get one mask object): the rows are found once per pass."""
    sa = block.attention.self
    attention = _attention_function(sa) or _eager

    def forward(hidden_states: Any, attention_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
        if any(a is not None for a in args) or any(v is not None for v in kwargs.values()) or block.training \
                or hidden_states.dim() != 3:
            return original(hidden_states, attention_mask, *args, **kwargs)
        if last[0] is attention_mask and last[2] == hidden_states.shape:
            idx = last[1]
        else:
            idx = _real_rows(attention_mask, hidden_states.shape)
            last[:] = [attention_mask, idx, hidden_states.shape]
        if idx is None:
            return original(hidden_states, attention_mask, *args, **kwargs)
        b, length, width = hidden_states.shape
        flat = hidden_states.reshape(b * length, width)
        rows = flat.index_select(0, idx)

        def heads(x: Any) -> Any:
            full = x.new_zeros(b * length, x.shape[-1])
            full.index_copy_(0, idx, x)
            return full.view(b, length, -1, sa.attention_head_size).transpose(1, 2)

        q, k, v = heads(sa.query(rows)), heads(sa.key(rows)), heads(sa.value(rows))
        context, _ = attention(sa, q, k, v, attention_mask, dropout=0.0, scaling=sa.scaling)
        context = context.reshape(b * length, -1).index_select(0, idx)
        attended = block.attention.output(context, rows)
        out_rows = block.output(block.intermediate(attended), attended)
        out = flat.clone()
        out.index_copy_(0, idx, out_rows)
        return out.view(b, length, -1)

    return forward


class UnpaddedBlocks:
    """The eligible blocks of ``model``; :meth:`active` runs them padding-free once :meth:`verify` passed."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.blocks = [m for m in model.modules() if eligible_block(m)]
        self._inside = [{id(x) for x in b.modules()} for b in self.blocks]
        self.enabled = False
        self.checked = 0  # calibration batches compared to the bit

    def _first_free(self) -> int:
        """Index of the first block after every module with a forward pre-hook (len(blocks): none is)."""
        first = 0
        for m in self.model.modules():
            if m._forward_pre_hooks:
                at = next((i for i, inside in enumerate(self._inside) if id(m) in inside), None)
                if at is None:
                    return len(self.blocks)
                first = max(first, at + 1)
        return first

    @contextlib.contextmanager
    def active(self, force: bool = False) -> Iterator[None]:
        """Within the block, eligible blocks run padding-free (if verified, or ``force``): those after the
        last one whose inputs a pre-hook reads (W8A8)."""
        if not self.blocks or not (self.enabled or force):
            yield
            return
        patched = []
        last: list[Any] = [None, None, None]
        try:
            for block in self.blocks[self._first_free():]:
                previous = block.__dict__.get("forward")
                block.forward = _unpadded_forward(block, block.forward, last)
                patched.append((block, previous))
            yield
        finally:
            for block, previous in reversed(patched):
                if previous is None:
                    del block.forward
                else:
                    block.forward = previous

    def verify(self, run: Any, reference: Any, mask: Any) -> bool:
        """Compare one batch: ``run()`` (the model's output tensor) with the original model's ``reference``,
        on the real tokens where ``mask`` (batch x tokens) applies. Call on every calibration batch, then
        :meth:`settle`; any difference keeps the original path."""
        import torch

        if not self.blocks or self.checked < 0:
            return False
        try:
            with self.active(force=True):
                out = run()
        except Exception:  # noqa: BLE001 - any failure of the rewrite keeps the original path
            self.checked = -1
            return False
        same = out.shape == reference.shape and out.dtype == reference.dtype
        if same and mask is not None and reference.dim() >= 3:
            keep = mask.to(torch.bool)
            same = torch.equal(out[keep], reference[keep])
        elif same:
            same = torch.equal(out, reference)
        self.checked = self.checked + 1 if same else -1
        return same

    def describe(self, batches: list[Any]) -> str:
        """One line for the search's log: how many blocks, and how many token rows they compute ("" when the
        path is off or the calibration batches carry no padding)."""
        masks = [b.get("attention_mask") for b in batches if isinstance(b, dict)]
        masks = [m for m in masks if m is not None]
        real, total = sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)
        if not self.enabled or real >= total:
            return ""
        return (f"proxy: {len(self.blocks)} encoder blocks run on their real tokens only ({real} of {total} token "
                f"rows), checked bit for bit against the padded model")

    def settle(self) -> bool:
        """Enable the padding-free path if every batch compared equal."""
        self.enabled = self.checked > 0
        return self.enabled
