"""Low-rank: truncated SVD, ``W ~ B @ A`` with ``B = U_r sqrt(S_r)`` and ``A = sqrt(S_r) V_r^T``.

Splitting the singular values evenly keeps both factors on the same scale, which quantizes better.
The SVD is computed once per (layer, structured shape) and reused for every rank.
"""

from __future__ import annotations

from autocomp.compressors.base import Compressor, LayerContext, Part, register
from autocomp.errors import AutocompError
from autocomp.plan import LayerPlan


@register
class LowRank(Compressor):
    name = "lowrank"
    order = 10

    def active(self, choice: LayerPlan) -> bool:
        return choice.rank is not None

    def __call__(self, parts: list[Part], choice: LayerPlan, ctx: LayerContext) -> list[Part]:
        import torch

        (part,) = parts
        w = part.values
        r = int(choice.rank)  # type: ignore[arg-type]
        if r > min(w.shape):
            raise AutocompError(f"layer {ctx.name}: rank {r} exceeds min{tuple(w.shape)}")
        key = ("svd", ctx.name, ctx.structured_key)
        svd = ctx.cache.get(key)
        if svd is None:
            u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
            svd = ctx.cache[key] = (u.float(), s.float(), vh.float())
        u, s, vh = svd
        root = s[:r].sqrt()
        return [Part(values=(u[:, :r] * root).contiguous()), Part(values=(root[:, None] * vh[:r]).contiguous())]
