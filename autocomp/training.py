"""Training a compressed model: quantization-aware training with a straight-through estimator, fixed (or
progressively ramped) pruning masks, trainable low-rank factors, and distillation from the original model.

``prepare_for_training(model, plan)`` returns a copy of the model in which every layer the plan touches
computes with its compressed weight: a ``torch.nn.utils.parametrize`` parametrization on the layer's
``weight`` that keeps the layer's type and name (so hooks and state dicts keep working) and

* cuts the structured-pruning rows / columns the plan removes (fixed: chosen once from the original
  weights, as the proxy did);
* for low-rank layers holds the factors ``B`` and ``A`` as its own parameters (initialized from the same
  truncated SVD as the proxy) and computes ``B @ A``;
* multiplies each stored matrix by its pruning mask (fixed from the original weights, or ramped up from 0
  to the plan's sparsity over the first part of training with ``schedule="progressive"``);
* fake-quantizes each stored matrix with the plan's exact round-to-nearest quantizer
  (:func:`autocomp.compressors.quantize.quantize_matrix`) and passes gradients straight through.

Scales are *not* learned: they are recomputed from the current weights at every step (max-abs or
min-max per group), exactly as the exporter will compute them, so the trained model and its packed
export are the same function (``finalize``) and the size model stays exact. Learned scales (LSQ) would
help most at 2-3 bits; they are left out to keep that guarantee simple.

W8A8 layers also fake-quantize their input activations (dynamic, per tensor, 7-bit range as the real
int8 kernels do) with a straight-through estimator.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from autocomp.errors import AutocompError
from autocomp.plan import LayerPlan, Plan

__all__ = ["prepare_for_training", "distillation_loss", "finalize", "compressed_parts", "set_progress"]

CONTRASTIVE_SCALE = 50.0  # inverse temperature (before --temperature) of the contrastive distillation match distributions


def _torch_module_base() -> type:
    import torch

    return torch.nn.Module


class _CompressedWeight(_torch_module_base()):  # type: ignore[misc]
    """Parametrization ``weight -> compressed weight`` for one layer (see the module docstring)."""

    def __init__(self, kind: str, weight: Any, choice: LayerPlan, rows: Any, cols: Any, progressive: bool) -> None:
        import torch

        from autocomp.compressors.base import LayerContext, run_pipeline
        from autocomp.models.introspect import weight_matrix_view

        super().__init__()
        self.kind = kind
        self.frozen = False
        self._cache: Any = None
        self.shape = tuple(weight.shape)
        self.choice = choice
        self.progressive = progressive and choice.prune == "unstructured"
        full = weight_matrix_view(kind, weight.detach()).float()
        self.full_shape = tuple(full.shape)
        self.register_buffer("rows", rows if rows is not None else torch.empty(0, dtype=torch.long))
        self.register_buffer("cols", cols if cols is not None else torch.empty(0, dtype=torch.long))
        sub = self._cut(full)
        parts = run_pipeline(sub, choice, LayerContext("train"))
        self.n_parts = len(parts)
        if choice.rank is not None:
            b, a = run_pipeline(sub, LayerPlan(rank=choice.rank), LayerContext("train"))
            self.B = torch.nn.Parameter(b.values.clone())
            self.A = torch.nn.Parameter(a.values.clone())
        for i, p in enumerate(parts):
            mask = p.mask if p.mask is not None else torch.ones(0, dtype=torch.bool)
            if self.progressive:
                mask = torch.ones_like(p.values, dtype=torch.bool)
            self.register_buffer(f"mask{i}", mask.clone())

    def _cut(self, m: Any) -> Any:
        if self.rows.numel():
            m = m.index_select(0, self.rows)
        if self.cols.numel():
            m = m.index_select(1, self.cols)
        return m

    def latent(self, weight: Any) -> list[Any]:
        """The trainable stored matrices before masks and quantization."""
        if self.choice.rank is not None:
            return [self.B, self.A]
        from autocomp.models.introspect import weight_matrix_view

        return [self._cut(weight_matrix_view(self.kind, weight).float())]

    def enable_learned_clip(self, weight: Any) -> None:
        """Give every quantized stored matrix one trainable clipping ratio per quantization group (PACT-style:
        the group is clamped to ``ratio x`` its current min/max range before quantization)."""
        import torch

        if self.choice.bits is None:
            return
        for i, v in enumerate(self.latent(weight)):
            g = self.choice.group_size or v.shape[1]
            self.register_parameter(f"clip{i}", torch.nn.Parameter(torch.ones(v.shape[0], -(-v.shape[1] // g), 1)))

    def clipped(self, weight: Any) -> list[Any]:
        """The latent matrices, each group clamped to its learned clipping ratio where there is one."""
        out = []
        for i, v in enumerate(self.latent(weight)):
            ratio = getattr(self, f"clip{i}", None)
            if ratio is not None:
                mask = getattr(self, f"mask{i}")
                kept = (v * mask if mask.numel() else v).detach()  # the range of what is stored
                lo, hi = _group_range(_grouped(kept, self.choice.group_size), self.choice.symmetric)
                v = _clamp_groups(v, self.choice.group_size, lo, hi, ratio.clamp(CLIP_GRID[-1], 1.0))
            out.append(v)
        return out

    def stored(self, weight: Any) -> list[Any]:
        """Masked, fake-quantized stored matrices (straight-through gradients)."""
        from autocomp.compressors.quantize import quantize_matrix

        out = []
        for i, v in enumerate(self.clipped(weight)):
            mask = getattr(self, f"mask{i}")
            if mask.numel():
                v = v * mask
            if self.choice.bits is not None:
                deq = quantize_matrix(v.detach(), int(self.choice.bits), self.choice.group_size, self.choice.symmetric)[0]
                v = v + (deq - v).detach()
            out.append(v)
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
        import torch

        parts = self.stored(weight)
        dense = parts[0] if len(parts) == 1 else parts[0] @ parts[1]
        if self.rows.numel() or self.cols.numel():
            full = torch.zeros(self.full_shape, dtype=dense.dtype, device=dense.device)
            r = self.rows if self.rows.numel() else torch.arange(self.full_shape[0])
            c = self.cols if self.cols.numel() else torch.arange(self.full_shape[1])
            dense = full.index_put((r[:, None], c[None, :]), dense)
        if self.kind == "Conv1D":
            dense = dense.t()
        return dense.reshape(self.shape).to(weight.dtype)

    def set_sparsity_progress(self, weight: Any, frac: float) -> None:
        """Progressive schedule: masks at ``frac`` (0..1) of the plan's sparsity, by current magnitude."""
        if not self.progressive:
            return
        import torch

        from autocomp.compressors.prune import magnitude_mask

        with torch.no_grad():
            for i, v in enumerate(self.latent(weight)):
                mask = getattr(self, f"mask{i}")
                mask.copy_(magnitude_mask(v * mask, self.choice.sparsity * min(max(frac, 0.0), 1.0)))


