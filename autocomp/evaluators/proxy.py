"""The proxy: how far the compressed model's outputs drift from the original's on calibration data.

Teacher outputs are computed once. Scoring a plan swaps its weights into the live model
(:class:`~autocomp.compressors.apply.PlanApplier`), runs the calibration batches and restores the weights;
the model is never reloaded or copied.

Metrics (0 = identical, lower is better), averaged over samples (and valid tokens where an
``attention_mask`` in the batch matches the output's token axis):

* ``cosine``: ``1 - cos(teacher, student)`` along the last axis (embeddings);
* ``kl``:     ``KL(softmax(teacher) || softmax(student))`` along the last axis, per token (logits; over more
  than TOPK_VOCAB classes when the teacher's full logits would take more than TEACHER_BYTES, over the
  teacher's TOPK most likely classes plus one bucket for the rest: :class:`TopKTeacher`);
* ``mse``:    ``sum (student - teacher)^2 / sum teacher^2`` (normalized MSE; anything else);
* ``alignment`` (dual encoders, the default for them): the image-text similarity matrix of each calibration
  batch, turned into match distributions along rows (image -> text) and columns (text -> image); ``KL(teacher
  || student)`` per row and per column, averaged. Each row is standardized (zero mean, unit deviation) before
  the softmax at sharpness ALIGN_SHARPNESS, because matching is an argmax and does not change when a query's
  similarities are shifted or scaled: a compressed tower that only squeezes the similarities is not
  penalized. It scores what matching uses, which per-tower drift does not: two towers drifting *together*
  keep their matches;
* ``alignment-i2t`` / ``alignment-t2i``: one direction only, for a task that matches one way: zero-shot
  classification queries the class captions with images (i2t); text-to-image retrieval the other way. The
  direction a task does not use can only add noise (e.g. a common shift of every caption changes text ->
  image matches and leaves image -> text matches alone);
* ``tower``: ``1 - cos`` of every image and every text embedding (per-tower drift), for comparison.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from autocomp.compressors.apply import PlanApplier
from autocomp.desc import ModelDesc
from autocomp.errors import AutocompError
from autocomp.models.base import LoadedModel, check_pairs, extract_output, output_metric, run_batch
from autocomp.plan import Plan

__all__ = ["ProxyEvaluator", "TopKTeacher", "distortion", "is_alignment", "METRICS", "data_fingerprint"]

METRICS = ("auto", "cosine", "kl", "mse", "alignment", "alignment-i2t", "alignment-t2i", "tower")
ALIGN_SHARPNESS = 2.0  # softmax inverse temperature on standardized similarity rows (1 to 6 rank plans alike)
_DIRECTIONS = {"alignment": ("i2t", "t2i"), "alignment-i2t": ("i2t",), "alignment-t2i": ("t2i",)}


def is_alignment(metric: str) -> bool:
    """Whether ``metric`` scores image-text matches (needs [images; texts] stacked outputs)."""
    return metric in _DIRECTIONS


TOPK = 128  # teacher probabilities kept per token for kl over a large vocabulary
TOPK_VOCAB = 1024  # ... when the output has more classes than this
TEACHER_BYTES = 256 << 20  # ... and the full teacher logits of every calibration batch would exceed this


class TopKTeacher:
    """A teacher's per-token distribution over a large vocabulary, kept as its ``k`` most likely classes
    (log-probabilities and indices) plus the log of the remaining mass: ``k + 1`` buckets instead of ``V``
    classes, so teacher memory is ``tokens * (8k + 4)`` bytes whatever the vocabulary (30k classes at
    k = 128: 59x less). The proxy becomes the KL divergence between the teacher's and the student's
    distributions over those buckets (as EvoPress scores large-vocabulary models): it never exceeds the
    full KL (grouping classes cannot increase a divergence) and misses only how the student reshuffles
    probability *within* the teacher's tail."""

    def __init__(self, logits: Any, k: int = TOPK) -> None:
        import torch

        lt = torch.log_softmax(logits.float(), dim=-1)
        self.logp, idx = lt.topk(min(k, lt.shape[-1]), dim=-1)
        self.index = idx.to(torch.int32)
        self.log_rest = torch.log1p(-self.logp.exp().sum(-1).clamp(max=1.0 - 1e-7))
        self.shape = tuple(logits.shape)

    def kl(self, student: Any) -> Any:
        """Per-token KL over the k + 1 buckets."""
        import torch

        ls = torch.log_softmax(student.float(), dim=-1)
        ls_k = ls.gather(-1, self.index.long())
        ls_rest = torch.log1p(-ls_k.exp().sum(-1).clamp(max=1.0 - 1e-7))
        return (self.logp.exp() * (self.logp - ls_k)).sum(-1) + self.log_rest.exp() * (self.log_rest - ls_rest)


