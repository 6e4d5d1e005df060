"""Round-to-nearest integer weight quantization, symmetric or asymmetric, per channel or group-wise, and
W8A8 (``int8``: 8-bit per-channel weights, activations quantized on the fly as int8 kernels do).

W8A8 comes in two activation grids, because the int8 kernels a plan deploys to differ: ``int8`` quantizes
each input tensor to 7 bits (0..127, ``reduce_range``: what torch's x86 / fbgemm dynamic Linear computes, so
that its u8 x s8 pair sums cannot saturate 16 bits), ``int8f`` to the full 8 bits (0..255: what ONNX Runtime's
``DynamicQuantizeLinear`` + ``MatMulInteger`` compute). The full grid halves the activation step, so its
rounding noise is about a quarter; a search for ``--hardware ort-cpu`` uses ``int8f`` wherever the space says
``int8``, so the proxy scores what the ORT export runs.

Groups run along the input dimension (``group_size`` inputs share a scale; 0 = the whole row). Scales are
stored as float16 and the codes are computed with the float16-rounded scale, so dequantizing the stored
codes reproduces exactly the weights the proxy evaluated.

* symmetric:  ``q = clamp(round(w / s), -(2^(b-1)-1), 2^(b-1)-1)``, ``s = max|w| / (2^(b-1)-1)``;
  stored unsigned as ``q + 2^(b-1)``.
* asymmetric: range widened to include 0, ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)``,
  ``q = clamp(round(w / s) + z, 0, 2^b - 1)``; ``w ~ (q - z) s``.

Pruned entries are zero before quantization and stay zero after (the mask is reapplied). Options in
search spaces: ``keep``, ``int8``, ``int8f``, or ``<bits><c|gN>[a]`` (``8c``, ``4g128``, ``3g32a``), each with an optional
``/gptq`` suffix (``4g128/gptq``, ``int8/gptq``): the same stored format with the codes chosen by GPTQ's
error compensation on the layer's calibration statistics (:mod:`~.compensate`; every layer but a grouped
convolution; an embedding table's statistic is output-side, see :mod:`~.calibration`), or ``/mse`` (any
layer, no data):
round to nearest on each group's range clipped to the ratio of :data:`CLIP_GRID` with the least squared
error (what ``train --clip mse`` starts from), so the search scores clipped grids too.

Training: fake quantization with a straight-through estimator; ``clip`` ``mse`` starts each group from the
clipping ratio (of :data:`CLIP_GRID`) with the least round-to-nearest error, ``learned`` also trains one
ratio per group (PACT-style, :data:`CLIP_LR_MULT` x the weights' learning rate). The clipping is held in
the weights, so the plan's min/max quantizer lands on the clipped range and the packed format is unchanged.
A GPTQ or ``/mse`` layer trains from the searched weights on the searched grid: its scales (and zero points)
stay fixed, the weights move (straight-through), and the export quantizes them on that grid (``clip`` does
not apply).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping

from autocomp.compressors.base import (Execution, LayerContext, OnnxWeight, Part, Stored, Technique, TechniqueConfig, ceil8,
                                       has_statistics, register)

__all__ = ["QuantConfig", "Quantize", "quantize_matrix", "fake_quant_input", "fake_quant_input_full", "mse_clip", "CLIP_GRID", "CLIPS",
           "CLIP_LR_MULT"]

_MIN_SCALE = 2.0**-24  # smallest positive float16
_MAX_SCALE = 65504.0
SCALE_BYTES = 2  # scales are stored as float16
_LABEL = re.compile(r"^(?:keep|int8f?|(\d+)(c|g(\d+))(a?))(/gptq|/gptq-plain|/gptq-columns|/mse)?$")
METHODS = ("rtn", "gptq", "mse")
ORDERS = ("columns", "act")  # GPTQ's column order: as stored, or by decreasing input second moment
CLIP_WEIGHTS = ("none", "act")  # GPTQ's clipped grid: every weight's error alike, or weighted by its input's RMS
CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # clip ratios tried per group: 1.0, 0.95, ..., 0.5
CLIPS = ("learned", "mse", "minmax")  # train's quantization ranges (learned = the mse start, then trainable ratios)
CLIP_LR_MULT = 10.0  # the clipping ratios' learning rate, as a multiple of the weights'


@dataclass(frozen=True)
class QuantConfig(TechniqueConfig):
    """bits: 2..16 weight bits; group_size: inputs per scale (0 = one group per output row);
    symmetric: no zero point; act_bits: 8 for W8A8 (8-bit per-channel symmetric weights only); method:
    ``rtn`` (round to nearest), ``gptq`` (error-compensated codes) or ``mse`` (least-error clipped ranges),
    all in the same stored format. order (``gptq``): ``act`` sweeps the columns by decreasing input second
    moment with static groups (labels ``/gptq``, ``/gptq-plain``), ``columns`` in stored order (label
    ``/gptq-columns``; what every ``/gptq`` plan written before version 3 computed, so those plans keep their
    weights).
    clip_weight (act-order ``gptq``): each group's clipping ratio minimizes its squared error with every
    column weighted by ``sqrt(H_jj)``, the RMS of the input it multiplies (``act``, label ``/gptq``), or
    unweighted (``none``, label ``/gptq-plain``: what act-order plans of versions 3-4 computed).
    reduce_range (W8A8): activations on a 7-bit grid (``int8``, torch's x86 kernel) or, False, the full 8-bit
    grid (``int8f``, ONNX Runtime's dynamic quantization)."""

    technique = "quantize"
    VERSION = 5
    ADDED = {"method": ("rtn", 2), "order": ("columns", 3), "reduce_range": (True, 4), "clip_weight": ("none", 5)}
    bits: int = 8
    group_size: int = 0
    symmetric: bool = True
    act_bits: int | None = None
    method: str = "rtn"
    order: str = "columns"
    reduce_range: bool = True
    clip_weight: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be an integer in 2..16, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise ValueError(f"group_size must be an integer >= 0 (0 = per channel), got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}")
        if self.act_bits is not None and (self.act_bits != 8 or self.bits != 8 or self.group_size or not self.symmetric):
            raise ValueError("act_bits 8 (W8A8) needs bits 8, group_size 0 (per channel) and symmetric weights")
        if not isinstance(self.reduce_range, bool) or (not self.reduce_range and self.act_bits != 8):
            raise ValueError(f"reduce_range must be true or false, and false only with act_bits 8 (W8A8), "
                             f"got {self.reduce_range!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.order not in ORDERS or (self.order != "columns" and self.method != "gptq"):
            raise ValueError(f"order must be one of {', '.join(ORDERS)} ({ORDERS[1]!r} with method gptq only), "
                             f"got {self.order!r}")
        if self.clip_weight not in CLIP_WEIGHTS or (self.clip_weight != "none" and self.order != "act"):
            raise ValueError(f"clip_weight must be one of {', '.join(CLIP_WEIGHTS)} ({CLIP_WEIGHTS[1]!r} with "
                             f"act-order gptq only), got {self.clip_weight!r}")


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


def group_params(x: Any, bits: int, symmetric: bool) -> tuple[Any, Any]:
    """The scale (float16 ``[rows]``) and zero point (int32 ``[rows]`` or None) :func:`quantize_matrix` gives
    one group ``x`` ``[rows, n]`` (same formulas): the compensated quantizers fix a group's scale this way."""
    import torch

    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return (x.abs().amax(dim=-1) / max(qmax, 1)).clamp(_MIN_SCALE, _MAX_SCALE).half(), None
    qmax = 2**bits - 1
    lo = x.amin(dim=-1).clamp(max=0.0)
    hi = x.amax(dim=-1).clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp(_MIN_SCALE, _MAX_SCALE).half()
    return scale, torch.clamp(torch.round(-lo / scale.float()), 0, qmax).to(torch.int32)


def quantize_column(c: Any, scale: Any, zp: Any, bits: int, symmetric: bool) -> tuple[Any, Any]:
    """One column ``c`` (float32 ``[rows]``) on fixed per-row scales -> (dequantized float32, codes int32),
    exactly as :func:`quantize_matrix` computes them."""
    import torch

    s = scale.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        q = torch.clamp(torch.round(c / s), -qmax, qmax)
        return q * s, (q + 2 ** (bits - 1)).to(torch.int32)
    qmax = 2**bits - 1
    q = torch.clamp(torch.round(c / s) + zp, 0, qmax)
    return (q - zp) * s, q.to(torch.int32)


def quantize_fixed(w: Any, scale: Any, zp: Any, bits: int, group_size: int, symmetric: bool) -> tuple[Any, Any]:
    """``w`` ``[rows, cols]`` on fixed group scales (``[rows, groups]``) -> (dequantized float32, codes int32):
    what training and the export of a trained checkpoint compute for a compensated (GPTQ) layer."""
    rows, cols = w.shape
    g = group_size or cols
    s = scale.repeat_interleave(g, dim=1)[:, :cols]
    z = None if zp is None else zp.repeat_interleave(g, dim=1)[:, :cols]
    return quantize_column(w, s, z, bits, symmetric)


def _fake_quant(x: Any, qmax: int) -> Any:
    """``x`` on a dynamic per-tensor asymmetric grid of ``qmax + 1`` levels, its range widened to include 0:
    ``s = (max - min) / qmax``, ``z = round(-min / s)``, ``q = clamp(round(x / s) + z, 0, qmax)``."""
    import torch

    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = torch.clamp((hi - lo) / qmax, min=1e-12)
    zp = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zp, 0, qmax) - zp) * scale


def fake_quant_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Dynamic per-tensor asymmetric activation quantization, 7-bit (fbgemm's reduce_range=True): what
    torch's dynamic int8 Linear does to its inputs on x86. A ``forward_pre_hook`` (``int8``)."""
    return (_fake_quant(args[0], 127), *args[1:])


def fake_quant_input_full(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The same on the full 8-bit grid (0..255): ONNX Runtime's ``DynamicQuantizeLinear`` (scale
    ``(max(0, max) - min(0, min)) / 255``, zero point ``round(-min / scale)``, round half to even, saturate).
    A ``forward_pre_hook`` (``int8f``)."""
    return (_fake_quant(args[0], 255), *args[1:])


def nbits_block(group_size: int, cols: int) -> int:
    """The ``MatMulNBits`` / ``GatherBlockQuantized`` block for a group of ``group_size`` inputs (0 or >= cols:
    per channel) of a ``cols``-input matrix: the largest power of two in 16..256 dividing the group (each
    block then carries its group's scale), per channel up to 128; 0 when no such block divides the group."""
    if not group_size or group_size >= cols:
        block = 16
        while block < 128 and block < cols:
            block *= 2
        return block
    return next((b for b in (256, 128, 64, 32, 16) if group_size % b == 0), 0)


@functools.lru_cache(maxsize=None)
def _parse(label: str) -> tuple[int, int, bool, int | None, str, str, bool, str] | None:
    """(bits, group size, symmetric, act bits, method, order, reduce range, clip weight), or None for keep."""
    m = _LABEL.match(str(label))
    if not m:
        raise ValueError(f"quant option {label!r} is not keep, int8, int8f or <bits><c|gN>[a], optionally with /gptq, "
                         f"/gptq-plain, /gptq-columns or /mse (e.g. 8c, 4g128, 3g32a, 4g128/gptq, 3g64/mse)")
    suffix = m.group(5)[1:] if m.group(5) else "rtn"
    method, order, weight = {"gptq": ("gptq", "act", "act"), "gptq-plain": ("gptq", "act", "none"),
                             "gptq-columns": ("gptq", "columns", "none")}.get(suffix, (suffix, "columns", "none"))
    if label == "keep":
        return None
    if label.startswith("keep/"):
        raise ValueError(f"quant option {label!r}: keep stores the weights as they are; drop /{suffix}")
    if label.startswith("int8f"):
        return 8, 0, True, 8, method, order, False, weight
    if label.startswith("int8"):
        return 8, 0, True, 8, method, order, True, weight
    bits = int(m.group(1))
    if not 2 <= bits <= 8:
        raise ValueError(f"quant option {label!r}: bits must be 2..8")
    group = int(m.group(3)) if m.group(3) else 0
    if m.group(3) and group < 1:
        raise ValueError(f"quant option {label!r}: group size must be >= 1")
    return bits, group, m.group(4) != "a", None, method, order, True, weight


@register
class Quantize(Technique):
    name = "quantize"
    order = 30
    stage = "encode"
    config = QuantConfig
    axis, dim, neutral = "quant", "q", "keep"
    row_local = True
    reference_axis = True

    def parse(self, label: str) -> Any:
        return _parse(label)

    def bind(self, option: Any, layer: Any, shapes: list[tuple[int, int]]) -> QuantConfig | None:
        bits, group, sym, act, method, order, reduce, weight = option
        if act and layer.type != "Linear":
            return None  # W8A8 kernels exist for Linear layers
        if method == "gptq" and not has_statistics(layer):
            return None  # no statistics: a grouped convolution
        if group >= shapes[0][1]:
            group = 0  # a group spanning the whole row is per-channel
        return QuantConfig(bits, group, sym, act, method, order, reduce, weight)

    def calibrated(self, c: QuantConfig) -> bool:
        return c.method == "gptq"

    def calibrated_option(self, option: Any) -> bool:
        return option[4] == "gptq"

    def fixed_start(self, c: QuantConfig) -> bool:
        return c.method != "rtn"  # a searched grid (GPTQ's, or the clipped one) is kept by training

    def label(self, c: QuantConfig) -> str:
        if c.method != "gptq":
            tail = "" if c.method == "rtn" else f"/{c.method}"
        else:
            tail = "/gptq-columns" if c.order == "columns" else "/gptq" if c.clip_weight == "act" else "/gptq-plain"
        if c.act_bits == 8:
            return ("int8" if c.reduce_range else "int8f") + tail
        return f"{c.bits}{'c' if c.group_size == 0 else f'g{c.group_size}'}{'' if c.symmetric else 'a'}{tail}"

    def brief(self, c: QuantConfig) -> str:
        tail = "" if c.method == "rtn" else f"/{c.method}"
        return f"{('int8' if c.reduce_range else 'int8f') if c.act_bits == 8 else f'{c.bits}b'}{'' if c.group_size == 0 else f'g{c.group_size}'}{tail}"

    def summary(self, c: QuantConfig) -> dict[str, float]:
        return {"bits": c.bits}

    def from_v1(self, f: Mapping[str, Any]) -> QuantConfig | None:
        if f.get("bits") is None:
            return None
        return QuantConfig(f["bits"], f.get("group_size", 0), f.get("symmetric", True), f.get("act_bits"))

    def to_v1(self, c: QuantConfig) -> dict[str, Any] | None:
        if c.method != "rtn" or not c.reduce_range:
            return None
        return {"bits": c.bits, "group_size": c.group_size, "symmetric": c.symmetric, "act_bits": c.act_bits}

    # -- bytes --------------------------------------------------------------------------------------------
    def stored(self, c: QuantConfig, stored: list[Stored]) -> list[Stored]:
        out = []
        for s in stored:
            n_groups = s.rows * -(-s.cols // (c.group_size or s.cols))
            zero_points = 0 if c.symmetric else ceil8(n_groups * c.bits)
            out.append(replace(s, value_bits=c.bits, meta_bytes=s.meta_bytes + n_groups * SCALE_BYTES + zero_points))
        return out

    # -- proxy --------------------------------------------------------------------------------------------
    def apply(self, parts: list[Part], c: QuantConfig, ctx: LayerContext) -> list[Part]:
        if c.method != "rtn" and ctx.holder is not None:
            return self._apply_trained(parts, c, ctx)
        if c.method == "gptq":
            return self._apply_gptq(parts, c, ctx)
        out = []
        for part in parts:
            w = part.values if part.mask is None else part.values * part.mask
            if c.method == "mse":
                w = mse_clip(w, c.bits, c.group_size, c.symmetric)
            deq, codes, scale, zp = quantize_matrix(w, c.bits, c.group_size, c.symmetric)
            out.append(part.evolve(values=deq, codes=codes, scale=scale, zero_point=zp))
        return out

    def _apply_trained(self, parts: list[Part], c: QuantConfig, ctx: LayerContext) -> list[Part]:
        """A trained layer with a searched grid (``ctx.holder``): quantized on the grid it trained on."""
        out = []
        for i, part in enumerate(parts):
            w = part.values if part.mask is None else part.values * part.mask
            scale = getattr(ctx.holder, f"qscale{ctx.index + i}")
            zp = getattr(ctx.holder, f"qzp{ctx.index + i}", None)
            deq, codes = quantize_fixed(w, scale, zp, c.bits, c.group_size, c.symmetric)
            out.append(part.evolve(values=deq, codes=codes, scale=scale.clone(), zero_point=None if zp is None else zp.clone()))
        return out

    def _apply_gptq(self, parts: list[Part], c: QuantConfig, ctx: LayerContext) -> list[Part]:
        """GPTQ on each stored matrix. Factors (``B @ A``) go from the last to the first: the input of ``B`` is
        ``A x``, so its statistics are ``A' H A'^T`` with the already quantized ``A'``."""
        from autocomp.compressors.compensate import act_order, gptq

        if c.order == "act" and len(parts) == 1 and parts[0].mask is None and not ctx.upstream and ctx.peers:
            return [parts[0].evolve(**self._gptq_with_peers(parts[0].values, c, ctx))]
        out: list[Part] = list(parts)
        h = ctx.hessian()
        for i in reversed(range(len(parts))):
            part = parts[i]
            own = i == len(parts) - 1  # the layer's own inputs: the factor (and order) are shared
            if c.order == "act":
                order, u = ctx.act_order() if own else (act_order(h), None)
            else:
                order, u = None, ctx.inverse_cholesky() if own else None
            deq, codes, scale, zp = gptq(part.values, h, c.bits, c.group_size, c.symmetric, part.mask, u, order,
                                         c.clip_weight == "act")
            out[i] = part.evolve(values=deq, codes=codes, scale=scale, zero_point=zp)
            if i:
                h = deq.double() @ h @ deq.double().T
        return out

    @staticmethod
    def _gptq_with_peers(w: Any, c: QuantConfig, ctx: LayerContext) -> dict[str, Any]:
        """Act-order GPTQ of a layer's plain matrix, together with the layer's other plain act-order GPTQ choices
        (``ctx.peers``) not yet computed: one sweep for all of them (:func:`~.compensate.gptq_many`, the same
        bits as each alone), the others left in ``ctx.cache`` until asked for. A search's sensitivity profile
        asks for every option of every layer: on MiniLM this halved the GPTQ time of a cold start
        (docs/BENCHMARKS.md)."""
        from autocomp.compressors.compensate import gptq_many

        def compute(configs: list[QuantConfig]) -> list[Any]:
            order, u = ctx.act_order()
            return gptq_many([(w, None, q.bits, q.group_size, q.symmetric, q.clip_weight == "act") for q in configs],
                             ctx.hessian(), u, order)

        hit = ctx.with_peers("gptq-peer", c, lambda q: q.method == "gptq" and q.order == "act", compute)
        deq, codes, scale, zp = hit
        return {"values": deq, "codes": codes, "scale": scale, "zero_point": zp}

    def input_hook(self, c: QuantConfig) -> Any:
        if c.act_bits != 8:
            return None
        return fake_quant_input if c.reduce_range else fake_quant_input_full

    def ort_label(self, label: str) -> str:
        """``int8`` -> ``int8f`` (any method suffix kept): ORT's dynamic int8 path quantizes activations to
        the full 8-bit grid, so a search for ORT scores that grid."""
        return "int8f" + label[4:] if label.startswith("int8") and not label.startswith("int8f") else label

    # -- training -----------------------------------------------------------------------------------------
    def train_setup(self, c: QuantConfig, holder: Any, latents: list[Any], options: Mapping[str, Any]) -> None:
        import torch

        if c.method != "rtn":  # the searched grid (GPTQ's, or the clipped one) stays: its scales become buffers
            for i, part in enumerate(options["parts"]):
                holder.register_buffer(f"qscale{i}", part.scale.clone())
                if part.zero_point is not None:
                    holder.register_buffer(f"qzp{i}", part.zero_point.clone())
            return
        if options.get("clip") != "learned" or not options.get("trainable", True):
            return
        for i, v in enumerate(latents):
            g = c.group_size or v.shape[1]
            holder.register_parameter(f"clip{i}", torch.nn.Parameter(torch.ones(v.shape[0], -(-v.shape[1] // g), 1)))

    def train_prepare(self, c: QuantConfig, holder: Any, i: int, v: Any) -> Any:
        ratio = getattr(holder, f"clip{i}", None)
        if ratio is None:
            return v
        lo, hi = _group_range(_grouped(v.detach(), c.group_size), c.symmetric)  # v is masked: the stored range
        return _clamp_groups(v, c.group_size, lo, hi, ratio.clamp(CLIP_GRID[-1], 1.0))

    def train_transform(self, c: QuantConfig, holder: Any, i: int, v: Any, mask: Any = None) -> Any:
        v = self.train_prepare(c, holder, i, v)
        if c.method != "rtn":
            deq = quantize_fixed(v.detach(), getattr(holder, f"qscale{i}"), getattr(holder, f"qzp{i}", None), c.bits,
                                 c.group_size, c.symmetric)[0]
        else:
            deq = quantize_matrix(v.detach(), c.bits, c.group_size, c.symmetric)[0]
        return v + (deq - v).detach()

    def train_start(self, c: QuantConfig, holder: Any, latents: list[Any], masks: list[Any],
                    options: Mapping[str, Any]) -> list[Any] | None:
        if options.get("clip", "minmax") == "minmax" or c.method != "rtn":
            return None
        return [mse_clip(v, c.bits, c.group_size, c.symmetric, m) for v, m in zip(latents, masks)]

    def train_param_lr(self, param_name: str) -> float | None:
        return CLIP_LR_MULT if param_name.startswith("clip") else None

    def train_after_step(self, holder: Any) -> None:
        for name, p in holder.named_parameters(recurse=False):
            if name.startswith("clip"):  # projected: a ratio outside the grid's range gets no gradient back
                p.data.clamp_(CLIP_GRID[-1], 1.0)

    # -- export -------------------------------------------------------------------------------------------
    def pack(self, c: QuantConfig, part: Part, key: str, out: dict[str, Any], state: dict[str, Any]) -> None:
        import numpy as np

        from autocomp.packing import pack_bits

        sel = state.get("selection")
        codes = part.codes.detach().cpu().numpy()
        out[f"{key}.qweight"] = pack_bits(codes[sel] if sel is not None else codes.reshape(-1), c.bits)
        out[f"{key}.scale"] = part.scale.detach().cpu().numpy().astype(np.float16).reshape(-1)
        if part.zero_point is not None:
            out[f"{key}.zero_point"] = pack_bits(part.zero_point.detach().cpu().numpy().reshape(-1), c.bits)
        state["encoded"] = True

    def unpack(self, c: QuantConfig, arrays: Mapping[str, Any], key: str, rows: int, cols: int,
               state: dict[str, Any]) -> None:
        import numpy as np

        from autocomp.packing import unpack_bits

        mask = state.get("mask")
        if mask is None:
            mask = np.ones((rows, cols), dtype=bool)
        codes = np.zeros((rows, cols), dtype=np.int64)
        codes[mask] = unpack_bits(arrays[f"{key}.qweight"], c.bits, int(mask.sum()))
        g = c.group_size or cols
        n_groups = -(-cols // g)
        s = np.repeat(arrays[f"{key}.scale"].astype(np.float32).reshape(rows, n_groups), g, axis=1)[:, :cols]
        if c.symmetric:
            q = codes - (1 << (c.bits - 1))
        else:
            zp = unpack_bits(arrays[f"{key}.zero_point"], c.bits, rows * n_groups).reshape(rows, n_groups)
            q = codes - np.repeat(zp, g, axis=1)[:, :cols]
        values = (q * s).astype(np.float32)
        values[~mask] = 0.0
        state["values"] = values

    # -- hardware -----------------------------------------------------------------------------------------
    def execution(self, c: QuantConfig, ex: Execution, device: Any) -> Execution:
        ex = replace(ex, store_bits=float(c.bits), act_bits=8 if c.act_bits == 8 else ex.act_bits)
        if c.act_bits == 8 and (device is None or device.int8) and (c.reduce_range or device is None
                                                                   or device.runtime == "ort"):
            return replace(ex, dtype="int8", read_bits=8.0, kernel="int8")
        if device is not None and c.bits in device.weight_only_bits:
            return replace(ex, read_bits=float(c.bits))
        return ex

    def onnx_kernel(self, c: QuantConfig) -> str | None:
        """W8A8: ``int8``; 2, 4 or 8 bits in groups a kernel block divides: ``nbits<b>``; else None."""
        if c.act_bits == 8:
            return "int8"
        if c.bits not in (2, 4, 8) or (c.group_size and c.group_size % 16):
            return None
        return f"nbits{c.bits}"

    def onnx_weight(self, c: QuantConfig, part: Part, use: str) -> OnnxWeight | None:
        """W8A8 -> ``MatMulInteger`` (int8 weights, the plan's per-row scales); weight-only 2..8 bits ->
        ``MatMulNBits`` (matmul) or ``GatherBlockQuantized`` (table) on the plan's own codes, scales and zero
        points, in the kernels' 2-, 4- or 8-bit containers (3 bits in 4, 5..7 in 8: the same values, more
        bytes). A group of g inputs becomes blocks of the largest power of two in 16..256 dividing g, each
        with the group's scale (per channel: blocks of up to 128 repeating the row's scale), so dequantizing
        gives exactly the plan's values. None (dense) above 8 bits or for a group no such block divides."""
        import numpy as np

        if part.codes is None:
            return None
        codes = part.codes.detach().cpu().numpy().astype(np.int64)
        rows, cols = codes.shape
        scale = part.scale.detach().cpu().float().numpy().reshape(rows, -1)
        zp = (np.full(scale.shape, 1 << (c.bits - 1), np.int64) if part.zero_point is None
              else part.zero_point.detach().cpu().numpy().astype(np.int64).reshape(rows, -1))
        g = c.group_size or cols
        if part.mask is not None:  # a pruned entry stores its group's zero (it already does; made certain)
            mask = part.mask.detach().cpu().numpy()
            codes = np.where(mask, codes, np.repeat(zp, g, axis=1)[:, :cols])
        if c.act_bits == 8 and use == "matmul":
            return OnnxWeight("MatMulInteger", 8, cols, (codes - 128).astype(np.int8), scale.reshape(rows),
                              act_grid=127 if c.reduce_range else 255)
        container = next((b for b in (2, 4, 8) if b >= c.bits), None)
        if container is None:
            return None
        block = nbits_block(c.group_size, cols)
        if not block:
            return None
        n_blocks = -(-cols // block)
        group_of_block = (np.arange(n_blocks) * block) // g
        note = f"{c.bits}-bit codes in {container}-bit containers" if container != c.bits else ""
        symmetric_default = part.zero_point is None and container == c.bits
        op = "MatMulNBits" if use == "matmul" else "GatherBlockQuantized"
        return OnnxWeight(op, container, block, codes, scale[:, group_of_block].astype(np.float32),
                          None if symmetric_default else zp[:, group_of_block], note)

    def runtime_linear(self, c: QuantConfig, part: Part, bias: Any) -> Any:
        """W8A8: torch's dynamic-quantized int8 Linear (x86/fbgemm) built from the plan's own codes and
        float16 scales, so the weights are exactly those the proxy evaluated. ``int8f`` (ORT's full 8-bit
        activation grid) runs as simulated: a float32 Linear whose inputs a pre-hook puts on that grid. fbgemm's full-range path
        saturates its 16-bit pair sums (max error 25-40% of the output's range measured on MiniLM-sized
        layers), so torch has no exact int8 kernel for it; the ONNX export runs it on ORT's."""
        if c.act_bits != 8 or part.codes is None:
            return None
        if not c.reduce_range:
            from autocomp.runtime import _dense_linear

            layer = _dense_linear(part, bias)
            layer.register_forward_pre_hook(fake_quant_input_full)
            return layer
        import warnings

        import torch
        import torch.ao.nn.quantized.dynamic as nnqd

        rows, cols = part.values.shape
        q = (part.codes.to(torch.int32) - 128).to(torch.int8)  # stored unsigned: q + 2^(bits-1)
        scale = part.scale.reshape(-1).double()
        with warnings.catch_warnings():  # torch >= 2.10 marks quantized tensors deprecated; the kernels remain
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(q, scale, torch.zeros(rows, dtype=torch.long), 0)
        layer = nnqd.Linear(cols, rows, bias_=bias is not None, dtype=torch.qint8)
        layer.set_weight_bias(qweight, None if bias is None else bias.detach().float())
        return layer


# -- clipping (train --clip, export --clip mse) --------------------------------------------------------------
def mse_clip(v: Any, bits: int, group_size: int, symmetric: bool, mask: Any = None, col_weight: Any = None) -> Any:
    """``v`` with each quantization group clamped to the fraction of its range (from :data:`CLIP_GRID`)
    whose round-to-nearest quantization has the least squared error against ``v`` (each column's error
    times ``col_weight[j]`` if given). The plan's min/max quantizer, run on the result, then lands on those
    clipped ranges: clipping is held in the weights, so the packed format does not change."""
    import torch

    w = v if mask is None or not mask.numel() else v * mask
    lo, hi = _group_range(_grouped(w, group_size), symmetric)
    best_err = best_a = None
    for a in CLIP_GRID:
        deq = quantize_matrix(_clamp_groups(w, group_size, lo, hi, a), bits, group_size, symmetric)[0]
        sq = (deq - w) ** 2 if col_weight is None else (deq - w) ** 2 * col_weight
        err = _grouped(sq, group_size).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_a = err, torch.full_like(err, a)
        else:
            better = err < best_err
            best_err, best_a = torch.where(better, err, best_err), torch.where(better, torch.full_like(err, a), best_a)
    return _clamp_groups(v, group_size, lo, hi, best_a)


def _grouped(v: Any, group_size: int) -> Any:
    """``[rows, cols]`` -> ``[rows, groups, group_size]``, zero-padded: the quantizer's groups."""
    import torch

    rows, cols = v.shape
    g = group_size or cols
    n = -(-cols // g)
    return torch.nn.functional.pad(v, (0, n * g - cols)).reshape(rows, n, g)


def _group_range(x: Any, symmetric: bool) -> tuple[Any, Any]:
    """Per group (``[rows, groups, 1]``) the range the quantizer spans: ±max|x|, or [min, max] widened to 0."""
    if symmetric:
        hi = x.abs().amax(-1, keepdim=True)
        return -hi, hi
    return x.amin(-1, keepdim=True).clamp(max=0.0), x.amax(-1, keepdim=True).clamp(min=0.0)


def _clamp_groups(v: Any, group_size: int, lo: Any, hi: Any, ratio: Any) -> Any:
    """``v`` with every group clamped to ``ratio`` times its range ``[lo, hi]``."""
    import torch

    rows, cols = v.shape
    x = _grouped(v, group_size)
    return torch.maximum(torch.minimum(x, ratio * hi), ratio * lo).reshape(rows, -1)[:, :cols]
