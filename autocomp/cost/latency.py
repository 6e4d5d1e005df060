"""Latency, BitOps and energy of a plan on a device, by arithmetic alone (no torch).

Per layer, a roofline: ``max(compute, memory) + overhead`` where

* compute = 2 x MACs / (peak[dtype] x efficiency) and MACs = positions x rows x cols after structured
  pruning (a low-rank layer is two matmuls, ``cols -> rank -> rows``);
* memory = (weight bytes as the device reads them + input and output activations) / (bandwidth x eff.);
* the dtype is what the device really runs, as each technique says of itself
  (:meth:`~autocomp.compressors.base.Technique.execution`): ``int8`` (W8A8) layers run int8 kernels where
  the device has them; bit-widths listed in ``weight_only_bits`` are read packed but computed in
  ``default_dtype``; anything else is dequantized and runs as ``default_dtype`` (saves bytes on disk, not
  time); 2:4 sparsity is faster only with ``sparse_2_4`` kernels, unstructured sparsity only with
  ``unstructured_sparse`` kernels.

Work outside the compressible layers (attention score matmuls, norms, activations) is included from
what introspection measured: ``other_flops_per_sample`` (scaled by seq^2) and the bytes those
operations move (scaled by seq); on calibrated devices also ``module_calls`` and ``other_ops`` (every
eager tensor operation outside the layers, counted with a dispatch mode, with its output elements per
operation type) at their measured fixed and per-element costs (GELU's erf is not an add). Structured head pruning does not shrink that term (it
is small). A device file calibrated on this machine replaces ``max(...) + overhead`` with a fitted
``a x compute + b x memory + c`` per kernel class (``dense``, ``int8``, ``other``).

BitOps convention: MACs x weight bits x activation bits over the compressible layers, MACs after
structured pruning and low-rank (dense MACs: unstructured zeros still count), weight bits = the plan's
bits (32 when kept as fp32), activation bits = 8 for W8A8 (``int8``) layers, else 32.

Energy: MACs x energy per MAC at the executed dtype + DRAM bytes x energy per byte (Horowitz, ISSCC'14;
``energy.yaml``), reported relative to the same model uncompressed on the same device.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from autocomp.compressors.pipeline import layer_execution
from autocomp.compressors.structured import structured_shape
from autocomp.cost.device import DTYPE_BITS, Device
from autocomp.desc import LayerDesc, ModelDesc
from autocomp.errors import AutocompError
from autocomp.plan import LayerPlan, Plan

__all__ = ["Workload", "parse_workload", "CostModel"]


@dataclass(frozen=True)
class Workload:
    batch: int = 1
    seq: int | None = None  # None: the calibration batch's sequence length

    def label(self) -> str:
        return f"{self.batch}x{self.seq}" if self.seq else str(self.batch)


def parse_workload(text: str | None, desc: ModelDesc) -> Workload:
    """``BATCHxSEQ`` (e.g. ``1x128``) or ``BATCH``. Default: batch 1, seq 128 for sequence models."""
    seq_model = "seq_len" in desc.info
    if not text:
        return Workload(1, min(128, int(desc.info.get("max_positions", 128))) if seq_model else None)
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < 1):
        raise AutocompError(f"--workload {text!r} is not BATCH or BATCHxSEQ with positive numbers (e.g. 1x128)")
    batch, seq = int(m.group(1)), int(m.group(2)) if m.group(2) else None
    if seq and not seq_model:
        raise AutocompError(f"--workload {text!r}: model {desc.spec!r} takes no sequence length; give only a batch size")
    max_pos = desc.info.get("max_positions")
    if seq and max_pos and seq > int(max_pos):
        raise AutocompError(f"--workload {text!r}: model {desc.spec!r} takes at most {max_pos} tokens per sequence")
    return Workload(batch, seq if seq else (min(128, int(max_pos or 128)) if seq_model else None))


@functools.lru_cache(maxsize=1)
def _energy_table() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parent / "energy.yaml").read_text())


def ort_class(ex: Any, group_size: int, k: int) -> str:
    """The ONNX Runtime kernel class of one matmul of a layer (its :class:`~autocomp.compressors.base.Execution`,
    the plan's quantization group, the matmul's K), as autocomp/ort.py lowers it: ``int8`` (W8A8),
    ``nbits<b>g<block>`` (weight-only in 2/4/8-bit containers), else ``fp32``."""
    from autocomp.compressors.quantize import nbits_block

    if ex.act_bits == 8:
        return "int8"
    for b in (2, 4, 8):
        if ex.store_bits <= b:
            block = nbits_block(group_size, k)
            return f"nbits{b}g{block}" if block else "fp32"
    return "fp32"


def _ort_fit(fits: Mapping[str, Any], cls: str, one_token: bool) -> Any:
    """A class's fit (its one-token fit at M = 1 when calibrated), else the same bits at the nearest calibrated
    block, else fp32."""
    names = [cls]
    if cls.startswith("nbits"):
        bits, block = cls[5:].split("g")
        near = sorted((abs(math.log2(int(k.split("g")[1]) / int(block))), k) for k in fits
                      if k.startswith(f"nbits{bits}g") and "@" not in k)
        names += [k for _, k in near]
    names.append("fp32")
    for name in names:
        if one_token and name + "@1" in fits:
            return fits[name + "@1"]
        if name in fits:
            return fits[name]
    raise AutocompError("the ort device file has no fp32 kernel fit; recalibrate it")


class CostModel:
    """Latency (seconds), BitOps and relative energy of plans for one (device, model, workload)."""

    def __init__(self, device: Device, desc: ModelDesc, workload: Workload | None = None) -> None:
        self.device = device
        self.desc = desc
        self.workload = workload or parse_workload(None, desc)
        self._memo: dict[Any, tuple[float, float, float, float]] = {}
        seq_cal = desc.info.get("seq_len")
        self._seq_ratio = (self.workload.seq / seq_cal) if (seq_cal and self.workload.seq) else 1.0
        e = _energy_table()
        self._mac_pj = {k: float(v["value"]) for k, v in e["mac_pj"].items()}
        self._dram_pj = float(e["dram_pj_per_byte"]["value"])
        self._base: tuple[float, float, float] | None = None
        # A whole-model correction fitted by `calibrate --model` on real runs of this very model (matched by
        # weight fingerprint): per-class scales on the kernel-level prediction plus a per-forward constant.
        e2e = (device.correction or {}).get("end_to_end")
        self._e2e = e2e if e2e and e2e.get("fingerprint") == desc.fingerprint else None
        # ONNX Runtime: per kernel group scales fitted by `calibrate --runtime ort` on exported plans of this
        # very model at this workload (:func:`autocomp.ort_hardware.fit_plans_ort`)
        ort_e2e = ((device.ort or {}).get("end_to_end") or {}) if device.runtime == "ort" else {}
        fitted = ort_e2e.get("fingerprint") == desc.fingerprint and ort_e2e.get("workload") == self.workload.label()
        self._ort_scales: dict[str, float] | None = ort_e2e.get("scales") if fitted else None

    # -- per layer ---------------------------------------------------------------------------------------
    def positions(self, layer: LayerDesc) -> float:
        p = layer.positions
        if p > 1.0:
            p *= self._seq_ratio
        return p * self.workload.batch

    def _combine(self, compute: float, memory: float, cls: str) -> float:
        corr = self.device.correction
        if corr and cls in corr:
            c = corr[cls]
            return c["compute"] * compute + c["memory"] * memory + c["overhead_s"]
        return max(compute, memory) + self.device.layer_overhead_s

    def _matmul(self, m: float, k: int, n: int, dtype: str, w_bits: float, speed: float, density: float) -> tuple[float, float, float]:
        d = self.device
        macs = m * k * n
        compute = 2 * macs * speed / (d.peak_ops[dtype] * d.eff_compute)
        w_bytes = k * n * w_bits / 8 * density
        dram = w_bytes + m * (k + n) * d.act_bytes
        return compute, dram / (d.memory_bandwidth * d.eff_memory), dram

    def layer(self, layer: LayerDesc, choice: LayerPlan, rows: int, cols: int) -> tuple[float, float, float, float]:
        """-> (seconds, bitops, energy pJ, MACs) for one layer at the workload."""
        key = (layer.name, choice, rows, cols)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        d = self.device
        m = self.positions(layer)
        if d.runtime == "ort":
            out = self._ort_layer(layer, choice, rows, cols, m)
            self._memo[key] = out
            return out
        if layer.type == "Embedding":  # a gather: memory only
            dram = m * cols * d.act_bytes
            seconds = self._combine(0.0, dram / (d.memory_bandwidth * d.eff_memory), "dense")
            out = (seconds * (self._e2e["dense"] if self._e2e else 1.0), 0.0, dram * self._dram_pj, 0.0)
            self._memo[key] = out
            return out
        ex = self.execution(layer, choice, rows, cols)
        seconds = energy = macs = 0.0
        scale = self._e2e[ex.kernel] if self._e2e else 1.0
        for k, n in ex.shapes:
            comp, mem, dram = self._matmul(m, k, n, ex.dtype, ex.read_bits, ex.speed, ex.density)
            seconds += scale * self._combine(comp, mem, ex.kernel)
            macs += m * k * n
            energy += m * k * n * self._mac_pj.get(ex.dtype, self._mac_pj["fp32"]) + dram * self._dram_pj
        out = (seconds, macs * ex.store_bits * ex.act_bits, energy, macs)
        self._memo[key] = out
        return out

    def _ort_layer(self, layer: LayerDesc, choice: LayerPlan, rows: int, cols: int, m: float) -> tuple[float, float, float, float]:
        """ONNX Runtime: each matmul at its kernel class's timed fit (``t = a MKN + b KN + c M(K+N) + d``,
        :func:`autocomp.ort_hardware.calibrate_ort`); an embedding gather per gathered element; each kernel
        group scaled as the whole-model fit says, where there is one for this model and workload."""
        parts, bitops, energy, macs = self._ort_parts(layer, choice, rows, cols, m)
        scales = self._ort_scales or {}
        return sum(t * float(scales.get(group, 1.0)) for group, t in parts.items()), bitops, energy, macs

    def _ort_parts(self, layer: LayerDesc, choice: LayerPlan, rows: int, cols: int,
                   m: float) -> tuple[dict[str, float], float, float, float]:
        """({kernel group: seconds} before any whole-model scale, bitops, energy pJ, MACs) of one layer in ONNX
        Runtime. Groups: ``fp32`` (MatMul), ``int8`` (W8A8), ``nbits`` (MatMulNBits), ``other`` (gathers)."""
        fits = self.device.ort["kernels"]  # type: ignore[index]
        if layer.type == "Embedding":
            c, d0 = fits["gather"]
            return {"other": c * m * cols + d0}, 0.0, m * cols * 4 * self._dram_pj, 0.0
        ex = self.execution(layer, choice, rows, cols)
        q = choice.get("quantize")
        parts: dict[str, float] = {}
        energy = macs = 0.0
        for k, n in ex.shapes:
            cls = ort_class(ex, q.group_size if q is not None else 0, k) if layer.type in ("Linear", "Conv1D") else "fp32"
            a, b, c, d0 = _ort_fit(fits, cls, m == 1)
            group = "nbits" if cls.startswith("nbits") else cls
            parts[group] = parts.get(group, 0.0) + a * m * k * n + b * k * n + c * m * (k + n) + d0
            macs += m * k * n
            w_bytes = k * n * min(ex.store_bits, 32.0) / 8
            energy += m * k * n * self._mac_pj.get(ex.dtype, self._mac_pj["fp32"]) + w_bytes * self._dram_pj
        return parts, macs * ex.store_bits * ex.act_bits, energy, macs

    def execution(self, layer: LayerDesc, choice: LayerPlan, rows: int, cols: int) -> Any:
        """How the layer runs on this device (:class:`~autocomp.compressors.base.Execution`)."""
        d = self.device
        return layer_execution(layer, choice, rows, cols, d, d.default_dtype, DTYPE_BITS[d.default_dtype])

    # -- whole model ---------------------------------------------------------------------------------------
    def other_cost(self) -> tuple[float, float]:
        """(seconds, energy pJ) of the work outside the compressible layers."""
        d, info = self.device, self.desc.info
        b, r = self.workload.batch, self._seq_ratio
        flops = float(info.get("other_flops_per_sample", 0.0)) * b * r**2  # attention scores ~ seq^2
        if d.runtime == "ort":
            return self._ort_other(flops), flops / 2 * self._mac_pj["fp32"]
        compute = flops / (d.peak_ops[d.default_dtype] * d.eff_compute)
        corr = d.correction or {}
        if "op_element_s" in corr:
            # calibrated: attention matmuls at the fitted rate, every eager module call and tensor operation
            # outside the layers at its measured fixed cost, and each operation's output elements at the
            # measured per-element cost of that operation (unknown operations priced as an add)
            per = corr["op_element_s"]
            elems = info.get("other_op_elements_per_sample", {})
            work = sum(n * b * (r * r if op == "softmax" else r) * per.get(op, per.get("add", 0.0))
                       for op, n in elems.items())
            a = corr.get("other", {}).get("compute", 1.0)
            seconds = (a * compute + float(info.get("module_calls", 0)) * corr.get("module_call_s", 0.0)
                       + float(info.get("other_ops", 0)) * corr.get("op_s", 0.0) + work)
            moved = 2.0 * sum(elems.values()) * b * r * d.act_bytes
        else:
            moved = float(info.get("elementwise_bytes_per_sample", 0.0)) * b * r * d.act_bytes / 4
            seconds = compute + moved / (d.memory_bandwidth * d.eff_memory)
        energy = flops / 2 * self._mac_pj.get(d.default_dtype, 4.6) + moved * self._dram_pj
        if self._e2e:
            seconds = seconds * self._e2e["other"] + self._e2e["intercept_s"]
        return seconds, energy

    def _ort_other(self, flops: float) -> float:
        """ONNX Runtime's time outside the layers: for the calibrated model, its measured fit over tokens
        (``u + v T + w T^2``, T = batch x sequence); for another model, its attention FLOPs at the fp32 rate."""
        ort = self.device.ort or {}
        e2e = ort.get("end_to_end") or {}
        if e2e.get("fingerprint") == self.desc.fingerprint:
            u, v, w = e2e["other"]
            t = self.workload.batch * (self.workload.seq or 1)
            return (u + v * t + w * t * t / max(self.workload.batch, 1)) * float((self._ort_scales or {}).get("other", 1.0))
        return flops / 2 * ort["kernels"]["fp32"][0]

    def _raw(self, plan: Plan) -> tuple[float, float, float]:
        seconds, energy = self.other_cost()
        bitops = 0.0
        for layer in self.desc.layers:
            rows, cols = structured_shape(layer, plan.structured)
            s, b, e, _ = self.layer(layer, plan.layer(layer.name), rows, cols)
            seconds, bitops, energy = seconds + s, bitops + b, energy + e
        return seconds, bitops, energy

    def evaluate(self, plan: Plan) -> dict[str, float]:
        """{"latency_ms", "bitops" (GBitOps), "energy" (relative to the uncompressed model)}."""
        if self._base is None:
            self._base = self._raw(Plan(layers={}))
        seconds, bitops, energy = self._raw(plan)
        return {"latency_ms": seconds * 1e3, "bitops": bitops / 1e9, "energy": energy / self._base[2]}

    def latency_ms(self, plan: Plan) -> float:
        return self.evaluate(plan)["latency_ms"]

    def ort_breakdown(self, plan: Plan) -> dict[str, float]:
        """ONNX Runtime: seconds per kernel group (``fp32``, ``int8``, ``nbits``; gathers and the rest of the
        graph as ``other``) before the whole-model scales -- the features `calibrate --runtime ort` fits on."""
        saved, self._ort_scales = self._ort_scales, None
        try:
            out = {"fp32": 0.0, "int8": 0.0, "nbits": 0.0, "other": self.other_cost()[0]}
            for layer in self.desc.layers:
                rows, cols = structured_shape(layer, plan.structured)
                for group, t in self._ort_parts(layer, plan.layer(layer.name), rows, cols, self.positions(layer))[0].items():
                    out[group] += t
            return out
        finally:
            self._ort_scales = saved

    def breakdown(self, plan: Plan) -> dict[str, float]:
        """Kernel-level seconds per class (``dense``, ``int8``, ``other``) before any whole-model
        correction: the features `calibrate --model` fits on."""
        saved, self._e2e, self._memo = self._e2e, None, {}
        try:
            out = {"dense": 0.0, "int8": 0.0, "other": self.other_cost()[0]}
            for layer in self.desc.layers:
                rows, cols = structured_shape(layer, plan.structured)
                choice = plan.layer(layer.name)
                cls = "dense" if layer.type == "Embedding" else self.execution(layer, choice, rows, cols).kernel
                out[cls] += self.layer(layer, choice, rows, cols)[0]
            return out
        finally:
            self._e2e, self._memo = saved, {}
