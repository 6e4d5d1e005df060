"""Find the compressible layers of a real model and measure their FLOPs with a real forward pass."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from autocomp.desc import LayerDesc, ModelDesc
from autocomp.errors import AutocompError
from autocomp.models.base import LoadedModel, check_pairs, run_batch

__all__ = ["introspect", "describe_static", "kept_parameters", "compressible_modules", "fingerprint", "weight_matrix_view", "matrix_to_weight",
           "MODALITY_PATTERNS"]

# first match wins; names are lower-cased before matching
MODALITY_PATTERNS: tuple[tuple[str, str], ...] = (
    ("fusion", r"(fusion|cross_?attn|crossattention|multi_?modal|mm_projector|visual_projection|text_projection|logit_scale)"),
    ("vision", r"(vision|visual|image|pixel|patch|vit\b|conv_stem)"),
    ("audio", r"(audio|speech|wav|mel|acoustic)"),
    ("text", r"(text|token|word|lm_head|embed_tokens|bert|roberta)"),
)
_BLOCK = re.compile(r"\.(\d+)(?:\.|$)")
# aten ops that do no arithmetic (views) or whose FLOPs FlopCounterMode already counts (matmuls)
VIEW_OPS = frozenset({"view", "_unsafe_view", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
                      "squeeze", "t", "detach", "alias", "as_strided", "split", "unbind", "reshape", "lift_fresh",
                      "_reshape_alias", "empty", "empty_like", "zeros", "ones", "arange", "full", "scalar_tensor"})
MATMUL_OPS = frozenset({"mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "convolution", "_scaled_dot_product_flash_attention",
                        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_attention_math"})


def _layer_type(module: Any) -> str | None:
    import torch

    if isinstance(module, torch.nn.Linear):
        return "Linear"
    if isinstance(module, torch.nn.Conv2d):
        return "Conv2d"
    if isinstance(module, torch.nn.Conv1d):
        return "Conv1d"
    if isinstance(module, torch.nn.Embedding):
        return "Embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers GPT-2 style
        return "Conv1D"
    return None


def compressible_modules(model: Any) -> dict[str, tuple[Any, str]]:
    """module path -> (module, type name) for every Linear / Conv1d / Conv2d / Embedding / Conv1D."""
    out = {}
    for name, mod in model.named_modules():
        kind = _layer_type(mod)
        if kind is not None and getattr(mod, "weight", None) is not None and name:
            out[name] = (mod, kind)
    return out


def weight_matrix_view(kind: str, weight: Any) -> Any:
    """The weight as ``rows x cols`` (outputs x inputs). A view where possible."""
    if kind == "Conv1D":
        return weight.t()
    if weight.dim() > 2:
        return weight.reshape(weight.shape[0], -1)
    return weight


def matrix_to_weight(kind: str, matrix: Any, weight: Any) -> Any:
    """Inverse of :func:`weight_matrix_view`: ``matrix`` (rows x cols) in ``weight``'s shape and dtype."""
    w = matrix.t() if kind == "Conv1D" else matrix
    return w.reshape(weight.shape).to(weight.dtype)


def fingerprint(model: Any) -> str:
    """Hash of parameter names and shapes: plans made for one architecture do not apply to another."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()[:16]


def _module_heads(model: Any) -> dict[str, int]:
    """Attention modules' head counts, read from their attributes (``num_heads``, ``num_attention_heads``,
    ``n_head``, or ``head_dim`` with a q projection): what ``heads: auto`` in a space uses."""
    out = {}
    for name, mod in model.named_modules():
        n = next((getattr(mod, a) for a in ("num_heads", "num_attention_heads", "n_head")
                  if isinstance(getattr(mod, a, None), int)), None)
        if n is None and isinstance(getattr(mod, "head_dim", None), int):
            q = next((getattr(mod, a) for a in ("q_proj", "query", "q") if hasattr(getattr(mod, a, None), "out_features")), None)
            n = q.out_features // mod.head_dim if q is not None and mod.head_dim else None
        if n and name:
            out[name] = int(n)
    return out


def _modality(name: str, default: str) -> str:
    low = name.lower()
    for tag, pattern in MODALITY_PATTERNS:
        if re.search(pattern, low):
            return tag
    return default


def _batch_size(batch: Any) -> int:
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = list(batch.values()) if isinstance(batch, dict) else list(batch)
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    return 1


_WEIGHT_MATMULS = frozenset({"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"})


def _OpCounter(inside: list[int], weights: dict[int, str] | None = None) -> Any:
    """Counts aten operations (and their output bytes) that run outside the compressible layers.

    ``weights`` (storage address -> layer name): a matrix multiply outside every layer's forward whose
    operand is a layer's weight (a parent calling ``F.linear(x, layer.weight)``, a fused attention kernel,
    a tied output head) is that layer's work: its FLOPs, counted from the operands' shapes, go to the layer
    (``self.layer_flops``), so a layer's cost never depends on its forward hook firing."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import flop_registry

    by_storage = weights or {}

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0
            self.nbytes = 0
            self.elements: dict[str, int] = {}  # op name -> output elements (views and matmuls excluded)
            self.layer_flops: dict[str, int] = {}
            self.attention_flops = 0
            self._in_attention = 0

        def _attribute(self, args: Any, out: Any) -> None:
            mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
            owner = next((by_storage[a.untyped_storage().data_ptr()] for a in mats
                          if a.untyped_storage().data_ptr() in by_storage), None)
            if owner is None or len(mats) < 2 or not isinstance(out, torch.Tensor):
                return
            k = mats[0].shape[-1]  # the contraction dimension: the first matrix's columns
            self.layer_flops[owner] = self.layer_flops.get(owner, 0) + 2 * out.numel() * int(k)

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            packet = func.overloadpacket
            sdpa = "scaled_dot_product" in packet.__name__ and "backward" not in packet.__name__ \
                and packet not in flop_registry
            if sdpa and not self._in_attention:
                # a fused attention op torch's FlopCounterMode does not price (on CPU: the composite
                # scaled_dot_product_attention and its flash kernel), counted once at the outermost call:
                # Q K^T and P V, 2 * B * H * L * S * (d_qk + d_v)
                q, k, v = args[:3]
                self.attention_flops += 2 * q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
            self._in_attention += sdpa
            try:
                out = func(*args, **(kwargs or {}))
            finally:
                self._in_attention -= sdpa
            if not inside[0]:
                self.count += 1
                tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                name = func.overloadpacket.__name__
                if name in _WEIGHT_MATMULS and by_storage:
                    self._attribute(args, out)
                if name not in VIEW_OPS and name not in MATMUL_OPS and tensors:
                    n = tensors[0].numel()
                    self.elements[name] = self.elements.get(name, 0) + n
                    self.nbytes += sum(t.numel() * t.element_size() for t in tensors)
            return out

    return Counter()


