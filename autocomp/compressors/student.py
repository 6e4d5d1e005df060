"""The trainable form of a plan: a copy of the model in which every layer the plan touches computes with its
compressed weight, built from the techniques' trainable forms (:mod:`autocomp.compressors.base`).

Each such layer gets a ``torch.nn.utils.parametrize`` parametrization on its ``weight`` (the layer keeps its
type and name, so hooks and state dicts keep working) that

* cuts the structured-pruning rows / columns the plan removes (fixed: chosen once from the original
  weights, as the proxy did);
* starts from the latent matrices: the cut weight, or a ``factor`` technique's trainable matrices (low
  rank: ``B`` and ``A``, initialized from the proxy's truncated SVD);
* runs each stored matrix through the other techniques' ``train_transform`` in pipeline order (pruning:
  a fixed or progressively ramped mask; quantization: a straight-through fake quantizer);
* recombines the parts (``B @ A``), puts the cut rows / columns back as zeros, and reshapes.

At step 0 the student computes exactly what the proxy scored (tests/test_techniques.py), and
:func:`compressed_parts` packs exactly what it computes, so training, ``finalize`` and the packed export
are the same function and the size model stays exact. Techniques acting on inputs (W8A8) hook them with a
straight-through estimator.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from autocomp.errors import AutocompError
from autocomp.plan import LayerPlan, Plan

__all__ = ["prepare_for_training", "compressed_layers", "compressed_parts", "finalize", "set_progress",
           "start_training", "param_lr", "after_step", "CompressedWeight"]


def _module() -> type:
    import torch

    return torch.nn.Module


class CompressedWeight(_module()):  # type: ignore[misc]
    """Parametrization ``weight -> compressed weight`` for one layer (see the module docstring)."""

    def __init__(self, kind: str, weight: Any, choice: LayerPlan, rows: Any, cols: Any,
                 options: Mapping[str, Any]) -> None:
        import torch

        from autocomp.models.introspect import weight_matrix_view

        super().__init__()
        self.kind = kind
        self.frozen = False
        self.progressive = False
        self._cache: Any = None
        self.shape = tuple(weight.shape)
        self.choice = choice
        self.steps = choice.steps()
        full = weight_matrix_view(kind, weight.detach()).float()
        self.full_shape = tuple(full.shape)
        self.register_buffer("rows", rows if rows is not None else torch.empty(0, dtype=torch.long))
        self.register_buffer("cols", cols if cols is not None else torch.empty(0, dtype=torch.long))
        sub = self._cut(full)
        self.factor = None
        latents = [sub]
        for tech, config in self.steps:
            init = options["latents"] if "latents" in options and tech.stage == "factor" else tech.train_latent(config, sub)
            if init is not None:
                self.factor = tech
                self.factor_names = [f"{n}" for n in tech.part_names(config)]
                for n, v in zip(self.factor_names, init):
                    self.register_parameter(n, torch.nn.Parameter(v.detach().clone()))
                latents = [getattr(self, n) for n in self.factor_names]
        for tech, config in self.steps:
            if tech is not self.factor:
                tech.train_setup(config, self, [v.detach() for v in latents], options)

    def _cut(self, m: Any) -> Any:
        if self.rows.numel():
            m = m.index_select(0, self.rows)
        if self.cols.numel():
            m = m.index_select(1, self.cols)
        return m

    def latent(self, weight: Any) -> list[Any]:
        """The trainable stored matrices before the techniques' transforms."""
        if self.factor is not None:
            return [getattr(self, n) for n in self.factor_names]
        from autocomp.models.introspect import weight_matrix_view

        return [self._cut(weight_matrix_view(self.kind, weight).float())]

    def prepared(self, weight: Any) -> list[Any]:
        """The latent matrices after every technique's :meth:`train_prepare` (masks, clipping), before
        encoding: what the export packs."""
        out = []
        for i, v in enumerate(self.latent(weight)):
            for tech, config in self.steps:
                if tech is not self.factor:
                    v = tech.train_prepare(config, self, i, v)
            out.append(v)
        return out

    def stored(self, weight: Any) -> list[Any]:
        """The stored matrices as training computes them (straight-through where they are encoded)."""
        out = []
        for i, v in enumerate(self.latent(weight)):
            mask = None
            for tech, config in self.steps:
                if tech is not self.factor:
                    v = tech.train_transform(config, self, i, v, mask)
                    mask = tech.train_mask(config, self, i) if tech.stage == "sparsify" else mask
            out.append(v)
        return out

    def masks(self, n: int) -> list[Any]:
        """The keep-masks of the ``n`` stored matrices (None where nothing is pruned)."""
        out = []
        for i in range(n):
            mask = None
            for tech, config in self.steps:
                mask = tech.train_mask(config, self, i) if tech.stage == "sparsify" else mask
            out.append(mask)
        return out

    def forward(self, weight: Any) -> Any:
        if self.frozen and not weight.requires_grad and not weight.is_inference():
            # a frozen layer (embedding tables by default): compress once, reuse until the weight changes
            key = (weight.data_ptr(), weight._version)  # noqa: SLF001 - bumped by every in-place write
            if self._cache is None or self._cache[0] != key:
                import torch

                with torch.no_grad():
                    self._cache = (key, self._compute(weight))
            return self._cache[1]
        return self._compute(weight)

    def _compute(self, weight: Any) -> Any:
        from autocomp.compressors.structured import scatter
        from autocomp.models.introspect import matrix_to_weight

        parts = self.stored(weight)
        dense = parts[0]
        for p in parts[1:]:
            dense = dense @ p
        dense = scatter(dense, self.rows if self.rows.numel() else None, self.cols if self.cols.numel() else None,
                        self.full_shape)
        return matrix_to_weight(self.kind, dense, weight)


