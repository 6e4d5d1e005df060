"""Pruning inside a matrix: magnitude (unstructured) and 2:4 (two of every four consecutive inputs kept).

Unstructured removes exactly ``n_pruned(numel, sparsity)`` entries, the smallest in magnitude (ties
broken by position, so the mask is deterministic), and stores a 1-bit-per-position mask; 2:4 keeps the
two largest of each group of four along the input dimension and stores a 2-bit position per kept value.
Options in search spaces: ``none``, ``uNN`` (NN% magnitude sparsity), ``2:4``, each pruning option with an
optional ``/sparsegpt`` suffix (``u50/sparsegpt``, ``2:4/sparsegpt``): the mask chosen and the kept weights
updated by SparseGPT from the layer's calibration inputs (:mod:`~.compensate`), in the same stored format
and bytes. Structured pruning (whole neurons / heads / channels) is a plan-level cut, see ``structured.py``.

Training: the mask is fixed from the original weights, or (``schedule="progressive"``) ramped from 0 to
the plan's sparsity by current magnitude over the first part of training.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping

from autocomp.compressors.base import (Execution, LayerContext, Part, Stored, Technique, TechniqueConfig, ceil8,
                                       has_statistics, register)
from autocomp.errors import AutocompError

__all__ = ["PruneConfig", "Prune", "magnitude_mask", "nm_mask", "n_pruned"]

NM_INDEX_BITS = 2  # 2:4 sparsity: a 2-bit position (0..3) per kept value
_LABEL = re.compile(r"^(?:none|u(\d{1,2})|2:4)(/sparsegpt)?$")
KINDS = ("unstructured", "2:4")
METHODS = ("magnitude", "sparsegpt")


@dataclass(frozen=True)
class PruneConfig(TechniqueConfig):
    """kind: ``unstructured`` (``sparsity`` of the entries removed) or ``2:4``; method: ``magnitude`` or
    ``sparsegpt`` (mask and kept weights from the calibration inputs)."""

    technique = "prune"
    VERSION = 2
    ADDED = {"method": ("magnitude", 2)}
    kind: str = "unstructured"
    sparsity: float = 0.5
    method: str = "magnitude"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"prune must be one of {('none', *KINDS)}, got {self.kind!r}")
        if self.kind == "unstructured" and not (isinstance(self.sparsity, (int, float)) and 0.0 < self.sparsity < 1.0):
            raise ValueError(f"unstructured sparsity must be in (0, 1), got {self.sparsity!r}")
        if self.method not in METHODS:
            raise ValueError(f"prune method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.kind == "2:4" and self.sparsity != 0.0:
            object.__setattr__(self, "sparsity", 0.0)  # the pattern fixes it (plans store 0)

    @property
    def fraction(self) -> float:
        return 0.5 if self.kind == "2:4" else float(self.sparsity)


def n_pruned(numel: int, sparsity: float) -> int:
    """How many entries unstructured pruning removes."""
    return int(math.floor(sparsity * numel + 1e-9))


SORT_BELOW = 1 << 14  # matrices smaller than this cache one stable sort of |W|; larger ones cache, per
# sparsity, only the threshold a selection finds (an int64 index array is 2x the matrix: a large model's
# bounded cache could not hold them, and re-sorting was a third of a 12-block GPT-2-medium's trial). Even at
# MiniLM's 384 x 1536 the selection (:func:`_bracketed_kth`) and its mask took 11 ms against 75 ms for the sort


def magnitude_threshold(values, sparsity: float) -> tuple[float, int] | None:  # type: ignore[no-untyped-def]
    """``(t, ties)``: the n-th smallest magnitude t (a selection, linear time, no index array:
    :func:`_bracketed_kth`) and how many of the entries with |w| == t the n pruned include (the first ones in
    index order). None: nothing pruned."""
    import torch

    flat = values.reshape(-1)
    n = n_pruned(flat.numel(), sparsity)
    if n == 0:
        return None
    mag = flat.abs()
    t = _bracketed_kth(mag, n)
    return float(t), n - int(torch.count_nonzero(mag < t))


SAMPLE = 1 << 16  # entries of a strided sample that bracket the n-th smallest (see _bracketed_kth)


def _bracketed_kth(mag, n: int):  # type: ignore[no-untyped-def]
    """The n-th smallest of ``mag`` (1-based), exactly: a strided sample's order statistics around the
    quantile n / numel give a bracket [lo, hi]; if the count below lo and the entries inside show that the
    n-th smallest lies in it, only those entries are selected from (a few percent of a large matrix), else
    the whole vector is. ~4x faster than ``kthvalue`` on MiniLM's 30522 x 384 word table, the same value."""
    import torch

    numel = mag.numel()
    step = numel // SAMPLE
    if step < 4:
        return mag.kthvalue(n).values
    sample = mag[::step].sort().values
    m = sample.numel()
    at = n * m / numel
    margin = 8 * math.isqrt(m) + 8  # ~16 standard deviations of the sample's rank of the true quantile
    i, j = int(at) - margin, int(at) + margin
    lo = sample[i] if i >= 0 else None
    hi = sample[j] if j < m else None
    below = int(torch.count_nonzero(mag < lo)) if lo is not None else 0
    if lo is None or hi is None:
        inside = mag[mag >= lo] if lo is not None else mag[mag <= hi] if hi is not None else mag
    else:
        inside = mag[(mag >= lo) & (mag <= hi)]
    if below < n <= below + inside.numel():
        return inside.kthvalue(n - below).values
    # the sample misled (a strongly patterned matrix): from all, by a sort (torch's kthvalue takes seconds on a
    # descending 2^19-vector: its selection degrades on ordered input)
    return mag.sort().values[n - 1]