def _seq_len(batch: Any) -> int | None:
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    return int(ids.shape[1]) if ids is not None and ids.dim() == 2 else None


def kept_parameters(model: Any, layer_param_ids: set[int]) -> list[dict[str, Any]]:
    """Every parameter outside the compressible layers, with why it stays as it is:
    ``{"name", "shape", "bytes", "reason"}`` (a tied parameter once, under its first name)."""
    owners = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), (type(mod).__name__, pname))
    out = []
    for name, p in model.named_parameters():  # deduplicated by torch
        if id(p) in layer_param_ids:
            continue
        owner, attr = owners.get(id(p), ("?", name))
        if p.dim() < 2:
            reason = "a vector or scalar (bias, norm, scale): kept as it is"
        elif owner in ("Linear", "Conv1d", "Conv2d", "Embedding", "Conv1D"):
            reason = f"{owner}.{attr} is not the layer's weight: kept as it is"
        else:
            reason = (f"{owner}.{attr}: a {p.dim()}-D parameter outside any Linear / Conv1d / Conv2d / Embedding / "
                      f"Conv1D layer (autocomp has no unit for it): kept as it is")
        out.append({"name": name, "shape": list(p.shape), "bytes": p.numel() * p.element_size(), "reason": reason})
    return out


def describe_static(loaded: LoadedModel) -> ModelDesc:
    """Like :func:`introspect` without the forward pass (FLOPs stay 0)."""
    return introspect(loaded, measure=False)


@dataclass
class _Measured:
    """What one forward pass on calibration batch 0 showed (hooks on every module, a FLOP counter, an
    operation counter outside the layers)."""

    flops: dict[str, int] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    elementwise: int = 0
    calls: int = 0
    total_flops: int = 0
    ops: Any = None
    batch: Any = None
    bs: int = 1


def _layer_hook(m: _Measured, name: str, kind: str) -> Any:
    def fn(mod: Any, inputs: Any, output: Any) -> None:
        x = inputs[0]
        w = weight_matrix_view(kind, mod.weight)
        if kind == "Embedding":
            f, pos = 0, x.numel()
        elif kind in ("Linear", "Conv1D"):
            pos = x.numel() // w.shape[1]
            f = 2 * pos * w.shape[0] * w.shape[1]
        else:  # conv: 2 * output elements * (in / groups * kernel)
            pos = output.numel() // w.shape[0]
            f = 2 * output.numel() * mod.weight[0].numel()
        m.flops[name] = m.flops.get(name, 0) + int(f)
        m.positions[name] = m.positions.get(name, 0) + int(pos)
    return fn


