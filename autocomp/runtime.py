"""Turn a plan into a model that runs with the kernels the plan implies, on this CPU.

* W8A8 (``int8``) Linear layers become torch's dynamic-quantized int8 Linear
  (``torch.ao.nn.quantized.dynamic.Linear``, x86/fbgemm kernels), built from the plan's own integer codes
  and float16 scales, so the weights are exactly the ones the proxy evaluated; activations are quantized
  on the fly (per tensor, 7-bit ``reduce_range``), which the proxy simulates the same way. Measured here:
  1.7-2.2x faster than fp32 for MiniLM-sized layers; torchao 0.18's int8 dynamic path was ~25x slower
  than fp32 on this CPU (no fast CPU kernel), so torch's own kernels are used.
* Structured pruning physically removes the rows of producers and the columns of consumers, so the
  matmuls shrink (attention modules infer their head count from the shapes).
* Low-rank layers become two smaller Linear layers (``cols -> rank -> rows``).
* Everything else runs as stored, dequantized to fp32: sub-8-bit weights and sparse weights save bytes,
  not time, on this CPU (no such kernels), exactly as the latency model says.

Tolerance (tests/test_runtime.py): without W8A8 layers the real model matches the simulated (proxy)
model to float rounding (max abs difference <= 1e-4; 1e-7 measured on MiniLM). With W8A8 layers each
layer matches its simulation to ~1e-6, but a 1e-6 difference can flip the rounding of a next layer's
activation code, so outputs differ by up to about one activation step; the tolerance is on the proxy:
real and simulated drift from the original agree within 25% (MiniLM uniform int8: 0.0247 vs 0.0239).
"""

from __future__ import annotations

import copy
from typing import Any

from autocomp.compressors.apply import PlanApplier, check_plan
from autocomp.compressors.base import Part
from autocomp.desc import ModelDesc
from autocomp.models.introspect import compressible_modules
from autocomp.plan import LayerPlan, Plan

__all__ = ["build_runtime_model", "measure_latency_ms"]


def _dense_linear(part: Part, bias: Any) -> Any:
    import torch

    values = part.values if part.mask is None else part.values * part.mask
    rows, cols = values.shape
    layer = torch.nn.Linear(cols, rows, bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(values)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.eval()


def _lowered(choice: LayerPlan, parts: list[Part], bias: Any) -> Any:
    """The module running one Linear layer's parts: the techniques' own kernels where they have them
    (W8A8: int8), dense fp32 otherwise, composed by a factor technique (low rank: two matmuls)."""
    steps = choice.steps()

    def linear(part: Part, b: Any) -> Any:
        for tech, config in steps:
            module = tech.runtime_linear(config, part, b)
            if module is not None:
                return module
        return _dense_linear(part, b)

    for tech, config in steps:
        module = tech.runtime_graph(config, parts, bias, linear)
        if module is not None:
            return module
    if len(parts) != 1:
        raise ValueError(f"{len(parts)} stored parts and no technique that composes them at run time")
    return linear(parts[0], bias)


def build_runtime_model(model: Any, desc: ModelDesc, plan: Plan, applier: PlanApplier | None = None) -> Any:
    """A new module (the original is untouched) that runs ``plan`` with real kernels."""
    import torch

    check_plan(plan, desc)
    applier = applier or PlanApplier(model, desc)  # computes parts from the original weights (cached)
    runtime = copy.deepcopy(model).eval()
    mods = compressible_modules(runtime)
    for layer in desc.layers:
        choice = plan.layer(layer.name)
        mod, kind = mods[layer.name]
        if kind != "Linear":  # Embedding / Conv / Conv1D: as stored, dequantized, masked
            w, b = applier.compressed(plan, layer.name)  # (None, None) when the plan leaves it alone
            if w is not None:
                with torch.no_grad():
                    mod.weight.copy_(w)
                    if b is not None:
                        mod.bias.copy_(b)
            continue
        parts, rows, cols = applier.layer_parts(plan, layer.name)
        if choice.is_identity and rows is None and cols is None:
            continue
        bias = mod.bias
        if bias is not None and rows is not None:
            bias = bias.detach()[rows]
        new = _lowered(choice, parts, bias)
        parent_name, _, attr = layer.name.rpartition(".")
        parent = runtime.get_submodule(parent_name) if parent_name else runtime
        setattr(parent, attr, new)
    for g in plan.structured.values():  # keep head-count attributes consistent where a module has them
        if g.kind == "heads" and g.keep < g.units:
            parent = runtime.get_submodule(g.producers[0].rpartition(".")[0])
            if hasattr(parent, "num_attention_heads"):
                parent.num_attention_heads = g.keep
            if isinstance(getattr(parent, "num_heads", None), int):  # autocomp's SplitAttention, CLIP-style
                parent.num_heads = g.keep
            if hasattr(parent, "all_head_size"):
                parent.all_head_size = g.keep * g.unit_size
    return runtime


def measure_latency_ms(model: Any, batch: Any, warmup: int = 3, runs: int = 10) -> float:
    """Median wall time of a forward pass (inference mode), warm-up runs excluded."""
    import time

    import torch

    from autocomp.models.base import run_batch

    with torch.inference_mode():
        for _ in range(warmup):
            run_batch(model, batch)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            run_batch(model, batch)
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


