"""Low rank: truncated SVD, ``W ~ B @ A`` with ``B = U_r sqrt(S_r)`` and ``A = sqrt(S_r) V_r^T``.

Splitting the singular values evenly keeps both factors on the same scale, which quantizes better. The
SVD is computed once per (layer, structured shape) and reused for every rank. Options in search spaces:
``full`` or ``rF``, a fraction ``0 < F < 1`` of ``min(rows, cols)`` rounded down to a multiple of 4
(dropped where the two factors would not be smaller than the matrix). The plan stores the absolute rank.
Training holds ``B`` and ``A`` as trainable parameters; the runtime runs two smaller matmuls.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping

from autocomp.compressors.base import Execution, LayerContext, Part, Stored, Technique, TechniqueConfig, register
from autocomp.errors import AutocompError

__all__ = ["LowRankConfig", "LowRank", "rank_for"]

_LABEL = re.compile(r"^(?:full|r(0?\.\d+|1(?:\.0*)?))$")


@dataclass(frozen=True)
class LowRankConfig(TechniqueConfig):
    """rank: the absolute rank of the (structurally cut) matrix."""

    technique = "lowrank"
    rank: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")


def rank_for(fraction: float, rows: int, cols: int) -> int | None:
    """Rank for a fraction of ``min(rows, cols)``, rounded down to a multiple of 4 (2:4- and SIMD-friendly);
    None when the two factors would not be smaller than the matrix."""
    r = int(fraction * min(rows, cols)) // 4 * 4
    if r < 4 or r * (rows + cols) >= rows * cols:
        return None
    return r


@functools.lru_cache(maxsize=None)
def _parse(label: str) -> float | None:
    m = _LABEL.match(str(label))
    if not m:
        raise ValueError(f"rank option {label!r} is not full or rF with 0 < F < 1 (e.g. r0.25)")
    if label == "full":
        return None
    f = float(m.group(1))
    if not 0 < f < 1:
        raise ValueError(f"rank option {label!r}: fraction must be in (0, 1)")
    return f


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

    def bind(self, fraction: float, layer: Any, shapes: list[tuple[int, int]]) -> LowRankConfig | None:
        if layer.groups != 1:
            return None  # a grouped conv is not one matrix
        (rows, cols), = shapes
        r = rank_for(fraction, rows, cols)
        return None if r is None else LowRankConfig(r)

    def check(self, c: LowRankConfig, layer: Any, shapes: list[tuple[int, int]]) -> None:
        (rows, cols), = shapes
        if c.rank > min(rows, cols):
            raise AutocompError(f"layer {layer.name}: rank {c.rank} exceeds min{(rows, cols)}")

    def label(self, c: LowRankConfig) -> str:
        return f"r{c.rank}"

    def brief(self, c: LowRankConfig) -> str:
        return ""

    def summary(self, c: LowRankConfig) -> dict[str, float]:
        return {"rank": float(c.rank)}

    def from_v1(self, f: Mapping[str, Any]) -> LowRankConfig | None:
        return None if f.get("rank") is None else LowRankConfig(f["rank"])

    def to_v1(self, c: LowRankConfig) -> dict[str, Any]:
        return {"rank": c.rank}

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
        key = ("svd", ctx.name, ctx.structured_key)
        svd = ctx.cache.get(key)
        if svd is None:
            u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
            svd = ctx.cache[key] = (u.float(), s.float(), vh.float())
        u, s, vh = svd
        root = s[: c.rank].sqrt()
        return [Part(values=(u[:, : c.rank] * root).contiguous()), Part(values=(root[:, None] * vh[: c.rank]).contiguous())]

    # -- training -----------------------------------------------------------------------------------------
    def train_latent(self, c: LowRankConfig, sub: Any) -> list[Any]:
        return [p.values for p in self.apply([Part(values=sub)], c, LayerContext(f"train.{self.name}"))]

    # -- hardware -----------------------------------------------------------------------------------------
    def execution(self, c: LowRankConfig, ex: Execution, device: Any) -> Execution:
        ((k, n),) = ex.shapes
        return replace(ex, shapes=((k, c.rank), (c.rank, n)))

    def runtime_graph(self, c: LowRankConfig, parts: list[Part], bias: Any, linear: Any) -> Any:
        import torch

        return torch.nn.Sequential(linear(parts[1], None), linear(parts[0], bias))  # x -> A (r x cols) -> B
