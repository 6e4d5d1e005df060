"""``nn.MultiheadAttention`` as four Linear layers, so every technique reaches its projections.

torch's attention keeps the query / key / value projections in one bare Parameter (``in_proj_weight``)
and, on its fused paths (``nn.TransformerEncoderLayer`` in eval mode, ``F.multi_head_attention_forward``),
never calls ``out_proj``'s forward. A compressor that works on layers would see 24% of a small
transformer as untouchable and its attention as free. :func:`split_attention` replaces every
``nn.MultiheadAttention`` in a model, in place, by :class:`SplitAttention`: the same arithmetic with
``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` as ``nn.Linear`` modules (the q / k / v slices of
``in_proj_weight``, or the separate ``q/k/v_proj_weight`` when ``kdim`` / ``vdim`` differ), each one a
layer of the plan: quantization, pruning, low rank and head pruning (q/k/v rows and ``out_proj`` columns,
one unit per head) all apply. Outputs equal the original module's to float rounding, in train and eval
mode, batch_first or not, batched or not, with ``key_padding_mask``, ``attn_mask``, ``is_causal``,
``add_bias_kv``, ``add_zero_attn`` and ``need_weights``.

Every model autocomp loads goes through it (:class:`~autocomp.models.base.LoadedModel` splits its module),
so plans, fingerprints and exported files name ``...self_attn.q_proj`` and so on. :func:`merge_attention`
turns the modules back into ``nn.MultiheadAttention`` (with the compressed weights) for code that needs
the original class or its state-dict keys.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["SplitAttention", "merge_attention", "split_attention"]


def _additive(mask: Any, dtype: Any) -> Any:
    """A boolean mask (True = may not attend) as an additive float mask; a float mask unchanged."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"only bool and floating-point attention masks are supported, got {mask.dtype}")
    return mask.to(dtype)


def _pad_last(mask: Any) -> Any:
    return None if mask is None else nn.functional.pad(mask, (0, 1))


class SplitAttention(nn.Module):
    """Multi-head attention with its four projections as ``nn.Linear`` modules; built from an
    ``nn.MultiheadAttention`` by :func:`split_attention` and called exactly like one."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.embed_dim, self.kdim, self.vdim = mha.embed_dim, mha.kdim, mha.vdim
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.dropout, self.batch_first, self.add_zero_attn = mha.dropout, mha.batch_first, mha.add_zero_attn
        # the nn.Transformer* fast paths read these: False sends them down the path that calls this module
        self._qkv_same_embed_dim = False
        self.in_proj_weight = None
        self.in_proj_bias = None
        ref = mha.out_proj.weight
        has_bias = mha.in_proj_bias is not None
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().chunk(3) if has_bias else (None,) * 3
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            setattr(self, name, lin)
        self.bias_k, self.bias_v = mha.bias_k, mha.bias_v
        self.out_proj = mha.out_proj

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

    def forward(self, query: Any, key: Any, value: Any, key_padding_mask: Any = None, need_weights: bool = True,
                attn_mask: Any = None, average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Any, Any]:
        batched = query.dim() == 3
        if not batched:  # [L, E]: a batch of one
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # [L, B, E] -> [B, L, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        bsz, tgt_len, _ = query.shape
        dtype = query.dtype
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        key_padding_mask = _additive(key_padding_mask, dtype)
        causal = is_causal and key_padding_mask is None and not need_weights
        attn_mask = None if causal else _additive(attn_mask, dtype)

        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.reshape(1, 1, -1).expand(bsz, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, -1).expand(bsz, 1, -1)], dim=1)
            attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)
        h, d = self.num_heads, self.head_dim
        q = q.reshape(bsz, tgt_len, h, d).transpose(1, 2)
        k = k.reshape(bsz, k.shape[1], h, d).transpose(1, 2)
        v = v.reshape(bsz, v.shape[1], h, d).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, h, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(bsz, h, 1, d)], dim=2)
            attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)
        src_len = k.shape[2]
        mask = None
        if attn_mask is not None:
            mask = attn_mask.reshape(1, 1, tgt_len, src_len) if attn_mask.dim() == 2 else \
                attn_mask.reshape(bsz, h, tgt_len, src_len)
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(bsz, 1, 1, src_len)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, dim=-1)
            if p > 0:
                attn = nn.functional.dropout(attn, p=p)
            out = attn @ v
            weights = attn.mean(dim=1) if average_attn_weights else attn
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, h * d))  # h < heads once heads are cut
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def split_attention(model: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by an equal :class:`SplitAttention`;
    -> how many were replaced. The model's outputs do not change."""
    found = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)]
    for name, mod in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        split = SplitAttention(mod)
        split.train(mod.training)
        setattr(parent, attr, split)
    return len(found)


def merge_attention(model: nn.Module) -> int:
    """The inverse of :func:`split_attention`: every :class:`SplitAttention` back to an
    ``nn.MultiheadAttention`` holding its current weights (in place); -> how many."""
    found = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, SplitAttention)]
    for name, mod in found:
        w = mod.out_proj.weight
        has_bias = mod.q_proj.bias is not None
        mha = nn.MultiheadAttention(mod.embed_dim, mod.num_heads, dropout=mod.dropout, bias=has_bias,
                                    add_bias_kv=mod.bias_k is not None, add_zero_attn=mod.add_zero_attn,
                                    kdim=mod.kdim, vdim=mod.vdim, batch_first=mod.batch_first,
                                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            qkv = (mod.q_proj.weight, mod.k_proj.weight, mod.v_proj.weight)
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat(qkv))
            else:
                for target, src in zip((mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight), qkv):
                    target.copy_(src)
            if has_bias:
                mha.in_proj_bias.copy_(torch.cat([mod.q_proj.bias, mod.k_proj.bias, mod.v_proj.bias]))
            if mod.bias_k is not None:
                mha.bias_k.copy_(mod.bias_k)
                mha.bias_v.copy_(mod.bias_v)
        mha.out_proj = mod.out_proj
        mha.train(mod.training)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, mha)
    return len(found)
