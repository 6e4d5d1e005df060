"""Codebook (vector) quantization: runs of ``dim`` consecutive weights of a row are stored as the index of
the nearest of ``centroids`` shared vectors, fitted by k-means over the whole matrix.

The idea is product / vector quantization (Jégou, Douze and Schmid, "Product quantization for nearest
neighbor search", 2011; Gong et al., "Compressing deep convolutional networks using vector quantization",
2014): a ``b``-bit index per ``d`` weights is ``b / d`` bits a weight, below the 2 bits where a scalar grid
breaks down. MiniLM's 30,522-row word table is the case it is for: at 6% of fp32 a scalar table cost 55% of
the budget and nothing in the task metric, while a 1-bit-a-weight codebook (``vq8x256``) keeps the metric
within a few percent of fp32; assigned by GPTQ's sweep (``/gptq``), a 2-bit codebook also beats the 2-bit
grids on the encoder's Linear layers (docs/BENCHMARKS.md).

Options in search spaces: ``vq<d>x<k>``, vectors of ``d`` inputs and ``k`` centroids (a power of two:
``log2 k``-bit indices), in a rule's ``quant`` list beside the scalar grids (one choice: a layer is encoded
one way or the other), or under its own key ``codebook`` (``none`` or ``vq<d>x<k>[/gptq]``; then the rule
offers no ``quant``). Stored, per matrix: the indices, packed, and the codebook in float16 (``k x d``); the
size model counts both. A layer whose input count ``d`` does not divide, or with fewer vectors than
centroids, is not offered the option.

The fit, deterministic on a machine: k-means++ seeding then :data:`ITERS` Lloyd steps on a fixed-seed sample
of :data:`SAMPLE` vectors (64 a centroid where that is more; all of them when fewer), the centroids rounded to float16,
then every vector assigned to its nearest stored centroid. ``vq<d>x<k>/gptq`` (config version 2, ``method``
``gptq``) fits the same codebook and assigns the vectors by GPTQ's sweep instead, with the layer's calibration
statistics (:func:`~.compensate.vq_gptq`, after GPTVQ): on MiniLM's Linear layers at 2 bits a weight
(``vq4x256/gptq``) it drifts 0.33x of the nearest assignment and 0.64x of ``2g64/gptq``. The codebook is
fitted on every row, so it is not row-local: an embedding table the proxy looks up on a few rows still gets
the codebook of the whole table.
Training keeps the codebook (its indices follow the trained weights, nearest centroid, straight-through).
The ONNX export stores the indices, packed, and the float16 codebook, and decodes them in the graph (no ONNX
Runtime kernel reads a codebook): a matrix once, when the session is built (ONNX Runtime folds the decoding
into a dense float32 constant: the file is small, the session and its speed are those of the dense layer), a
table per looked-up row at run time (the table stays packed in memory). See :mod:`autocomp.ort`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping

from autocomp.compressors.base import (Execution, LayerContext, OnnxWeight, Part, Stored, Technique, TechniqueConfig,
                                       has_statistics, register)
from autocomp.errors import AutocompError

__all__ = ["CodebookConfig", "Codebook", "encode", "encode_compensated", "fit_codebook", "nearest"]

_LABEL = re.compile(r"^(?:none|vq(\d+)x(\d+)(/gptq)?)$")
METHODS = ("kmeans", "gptq")
ITERS = 20  # Lloyd steps
SAMPLE = 1 << 16  # the Lloyd steps' sample: this many vectors, or 64 a centroid where that is more
SEED_SAMPLE = 16  # k-means++ seeds from the first 16 sample vectors a centroid (it is sequential in the seeds)
CHUNK = 1 << 16  # vectors per distance block: 256 centroids x 65,536 vectors = 64 MB of float32
CODEBOOK_BYTES = 2  # float16


@dataclass(frozen=True)
class CodebookConfig(TechniqueConfig):
    """dim: weights a vector (consecutive inputs of one row); centroids: the codebook's size, a power of 2."""

    technique = "codebook"
    VERSION = 2
    ADDED = {"method": ("kmeans", 2)}
    dim: int = 8
    centroids: int = 256
    method: str = "kmeans"

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or not 1 <= self.dim <= 64:
            raise ValueError(f"codebook dim must be an integer in 1..64, got {self.dim!r}")
        k = self.centroids
        if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 1 << 16 or k & (k - 1):
            raise ValueError(f"codebook centroids must be a power of 2 in 2..65536, got {k!r}")
        if self.method not in METHODS:
            raise ValueError(f"codebook method must be one of {', '.join(METHODS)}, got {self.method!r}")

    @property
    def bits(self) -> int:
        """Bits of one index."""
        return self.centroids.bit_length() - 1