def magnitude_mask(values, sparsity: float, order=None, threshold=None):  # type: ignore[no-untyped-def]
    """The exact ``n_pruned`` smallest magnitudes pruned, ties in index order (a stable ascending sort's
    first n). With ``order`` (that sort, cached) one scatter; without it on a large matrix, a selection
    (:func:`magnitude_threshold`, or ``threshold``, its cached result): every |w| < t pruned and the first
    of the |w| == t in index order, which is the same set."""
    import torch

    flat = values.reshape(-1)
    n = n_pruned(flat.numel(), sparsity)
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    if n == 0:
        return mask.reshape(values.shape)
    if order is None and (threshold is not None or flat.numel() >= SORT_BELOW):
        t, ties_pruned = threshold if threshold is not None else magnitude_threshold(values, sparsity)
        mag = flat.abs()
        mask = mag > t
        ties = torch.nonzero(mag == t).squeeze(-1)
        mask[ties[ties_pruned:]] = True  # the later ties in index order stay
        return mask.reshape(values.shape)
    if order is None:
        order = torch.sort(flat.abs(), stable=True).indices
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


@functools.lru_cache(maxsize=None)
def _parse(label: str) -> PruneConfig | None:
    m = _LABEL.match(str(label))
    if not m:
        raise ValueError(f"prune option {label!r} is not none, uNN (NN% magnitude) or 2:4, optionally with "
                         f"/sparsegpt (e.g. u50/sparsegpt)")
    method = "sparsegpt" if m.group(2) else "magnitude"
    if label == "none":
        return None
    if label == "none/sparsegpt":
        raise ValueError("prune option 'none/sparsegpt': none prunes nothing; drop /sparsegpt")
    if label.startswith("2:4"):
        return PruneConfig("2:4", 0.0, method)
    pct = int(m.group(1))
    if not 0 < pct < 100:
        raise ValueError(f"prune option {label!r}: percentage must be 1..99")
    return PruneConfig("unstructured", pct / 100, method)


