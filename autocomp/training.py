"""Training a compressed model: distillation from the original model into the plan's trainable student.

The student itself (:mod:`autocomp.compressors.student`) is built from the techniques' trainable forms:
fake quantization with a straight-through estimator (scales recomputed from the weights every step, as
the exporter computes them, so the trained model and its packed export are the same function), fixed or
progressively ramped pruning masks, trainable low-rank factors, optional learned clipping ranges. This
module holds the losses (response, feature, relation, contrastive), the loop, and its checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autocomp.compressors.quantize import CLIPS
from autocomp.compressors.student import (after_step, finalize, param_lr, prepare_for_training, set_progress,
                                          start_training)
from autocomp.errors import AutocompError
from autocomp.plan import Plan

__all__ = ["prepare_for_training", "distillation_loss", "finalize", "train", "load_student", "save_checkpoint"]

CONTRASTIVE_SCALE = 50.0  # inverse temperature (before --temperature) of the contrastive distillation match distributions


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

    from safetensors.torch import save_file

    from autocomp.files import atomic_write

    state = {k: v.detach().clone().contiguous() for k, v in student.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={k: str(v) for k, v in meta.items()}))


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
    if meta.get("plan_key") and meta["plan_key"] != plan.digest():
        raise AutocompError(f"weights {str(p)!r} were trained for another plan than this one; pass the plan they "
                            f"were trained with")
    if train_embeddings is None:
        train_embeddings = meta.get("train_embeddings") == "1"
    student = prepare_for_training(model, plan, desc, schedule=meta.get("schedule", schedule),
                                   train_embeddings=train_embeddings, clip=meta.get("clip", "minmax"))
    own = student.state_dict()
    # checkpoints from before techniques were plug-ins carry an empty mask buffer for every unpruned part
    state = {k: v for k, v in state.items() if k in own or v.numel() or ".mask" not in k}
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise AutocompError(f"weights {str(p)!r} do not match the plan on this model: {first}") from None
    return student, meta


def _check_train(loaded: Any, steps: int, batches: list[Any], distill: tuple[str, ...], amp: str, clip: str) -> bool:
    """Refuse bad training settings before any work; -> whether the model is a dual encoder."""
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
    return dual


def _student(teacher: Any, plan: Plan, desc: Any, out: Any, resume: bool, schedule: str, train_embeddings: bool,
             clip: str) -> tuple[Any, int, bool, str]:
    """(student, first step, train_embeddings, clip): the checkpoint at ``out`` resumed, or a fresh start."""
    from pathlib import Path

    if resume and Path(out).is_file():
        try:
            # a resumed run trains what the checkpoint trained (plus the embeddings when asked now)
            student, meta = load_student(teacher, plan, desc, out, schedule, train_embeddings or None)
        except AutocompError:
            raise AutocompError(f"{str(out)!r} exists and is not a checkpoint of this plan; choose another --out "
                                f"or delete it") from None
        # how the checkpoint's run started; it already holds (and has trained) its starting weights
        return (student, int(meta.get("step", 0)), train_embeddings or meta.get("train_embeddings") == "1",
                meta.get("clip", "minmax"))
    student = prepare_for_training(teacher, plan, desc, schedule=schedule, train_embeddings=train_embeddings, clip=clip)
    start_training(student, clip)
    return student, 0, train_embeddings, clip


def _optimizer(student: Any, lr: float, steps: int, start: int) -> tuple[Any, Any]:
    """AdamW (technique parameters that want their own learning rate get it, e.g. clipping ratios x10),
    linear warm-up over 5% of the steps, cosine decay; a resumed run continues the schedule."""
    import math

    import torch

    mults = param_lr(student)
    groups = [{"params": [p for p in student.parameters() if p.requires_grad and id(p) not in mults]}]
    for mult in sorted(set(mults.values())):
        own = [p for p in student.parameters() if p.requires_grad and mults.get(id(p)) == mult]
        if own:
            groups.append({"params": own, "lr": lr * mult})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    warm = max(1, int(0.05 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + start + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s + start, steps) / steps)))
    return opt, sched


@dataclass
class _Losses:
    """How one step's loss is made: the distillation kinds, their settings, the optional task loss."""

    teacher: Any
    student: Any
    distill: tuple[str, ...]
    temperature: float
    metric: str
    blocks: tuple[list[Any], list[Any]]  # (teacher's, student's) blocks for feature distillation, or empty
    task_loss: Any
    ctx: Any

    def __call__(self, batch: Any) -> dict[str, Any]:
        import torch

        from autocomp.models.base import extract_output, run_batch

        t_blocks, s_blocks = self.blocks
        with torch.no_grad(), self.ctx():
            t_store, hooks = _capture(t_blocks)
            t_out = extract_output(run_batch(self.teacher, batch))[0].float()
            for h in hooks:
                h.remove()
        with self.ctx():
            s_store, hooks = _capture(s_blocks)
            raw = run_batch(self.student, batch)
            s_out = extract_output(raw)[0].float()
            for h in hooks:
                h.remove()
        mask = None
        if isinstance(batch, dict) and "attention_mask" in batch and s_out.dim() == 3:
            mask = batch["attention_mask"].float()
        losses = {}
        if "response" in self.distill:
            losses["response"] = distillation_loss(s_out, t_out, "response", self.temperature, self.metric, mask)
        if "relation" in self.distill:
            losses["relation"] = distillation_loss(s_out, t_out, "relation")
        if "contrastive" in self.distill:
            losses["contrastive"] = distillation_loss(s_out, t_out, "contrastive", self.temperature)
        if s_store and len(s_store) == len(t_store):  # blocks whose forward ran
            losses["feature"] = distillation_loss([x.float() for x in s_store], [x.float() for x in t_store], "feature")
        if self.task_loss is not None:
            losses["task"] = self.task_loss(raw, batch)
        return losses