@functools.lru_cache(maxsize=None)
def _parse(label: str) -> CodebookConfig | None:
    m = _LABEL.match(str(label))
    if not m:
        raise ValueError(f"codebook option {label!r} is not none or vq<d>x<k>[/gptq] (vectors of d weights, k "
                         f"centroids, e.g. vq8x256 or vq4x256/gptq)")
    if label == "none":
        return None
    return CodebookConfig(int(m.group(1)), int(m.group(2)), "gptq" if m.group(3) else "kmeans")


def nearest(x: Any, book: Any, mask: Any = None) -> Any:
    """Index (int64) of the nearest row of ``book`` ``[k, d]`` for each row of ``x`` ``[n, d]`` (float32,
    squared Euclidean distance; the lowest index on a tie). ``mask`` (float ``[n, d]``, 1 = kept, ``x`` zero
    elsewhere): the distance over the kept entries only, so a pruned entry takes no part in the choice, and a
    vector decoded from ``book`` and masked is assigned back to a centroid that decodes it the same. More
    generally, with ``mask`` weights ``m >= 0`` and ``x`` given as ``m * x``: the least ``sum m (x - c)^2``."""
    import torch

    squares = book * book
    norms = squares.sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long)
    for i in range(0, x.shape[0], CHUNK):
        xb = x[i:i + CHUNK]
        base = norms[None, :] if mask is None else mask[i:i + CHUNK] @ squares.t()
        out[i:i + CHUNK] = torch.addmm(base, xb, book.t(), alpha=-2.0).argmin(1)
    return out