@register
class Prune(Technique):
    name = "prune"
    order = 20
    stage = "sparsify"
    config = PruneConfig
    axis, dim, neutral = "prune", "p", "none"
    title = "pruned"

    def parse(self, label: str) -> Any:
        return _parse(label)

    def bind(self, option: PruneConfig, layer: Any, shapes: list[tuple[int, int]]) -> PruneConfig | None:
        if option.kind == "2:4" and any(cols % 4 for _, cols in shapes):
            return None  # the packed 2:4 format needs whole groups of 4 inputs
        if option.method != "magnitude" and not has_statistics(layer):
            return None  # no statistics: a grouped convolution
        return option

    def calibrated(self, c: PruneConfig) -> bool:
        return c.method != "magnitude"

    def calibrated_option(self, option: Any) -> bool:
        return option.method != "magnitude"

    def check(self, c: PruneConfig, layer: Any, shapes: list[tuple[int, int]]) -> None:
        if c.kind == "2:4" and any(cols % 4 for _, cols in shapes):
            raise AutocompError(f"layer {layer.name}: 2:4 sparsity needs every stored matrix's input size divisible "
                                f"by 4, got {[cols for _, cols in shapes]}")

    def label(self, c: PruneConfig) -> str:
        tail = "" if c.method == "magnitude" else f"/{c.method}"
        return ("2:4" if c.kind == "2:4" else f"u{round(c.sparsity * 100)}") + tail

    def summary(self, c: PruneConfig) -> dict[str, float]:
        return {"sparsity": c.fraction}

    def from_v1(self, f: Mapping[str, Any]) -> PruneConfig | None:
        kind = f.get("prune", "none")
        if kind == "none":
            return None
        return PruneConfig(kind, f.get("sparsity", 0.0) if kind == "unstructured" else 0.0)

    def to_v1(self, c: PruneConfig) -> dict[str, Any] | None:
        if c.method != "magnitude":
            return None
        return {"prune": c.kind, "sparsity": c.sparsity if c.kind == "unstructured" else 0.0}

    # -- bytes --------------------------------------------------------------------------------------------
    def stored(self, c: PruneConfig, stored: list[Stored]) -> list[Stored]:
        out = []
        for s in stored:
            numel = s.rows * s.cols
            if c.kind == "2:4":
                nnz, meta = numel // 2, ceil8(numel // 2 * NM_INDEX_BITS)
            else:
                nnz, meta = numel - n_pruned(numel, c.sparsity), ceil8(numel)  # bitmask, 1 bit per position
            out.append(replace(s, nnz=nnz, meta_bytes=s.meta_bytes + meta))
        return out

    # -- proxy --------------------------------------------------------------------------------------------
    def apply(self, parts: list[Part], c: PruneConfig, ctx: LayerContext) -> list[Part]:
        import torch

        if ctx.holder is not None:  # a trained layer keeps the mask it trained with (not one recomputed from its
            # trained values: a kept weight that trained to exactly zero would tie with the pruned ones)
            return [part.evolve(mask=getattr(ctx.holder, f"mask{ctx.index + i}").clone(), nm=c.kind == "2:4")
                    for i, part in enumerate(parts)]
        if c.method == "sparsegpt":
            return self._apply_sparsegpt(parts, c, ctx)
        out = []
        for i, part in enumerate(parts):
            if c.kind == "2:4":
                key = ("nm", ctx.name, ctx.structured_key, ctx.upstream, i)
                mask = ctx.cache.get(key)
                if mask is None:
                    mask = ctx.cache[key] = nm_mask(part.values)
                out.append(part.evolve(mask=mask, nm=True))
                continue
            if part.values.numel() >= SORT_BELOW:
                # a few bytes per (layer, sparsity), kept out of the LRU (a bounded cache would evict them)
                small = getattr(ctx.cache, "small", ctx.cache)
                key = ("absthr", ctx.name, ctx.structured_key, ctx.upstream, i, c.sparsity)
                if key not in small:
                    small[key] = magnitude_threshold(part.values, c.sparsity)
                out.append(part.evolve(mask=magnitude_mask(part.values, c.sparsity, threshold=small[key])))
                continue
            # the sort order depends only on the values; for factors, on the upstream rank too
            key = ("absorder", ctx.name, ctx.structured_key, ctx.upstream, i)
            order = ctx.cache.get(key)
            if order is None:
                order = ctx.cache[key] = torch.sort(part.values.reshape(-1).abs(), stable=True).indices
            out.append(part.evolve(mask=magnitude_mask(part.values, c.sparsity, order)))
        return out

    def _apply_sparsegpt(self, parts: list[Part], c: PruneConfig, ctx: LayerContext) -> list[Part]:
        """SparseGPT on each stored matrix, factors from the last to the first (the input of ``B`` is ``A x``:
        statistics ``A' H A'^T`` with the pruned ``A'``)."""
        from autocomp.compressors.compensate import sparsegpt

        out: list[Part] = list(parts)
        if len(parts) == 1 and parts[0].mask is None and not ctx.upstream and ctx.peers:
            values, mask = self._sparsegpt_with_peers(parts[0].values, c, ctx)
            return [parts[0].evolve(values=values, mask=mask, nm=c.kind == "2:4")]
        h = ctx.hessian()
        for i in reversed(range(len(parts))):
            u = ctx.inverse_cholesky() if i == len(parts) - 1 else None  # the layer's own inputs: shared
            values, mask = sparsegpt(parts[i].values, h, c.kind, c.sparsity, u)
            out[i] = parts[i].evolve(values=values, mask=mask, nm=c.kind == "2:4")
            if i:
                h = values.double() @ h @ values.double().T
        return out

    @staticmethod
    def _sparsegpt_with_peers(w: Any, c: PruneConfig, ctx: LayerContext) -> tuple[Any, Any]:
        """SparseGPT of a layer's plain matrix together with its other plain SparseGPT choices (``ctx.peers``)
        not yet computed, in one sweep (:func:`~.compensate.sparsegpt_many`); the others wait in ``ctx.cache``
        (as GPTQ's, see ``Quantize._gptq_with_peers``)."""
        from autocomp.compressors.compensate import sparsegpt_many

        def compute(configs: list[PruneConfig]) -> list[Any]:
            return sparsegpt_many(w, ctx.hessian(), [(q.kind, q.sparsity) for q in configs], ctx.inverse_cholesky())

        return ctx.with_peers("sparsegpt-peer", c, lambda q: q.method == "sparsegpt", compute)

    # -- training -----------------------------------------------------------------------------------------
    def train_setup(self, c: PruneConfig, holder: Any, latents: list[Any], options: Mapping[str, Any]) -> None:
        import torch

        progressive = bool(options.get("progressive")) and c.kind == "unstructured" and "parts" not in options
        holder.progressive = progressive
        if "parts" in options:  # a compensated layer: the masks the proxy chose (the weights start compensated)
            for i, p in enumerate(options["parts"]):
                holder.register_buffer(f"mask{i}", p.mask.clone())
            return
        parts = self.apply([Part(values=v.detach()) for v in latents], c, LayerContext(f"train.{self.name}"))
        for i, p in enumerate(parts):
            mask = torch.ones_like(p.values, dtype=torch.bool) if progressive else p.mask
            holder.register_buffer(f"mask{i}", mask.clone())

    def train_prepare(self, c: PruneConfig, holder: Any, i: int, v: Any) -> Any:
        return v * getattr(holder, f"mask{i}")

    def train_mask(self, c: PruneConfig, holder: Any, i: int) -> Any:
        return getattr(holder, f"mask{i}")

    def train_progress(self, c: PruneConfig, holder: Any, latents: list[Any], frac: float) -> None:
        """Progressive schedule: masks at ``frac`` (0..1) of the plan's sparsity, by current magnitude."""
        if not getattr(holder, "progressive", False):
            return
        import torch

        with torch.no_grad():
            for i, v in enumerate(latents):
                mask = getattr(holder, f"mask{i}")
                mask.copy_(magnitude_mask(v * mask, c.sparsity * min(max(frac, 0.0), 1.0)))

    # -- export -------------------------------------------------------------------------------------------
    def pack(self, c: PruneConfig, part: Part, key: str, out: dict[str, Any], state: dict[str, Any]) -> None:
        import numpy as np

        from autocomp.packing import pack_bits

        mask = part.mask.detach().cpu().numpy().astype(bool)
        if c.kind == "2:4":
            rows, cols = mask.shape
            pos = np.nonzero(mask.reshape(rows, cols // 4, 4))[2]  # row-major: 2 ascending positions per group
            out[f"{key}.nm_index"] = pack_bits(pos, NM_INDEX_BITS)
        else:
            out[f"{key}.mask"] = np.packbits(mask.reshape(-1), bitorder="little")
        state["selection"] = mask

    def unpack(self, c: PruneConfig, arrays: Mapping[str, Any], key: str, rows: int, cols: int,
               state: dict[str, Any]) -> None:
        import numpy as np

        from autocomp.packing import unpack_bits

        numel = rows * cols
        if c.kind == "2:4":
            pos = unpack_bits(arrays[f"{key}.nm_index"], NM_INDEX_BITS, numel // 2).reshape(rows, cols // 4, 2)
            mask = np.zeros((rows, cols // 4, 4), dtype=bool)
            np.put_along_axis(mask, pos, True, axis=-1)
            state["mask"] = mask.reshape(rows, cols)
        else:
            state["mask"] = np.unpackbits(arrays[f"{key}.mask"], bitorder="little")[:numel].astype(bool).reshape(rows, cols)

    # -- hardware -----------------------------------------------------------------------------------------
    def execution(self, c: PruneConfig, ex: Execution, device: Any) -> Execution:
        if device is None:
            return ex
        if c.kind == "2:4" and device.sparse_2_4:
            return replace(ex, speed=1.0 / device.sparse_2_4, density=0.5 + 1 / max(ex.read_bits, 1))  # values + indices
        if c.kind == "unstructured" and device.unstructured_sparse:
            return replace(ex, speed=1.0 - c.sparsity, density=1.0 - c.sparsity)
        return ex
