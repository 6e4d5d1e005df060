"""One layer's techniques composed in pipeline order: the proxy transform, the exact stored matrices (bytes),
the packed arrays and their decoding, and how the layer runs on a device. Every stage reads the techniques
through their contract (:mod:`autocomp.compressors.base`); nothing here names one.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

from autocomp.compressors.base import Execution, LayerContext, Part, Stored
from autocomp.errors import AutocompError
from autocomp.plan import LayerPlan

__all__ = ["run_pipeline", "reconstruct", "stored_matrices", "stored_bytes", "stored_shapes", "pack_layer", "unpack_layer",
           "layer_execution", "check_layer", "part_keys"]


def run_pipeline(matrix: Any, choice: LayerPlan, ctx: LayerContext, row_subset: Any = None) -> list[Part]:
    """Run the layer's techniques in order on a float32 matrix.

    ``row_subset`` (indices) asks only for those output rows: techniques with ``row_local = False``
    (low-rank, global magnitude pruning) run on the whole matrix first, then the first part is cut to
    the subset and the row-local ones (quantization is per row / per group) finish the job. The rows
    returned equal the same rows of the full result.
    """
    parts = [Part(values=matrix)]
    cut = row_subset is None
    upstream: list[Any] = []
    for tech, config in choice.steps():
        if not cut and tech.row_local:
            parts = [_take_rows(parts[0], row_subset), *parts[1:]]
            cut = True
        ctx.upstream = tuple(upstream)
        parts = tech.apply(parts, config, ctx)
        upstream.append(config)
    if not cut:
        parts = [_take_rows(parts[0], row_subset), *parts[1:]]
    return parts


def _take_rows(part: Part, rows: Any) -> Part:
    def take(t: Any) -> Any:
        return None if t is None else t.index_select(0, rows)

    return part.evolve(values=take(part.values), mask=take(part.mask), codes=take(part.codes),
                       scale=take(part.scale), zero_point=take(part.zero_point))


def reconstruct(parts: list[Part]) -> Any:
    """The dense matrix the parts represent (the product of the factors)."""
    out = None
    for p in parts:
        v = p.values if p.mask is None else p.values * p.mask
        out = v if out is None else out @ v
    return out


def stored_matrices(choice: LayerPlan, rows: int, cols: int, itemsize: int) -> list[Stored]:
    """The matrices the packed format stores for a ``rows x cols`` weight (bias not included)."""
    stored = [Stored(rows, cols, rows * cols, itemsize * 8)]
    for tech, config in choice.steps():
        stored = tech.stored(config, stored)
    return stored


@functools.lru_cache(maxsize=1 << 16)
def stored_bytes(choice: LayerPlan, rows: int, cols: int, itemsize: int) -> int:
    """Total bytes of :func:`stored_matrices` (memoized: the size model's hot path)."""
    return sum(s.nbytes for s in stored_matrices(choice, rows, cols, itemsize))


def stored_shapes(choice: LayerPlan, rows: int, cols: int, before: str | None = None) -> list[tuple[int, int]]:
    """Shapes of the stored matrices (before technique ``before`` runs, if given)."""
    stored = [Stored(rows, cols, rows * cols, 32)]
    for tech, config in choice.steps():
        if tech.name == before:
            break
        stored = tech.stored(config, stored)
    return [(s.rows, s.cols) for s in stored]


def check_layer(choice: LayerPlan, layer: Any, rows: int, cols: int) -> None:
    """Refuse a layer plan the packed format cannot hold for this layer (one line naming it)."""
    stored = [Stored(rows, cols, rows * cols, 32)]
    for tech, config in choice.steps():
        tech.check(config, layer, [(s.rows, s.cols) for s in stored])
        stored = tech.stored(config, stored)


def part_keys(name: str, choice: LayerPlan, n_parts: int) -> list[str]:
    """Array-name prefixes of a layer's parts: ``name`` for one part, ``name.B`` / ``name.A`` for factors."""
    if n_parts == 1:
        return [name]
    for tech, config in choice.steps():
        names = tech.part_names(config)
        if names:
            return [f"{name}.{n}" for n in names]
    raise AutocompError(f"layer {name}: {n_parts} stored parts but no technique names them")


def pack_layer(name: str, parts: list[Part], choice: LayerPlan, bias: Any = None,
               dtype: str = "float32") -> dict[str, Any]:
    """The arrays the packed format stores for one layer (docs/FORMAT.md), keyed by tensor name.
    ``parts`` come from :func:`run_pipeline` on the (structurally cut) matrix; ``bias`` is the kept bias."""
    out: dict[str, Any] = {}
    for key, part in zip(part_keys(name, choice, len(parts)), parts):
        state: dict[str, Any] = {}
        for tech, config in choice.steps():
            tech.pack(config, part, key, out, state)
        if not state.get("encoded"):
            vals = part.values.detach().cpu().numpy().astype(dtype)
            sel = state.get("selection")
            out[f"{key}.values"] = vals[sel] if sel is not None else vals.reshape(-1)
    if bias is not None:
        out[f"{name}.bias"] = bias.detach().cpu().numpy().reshape(-1)
    return out


def unpack_layer(arrays: Mapping[str, Any], name: str, choice: LayerPlan, rows: int, cols: int) -> Any:
    """Inverse of :func:`pack_layer`: the dense float32 matrix (numpy) the layer's arrays represent."""
    import numpy as np

    shapes = stored_shapes(choice, rows, cols)
    dense = None
    for key, (r, c) in zip(part_keys(name, choice, len(shapes)), shapes):
        state: dict[str, Any] = {}
        for tech, config in choice.steps():
            tech.unpack(config, arrays, key, r, c, state)
        values = state.get("values")
        if values is None:
            mask = state.get("mask")
            values = np.zeros((r, c), dtype=np.float32)
            if mask is None:
                values[:] = arrays[f"{key}.values"].astype(np.float32).reshape(r, c)
            else:
                values[mask] = arrays[f"{key}.values"].astype(np.float32)
        dense = values if dense is None else _matmul(dense, values)
    return dense


def _matmul(a: Any, b: Any) -> Any:
    """Factors multiply as the proxy multiplies them (torch), so decoded weights match it bit for bit."""
    import torch

    return (torch.from_numpy(a) @ torch.from_numpy(b)).numpy()


def layer_execution(layer: Any, choice: LayerPlan, rows: int, cols: int, device: Any, default_dtype: str,
                    dtype_bits: int) -> Execution:
    """How a ``rows x cols`` layer runs on ``device``: the techniques adjust it from the last to the first
    (the value format is known before sparsity speed-ups and factor shapes are)."""
    ex = Execution(shapes=((cols, rows),), dtype=default_dtype, read_bits=float(dtype_bits),
                   store_bits=float(layer.weight_itemsize * 8))
    for tech, config in reversed(choice.steps()):
        ex = tech.execution(config, ex, device)
    return ex