class _BiasMask(_module()):  # type: ignore[misc]
    def __init__(self, rows: Any, n: int) -> None:
        import torch

        super().__init__()
        keep = torch.zeros(n, dtype=torch.bool)
        keep[rows] = True
        self.register_buffer("keep", keep)

    def forward(self, bias: Any) -> Any:
        return bias * self.keep


def _straight_through(hook: Any) -> Any:
    """A forward-pre-hook applying ``hook`` to the input forward and passing gradients straight through."""
    def ste(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        xq = hook(module, (x.detach(),))[0]
        return (x + (xq - x.detach()).detach() if x.requires_grad else xq, *args[1:])

    ste._autocomp_ste = True  # type: ignore[attr-defined]  # finalize swaps it for the plain hook
    ste._autocomp_hook = hook  # type: ignore[attr-defined]
    return ste


def prepare_for_training(model: Any, plan: Plan, desc: Any = None, schedule: str = "fixed",
                         train_embeddings: bool = False, clip: str = "minmax") -> Any:
    """A trainable copy of ``model`` that computes with ``plan``'s compressed weights (see module doc).

    ``schedule``: ``"fixed"`` (masks from the original weights) or ``"progressive"`` (unstructured
    sparsity ramps up; call :func:`set_progress` as training advances). Embedding tables stay frozen at
    their compressed values unless ``train_embeddings`` (they are most of a small encoder's weights, get
    sparse gradients, and re-compressing them every step doubled MiniLM's step time). ``clip`` is handed to
    the techniques (quantization: ``learned`` gives each trained group a trainable clipping ratio; the
    ``mse`` / ``learned`` starting ranges are applied by :func:`start_training`)."""
    import torch
    from torch.nn.utils import parametrize

    from autocomp.compressors.apply import PlanApplier, check_plan
    from autocomp.models.introspect import compressible_modules

    if schedule not in ("fixed", "progressive"):
        raise AutocompError(f"schedule must be 'fixed' or 'progressive', got {schedule!r}")
    student = copy.deepcopy(model)
    mods = compressible_modules(student)
    if desc is None:
        from autocomp.models.base import LoadedModel
        from autocomp.models.introspect import describe_static

        desc = describe_static(LoadedModel(module=model, name=plan.model_name, spec=plan.model_spec, batches=[]))
    check_plan(plan, desc)
    applier = PlanApplier(student, desc)
    for p in student.parameters():
        p.requires_grad_(True)
    users: dict[int, list[Any]] = {}  # a weight Parameter -> every module holding it (a tied output head too)
    for m in student.modules():
        if isinstance(m._parameters.get("weight"), torch.nn.Parameter):  # noqa: SLF001
            users.setdefault(id(m._parameters["weight"]), []).append(m)  # noqa: SLF001
    for layer in desc.layers:
        mod, kind = mods[layer.name]
        rows, cols, _ = applier.kept_indices(plan, layer.name)
        choice = plan.layer(layer.name)
        frozen = kind == "Embedding" and not train_embeddings
        if choice.is_identity and rows is None and cols is None:
            if frozen:
                mod.weight.requires_grad_(False)
            continue
        options = {"progressive": schedule == "progressive", "clip": clip, "trainable": not frozen}
        refit = cols is not None and any(g.refit and g.keep < g.units and layer.name in g.consumers
                                         for g in plan.structured.values())
        if refit or any(t.fixed_start(c) for t, c in choice.steps()):
            options.update(_compensated_start(applier, plan, layer.name, mod, kind, rows, cols))
        param = CompressedWeight(kind, mod.weight, choice, rows, cols, options)
        tied = [m for m in users.get(id(mod.weight), []) if m is not mod]
        parametrize.register_parametrization(mod, "weight", param, unsafe=True)
        for m in tied:  # a module sharing the weight (GPT-2's lm_head) computes with the same compressed weight
            parametrize.register_parametrization(m, "weight", param, unsafe=True)
        if param.factor is not None or frozen:
            mod.parametrizations.weight.original.requires_grad_(False)
        if frozen:
            param.frozen = param.factor is None and not param.progressive
            for p in param.parameters(recurse=False):
                p.requires_grad_(False)
        if rows is not None and getattr(mod, "bias", None) is not None and mod.bias.numel() == param.full_shape[0]:
            parametrize.register_parametrization(mod, "bias", _BiasMask(rows, mod.bias.numel()))
        for hook in choice.input_hooks():
            mod.register_forward_pre_hook(_straight_through(hook))
    student._autocomp_plan = plan  # noqa: SLF001 - read by finalize/export
    student._autocomp_desc = desc
    return student


def _compensated_start(applier: Any, plan: Plan, name: str, mod: Any, kind: str, rows: Any, cols: Any) -> dict[str, Any]:
    """A layer with a compensated option starts from the proxy's compensated weights: ``parts`` (the proxy's
    stored matrices: masks, GPTQ grids) and ``latents`` (the trainable matrices: GPTQ's dequantized values
    when the encoding is compensated, else the matrices before encoding). A plain layer's latent is its
    weight, written here (the student is a copy)."""
    import torch

    from autocomp.compressors.pipeline import run_pipeline
    from autocomp.models.introspect import weight_matrix_view

    choice = plan.layer(name)
    parts, _, _ = applier.layer_parts(plan, name)
    encode = next(((t, c) for t, c in choice.steps() if t.stage == "encode"), None)
    if encode is not None and not encode[0].fixed_start(encode[1]):
        m, _, _, skey = applier.cut_matrix(plan, name)
        latents = [p.values for p in run_pipeline(m, choice.without("encode"), applier.context(name, skey, cols))]
    else:
        latents = [p.values for p in parts]
    if not any(t.stage == "factor" for t, _ in choice.steps()):
        with torch.no_grad():
            w = weight_matrix_view(kind, mod.weight.data)
            r = rows if rows is not None else torch.arange(w.shape[0])
            k = cols if cols is not None else torch.arange(w.shape[1])
            w.index_put_((r[:, None], k[None, :]), latents[0].to(w.dtype))
            if w.untyped_storage().data_ptr() != mod.weight.data.untyped_storage().data_ptr():
                mod.weight.data.copy_(w.t().reshape(mod.weight.shape) if kind == "Conv1D" else w.reshape(mod.weight.shape))
    return {"parts": parts, "latents": [v.detach().clone() for v in latents]}


def _parametrized(student: Any) -> list[tuple[str, Any, CompressedWeight]]:
    """(module path, module, parametrization) for every module computing with a compressed weight, a
    module tied to a compressed layer's weight (sharing its parametrization) included."""
    out = []
    for name, mod in student.named_modules():
        plist = getattr(getattr(mod, "parametrizations", None), "weight", None)
        if plist is not None and isinstance(plist[0], CompressedWeight):
            out.append((name, mod, plist[0]))
    return out


def compressed_layers(student: Any) -> dict[str, tuple[Any, CompressedWeight]]:
    """module path -> (module, its parametrization) for every compressed layer of a student (a weight tied
    to several modules once, under the first: the layer the plan names)."""
    out: dict[str, tuple[Any, CompressedWeight]] = {}
    seen: set[int] = set()
    for name, mod, p in _parametrized(student):
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = (mod, p)
    return out


def set_progress(student: Any, frac: float) -> None:
    """Schedules (progressive sparsity): tell every technique how far training is (``frac`` in 0..1)."""
    for mod, p in compressed_layers(student).values():
        latents = p.latent(mod.parametrizations.weight.original)
        for tech, config in p.steps:
            tech.train_progress(config, p, latents, frac)


def start_training(student: Any, clip: str) -> int:
    """Before the first step of a fresh run, let the techniques set better starting values (quantization
    with ``clip`` ``mse``/``learned``: each group clamped to its least-error clipping range, written into
    the latent weights). -> the number of layers changed."""
    import torch

    from autocomp.models.introspect import weight_matrix_view

    changed = 0
    with torch.no_grad():
        for mod, p in compressed_layers(student).values():
            original = mod.parametrizations.weight.original
            latents = p.latent(original)
            masks = p.masks(len(latents))
            for tech, config in p.steps:
                new = tech.train_start(config, p, latents, masks, {"clip": clip})
                if new is None:
                    continue
                for v, n in zip(latents, new):
                    if p.factor is not None:
                        v.copy_(n)  # the factors are the parameters themselves
                        continue
                    m = weight_matrix_view(p.kind, original)
                    r = p.rows if p.rows.numel() else torch.arange(m.shape[0])
                    k = p.cols if p.cols.numel() else torch.arange(m.shape[1])
                    m.index_put_((r[:, None], k[None, :]), n.to(m.dtype))
                    if m.untyped_storage().data_ptr() != original.untyped_storage().data_ptr():
                        original.copy_(m.reshape(original.shape))  # the matrix view was a copy
                latents = p.latent(original)
                changed += 1
            p._cache = None  # noqa: SLF001 - a frozen layer recompresses from the new weights
    return changed


def param_lr(student: Any) -> dict[int, float]:
    """id(parameter) -> learning-rate multiplier, for the technique parameters that want their own."""
    out = {}
    for _, p in compressed_layers(student).values():
        for name, prm in p.named_parameters(recurse=False):
            for tech, _ in p.steps:
                mult = tech.train_param_lr(name)
                if mult is not None:
                    out[id(prm)] = mult
    return out


def after_step(student: Any) -> None:
    """After each optimizer step: the techniques' projections (e.g. clipping ratios kept in range)."""
    import torch

    with torch.no_grad():
        for _, p in compressed_layers(student).values():
            for tech, _ in p.steps:
                tech.train_after_step(p)


def compressed_parts(student: Any) -> dict[str, tuple[list[Any], Any, Any]]:
    """name -> (stored Parts in the plan's exact format, kept rows, kept cols) for every compressed layer;
    what the exporter packs. Runs the plan's techniques (all but the factor, whose trained matrices are the
    parts) on the prepared matrices, so the result equals what the student computes."""
    import torch

    from autocomp.compressors.base import LayerContext
    from autocomp.compressors.pipeline import run_pipeline

    out = {}
    with torch.no_grad():
        for name, (mod, p) in compressed_layers(student).items():
            per = p.choice.without("factor")
            parts = []
            for i, v in enumerate(p.prepared(mod.parametrizations.weight.original)):
                parts += run_pipeline(v.detach().float(), per, LayerContext(name, holder=p, index=i))
            out[name] = (parts, p.rows if p.rows.numel() else None, p.cols if p.cols.numel() else None)
    return out


def finalize(student: Any) -> Any:
    """A plain copy of the student (no parametrizations, no straight-through hooks) whose weights are exactly
    the compressed weights the plan's format stores; input hooks (W8A8 activations) stay on."""
    import torch

    model = copy.deepcopy(student)
    done: dict[tuple[int, str], Any] = {}  # (parametrization, name) -> the plain Parameter: tied stays tied
    for _, mod, _p in _parametrized(model):
        with torch.no_grad():
            values = {k: done.get((id(mod.parametrizations[k][0]), k)) for k in mod.parametrizations.keys()}
            values = {k: v if v is not None else torch.nn.Parameter(getattr(mod, k).detach().clone(), requires_grad=False)
                      for k, v in values.items()}
            done.update({(id(mod.parametrizations[k][0]), k): v for k, v in values.items()})
        # Not parametrize.remove_parametrizations: it deletes the property from the parametrized class,
        # which a deep copy shares with the student it came from.
        mod.__class__ = mod.__class__.__bases__[0]
        del mod._modules["parametrizations"]  # noqa: SLF001
        for k, v in values.items():
            mod.register_parameter(k, v)
        for key, fn in list(mod._forward_pre_hooks.items()):  # noqa: SLF001
            if getattr(fn, "_autocomp_ste", False):
                del mod._forward_pre_hooks[key]  # noqa: SLF001
                mod.register_forward_pre_hook(fn._autocomp_hook)
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model.eval()
