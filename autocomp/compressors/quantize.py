"""Round-to-nearest integer weight quantization, symmetric or asymmetric, per channel or group-wise.

Groups run along the input dimension (``group_size`` inputs share a scale; 0 = the whole row). Scales are
stored as float16 and the codes are computed with the float16-rounded scale, so dequantizing the stored
codes reproduces exactly the weights the proxy evaluated.

* symmetric:  ``q = clamp(round(w / s), -(2^(b-1)-1), 2^(b-1)-1)``, ``s = max|w| / (2^(b-1)-1)``;
  stored unsigned as ``q + 2^(b-1)``.
* asymmetric: range widened to include 0, ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)``,
  ``q = clamp(round(w / s) + z, 0, 2^b - 1)``; ``w ~ (q - z) s``.

Pruned entries are zero before quantization and stay zero after (the mask is reapplied).
"""

from __future__ import annotations

from typing import Any

from autocomp.compressors.base import Compressor, LayerContext, Part, register
from autocomp.plan import LayerPlan

_MIN_SCALE = 2.0**-24  # smallest positive float16
_MAX_SCALE = 65504.0


def quantize_matrix(w: Any, bits: int, group_size: int, symmetric: bool) -> tuple[Any, Any, Any, Any]:
    """-> (dequantized float32 [rows, cols], codes int32 [rows, cols], scale f16 [rows, G], zero-point)."""
    import torch

    rows, cols = w.shape
    g = group_size or cols
    n_groups = -(-cols // g)
    pad = n_groups * g - cols
    x = torch.nn.functional.pad(w, (0, pad)) if pad else w
    x = x.reshape(rows, n_groups, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = x.abs().amax(dim=-1)
        scale = (amax / max(qmax, 1)).clamp(_MIN_SCALE, _MAX_SCALE).half()
        s = scale.float().unsqueeze(-1)
        q = torch.clamp(torch.round(x / s), -qmax, qmax)
        deq = q * s
        codes = (q + 2 ** (bits - 1)).to(torch.int32)
        zp = None
    else:
        qmax = 2**bits - 1
        lo = x.amin(dim=-1).clamp(max=0.0)
        hi = x.amax(dim=-1).clamp(min=0.0)
        scale = ((hi - lo) / qmax).clamp(_MIN_SCALE, _MAX_SCALE).half()
        s = scale.float().unsqueeze(-1)
        zp = torch.clamp(torch.round(-lo / scale.float()), 0, qmax).to(torch.int32)
        q = torch.clamp(torch.round(x / s) + zp.unsqueeze(-1), 0, qmax)
        deq = (q - zp.unsqueeze(-1)) * s
        codes = q.to(torch.int32)
    deq = deq.reshape(rows, n_groups * g)[:, :cols]
    codes = codes.reshape(rows, n_groups * g)[:, :cols]
    return deq.contiguous(), codes.contiguous(), scale, zp


@register
class Quantize(Compressor):
    name = "quantize"
    order = 30
    row_local = True

    def active(self, choice: LayerPlan) -> bool:
        return choice.bits is not None

    def __call__(self, parts: list[Part], choice: LayerPlan, ctx: LayerContext) -> list[Part]:
        out = []
        for part in parts:
            w = part.values if part.mask is None else part.values * part.mask
            deq, codes, scale, zp = quantize_matrix(w, int(choice.bits), choice.group_size, choice.symmetric)  # type: ignore[arg-type]
            out.append(part.evolve(values=deq, codes=codes, scale=scale, zero_point=zp))
        return out