class _BiasMask(_torch_module_base()):  # type: ignore[misc]
    def __init__(self, rows: Any, n: int) -> None:
        import torch

        super().__init__()
        keep = torch.zeros(n, dtype=torch.bool)
        keep[rows] = True
        self.register_buffer("keep", keep)

    def forward(self, bias: Any) -> Any:
        return bias * self.keep


def _act_fake_quant(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    from autocomp.compressors.apply import _fake_quant_input

    x = args[0]
    xq = _fake_quant_input(module, (x.detach(),))[0]
    return (x + (xq - x.detach()).detach() if x.requires_grad else xq, *args[1:])


def prepare_for_training(model: Any, plan: Plan, desc: Any = None, schedule: str = "fixed",
                         train_embeddings: bool = False, learn_clip: bool = False) -> Any:
    """A trainable copy of ``model`` that computes with ``plan``'s compressed weights (see module doc).

    ``schedule``: ``"fixed"`` (masks from the original weights) or ``"progressive"`` (unstructured
    sparsity ramps up; call :func:`set_progress` as training advances). Embedding tables stay frozen at
    their compressed values unless ``train_embeddings`` (they are most of a small encoder's weights, get
    sparse gradients, and re-quantizing them every step doubled MiniLM's step time). ``learn_clip`` gives
    each trained quantization group a trainable clipping ratio (see ``_CompressedWeight.clipped``)."""
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
    for layer in desc.layers:
        mod, kind = mods[layer.name]
        rows, cols, _ = applier._kept(plan, layer.name)
        choice = plan.layer(layer.name)
        if choice.is_identity and rows is None and cols is None:
            if kind == "Embedding" and not train_embeddings:
                mod.weight.requires_grad_(False)
            continue
        param = _CompressedWeight(kind, mod.weight, choice, rows, cols, schedule == "progressive")
        parametrize.register_parametrization(mod, "weight", param, unsafe=True)
        if choice.rank is not None:
            mod.parametrizations.weight.original.requires_grad_(False)
        if kind == "Embedding" and not train_embeddings:
            mod.parametrizations.weight.original.requires_grad_(False)
            param.frozen = choice.rank is None and not param.progressive
            if choice.rank is not None:
                param.B.requires_grad_(False)
                param.A.requires_grad_(False)
        if learn_clip and not (kind == "Embedding" and not train_embeddings):
            param.enable_learned_clip(mod.parametrizations.weight.original)
        if rows is not None and getattr(mod, "bias", None) is not None and mod.bias.numel() == param.full_shape[0]:
            parametrize.register_parametrization(mod, "bias", _BiasMask(rows, mod.bias.numel()))
        if choice.act_bits == 8:
            mod.register_forward_pre_hook(_act_fake_quant)
    student._autocomp_plan = plan  # noqa: SLF001 - read by finalize/export
    student._autocomp_desc = desc
    return student


def _compressed_layers(student: Any) -> dict[str, tuple[Any, Any]]:
    out = {}
    for name, mod in student.named_modules():
        plist = getattr(getattr(mod, "parametrizations", None), "weight", None)
        if plist is not None and isinstance(plist[0], _CompressedWeight):
            out[name] = (mod, plist[0])
    return out


def set_progress(student: Any, frac: float) -> None:
    """Progressive schedule: set every ramped mask to ``frac`` (0..1) of its final sparsity."""
    for mod, p in _compressed_layers(student).values():
        p.set_sparsity_progress(mod.parametrizations.weight.original, frac)


CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # clip ratios tried per group: 1.0, 0.95, ..., 0.5
CLIPS = ("learned", "mse", "minmax")  # train's quantization ranges (learned = the mse start, then trainable ratios)
CLIP_LR_MULT = 10.0  # the clipping ratios' learning rate, as a multiple of the weights'


def mse_clip(v: Any, bits: int, group_size: int, symmetric: bool, mask: Any = None) -> Any:
    """``v`` with each quantization group clamped to the fraction of its range (from :data:`CLIP_GRID`)
    whose round-to-nearest quantization has the least squared error against ``v``. The plan's min/max
    quantizer, run on the result, then lands on those clipped ranges: clipping is held in the weights, so
    the packed format does not change."""
    import torch

    from autocomp.compressors.quantize import quantize_matrix

    w = v if mask is None or not mask.numel() else v * mask
    lo, hi = _group_range(_grouped(w, group_size), symmetric)
    best_err = best_a = None
    for a in CLIP_GRID:
        deq = quantize_matrix(_clamp_groups(w, group_size, lo, hi, a), bits, group_size, symmetric)[0]
        err = _grouped((deq - w) ** 2, group_size).sum(-1, keepdim=True)
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


def clip_init(student: Any) -> int:
    """Clamp every quantized layer's trainable weights to their MSE-optimal clipping ranges
    (:func:`mse_clip`) before training starts; -> the number of layers changed. Min/max ranges waste most
    of a 2-3-bit grid on a few outliers; clipped ones start training from a far smaller weight error."""
    import torch

    from autocomp.models.introspect import weight_matrix_view

    changed = 0
    with torch.no_grad():
        for mod, p in _compressed_layers(student).values():
            c = p.choice
            if c.bits is None:
                continue
            original = mod.parametrizations.weight.original
            for i, v in enumerate(p.latent(original)):
                new = mse_clip(v, int(c.bits), c.group_size, c.symmetric, getattr(p, f"mask{i}"))
                if c.rank is not None:
                    v.copy_(new)  # B / A are the parameters themselves
                    continue
                m = weight_matrix_view(p.kind, original)
                r = p.rows if p.rows.numel() else torch.arange(m.shape[0])
                k = p.cols if p.cols.numel() else torch.arange(m.shape[1])
                m.index_put_((r[:, None], k[None, :]), new.to(m.dtype))
                if m.untyped_storage().data_ptr() != original.untyped_storage().data_ptr():
                    original.copy_(m.reshape(original.shape))  # the matrix view was a copy
            changed += 1
            p._cache = None  # noqa: SLF001 - a frozen layer recompresses from the clamped weights
    return changed


def compressed_parts(student: Any) -> dict[str, tuple[list[Any], Any, Any]]:
    """name -> (stored Parts in the plan's exact format, kept rows, kept cols) for every compressed layer;
    what the exporter packs. Runs the plan's own prune/quantize compressors on the trained (projected)
    matrices, so the result equals what the student computes."""
    import torch

    from autocomp.compressors.base import LayerContext, run_pipeline

    out = {}
    with torch.no_grad():
        for name, (mod, p) in _compressed_layers(student).items():
            per = dataclasses.replace(p.choice, rank=None)
            parts = []
            for i, v in enumerate(p.clipped(mod.parametrizations.weight.original)):
                mask = getattr(p, f"mask{i}")
                v = (v * mask if mask.numel() else v).detach().float()
                parts += run_pipeline(v, per, LayerContext(name))
            out[name] = (parts, p.rows if p.rows.numel() else None, p.cols if p.cols.numel() else None)
    return out


def finalize(student: Any) -> Any:
    """A plain copy of the student (no parametrizations, no training hooks) whose weights are exactly the
    compressed weights the plan's format stores; activation fake-quantization of W8A8 layers stays on."""
    from autocomp.compressors.apply import _fake_quant_input

    import torch

    model = copy.deepcopy(student)
    for name, (mod, p) in _compressed_layers(model).items():
        w8a8 = p.choice.act_bits == 8
        with torch.no_grad():
            values = {k: getattr(mod, k).detach().clone() for k in mod.parametrizations.keys()}
        # Not parametrize.remove_parametrizations: it deletes the property from the parametrized class,
        # which a deep copy shares with the student it came from.
        mod.__class__ = mod.__class__.__bases__[0]
        del mod._modules["parametrizations"]  # noqa: SLF001
        for k, v in values.items():
            mod.register_parameter(k, torch.nn.Parameter(v, requires_grad=False))
        for key in [k for k, fn in mod._forward_pre_hooks.items() if fn is _act_fake_quant]:  # noqa: SLF001
            del mod._forward_pre_hooks[key]  # noqa: SLF001
        if w8a8:
            mod.register_forward_pre_hook(_fake_quant_input)
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model.eval()


def distillation_loss(student_out: Any, teacher_out: Any, kind: str = "response", temperature: float = 2.0,
                      metric: str = "cosine", mask: Any = None) -> Any:
    """Distillation loss between student and teacher outputs (teacher detached).

    * ``response``: ``metric="kl"``: KL(teacher || student) of softened distributions, scaled by T^2
      (Hinton et al.); ``"cosine"``: mean 1 - cos per output row (embeddings); ``"mse"``: normalized MSE.
    * ``feature``: lists of per-block hidden states (or single tensors): mean normalized MSE per block.
    * ``relation``: pairwise cosine-similarity matrices within the batch (rows = items), mean squared
      difference: keeps the geometry a retrieval or image-text model relies on. For a dual encoder's
      stacked ``[images; texts]`` output this covers image-image, text-text and image-text pairs.
    * ``contrastive`` (dual encoders, output = ``[images; texts]`` stacked): KL(teacher || student) of the
      image->text and text->image match distributions (softmax of cosine similarities times
      ``CONTRASTIVE_SCALE / temperature``), scaled by T^2: what keeps the towers aligned.
    """
    import torch
    import torch.nn.functional as F

    if kind == "feature":
        s_list = student_out if isinstance(student_out, (list, tuple)) else [student_out]
        t_list = teacher_out if isinstance(teacher_out, (list, tuple)) else [teacher_out]
        losses = [((s.float() - t.detach().float()).pow(2).mean() / t.detach().float().pow(2).mean().clamp_min(1e-12))
                  for s, t in zip(s_list, t_list)]
        return torch.stack(losses).mean()
    s, t = student_out.float(), teacher_out.detach().float()
    if kind == "contrastive":
        n = s.shape[0] // 2
        sn, tn = F.normalize(s.reshape(2 * n, -1), dim=-1), F.normalize(t.reshape(2 * n, -1), dim=-1)
        ls_, lt_ = sn[:n] @ sn[n:].T * (CONTRASTIVE_SCALE / temperature), tn[:n] @ tn[n:].T * (CONTRASTIVE_SCALE / temperature)
        total = s.new_zeros(())
        for a, b in ((lt_, ls_), (lt_.T, ls_.T)):
            pa, pb = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
            total = total + (pa.exp() * (pa - pb)).sum(-1).mean()
        return total * temperature**2 / 2
    if kind == "relation":
        s2, t2 = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
        rs = F.normalize(s2, dim=-1) @ F.normalize(s2, dim=-1).T
        rt = F.normalize(t2, dim=-1) @ F.normalize(t2, dim=-1).T
        return (rs - rt).pow(2).mean()
    if kind != "response":
        raise AutocompError(f"unknown distillation kind {kind!r}; use response, feature, relation or contrastive")
    if metric == "kl":
        ls = F.log_softmax(s / temperature, dim=-1)
        lt = F.log_softmax(t / temperature, dim=-1)
        per = (lt.exp() * (lt - ls)).sum(-1) * temperature**2
    elif metric == "cosine":
        per = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-12)
    elif metric == "mse":
        per = (s - t).pow(2).mean(-1) / t.pow(2).mean().clamp_min(1e-12)
    else:
        raise AutocompError(f"unknown metric {metric!r}; use kl, cosine or mse")
    if mask is not None and per.shape == mask.shape:
        return (per * mask).sum() / mask.sum().clamp_min(1)
    return per.mean()