def fit_codebook(x: Any, k: int, iters: int = ITERS, seed: int = 0) -> Any:
    """``k`` centroids (float32 ``[k, d]``) of the rows of ``x`` ``[n, d]``: k-means++ seeding and Lloyd steps
    on a fixed-seed sample. Deterministic; an empty cluster keeps its centroid."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    size = max(SAMPLE, 64 * k)
    sample = x if n <= size else x[torch.randperm(n, generator=g)[:size]]
    sample = sample.float().contiguous()
    seeds = sample[:SEED_SAMPLE * k]
    # k-means++ (Arthur and Vassilvitskii, 2007): each next seed drawn in proportion to its squared distance
    first = int(torch.randint(seeds.shape[0], (1,), generator=g))
    cent = torch.empty(k, sample.shape[1])
    cent[0] = seeds[first]
    d2 = ((seeds - cent[0]) ** 2).sum(1)
    for j in range(1, k):
        total = float(d2.sum())
        pick = int(torch.multinomial(d2 / total, 1, generator=g)) if total > 0 else j % seeds.shape[0]
        cent[j] = seeds[pick]
        d2 = torch.minimum(d2, ((seeds - cent[j]) ** 2).sum(1))
    for _ in range(iters):
        assign = nearest(sample, cent)
        sums = torch.zeros_like(cent).index_add_(0, assign, sample)
        count = torch.bincount(assign, minlength=k)
        cent = torch.where((count > 0)[:, None], sums / count.clamp_min(1)[:, None].float(), cent)
    return cent


def encode(w: Any, c: CodebookConfig, book: Any = None, mask: Any = None) -> tuple[Any, Any, Any]:
    """-> (decoded float32 ``[rows, cols]``, zero where ``mask`` is False; indices int32 ``[rows, cols / dim]``;
    codebook float16 ``[k, dim]``). ``book`` (float16) given: only the assignment to it. ``mask`` (bool, as
    ``w``): pruned entries, zero in ``w``, are left out of the distances."""
    import torch

    rows, cols = w.shape
    m = None if mask is None else mask.reshape(-1, c.dim).float()
    x = w.float().reshape(-1, c.dim) if m is None else (w.float() * mask).reshape(-1, c.dim)
    if book is None:
        book = fit_codebook(x, c.centroids).half()
    stored = book.float()
    codes = nearest(x, stored, m)
    deq = stored[codes].reshape(rows, cols)
    return deq if mask is None else deq * mask, codes.to(torch.int32).reshape(rows, -1), book


def encode_compensated(w: Any, c: CodebookConfig, h: Any, mask: Any = None) -> tuple[Any, Any, Any]:
    """``/gptq``: the codebook fitted to the weights as :func:`encode` fits it, then the vectors assigned by
    GPTQ's sweep (:func:`~.compensate.vq_gptq`). Weighing each weight in the fit by its input's second moment
    (``h_jj``, or its square root) was measured no better on MiniLM (docs/BENCHMARKS.md). -> as :func:`encode`."""
    import torch

    from autocomp.compressors.compensate import vq_gptq

    x = (w.float() if mask is None else w.float() * mask).reshape(-1, c.dim)
    book = fit_codebook(x, c.centroids).half()
    deq, codes = vq_gptq(w, h, book.float(), c.dim, mask)
    return deq, codes.to(torch.int32), book


@register
class Codebook(Technique):
    name = "codebook"
    order = 32
    stage = "encode"
    config = CodebookConfig
    axis, dim, neutral = "codebook", "v", "none"
    title = "vector-quantized"
    row_local = False  # one codebook for the whole matrix
    shares_axis = "quant"  # a rule's quant list may offer codebooks beside scalar grids, as one choice

    def parse(self, label: str) -> Any:
        return _parse(label)

    def bind(self, option: CodebookConfig, layer: Any, shapes: list[tuple[int, int]]) -> CodebookConfig | None:
        if option.method == "gptq" and not has_statistics(layer):
            return None
        for rows, cols in shapes:
            if cols % option.dim or rows * cols // option.dim < option.centroids:
                return None
        return option

    def calibrated(self, c: CodebookConfig) -> bool:
        return c.method == "gptq"

    def calibrated_option(self, option: Any) -> bool:
        return option is not None and option.method == "gptq"

    def check(self, c: CodebookConfig, layer: Any, shapes: list[tuple[int, int]]) -> None:
        for rows, cols in shapes:
            if cols % c.dim:
                raise AutocompError(f"layer {layer.name}: codebook vectors of {c.dim} do not tile its {cols} inputs")

    def fixed_start(self, c: CodebookConfig) -> bool:
        return True  # training keeps the fitted codebook

    def label(self, c: CodebookConfig) -> str:
        return f"vq{c.dim}x{c.centroids}" + ("/gptq" if c.method == "gptq" else "")

    def summary(self, c: CodebookConfig) -> dict[str, float]:
        return {"bits": c.bits / c.dim}

    # -- bytes --------------------------------------------------------------------------------------------
    def stored(self, c: CodebookConfig, stored: list[Stored]) -> list[Stored]:
        # an index for every vector (pruned entries included: a pruning mask is stored beside, by its technique)
        return [replace(s, nnz=s.rows * s.cols // c.dim, value_bits=c.bits,
                        meta_bytes=s.meta_bytes + c.centroids * c.dim * CODEBOOK_BYTES) for s in stored]

    # -- proxy --------------------------------------------------------------------------------------------
    def apply(self, parts: list[Part], c: CodebookConfig, ctx: LayerContext) -> list[Part]:
        for part in parts:
            if part.values.shape[1] % c.dim:
                raise AutocompError(f"layer {ctx.name}: codebook vectors of {c.dim} do not tile its "
                                    f"{part.values.shape[1]} inputs")
        out: list[Part] = list(parts)
        if c.method == "gptq" and ctx.holder is None:
            # factors (B @ A) from the last to the first: the input of B is A x, statistics A' H A'^T
            h = ctx.hessian()
            for i in reversed(range(len(parts))):
                deq, codes, book = encode_compensated(parts[i].values, c, h, parts[i].mask)
                out[i] = parts[i].evolve(values=deq, codes=codes, scale=None, zero_point=None,
                                         extra={"codebook": book.clone()})
                if i:
                    h = deq.double() @ h @ deq.double().T
            return out
        for i, part in enumerate(parts):
            book = getattr(ctx.holder, f"vqbook{ctx.index + i}") if ctx.holder is not None else None
            deq, codes, book = encode(part.values, c, book, part.mask)
            out[i] = part.evolve(values=deq, codes=codes, scale=None, zero_point=None, extra={"codebook": book.clone()})
        return out

    # -- training -----------------------------------------------------------------------------------------
    def train_setup(self, c: CodebookConfig, holder: Any, latents: list[Any], options: Mapping[str, Any]) -> None:
        for i, part in enumerate(options["parts"]):
            holder.register_buffer(f"vqbook{i}", part.extra["codebook"].clone())

    def train_transform(self, c: CodebookConfig, holder: Any, i: int, v: Any, mask: Any = None) -> Any:
        v = self.train_prepare(c, holder, i, v)
        deq = encode(v.detach(), c, getattr(holder, f"vqbook{i}"), mask)[0]
        return v + (deq - v).detach()

    # -- export -------------------------------------------------------------------------------------------
    def pack(self, c: CodebookConfig, part: Part, key: str, out: dict[str, Any], state: dict[str, Any]) -> None:
        import numpy as np

        from autocomp.packing import pack_bits

        out[f"{key}.vqcodes"] = pack_bits(part.codes.detach().cpu().numpy().reshape(-1), c.bits)
        out[f"{key}.codebook"] = part.extra["codebook"].detach().cpu().numpy().astype(np.float16).reshape(-1)
        state["encoded"] = True

    def unpack(self, c: CodebookConfig, arrays: Mapping[str, Any], key: str, rows: int, cols: int,
               state: dict[str, Any]) -> None:
        import numpy as np

        from autocomp.packing import unpack_bits

        codes = unpack_bits(arrays[f"{key}.vqcodes"], c.bits, rows * cols // c.dim)
        book = arrays[f"{key}.codebook"].astype(np.float32).reshape(c.centroids, c.dim)
        values = book[codes].reshape(rows, cols)
        mask = state.get("mask")
        if mask is not None:
            values = values * mask
        state["values"] = values.astype(np.float32)

    # -- ONNX -------------------------------------------------------------------------------------------
    def onnx_weight(self, c: CodebookConfig, part: Part, use: str) -> OnnxWeight | None:
        """``Codebook``: the indices ``[rows, cols / dim]``, the float16 codebook ``[k, dim]`` and, for a pruned
        part, its mask (a bitmap, as the packed format stores it), decoded by the graph
        (:func:`autocomp.ort._lower_codebook`)."""
        import numpy as np

        if part.codes is None or "codebook" not in part.extra:
            return None
        codes = part.codes.detach().cpu().numpy().astype(np.int64).reshape(part.values.shape[0], -1)
        book = part.extra["codebook"].detach().cpu().numpy().astype(np.float16).reshape(c.centroids, c.dim)
        notes = []
        if use == "matmul":
            notes.append("codebook decoded to a dense float32 matrix when the ONNX Runtime session is built")
        if (codes.shape[1] * c.bits) % 8:
            notes.append(f"{c.bits}-bit codebook indices padded to whole bytes per row")
        note = "; ".join(notes)
        mask = None if part.mask is None else part.mask.detach().cpu().numpy().astype(bool)
        return OnnxWeight("Codebook", c.bits, c.dim, codes, book, note=note, mask=mask)

    # -- hardware -----------------------------------------------------------------------------------------
    def execution(self, c: CodebookConfig, ex: Execution, device: Any) -> Execution:
        return replace(ex, store_bits=c.bits / c.dim)  # runs decoded (dense): what it reads is unchanged
