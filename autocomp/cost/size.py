"""Exact size of the packed format (docs/FORMAT.md), by arithmetic alone.

Every number here is the byte length of one array the exporter writes; ``ceil`` appears once per array
because each array is padded to a whole byte. The uncompressed plan's size is the model's real parameter
bytes. Keep this file free of torch: it scores thousands of plans a second and is tested against arrays
really packed with numpy (tests/test_size.py).
"""

from __future__ import annotations

import math
from typing import Mapping

from autocomp.desc import LayerDesc, ModelDesc
from autocomp.plan import LayerPlan, Plan, StructuredGroup

__all__ = ["n_pruned", "tensor_bytes", "layer_bytes", "plan_bytes", "structured_shape", "SCALE_BYTES"]

SCALE_BYTES = 2  # scales are stored as float16
NM_INDEX_BITS = 2  # 2:4 sparsity: a 2-bit position (0..3) per kept value


def _ceil8(bits: int) -> int:
    return (bits + 7) // 8


def n_pruned(numel: int, sparsity: float) -> int:
    """How many entries unstructured pruning removes (shared with the pruning compressor)."""
    return int(math.floor(sparsity * numel + 1e-9))


def tensor_bytes(rows: int, cols: int, choice: LayerPlan, itemsize: int) -> int:
    """Bytes of one stored matrix (the weight, or one low-rank factor) after pruning and quantization."""
    numel = rows * cols
    meta = 0
    if choice.prune == "unstructured":
        nnz = numel - n_pruned(numel, choice.sparsity)
        meta = _ceil8(numel)  # bitmask, 1 bit per dense position
    elif choice.prune == "2:4":
        nnz = numel // 2
        meta = _ceil8(nnz * NM_INDEX_BITS)
    else:
        nnz = numel
    if choice.bits is None:
        return nnz * itemsize + meta
    group = choice.group_size or cols
    n_groups = rows * -(-cols // group)
    zero_points = 0 if choice.symmetric else _ceil8(n_groups * choice.bits)
    return _ceil8(nnz * choice.bits) + n_groups * SCALE_BYTES + zero_points + meta


def structured_shape(layer: LayerDesc, groups: Mapping[str, StructuredGroup]) -> tuple[int, int]:
    """``(rows, cols)`` of a layer after the structured groups it produces for / consumes from."""
    rows, cols = layer.rows, layer.cols
    for g in groups.values():
        if layer.name in g.producers:
            rows = rows // g.units * g.keep
        if layer.name in g.consumers:
            cols = cols // g.units * g.keep
    return rows, cols


def layer_bytes(layer: LayerDesc, choice: LayerPlan, rows: int | None = None, cols: int | None = None) -> int:
    """Bytes of one layer: its weight (or two factors) plus its bias at the stored dtype."""
    rows = layer.rows if rows is None else rows
    cols = layer.cols if cols is None else cols
    bias = (rows if layer.bias else 0) * layer.bias_itemsize
    if layer.bias and layer.bias != layer.rows:  # bias not per output row (unusual): kept whole
        bias = layer.bias * layer.bias_itemsize
    if choice.rank is None:
        return tensor_bytes(rows, cols, choice, layer.weight_itemsize) + bias
    r = choice.rank
    return (tensor_bytes(rows, r, choice, layer.weight_itemsize)
            + tensor_bytes(r, cols, choice, layer.weight_itemsize) + bias)


def plan_bytes(desc: ModelDesc, plan: Plan) -> int:
    """Exact bytes of the packed model: compressed layers + structured masks + every other parameter."""
    total = desc.other_bytes
    groups = {k: g for k, g in plan.structured.items() if g.keep < g.units}
    for layer in desc.layers:
        rows, cols = structured_shape(layer, groups) if groups else (layer.rows, layer.cols)
        total += layer_bytes(layer, plan.layer(layer.name), rows, cols)
    total += sum(_ceil8(g.units) for g in groups.values())  # kept-unit bitmask per group
    return total
