"""Exact size of the packed format (docs/FORMAT.md), by arithmetic alone.

Every number is the byte length of one array the exporter writes: the techniques of a layer say how they
change its stored matrices (:meth:`autocomp.compressors.base.Technique.stored`); a bias is stored at its
dtype; every parameter outside the compressible layers as it is; each structured group adds a keep-bitmask.
The uncompressed plan's size is the model's real parameter bytes. No torch here: it scores thousands of
plans a second and is tested against arrays really packed (tests/test_size.py, tests/test_techniques.py).
"""

from __future__ import annotations

from typing import Mapping

from autocomp.compressors.pipeline import stored_bytes
from autocomp.compressors.structured import structured_shape
from autocomp.desc import LayerDesc, ModelDesc
from autocomp.plan import LayerPlan, Plan, StructuredGroup

__all__ = ["layer_bytes", "plan_bytes", "structured_shape", "mask_bytes"]


def layer_bytes(layer: LayerDesc, choice: LayerPlan, rows: int | None = None, cols: int | None = None) -> int:
    """Bytes of one layer: its stored weight matrices plus its bias at the stored dtype."""
    rows = layer.rows if rows is None else rows
    cols = layer.cols if cols is None else cols
    bias = (rows if layer.bias else 0) * layer.bias_itemsize
    if layer.bias and layer.bias != layer.rows:  # bias not per output row (unusual): kept whole
        bias = layer.bias * layer.bias_itemsize
    return stored_bytes(choice, rows, cols, layer.weight_itemsize) + bias


def mask_bytes(groups: Mapping[str, StructuredGroup]) -> int:
    """The kept-unit bitmasks of the structured groups that cut."""
    return sum((g.units + 7) // 8 for g in groups.values() if g.keep < g.units)


def plan_bytes(desc: ModelDesc, plan: Plan) -> int:
    """Exact bytes of the packed model: compressed layers + structured masks + every other parameter."""
    total = desc.other_bytes
    for layer in desc.layers:
        rows, cols = structured_shape(layer, plan.structured)
        total += layer_bytes(layer, plan.layer(layer.name), rows, cols)
    return total + mask_bytes(plan.structured)