def _measure(loaded: LoadedModel, mods: dict[str, tuple[Any, str]]) -> _Measured:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model, m = loaded.module, _Measured()

    def elementwise_hook(mod: Any, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):  # read + write of the output-sized tensor
            m.elementwise += 2 * output.numel() * output.element_size()

    def call_hook(mod: Any, inputs: Any, output: Any) -> None:
        m.calls += 1

    handles = [mod.register_forward_hook(_layer_hook(m, n, k)) for n, (mod, k) in mods.items()]
    handles += [mod.register_forward_hook(elementwise_hook) for mod in model.modules()
                if not list(mod.children()) and _layer_type(mod) is None and not isinstance(mod, torch.nn.Dropout)]
    handles += [mod.register_forward_hook(call_hook) for mod in model.modules() if _layer_type(mod) is None]
    inside = [0]
    handles += [mod.register_forward_pre_hook(lambda *a: inside.__setitem__(0, inside[0] + 1)) for mod, _ in mods.values()]
    handles += [mod.register_forward_hook(lambda *a: inside.__setitem__(0, inside[0] - 1)) for mod, _ in mods.values()]
    first: dict[int, str] = {}
    for n, (mod, _) in mods.items():  # a tied weight belongs to the first layer holding it (the listed one)
        first.setdefault(mod.weight.untyped_storage().data_ptr(), n)
    m.ops = _OpCounter(inside, first)
    m.batch = loaded.batches[0]
    for i, b in enumerate(loaded.batches):
        check_pairs(b, i)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter, m.ops:
            run_batch(model, m.batch)
        m.total_flops = int(counter.get_total_flops()) + m.ops.attention_flops
    except AutocompError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise AutocompError(f"calibration batch 0 does not fit model {loaded.spec!r}: {type(e).__name__}: {msg}") from None
    finally:
        for h in handles:
            h.remove()
    m.bs = max(1, _batch_size(m.batch))
    for name, f in m.ops.layer_flops.items():  # work done with a layer's weight outside its forward
        m.flops[name] = m.flops.get(name, 0) + f
        mod, kind = mods[name]
        w = weight_matrix_view(kind, mod.weight)
        m.positions[name] = m.positions.get(name, 0) + f // (2 * w.shape[0] * w.shape[1])
    return m


def introspect(loaded: LoadedModel, measure: bool = True) -> ModelDesc:
    """Describe every compressible layer; FLOPs per sample come from a forward on the first batch."""
    import torch

    model = loaded.module
    mods = compressible_modules(model)
    if not mods:
        raise AutocompError(
            f"model {loaded.spec!r} has no compressible layers (Linear, Conv1d, Conv2d, Embedding, Conv1D)"
        )
    measured = _measure(loaded, mods) if measure else _Measured()
    flops, positions, bs = measured.flops, measured.positions, measured.bs

    seen: set[int] = set()
    layer_param_ids: set[int] = set()
    layers = []
    tied: list[str] = []
    for name, (mod, kind) in mods.items():
        w = mod.weight
        if id(w) in seen:  # tied weight (e.g. lm_head tied to the embedding): compress it once
            tied.append(name)
            continue
        seen.add(id(w))
        rows, cols = weight_matrix_view(kind, w).shape
        b = getattr(mod, "bias", None)
        layer_param_ids.add(id(w))
        if isinstance(b, torch.nn.Parameter):
            layer_param_ids.add(id(b))
        m = _BLOCK.search(name)
        layers.append(LayerDesc(
            name=name, type=kind, rows=int(rows), cols=int(cols), weight_itemsize=w.element_size(),
            bias=int(b.numel()) if isinstance(b, torch.Tensor) else 0,
            bias_itemsize=b.element_size() if isinstance(b, torch.Tensor) else 4,
            flops_per_sample=flops.get(name, 0) // bs,
            block=int(m.group(1)) if m else None,
            modality=_modality(name, loaded.modality),
            groups=int(getattr(mod, "groups", 1)),
            positions=positions.get(name, 0) / bs,
        ))
    params = list(model.parameters())  # deduplicated by torch
    total_bytes = sum(p.numel() * p.element_size() for p in params)
    other = sum(p.numel() * p.element_size() for p in params if id(p) not in layer_param_ids)
    info = dict(loaded.info)
    info["default_modality"] = loaded.modality
    heads = _module_heads(model)
    if heads:
        info["module_heads"] = heads
    # every parameter outside the layers, by name, so bytes can be split by modality exactly
    info["other_param_bytes"] = {n: p.numel() * p.element_size() for n, p in model.named_parameters()
                                 if id(p) not in layer_param_ids}
    info["kept"] = kept_parameters(model, layer_param_ids)
    if measure:
        # matmul FLOPs outside the compressible layers (attention scores, a tied output head, ...) and
        # elementwise traffic
        ops = measured.ops
        listed = sum(f for n, f in flops.items() if n not in tied)
        info["other_flops_per_sample"] = max(0, measured.total_flops - listed) / bs
        info["elementwise_bytes_per_sample"] = measured.elementwise / bs
        info["module_calls"] = measured.calls  # calls of modules other than the compressible layers, per forward
        info["other_ops"] = ops.count  # tensor operations outside the compressible layers, per forward
        info["other_op_bytes_per_sample"] = ops.nbytes / bs  # their output bytes (written once, read once)
        info["other_op_elements_per_sample"] = {k: v / bs for k, v in sorted(ops.elements.items())}
        seq = _seq_len(measured.batch)
        if seq:
            info["seq_len"] = seq
    return ModelDesc(name=loaded.name, spec=loaded.spec, params=sum(p.numel() for p in params),
                     fp32_bytes=int(total_bytes), other_bytes=int(other), layers=tuple(layers),
                     fingerprint=fingerprint(model), info=info)
