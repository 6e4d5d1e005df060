"""Low rank: truncated SVD, ``W ~ B @ A`` with ``B = U_r sqrt(S_r)`` and ``A = sqrt(S_r) V_r^T``.

Splitting the singular values evenly keeps both factors on the same scale, which quantizes better. The
SVD is computed once per (layer, structured shape) and reused for every rank. Options in search spaces:
``full`` or ``rF``, a fraction ``0 < F < 1`` of ``min(rows, cols)`` rounded down to a multiple of 4
(dropped where the two factors would not be smaller than the matrix), optionally with ``/aa``
(activation-aware: the truncated SVD of ``W L``, ``H = L L^T`` the layer's input second moment, so the rank
keeps what the inputs excite; :mod:`~.compensate`). The plan stores the absolute rank.
Training holds ``B`` and ``A`` as trainable parameters; the runtime runs two smaller matmuls.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping

from autocomp.compressors.base import (Execution, LayerContext, Part, Stored, Technique, TechniqueConfig,
                                       has_statistics, register)
from autocomp.errors import AutocompError

__all__ = ["LowRankConfig", "LowRank", "rank_for"]

_LABEL = re.compile(r"^(?:full|r(0?\.\d+|1(?:\.0*)?))(/aa)?$")
METHODS = ("svd", "aa")


GRAM_SVD_ABOVE = 1 << 16  # matrices this large factor through the eigenvectors of their Gram matrix (MiniLM's
# 384 x 384 and 384 x 1536 3-4x faster than LAPACK's SVD here; tiny test matrices keep LAPACK)


def gram_svd(w):  # type: ignore[no-untyped-def]
    """Thin SVD of ``w`` from the eigendecomposition of the smaller Gram matrix, in float64: ``W W^T = U S^2
    U^T``, ``V^T = S^-1 U^T W`` (or the transpose). 6x faster than LAPACK's SVD for a 1024x4096 matrix here
    (0.25 vs 1.6 s), which a large model's search pays again whenever the factors leave the bounded cache.
    Squaring doubles the condition number's exponent, so in float64 the singular values down to ~1e-8 of
    the largest keep float32 accuracy: more than any kept rank needs. Singular triplets descending."""
    import torch

    wd = w.double()
    tall = wd.shape[0] > wd.shape[1]
    a = wd.T if tall else wd  # rows <= cols
    evals, evecs = torch.linalg.eigh(a @ a.T)
    evals, evecs = evals.flip(0), evecs.flip(1)
    s = evals.clamp_min(0).sqrt()
    inv = torch.where(s > s[0] * 1e-12, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))
    other = (evecs.T @ a) * inv[:, None]  # rows: the right singular vectors of a
    return (other.T, s, evecs.T) if tall else (evecs, s, other)


@dataclass(frozen=True)
class LowRankConfig(TechniqueConfig):
    """rank: the absolute rank of the (structurally cut) matrix; method: ``svd`` (of W) or ``aa``
    (activation-aware: of W whitened by the calibration inputs)."""

    technique = "lowrank"
    VERSION = 2
    ADDED = {"method": ("svd", 2)}
    rank: int = 1
    method: str = "svd"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.method not in METHODS:
            raise ValueError(f"low-rank method must be one of {', '.join(METHODS)}, got {self.method!r}")


def rank_for(fraction: float, rows: int, cols: int) -> int | None:
    """Rank for a fraction of ``min(rows, cols)``, rounded down to a multiple of 4 (2:4- and SIMD-friendly);
    None when the two factors would not be smaller than the matrix."""
    r = int(fraction * min(rows, cols)) // 4 * 4
    if r < 4 or r * (rows + cols) >= rows * cols:
        return None
    return r


@functools.lru_cache(maxsize=None)
def _parse(label: str) -> tuple[float, str] | None:
    m = _LABEL.match(str(label))
    if not m:
        raise ValueError(f"rank option {label!r} is not full or rF with 0 < F < 1, optionally with /aa "
                         f"(e.g. r0.25, r0.5/aa)")
    if label == "full":
        return None
    if label == "full/aa":
        raise ValueError("rank option 'full/aa': full keeps the matrix; drop /aa")
    f = float(m.group(1))
    if not 0 < f < 1:
        raise ValueError(f"rank option {label!r}: fraction must be in (0, 1)")
    return f, "aa" if m.group(2) else "svd"


@register
class LowRank(Technique):
    name = "lowrank"
    order = 10
    stage = "factor"
    config = LowRankConfig
    axis, dim, neutral = "rank", "r", "full"
    title = "low-rank"

    def parse(self, label: str) -> Any:
        return _parse(label)

    def bind(self, option: tuple[float, str], layer: Any, shapes: list[tuple[int, int]]) -> LowRankConfig | None:
        fraction, method = option
        if layer.groups != 1:
            return None  # a grouped conv is not one matrix
        if method != "svd" and not has_statistics(layer):
            return None  # no statistics (unreachable today: grouped convolutions are refused above)
        (rows, cols), = shapes
        r = rank_for(fraction, rows, cols)
        return None if r is None else LowRankConfig(r, method)

    def calibrated(self, c: LowRankConfig) -> bool:
        return c.method != "svd"

    def calibrated_option(self, option: Any) -> bool:
        return option[1] != "svd"

    def check(self, c: LowRankConfig, layer: Any, shapes: list[tuple[int, int]]) -> None:
        (rows, cols), = shapes
        if c.rank > min(rows, cols):
            raise AutocompError(f"layer {layer.name}: rank {c.rank} exceeds min{(rows, cols)}")

    def label(self, c: LowRankConfig) -> str:
        return f"r{c.rank}" + ("" if c.method == "svd" else f"/{c.method}")

    def brief(self, c: LowRankConfig) -> str:
        return ""

    def summary(self, c: LowRankConfig) -> dict[str, float]:
        return {"rank": float(c.rank)}

    def from_v1(self, f: Mapping[str, Any]) -> LowRankConfig | None:
        return None if f.get("rank") is None else LowRankConfig(f["rank"])

    def to_v1(self, c: LowRankConfig) -> dict[str, Any] | None:
        return {"rank": c.rank} if c.method == "svd" else None

    def part_names(self, c: LowRankConfig) -> list[str]:
        return ["B", "A"]

    # -- bytes --------------------------------------------------------------------------------------------
    def stored(self, c: LowRankConfig, stored: list[Stored]) -> list[Stored]:
        (s,) = stored
        return [replace(s, cols=c.rank, nnz=s.rows * c.rank), replace(s, rows=c.rank, nnz=c.rank * s.cols)]

    # -- proxy --------------------------------------------------------------------------------------------
    def apply(self, parts: list[Part], c: LowRankConfig, ctx: LayerContext) -> list[Part]:
        import torch

        (part,) = parts
        w = part.values
        if c.rank > min(w.shape):
            raise AutocompError(f"layer {ctx.name}: rank {c.rank} exceeds min{tuple(w.shape)}")
        if c.method == "aa":
            return self._apply_aa(w, c, ctx)
        key = ("svd", ctx.name, ctx.structured_key)
        svd = ctx.cache.get(key)
        if svd is None:
            u, s, vh = gram_svd(w) if w.numel() >= GRAM_SVD_ABOVE else torch.linalg.svd(w.double(), full_matrices=False)
            svd = ctx.cache[key] = (u.float(), s.float(), vh.float())
        u, s, vh = svd
        root = s[: c.rank].sqrt()
        return [Part(values=(u[:, : c.rank] * root).contiguous()), Part(values=(root[:, None] * vh[: c.rank]).contiguous())]

    def _apply_aa(self, w: Any, c: LowRankConfig, ctx: LayerContext) -> list[Part]:
        """``W L = U S V^T`` (``H = L L^T``): ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T L^-1``."""
        import torch

        from autocomp.compressors.compensate import whitened_svd

        key = ("wsvd", ctx.name, ctx.structured_key)
        svd = ctx.cache.get(key)
        if svd is None:
            svd = ctx.cache[key] = whitened_svd(w, ctx.hessian())
        u, s, vh, lo = svd
        root = s[: c.rank].sqrt()
        a = torch.linalg.solve_triangular(lo, root[:, None] * vh[: c.rank], upper=False, left=False)
        return [Part(values=(u[:, : c.rank] * root).float().contiguous()), Part(values=a.float().contiguous())]

    # -- training -----------------------------------------------------------------------------------------
    def train_latent(self, c: LowRankConfig, sub: Any) -> list[Any]:
        return [p.values for p in self.apply([Part(values=sub)], c, LayerContext(f"train.{self.name}"))]

    # -- hardware -----------------------------------------------------------------------------------------
    def execution(self, c: LowRankConfig, ex: Execution, device: Any) -> Execution:
        ((k, n),) = ex.shapes
        return replace(ex, shapes=((k, c.rank), (c.rank, n)))

    def onnx_kernel(self, c: LowRankConfig) -> str | None:
        return "factor"  # two matmuls, each stored and run as its own options say

    def runtime_graph(self, c: LowRankConfig, parts: list[Part], bias: Any, linear: Any) -> Any:
        import torch

        return torch.nn.Sequential(linear(parts[1], None), linear(parts[0], bias))  # x -> A (r x cols) -> B