def train(loaded: Any, plan: Plan, desc: Any, steps: int, out: Any, batches: list[Any], lr: float = 2e-4,
          distill: tuple[str, ...] = ("response", "relation"), temperature: float = 2.0, amp: str = "none",
          schedule: str = "fixed", ramp: float = 0.3, task_loss: Any = None, checkpoint_every: int = 50,
          resume: bool = True, seed: int = 0, on_step: Any = None, train_embeddings: bool = False,
          clip: str = "learned") -> dict[str, Any]:
    """Distill the original model into its compressed student for ``steps`` optimizer steps.

    Teacher = the original model (frozen); loss = sum of the chosen distillation kinds (+ ``task_loss(out,
    batch)`` when given). ``clip="mse"`` starts a fresh run from MSE-optimal clipping ranges
    (:func:`~autocomp.compressors.student.start_training`), ``"learned"`` (default) does too and then trains
    one clipping ratio per quantization group, ``"minmax"`` keeps the plan's plain ranges. AdamW with linear
    warm-up (5% of steps) and cosine decay; batches reshuffled every epoch. Dropout stays off (eval mode) so
    that the run is deterministic. ``amp="bf16"`` runs forward passes under CPU bf16 autocast. Checkpoints
    (atomic) every ``checkpoint_every`` steps and at the end; an existing checkpoint for the same plan at
    ``out`` is resumed (optimizer state restarts). -> summary dict."""
    import time
    from pathlib import Path

    import torch

    from autocomp.models.base import resolve_metric

    dual = _check_train(loaded, steps, batches, distill, amp, clip)
    torch.manual_seed(seed)
    teacher = loaded.module.eval()
    student, start, train_embeddings, clip = _student(teacher, plan, desc, out, resume, schedule, train_embeddings, clip)
    student.eval()
    opt, sched = _optimizer(student, lr, steps, start)
    blocks = (_block_modules(teacher), _block_modules(student))
    feature = "feature" in distill and bool(blocks[0]) and len(blocks[0]) == len(blocks[1])
    metric = resolve_metric(loaded)
    losses_of = _Losses(teacher, student, distill, temperature,
                        metric if metric in ("cosine", "kl", "mse") else "cosine" if dual else "mse",
                        blocks if feature else ([], []), task_loss,
                        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp == "bf16" else _null)
    meta = {"autocomp_checkpoint": "1", "plan_key": plan.digest(), "schedule": schedule, "steps": steps,
            "train_embeddings": "1" if train_embeddings else "0", "clip": clip}
    items, t0, last, step = 0, time.perf_counter(), {"loss": float("nan")}, start
    try:
        for step in range(start, steps):
            if schedule == "progressive":
                set_progress(student, (step + 1) / max(1, ramp * steps))
            batch = batches[_batch_order(len(batches), step // len(batches), seed)[step % len(batches)]]
            losses = losses_of(batch)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            after_step(student)
            items += _batch_items(batch)
            last = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}
            if on_step:
                on_step(step + 1, steps, last, items / (time.perf_counter() - t0))
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                save_checkpoint(student, out, {**meta, "step": step + 1})
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