def _token_mask(batch: Any, out: Any) -> Any:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None or out.dim() < 3 or tuple(mask.shape) != tuple(out.shape[:2]):
        return None
    return mask.to(out.dtype)


KL_CHUNK = 1 << 22  # kl over more elements than this runs in row chunks (transient memory, not the result)


def _kl_rows(t: Any, s: Any) -> Any:
    import torch

    lt, ls = torch.log_softmax(t, dim=-1), torch.log_softmax(s, dim=-1)
    return (lt.exp() * (lt - ls)).sum(dim=-1)


def distortion(metric: str, teacher: Any, student: Any, mask: Any = None) -> tuple[float, float]:
    """(sum of per-item distortion, item count) so batches combine into one mean; for mse (num, den)."""
    import torch

    if isinstance(teacher, TopKTeacher):
        if metric != "kl":
            raise AutocompError(f"a top-k teacher scores only the kl metric, not {metric!r}")
        per = teacher.kl(student)
        if mask is not None:
            return float((per * mask).sum()), float(mask.sum())
        return float(per.sum()), float(per.numel())
    t, s = teacher.float(), student.float()
    if metric == "mse":
        err, ref = (s - t).pow(2), t.pow(2)
        if mask is not None:
            m = mask.unsqueeze(-1)
            err, ref = err * m, ref * m
        return float(err.sum()), float(ref.sum())
    if metric in _DIRECTIONS:
        n = t.shape[0] // 2
        t, s = torch.nn.functional.normalize(t, dim=-1), torch.nn.functional.normalize(s, dim=-1)
        st, ss = t[:n] @ t[n:].T, s[:n] @ s[n:].T

        def logits(x: Any) -> Any:
            return ALIGN_SHARPNESS * (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-8)

        total = 0.0
        for direction in _DIRECTIONS[metric]:
            a, b = (st, ss) if direction == "i2t" else (st.T, ss.T)
            pa, pb = torch.log_softmax(logits(a), dim=-1), torch.log_softmax(logits(b), dim=-1)
            total += float((pa.exp() * (pa - pb)).sum())
        return total, float(n * len(_DIRECTIONS[metric]))
    if metric in ("cosine", "tower"):
        per = 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-12)
    elif metric == "kl":
        if t.numel() > KL_CHUNK:  # a large vocabulary: a few rows at a time (the same per-row values)
            rt, rs = t.reshape(-1, t.shape[-1]), s.reshape(-1, s.shape[-1])
            step = max(1, KL_CHUNK // t.shape[-1])
            per = torch.cat([_kl_rows(rt[i:i + step], rs[i:i + step]) for i in range(0, rt.shape[0], step)])
            per = per.reshape(t.shape[:-1])
        else:
            per = _kl_rows(t, s)
    else:
        raise AutocompError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if mask is not None:
        return float((per * mask).sum()), float(mask.sum())
    return float(per.sum()), float(per.numel())


def data_fingerprint(batches: list[Any]) -> str:
    import torch

    h = hashlib.sha256()
    for b in batches:
        items = sorted(b.items()) if isinstance(b, dict) else list(enumerate(b)) if isinstance(b, (list, tuple)) else [(0, b)]
        for k, v in items:
            if isinstance(v, torch.Tensor):
                h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _non_finite_input(batch: Any) -> str | None:
    """The name (or position) of a floating-point input tensor holding NaN / inf, or None."""
    import torch

    items = batch.items() if isinstance(batch, dict) else enumerate(batch) if isinstance(batch, (list, tuple)) \
        else [("0", batch)]
    for k, v in items:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            return repr(k) if isinstance(k, str) else f"#{k}"
    return None


def _record_lookups(model: Any, desc: ModelDesc) -> tuple[dict[str, set[int]], list[Any]]:
    """Hooks that collect the rows each Embedding layer looks up (skipped for weights shared with
    another layer, e.g. an output head tied to the embedding, where every row is used)."""
    import torch

    from autocomp.models.introspect import compressible_modules

    mods = compressible_modules(model)
    weight_users: dict[int, int] = {}
    for mod, _ in mods.values():
        weight_users[id(mod.weight)] = weight_users.get(id(mod.weight), 0) + 1
    seen: dict[str, set[int]] = {}
    hooks = []
    for layer in desc.layers:
        mod, kind = mods[layer.name]
        if kind != "Embedding" or weight_users[id(mod.weight)] > 1 or getattr(mod, "max_norm", None):
            continue
        seen[layer.name] = set()

        def hook(m: Any, inputs: Any, output: Any, name: str = layer.name) -> None:
            seen[name].update(torch.unique(inputs[0]).tolist())

        hooks.append(mod.register_forward_hook(hook))
    return seen, hooks


class ProxyEvaluator:
    """``evaluator(plan) -> float``. Deterministic: same plan, same number, on the same machine."""

    def __init__(self, loaded: LoadedModel, desc: ModelDesc, applier: PlanApplier | None = None,
                 reuse_bytes: int | None = None, unpadded: bool = True) -> None:
        """``reuse_bytes``: the bound of the block outputs kept for reuse across plans (default
        :func:`~autocomp.evaluators.reuse.default_block_cache_bytes`; 0: recompute every block).
        ``unpadded``: run BERT-style encoder blocks on their real tokens only, where that gives the original
        model's outputs to the bit on every calibration batch (:mod:`autocomp.evaluators.unpadded`)."""
        import torch

        from autocomp.evaluators.reuse import BlockCache
        from autocomp.evaluators.unpadded import UnpaddedBlocks

        self.loaded = loaded
        self.model = loaded.module.eval()
        self.batches = loaded.batches
        self.teacher: list[Any] = []
        self.masks: list[Any] = []
        metric = loaded.metric
        looked_up, hooks = _record_lookups(self.model, desc)
        self.reuse = BlockCache(self.model, desc, reuse_bytes)
        self.unpadded = UnpaddedBlocks(self.model if unpadded else torch.nn.Module())
        with torch.inference_mode(), self.reuse.observe():
            for i, batch in enumerate(self.batches):
                check_pairs(batch, i)
                try:
                    out = run_batch(self.model, batch)
                except Exception as e:
                    msg = str(e).splitlines()[0] if str(e) else ""
                    raise AutocompError(
                        f"calibration batch {i} does not fit model {loaded.spec!r}: {type(e).__name__}: {msg}"
                    ) from None
                tensor, auto = extract_output(out)
                auto = output_metric(auto, tensor, self.model, batch)
                if metric == "auto":
                    metric = auto
                if not torch.isfinite(tensor).all():
                    bad = _non_finite_input(batch)
                    if bad is not None:
                        raise AutocompError(f"calibration batch {i} holds NaN or inf in its input {bad}; clean the "
                                            f"calibration data (--data)")
                    raise AutocompError(f"the original model's output on calibration batch {i} is not finite "
                                        f"(its inputs are); check the model's weights")
                self.masks.append(_token_mask(batch, tensor))
                self.unpadded.verify(lambda b=batch: extract_output(run_batch(self.model, b))[0], tensor,
                                     self.masks[-1])
                if i == 0:  # every batch's full logits, estimated from the first one's
                    topk = metric == "kl" and tensor.dim() >= 2 and tensor.shape[-1] > TOPK_VOCAB \
                        and tensor.numel() * 4 * len(self.batches) > TEACHER_BYTES
                if topk:
                    self.teacher.append(TopKTeacher(tensor))
                else:
                    self.teacher.append(tensor.detach().clone())
        for h in hooks:
            h.remove()
        self.unpadded.settle()
        subsets = {n: torch.tensor(sorted(ix), dtype=torch.long) for n, ix in looked_up.items()}
        self.applier = applier or PlanApplier(self.model, desc, row_subsets=subsets)
        if metric not in METRICS[1:]:
            raise AutocompError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        if (is_alignment(metric) or metric == "tower") and auto != "alignment":
            raise AutocompError(f"metric {metric!r} needs a dual encoder (outputs with image_embeds and text_embeds); "
                                f"model {loaded.spec!r} is not one: use --metric auto")
        self.metric = metric

    def _layer_key(self, plan: Plan, name: str) -> Any:
        """What determines layer ``name``'s weights under ``plan`` (the applier's compressed-weight key)."""
        return plan.layer(name), self.applier.kept_indices(plan, name)[2]

    def __call__(self, plan: Plan) -> float:
        return self.finish(*self.partial(plan, range(len(self.batches))))

    def partial(self, plan: Plan, indices: Any) -> tuple[float, float]:
        """(numerator, denominator) over some calibration batches; partials of disjoint batch sets add up
        to the full-set value (staged evaluation reuses the first stage's work)."""
        import torch

        num = den = 0.0
        with torch.inference_mode(), self.applier.applied(plan), self.unpadded.active(), \
                self.reuse.active(plan, self._layer_key):
            for i in indices:
                with self.reuse.batch(i):
                    student, _ = extract_output(run_batch(self.model, self.batches[i]))
                a, b = distortion(self.metric, self.teacher[i], student, self.masks[i])
                num, den = num + a, den + b
        return num, den

    @staticmethod
    def finish(num: float, den: float) -> float:
        value = num / den if den > 0 else float("nan")
        return value if math.isfinite(value) else float("nan")
