"""Latency, BitOps and energy of a plan on a device, by arithmetic alone (no torch).

Per layer, a roofline: ``max(compute, memory) + overhead`` where

* compute = 2 x MACs / (peak[dtype] x efficiency) and MACs = positions x rows x cols after structured
  pruning (a low-rank layer is two matmuls, ``cols -> rank -> rows``);
* memory = (weight bytes as the device reads them + input and output activations) / (bandwidth x eff.);
* the dtype is what the device really runs: ``int8`` (W8A8) layers run int8 kernels where the device has
  them; bit-widths listed in
  ``weight_only_bits`` are read packed but computed in ``default_dtype``; anything else is dequantized and
  runs as ``default_dtype`` (saves bytes on disk, not time); 2:4 sparsity is faster only with
  ``sparse_2_4`` kernels, unstructured sparsity only with ``unstructured_sparse`` kernels.

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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocomp.cost.device import DTYPE_BITS, Device
from autocomp.cost.size import structured_shape
from autocomp.desc import LayerDesc, ModelDesc
from autocomp.errors import AutocompError
from autocomp.plan import LayerPlan, Plan

__all__ = ["Workload", "parse_workload", "CostModel", "runs_int8"]


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


def runs_int8(device: Device | None, choice: LayerPlan) -> bool:
    """Whether a layer runs W8A8 int8 kernels (real ones on this CPU: torch's dynamic quantized Linear)."""
    return choice.act_bits == 8 and (device is None or device.int8)


@functools.lru_cache(maxsize=1)
def _energy_table() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parent / "energy.yaml").read_text())


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
        if layer.type == "Embedding":  # a gather: memory only
            dram = m * cols * d.act_bytes
            seconds = self._combine(0.0, dram / (d.memory_bandwidth * d.eff_memory), "dense")
            out = (seconds * (self._e2e["dense"] if self._e2e else 1.0), 0.0, dram * self._dram_pj, 0.0)
            self._memo[key] = out
            return out
        int8 = runs_int8(d, choice)
        dtype = "int8" if int8 else d.default_dtype
        if int8:
            w_bits = 8.0
        elif choice.bits is not None and choice.bits in d.weight_only_bits:
            w_bits = float(choice.bits)
        else:
            w_bits = float(DTYPE_BITS[d.default_dtype])
        speed = density = 1.0
        if choice.prune == "2:4" and d.sparse_2_4:
            speed, density = 1.0 / d.sparse_2_4, 0.5 + 1 / max(w_bits, 1)  # values + 2-bit indices
        elif choice.prune == "unstructured" and d.unstructured_sparse:
            speed = density = 1.0 - choice.sparsity
        shapes = [(cols, rows)] if choice.rank is None else [(cols, choice.rank), (choice.rank, rows)]
        seconds = energy = macs = 0.0
        cls = "int8" if int8 else "dense"
        scale = self._e2e[cls] if self._e2e else 1.0
        for k, n in shapes:
            comp, mem, dram = self._matmul(m, k, n, dtype, w_bits, speed, density)
            seconds += scale * self._combine(comp, mem, cls)
            macs += m * k * n
            energy += m * k * n * self._mac_pj.get(dtype, self._mac_pj["fp32"]) + dram * self._dram_pj
        a_bits = 8 if choice.act_bits == 8 else 32
        w_store = choice.bits if choice.bits is not None else layer.weight_itemsize * 8
        out = (seconds, macs * w_store * a_bits, energy, macs)
        self._memo[key] = out
        return out

    # -- whole model ---------------------------------------------------------------------------------------
    def _other(self) -> tuple[float, float]:
        """(seconds, energy pJ) of the work outside the compressible layers."""
        d, info = self.device, self.desc.info
        b, r = self.workload.batch, self._seq_ratio
        flops = float(info.get("other_flops_per_sample", 0.0)) * b * r**2  # attention scores ~ seq^2
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

    def _raw(self, plan: Plan) -> tuple[float, float, float]:
        groups = {k: g for k, g in plan.structured.items() if g.keep < g.units}
        seconds, energy = self._other()
        bitops = 0.0
        for layer in self.desc.layers:
            rows, cols = structured_shape(layer, groups) if groups else (layer.rows, layer.cols)
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

    def breakdown(self, plan: Plan) -> dict[str, float]:
        """Kernel-level seconds per class (``dense``, ``int8``, ``other``) before any whole-model
        correction: the features `calibrate --model` fits on."""
        saved, self._e2e, self._memo = self._e2e, None, {}
        try:
            out = {"dense": 0.0, "int8": 0.0, "other": self._other()[0]}
            groups = {k: g for k, g in plan.structured.items() if g.keep < g.units}
            for layer in self.desc.layers:
                rows, cols = structured_shape(layer, groups) if groups else (layer.rows, layer.cols)
                choice = plan.layer(layer.name)
                cls = "int8" if layer.type != "Embedding" and runs_int8(self.device, choice) else "dense"
                out[cls] += self.layer(layer, choice, rows, cols)[0]
            return out
        finally:
            self._e2e, self._memo = saved, {}
