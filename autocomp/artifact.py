"""The packed export (docs/FORMAT.md) and loading it back as a runnable model.

``export(model_or_student, plan, path)`` writes one safetensors file: every layer's arrays as the format
specifies (bit-packed codes, float16 scales, packed zero-points, masks / 2:4 indices, low-rank factors,
biases), one keep-bitmask per structured group, every other parameter as stored, and as metadata the
plan, the model spec, the calibration-data spec, the model's layout fingerprint and a SHA-256 of the
tensor payload. The tensor payload is exactly ``autocomp.cost.size.plan_bytes(desc, plan)``.

``load(path)`` rebuilds the architecture from the recorded model spec, checks the layout fingerprint and
the payload checksum (a truncated or altered file is refused, never half-loaded), decodes every layer
and returns the model in eval mode. Its outputs equal the fake-quantized student's (bit-exact weights;
tolerance stated in the tests: max |difference| <= 1e-5 x max |output|).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from autocomp.errors import AutocompError
from autocomp.plan import Plan

__all__ = ["export", "load", "FORMAT_VERSION"]

FORMAT_VERSION = "1"


def _checksum(arrays: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(arrays[name].tobytes())
    return h.hexdigest()


def export(model: Any, plan: Plan, path: str | Path, spec: str | None = None, data_spec: str | None = None,
           desc: Any = None) -> dict[str, Any]:
    """Pack ``model`` (a plain model or a :func:`~autocomp.prepare_for_training` student) under ``plan``.

    -> ``{"path", "predicted_bytes", "payload_bytes", "file_bytes"}``. ``spec`` (how to rebuild the
    architecture: ``minilm``, ``file.py:fn``, ``pkg.module:fn``, ``hf:DIR``) defaults to the plan's."""
    import numpy as np
    from safetensors.numpy import save_file

    from autocomp.compressors.pipeline import pack_layer
    from autocomp.compressors.student import compressed_layers, compressed_parts, finalize, prepare_for_training
    from autocomp.cost.size import plan_bytes

    student = model if compressed_layers(model) or getattr(model, "_autocomp_plan", None) is not None else None
    if student is None:
        student = prepare_for_training(model, plan, desc)
    desc = desc or student._autocomp_desc  # noqa: SLF001
    spec = spec or plan.model_spec
    if not spec:
        raise AutocompError("the plan names no model; pass spec= (e.g. 'file.py:fn') so load() can rebuild it")
    parts_by_layer = compressed_parts(student)
    plain = finalize(student)
    from autocomp.models.introspect import compressible_modules

    mods = compressible_modules(plain)
    arrays: dict[str, np.ndarray] = {}
    layer_params = set()
    for layer in desc.layers:
        mod, kind = mods[layer.name]
        layer_params.add(f"{layer.name}.weight")
        bias = getattr(mod, "bias", None)
        if bias is not None:
            layer_params.add(f"{layer.name}.bias")
        if layer.name in parts_by_layer:
            parts, rows, _ = parts_by_layer[layer.name]
            kept_bias = None if bias is None else (bias.detach()[rows] if rows is not None and bias.numel() == layer.rows else bias.detach())
            arrays.update(pack_layer(layer.name, parts, plan.layer(layer.name), bias=kept_bias))
        else:
            from autocomp.compressors.base import Part
            from autocomp.models.introspect import weight_matrix_view
            from autocomp.plan import LayerPlan

            m = weight_matrix_view(kind, mod.weight.detach())
            arrays.update(pack_layer(layer.name, [Part(values=m)], LayerPlan(), dtype=str(m.numpy().dtype),
                                     bias=None if bias is None else bias.detach()))
    layers_now = compressed_layers(student)
    for gname, g in sorted(plan.structured.items()):
        if g.keep >= g.units:
            continue
        _, p = layers_now[g.producers[0]]  # the units the student kept (chosen once from the original weights)
        units = np.unique(p.rows.numpy() // (p.full_shape[0] // g.units))
        keep = np.zeros(g.units, dtype=bool)
        keep[units] = True
        arrays[f"structured.{gname}.keep"] = np.packbits(keep, bitorder="little")
    for name, prm in plain.named_parameters():
        if name not in layer_params:
            arrays[name] = prm.detach().cpu().numpy()
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    payload = int(sum(a.nbytes for a in arrays.values()))
    predicted = plan_bytes(desc, plan)
    meta = {"autocomp_format": FORMAT_VERSION, "plan": json.dumps(plan.to_dict(), separators=(",", ":")),
            "model_spec": spec, "data_spec": data_spec or "", "fingerprint": desc.fingerprint,
            "payload_sha256": _checksum(arrays)}
    from autocomp.files import atomic_write

    path = atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=meta))
    return {"path": str(path), "predicted_bytes": int(predicted), "payload_bytes": payload,
            "file_bytes": path.stat().st_size}


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of any safetensors file (read from its header only), or a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise AutocompError(f"file {str(p)!r} does not exist")
    try:
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        return dict(header.get("__metadata__") or {})
    except (ValueError, OSError, UnicodeDecodeError, AttributeError) as e:
        raise AutocompError(f"{str(p)!r} is not a safetensors file ({e}); re-export it") from None


