"""Pruning inside a matrix: magnitude (unstructured) and 2:4 (two of every four consecutive inputs kept).

Unstructured removes exactly ``n_pruned(numel, sparsity)`` entries, the smallest in magnitude (ties
broken by position, so the mask is deterministic). 2:4 keeps the two largest of each group of four along
the input dimension. Structured pruning (whole neurons/heads/channels) lives in ``structured.py``.
"""

from __future__ import annotations

from autocomp.compressors.base import Compressor, LayerContext, Part, register
from autocomp.cost.size import n_pruned
from autocomp.errors import AutocompError
from autocomp.plan import LayerPlan


def magnitude_mask(values, sparsity: float, order=None):  # type: ignore[no-untyped-def]
    import torch

    flat = values.reshape(-1)
    n = n_pruned(flat.numel(), sparsity)
    if order is None:
        order = torch.sort(flat.abs(), stable=True).indices
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    mask[order[:n]] = False
    return mask.reshape(values.shape)


def nm_mask(values, n: int = 2, m: int = 4):  # type: ignore[no-untyped-def]
    import torch

    rows, cols = values.shape
    if cols % m:
        raise AutocompError(f"{n}:{m} sparsity needs the input dimension divisible by {m}, got {cols}")
    g = values.abs().reshape(rows, cols // m, m)
    keep = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


@register
class Prune(Compressor):
    name = "prune"
    order = 20

    def active(self, choice: LayerPlan) -> bool:
        return choice.prune != "none"

    def __call__(self, parts: list[Part], choice: LayerPlan, ctx: LayerContext) -> list[Part]:
        import torch

        out = []
        for i, part in enumerate(parts):
            if choice.prune == "2:4":
                key = ("nm", ctx.name, ctx.structured_key, choice.rank, i)
                mask = ctx.cache.get(key)
                if mask is None:
                    mask = ctx.cache[key] = nm_mask(part.values)
                out.append(part.evolve(mask=mask, nm=True))
                continue
            # the sort order depends only on the values; for factors, on the rank too
            key = ("absorder", ctx.name, ctx.structured_key, choice.rank, i)
            order = ctx.cache.get(key)
            if order is None:
                order = ctx.cache[key] = torch.sort(part.values.reshape(-1).abs(), stable=True).indices
            out.append(part.evolve(mask=magnitude_mask(part.values, choice.sparsity, order)))
        return out
