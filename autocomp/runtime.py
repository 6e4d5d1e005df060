"""Turn a plan into a model that runs with the kernels the plan implies, on this CPU.

* W8A8 (``int8``) Linear layers become torch's dynamic-quantized int8 Linear
  (``torch.ao.nn.quantized.dynamic.Linear``, x86/fbgemm kernels), built from the plan's own integer codes
  and float16 scales, so the weights are exactly the ones the proxy evaluated; activations are quantized
  on the fly (per tensor, 7-bit ``reduce_range``), which the proxy simulates the same way. Measured here:
  1.7-2.2x faster than fp32 for MiniLM-sized layers; torchao 0.18's int8 dynamic path was ~25x slower
  than fp32 on this CPU (no fast CPU kernel), so torch's own kernels are used.
  ``int8f`` (W8A8 on ONNX Runtime's full 8-bit activation grid) runs as simulated, in float32: fbgemm's
  full-range path saturates its 16-bit pair sums, so torch has no exact kernel for it.
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
from autocomp.models.introspect import compressible_modules, weight_matrix_view
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


def _lowered(choice: LayerPlan, parts: list[Part], bias: Any, kernels: bool = True, built: list | None = None) -> Any:
    """The module running one Linear layer's parts: the techniques' own kernels where they have them
    (W8A8: int8) and ``kernels`` allows, dense fp32 otherwise, composed by a factor technique (low rank: two
    matmuls). ``built`` collects each (part, leaf Linear) pair."""
    steps = choice.steps()

    def linear(part: Part, b: Any) -> Any:
        for tech, config in steps if kernels else ():
            module = tech.runtime_linear(config, part, b)
            if module is not None:
                return module
        module = _dense_linear(part, b)
        if built is not None:
            built.append((part, module))
        return module

    for tech, config in steps:
        module = tech.runtime_graph(config, parts, bias, linear)
        if module is not None:
            return module
    if len(parts) != 1:
        raise ValueError(f"{len(parts)} stored parts and no technique that composes them at run time")
    return linear(parts[0], bias)


def _set_stored(mod: Any, kind: str, plan: Plan, name: str, layer_parts: Any, applier: Any) -> None:
    """A non-Linear layer's compressed weights, in place and in its own shape (cut units as zeros)."""
    import torch

    if applier is not None:
        w, b = applier.compressed(plan, name)  # (None, None) when the plan leaves it alone
    else:
        from autocomp.compressors.pipeline import reconstruct
        from autocomp.compressors.structured import scatter
        from autocomp.models.introspect import matrix_to_weight

        lp, rows, cols = layer_parts(plan, name)
        full = weight_matrix_view(kind, mod.weight.detach())
        w, b = matrix_to_weight(kind, scatter(reconstruct(lp), rows, cols, tuple(full.shape)), mod.weight), None
    if w is not None:
        with torch.no_grad():
            mod.weight.copy_(w)
            if b is not None:
                mod.bias.copy_(b)


def build_runtime_model(model: Any, desc: ModelDesc, plan: Plan, applier: PlanApplier | None = None,
                        kernels: bool = True, parts: Any = None, on_layer: Any = None) -> Any:
    """A new module (the original is untouched) that runs ``plan`` with real kernels.

    ``kernels=False``: every leaf a dense fp32 Linear (the ONNX export lowers them itself). ``parts``:
    ``name -> (parts, rows, cols)`` or None, instead of computing them from ``model``'s weights (a trained
    student's :func:`~autocomp.compressors.student.compressed_parts`). ``on_layer(name, [(part, module)])``
    is told which stored part each built leaf module holds (Embedding / Conv: the layer's module itself)."""
    import torch

    check_plan(plan, desc)
    if parts is None:
        applier = applier or PlanApplier(model, desc)  # computes parts from the original weights (cached)
        layer_parts = applier.layer_parts
    else:
        def layer_parts(plan: Plan, name: str) -> tuple[list[Part], Any, Any]:
            return parts(name) or ([Part(values=weight_matrix_view(kind_of[name], weight_of[name]))], None, None)

        mods0 = compressible_modules(model)
        kind_of = {n: k for n, (_, k) in mods0.items()}
        weight_of = {n: m.weight.detach() for n, (m, _) in mods0.items()}
    runtime = copy.deepcopy(model).eval()
    mods = compressible_modules(runtime)
    for layer in desc.layers:
        choice = plan.layer(layer.name)
        mod, kind = mods[layer.name]
        if kind != "Linear":  # Embedding / Conv / Conv1D: as stored, dequantized, masked
            _set_stored(mod, kind, plan, layer.name, layer_parts, applier)
            if on_layer is not None:
                lp, rows, cols = layer_parts(plan, layer.name)
                if rows is None and cols is None and len(lp) == 1:
                    on_layer(layer.name, [(lp[0], mod)])
            continue
        lp, rows, cols = layer_parts(plan, layer.name)
        if choice.is_identity and rows is None and cols is None:
            if on_layer is not None:
                on_layer(layer.name, [(lp[0], mod)])
            continue
        bias = mod.bias
        if bias is not None and rows is not None:
            bias = bias.detach()[rows]
        built: list = []
        new = _lowered(choice, lp, bias, kernels, built)
        if on_layer is not None:
            on_layer(layer.name, built)
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