# -- the training loop --------------------------------------------------------------------------------------
def _block_modules(model: Any) -> list[Any]:
    """The repeated blocks (children of a ModuleList: ``encoder.layer.3``, ``h.7``...), for feature
    distillation; empty for models without them."""
    import re

    import torch

    from torch.nn.utils.parametrize import ParametrizationList

    mods = dict(model.named_modules())
    out = []
    for name, mod in mods.items():
        parent = mods.get(name.rpartition(".")[0])
        # a student's parametrizations are ModuleLists too: they are not blocks
        if (re.search(r"\.\d+$", name) and isinstance(parent, torch.nn.ModuleList)
                and not isinstance(parent, ParametrizationList)):
            out.append(mod)
    return out


def _capture(blocks: list[Any]) -> tuple[list[Any], list[Any]]:
    store: list[Any] = []

    def hook(mod: Any, inp: Any, out: Any) -> None:
        store.append(out[0] if isinstance(out, (tuple, list)) else out)

    return store, [b.register_forward_hook(hook) for b in blocks]


def save_checkpoint(student: Any, path: Any, meta: dict[str, Any]) -> None:
    """Atomic: a crash or Ctrl-C while saving leaves the previous checkpoint in place."""
    import os
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in student.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={k: str(v) for k, v in meta.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_student(model: Any, plan: Plan, desc: Any, weights: Any, schedule: str = "fixed",
                 train_embeddings: bool | None = None) -> tuple[Any, dict[str, str]]:
    """Rebuild a student from a checkpoint written by :func:`train`; -> (student, checkpoint metadata)."""
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(weights)
    if not p.is_file():
        raise AutocompError(f"weights file {str(p)!r} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
        state = load_file(str(p))
    except Exception as e:
        raise AutocompError(f"weights file {str(p)!r} is not a readable safetensors file ({e})") from None
    if meta.get("autocomp_checkpoint") != "1":
        raise AutocompError(f"{str(p)!r} is not an `autocomp train` checkpoint")
    if meta.get("plan_key") and meta["plan_key"] != _plan_hash(plan):
        raise AutocompError(f"weights {str(p)!r} were trained for another plan than this one; pass the plan they "
                            f"were trained with")
    if train_embeddings is None:
        train_embeddings = meta.get("train_embeddings") == "1"
    student = prepare_for_training(model, plan, desc, schedule=meta.get("schedule", schedule),
                                   train_embeddings=train_embeddings, learn_clip=meta.get("clip") == "learned")
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise AutocompError(f"weights {str(p)!r} do not match the plan on this model: {first}") from None
    return student, meta


def train(loaded: Any, plan: Plan, desc: Any, steps: int, out: Any, batches: list[Any], lr: float = 2e-4,
          distill: tuple[str, ...] = ("response", "relation"), temperature: float = 2.0, amp: str = "none",
          schedule: str = "fixed", ramp: float = 0.3, task_loss: Any = None, checkpoint_every: int = 50,
          resume: bool = True, seed: int = 0, on_step: Any = None, train_embeddings: bool = False,
          clip: str = "learned") -> dict[str, Any]:
    """Distill the original model into its compressed student for ``steps`` optimizer steps.

    Teacher = the original model (frozen); loss = sum of the chosen distillation kinds (+ ``task_loss(out,
    batch)`` when given). ``clip="mse"`` starts a fresh run from MSE-optimal clipping ranges
    (:func:`clip_init`), ``"learned"`` (default) does too and then trains one clipping ratio per quantization
    group, ``"minmax"`` keeps the plan's plain ranges. AdamW with linear warm-up (5% of
    steps) and cosine decay; batches reshuffled every epoch. Dropout stays off (eval mode) so that the run
    is deterministic. ``amp="bf16"`` runs forward passes under CPU bf16 autocast. Checkpoints (atomic) every ``checkpoint_every`` steps and at the end; an existing checkpoint
    for the same plan at ``out`` is resumed (optimizer state restarts). -> summary dict."""
    import math
    import time

    import torch

    from autocomp.models.base import extract_output, run_batch

    if steps < 1:
        raise AutocompError(f"--steps must be >= 1, got {steps}")
    if not batches:
        raise AutocompError("no training batches; pass --data file.py:fn returning a non-empty list of batches")
    for kind in distill:
        if kind not in ("response", "feature", "relation", "contrastive"):
            raise AutocompError(f"unknown distillation kind {kind!r}; use response, feature, relation and/or "
                                f"contrastive")
    dual = loaded.metric.startswith("alignment") or loaded.metric == "tower" or bool(loaded.info.get("dual_encoder"))
    if "contrastive" in distill and not dual:
        raise AutocompError("contrastive distillation needs a dual encoder (image_embeds + text_embeds outputs)")
    if amp not in ("none", "bf16"):
        raise AutocompError(f"--amp must be none or bf16, got {amp!r}")
    if clip not in CLIPS:
        raise AutocompError(f"--clip must be one of {', '.join(CLIPS)}, got {clip!r}")
    torch.manual_seed(seed)
    teacher = loaded.module.eval()
    start = 0
    from pathlib import Path

    if resume and Path(out).is_file():
        try:
            # a resumed run trains what the checkpoint trained (plus the embeddings when asked now)
            student, meta = load_student(teacher, plan, desc, out, schedule, train_embeddings or None)
            start = int(meta.get("step", 0))
            train_embeddings = train_embeddings or meta.get("train_embeddings") == "1"
            clip = meta.get("clip", "minmax")  # how the checkpoint's run started
        except AutocompError:
            raise AutocompError(f"{str(out)!r} exists and is not a checkpoint of this plan; choose another --out "
                                f"or delete it") from None
    else:
        student = prepare_for_training(teacher, plan, desc, schedule=schedule, train_embeddings=train_embeddings,
                                       learn_clip=clip == "learned")
        if clip in ("mse", "learned"):
            clip_init(student)  # a resumed run already holds (and has trained) its clamped weights
    student.eval()
    ratios = [p for n, p in student.named_parameters() if p.requires_grad and n.rsplit(".", 1)[-1].startswith("clip")]
    ids = {id(p) for p in ratios}
    params = [p for p in student.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": params}] + ([{"params": ratios, "lr": lr * CLIP_LR_MULT}] if ratios else [])
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    warm = max(1, int(0.05 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(  # a resumed run continues the schedule where it stopped
        opt, lambda s: min(1.0, (s + start + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s + start, steps) / steps)))
    t_blocks, s_blocks = _block_modules(teacher), _block_modules(student)
    feature = "feature" in distill and t_blocks and len(t_blocks) == len(s_blocks)
    meta = {"autocomp_checkpoint": "1", "plan_key": _plan_hash(plan), "schedule": schedule, "steps": steps,
            "train_embeddings": "1" if train_embeddings else "0", "clip": clip}
    metric = loaded.metric if loaded.metric in ("cosine", "kl", "mse") else "cosine" if dual else "mse"
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp == "bf16" else (lambda: _null())
    items = 0
    t0 = time.perf_counter()
    last = {"loss": float("nan")}
    step = start
    try:
        for step in range(start, steps):
            if schedule == "progressive":
                set_progress(student, (step + 1) / max(1, ramp * steps))
            batch = batches[_batch_order(len(batches), step // len(batches), seed)[step % len(batches)]]
            with torch.no_grad(), ctx():
                t_store, hooks = _capture(t_blocks) if feature else ([], [])
                t_out = extract_output(run_batch(teacher, batch))[0].float()
                for h in hooks:
                    h.remove()
            with ctx():
                s_store, hooks = _capture(s_blocks) if feature else ([], [])
                raw = run_batch(student, batch)
                s_out = extract_output(raw)[0].float()
                for h in hooks:
                    h.remove()
            mask = None
            if isinstance(batch, dict) and "attention_mask" in batch and s_out.dim() == 3:
                mask = batch["attention_mask"].float()
            losses = {}
            if "response" in distill:
                losses["response"] = distillation_loss(s_out, t_out, "response", temperature, metric, mask)
            if "relation" in distill:
                losses["relation"] = distillation_loss(s_out, t_out, "relation")
            if "contrastive" in distill:
                losses["contrastive"] = distillation_loss(s_out, t_out, "contrastive", temperature)
            if feature and s_store and len(s_store) == len(t_store):  # blocks whose forward ran
                losses["feature"] = distillation_loss([x.float() for x in s_store], [x.float() for x in t_store], "feature")
            if task_loss is not None:
                losses["task"] = task_loss(raw, batch)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ratios:
                with torch.no_grad():  # projected: a ratio above 1 or below the grid's end gets no gradient back
                    for r in ratios:
                        r.clamp_(CLIP_GRID[-1], 1.0)
            items += _batch_items(batch)
            last = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}
            done = step + 1
            if on_step:
                on_step(done, steps, last, items / (time.perf_counter() - t0))
            if checkpoint_every and done % checkpoint_every == 0 and done < steps:
                save_checkpoint(student, out, {**meta, "step": done})
        step = steps
    finally:
        if schedule == "progressive" and step >= steps:
            set_progress(student, 1.0)
        if step > start or not Path(out).is_file():
            save_checkpoint(student, out, {**meta, "step": step})
    secs = time.perf_counter() - t0
    return {"steps": steps, "start_step": start, "seconds": secs, "items_per_second": items / secs if secs else 0.0,
            "final_loss": last, "student": student}


def _batch_order(n: int, epoch: int, seed: int) -> list[int]:
    """A fresh permutation of the ``n`` batches for every epoch, a function of (seed, epoch) alone so a
    resumed run sees what an uninterrupted one would (batches arrive length-sorted; unshuffled, every
    epoch would run from the shortest to the longest)."""
    import numpy as np

    return [int(i) for i in np.random.RandomState([seed, epoch]).permutation(n)]


def _plan_hash(plan: Plan) -> str:
    import hashlib

    return hashlib.sha256(plan.key().encode()).hexdigest()[:16]


def _batch_items(batch: Any) -> int:
    import torch

    if isinstance(batch, dict):
        v = next((x for x in batch.values() if isinstance(x, torch.Tensor)), None)
    elif isinstance(batch, (list, tuple)):
        v = batch[0]
    else:
        v = batch
    return int(v.shape[0]) if isinstance(v, torch.Tensor) and v.dim() else 1


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