def read_header(path: str | Path) -> dict[str, str]:
    """The metadata of an export file, or a one-line error if it is not one."""
    meta = safetensors_metadata(path)
    if meta.get("autocomp_format") != FORMAT_VERSION:
        raise AutocompError(f"{str(path)!r} is not an autocomp export (format {meta.get('autocomp_format')!r}); "
                            f"make one with `autocomp export`")
    return meta


def load(path: str | Path, model: Any = None) -> Any:
    """Rebuild the model stored by :func:`export` (eval mode). ``model``: an instance of the architecture
    to fill, instead of rebuilding it from the recorded spec."""
    import numpy as np
    import torch
    from safetensors.numpy import load_file

    from autocomp.compressors.pipeline import unpack_layer
    from autocomp.compressors.structured import kept_index, scatter
    from autocomp.models.introspect import compressible_modules, matrix_to_weight, weight_matrix_view

    meta = read_header(path)
    try:
        arrays = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated / inconsistent files
        raise AutocompError(f"{str(path)!r} is damaged or truncated ({type(e).__name__}: {e}); re-export it") from None
    if _checksum(arrays) != meta.get("payload_sha256"):
        raise AutocompError(f"{str(path)!r} is damaged: its tensors do not match the recorded checksum; re-export it")
    plan = Plan.from_dict(json.loads(meta["plan"]))
    if model is None:
        from autocomp.models import load_model

        model = load_model(meta["model_spec"], data=meta.get("data_spec") or None).module
    from autocomp.models.attention import split_attention
    from autocomp.models.introspect import fingerprint

    split_attention(model)  # as every loaded model is (a no-op when it has no nn.MultiheadAttention)

    if fingerprint(model) != meta["fingerprint"]:
        raise AutocompError(f"{str(path)!r} was exported from a model with another layout than "
                            f"{meta['model_spec']!r} has now")
    mods = compressible_modules(model)
    keep_units = {}
    for gname, g in plan.structured.items():
        if g.keep < g.units:
            bits = np.unpackbits(arrays[f"structured.{gname}.keep"], bitorder="little")[: g.units].astype(bool)
            keep_units[gname] = torch.from_numpy(np.flatnonzero(bits))
    state = {}
    seen = set()
    with torch.no_grad():
        for name, (mod, kind) in mods.items():
            if id(mod.weight) in seen:
                continue
            seen.add(id(mod.weight))
            full = weight_matrix_view(kind, mod.weight)
            rows_full, cols_full = full.shape
            rows = cols = None
            for gname, units in keep_units.items():
                g = plan.structured[gname]
                if name in g.producers:
                    rows = kept_index(units, rows_full, g.units)
                if name in g.consumers:
                    cols = kept_index(units, cols_full, g.units)
            rn = len(rows) if rows is not None else rows_full
            cn = len(cols) if cols is not None else cols_full
            c = plan.layer(name)
            sub = torch.from_numpy(unpack_layer(arrays, name, c, rn, cn))
            dense = scatter(sub, rows, cols, (rows_full, cols_full))
            mod.weight.data = matrix_to_weight(kind, dense, mod.weight).contiguous()
            bias = getattr(mod, "bias", None)
            if bias is not None:
                stored = torch.from_numpy(arrays[f"{name}.bias"].copy())
                if rows is not None and bias.numel() == rows_full:
                    nb = torch.zeros_like(bias.data)
                    nb[rows] = stored.to(bias.dtype)
                    bias.data = nb
                else:
                    bias.data = stored.to(bias.dtype).reshape(bias.shape)
            for hook in c.input_hooks():
                mod.register_forward_pre_hook(hook)
        layer_params = {f"{n}.{k}" for n in mods for k in ("weight", "bias")}
        for pname, prm in model.named_parameters():
            if pname in layer_params:
                continue
            if pname not in arrays:
                raise AutocompError(f"{str(path)!r} has no tensor {pname!r}; re-export it")
            state[pname] = prm
            prm.data = torch.from_numpy(arrays[pname].copy()).to(prm.dtype).reshape(prm.shape)
    model._autocomp_plan = plan  # noqa: SLF001
    return model.eval()
