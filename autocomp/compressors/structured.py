"""Structured pruning: remove whole units (FFN neurons, attention heads, conv channels) from coupled layers.

A :class:`~autocomp.plan.StructuredGroup` names producers (whose output rows form the units) and consumers
(whose input columns read them). Removing a unit drops its rows from every producer (and their bias
entries) and its columns from every consumer, so the matmuls really shrink. Which units stay is decided
once per group from the weights: the largest joint squared L2 norm over producers' rows and consumers'
columns, ties by index.
"""

from __future__ import annotations

from typing import Any, Mapping

from autocomp.plan import StructuredGroup

__all__ = ["unit_order", "kept_units", "kept_index", "structured_shape", "scatter"]


def structured_shape(layer: Any, groups: Mapping[str, StructuredGroup]) -> tuple[int, int]:
    """``(rows, cols)`` of a layer after the structured groups that cut (keep < units) and that it produces
    for / consumes from. No torch: the size and latency models call it."""
    rows, cols = layer.rows, layer.cols
    for g in groups.values():
        if g.keep >= g.units:
            continue
        if layer.name in g.producers:
            rows = rows // g.units * g.keep
        if layer.name in g.consumers:
            cols = cols // g.units * g.keep
    return rows, cols


def scatter(sub: Any, rows: Any, cols: Any, shape: tuple[int, int]) -> Any:
    """The full ``shape`` matrix holding ``sub`` at the kept ``rows`` x ``cols`` (None: all) and zeros in
    the cut units; differentiable (training uses it)."""
    import torch

    if rows is None and cols is None:
        return sub
    full = torch.zeros(shape, dtype=sub.dtype, device=sub.device)
    r = rows if rows is not None else torch.arange(shape[0])
    c = cols if cols is not None else torch.arange(shape[1])
    return full.index_put((r[:, None], c[None, :]), sub)


def unit_order(group: StructuredGroup, matrices: dict[str, Any]) -> Any:
    """Units sorted from most to least important. ``matrices``: layer name -> float matrix view."""
    import torch

    score = torch.zeros(group.units, dtype=torch.float64)
    for name in group.producers:
        w = matrices[name].double()
        score += w.pow(2).reshape(group.units, -1).sum(dim=1)
    for name in group.consumers:
        w = matrices[name].double()
        score += w.pow(2).reshape(w.shape[0], group.units, -1).sum(dim=(0, 2))
    return torch.sort(score, descending=True, stable=True).indices


def kept_units(order: Any, keep: int) -> Any:
    import torch

    return torch.sort(order[:keep]).values


def kept_index(units: Any, total: int, n_units: int) -> Any:
    """Row (or column) indices covered by the kept units when ``total`` rows are split into ``n_units``."""
    import torch

    per = total // n_units
    return (units[:, None] * per + torch.arange(per)[None, :]).reshape(-1)
