"""What the ``train``, ``export`` and ``evaluate`` commands do, callable from Python too."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

from autocomp.errors import AutocompError
from autocomp.plan import Plan

__all__ = ["load_for_plan", "make_task", "model_for", "evaluate_plan", "proxy_fidelity"]


def load_for_plan(plan_path: Path, model: str | None, data: str | None,
                  studies_dir: Path | None = None) -> tuple[Plan, Any, Any]:
    """(plan, loaded model, desc); the plan is checked against the model (one-line error if it does not fit).
    A plan with compensated options gets the calibration statistics of ``data`` attached to the model (from
    ``<studies_dir>/calibration`` when the search left them there), and is refused if it was scored on other
    data."""
    from autocomp.compressors.apply import check_plan
    from autocomp.compressors.calibration import ensure
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect

    plan = Plan.load(plan_path)
    spec = model or plan.model_spec
    if not spec:
        raise AutocompError(f"plan {str(plan_path)!r} names no model; pass --model")
    loaded = load_model(spec, data=data)
    desc = introspect(loaded)
    check_plan(plan, desc)
    import os

    studies = Path(studies_dir or os.environ.get("AUTOCOMP_STUDIES", "studies"))
    ensure(loaded, desc, studies / "calibration", plan)
    return plan, loaded, desc


LOWER_IS_BETTER = frozenset({"perplexity"})


class PerplexityTask:
    """``--task perplexity``: next-token perplexity of a causal LM, ``exp(mean -log p(x[t+1] | x[:t+1]))`` over
    every predicted token of ``batches`` (the logits at position t score token t + 1; padding, where the
    batch has an ``attention_mask``, is skipped). Lower is better; log2 of it is bits per token (per
    character for a character LM)."""

    name = "perplexity"

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    @staticmethod
    def _ids(batch: Any) -> Any:
        import torch

        if isinstance(batch, dict):
            ids = batch.get("input_ids")
            if ids is None:
                ids = next((v for v in batch.values() if isinstance(v, torch.Tensor) and not v.is_floating_point()), None)
        elif isinstance(batch, (list, tuple)):
            ids = next((v for v in batch if isinstance(v, torch.Tensor) and not v.is_floating_point()), None)
        else:
            ids = batch
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() != 2:
            raise AutocompError("--task perplexity needs batches of integer token ids [batch, tokens] (a tensor, "
                                "or a dict with input_ids)")
        return ids

    def __call__(self, model: Any) -> float:
        import math

        import torch

        from autocomp.models.base import extract_output, run_batch

        nll, count = 0.0, 0
        for batch in self.batches:
            ids = self._ids(batch)
            logits, _ = extract_output(run_batch(model, batch))
            if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
                raise AutocompError(f"--task perplexity needs logits [batch, tokens, vocab] aligned with the token ids "
                                    f"{tuple(ids.shape)}; the model returned {tuple(logits.shape)}")
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            tok = -lp.gather(-1, ids[:, 1:].long().unsqueeze(-1)).squeeze(-1)
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            valid = torch.ones_like(tok, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
            nll += float(tok[valid].sum())
            count += int(valid.sum())
        if count == 0:
            raise AutocompError("--task perplexity: the batches hold no token to predict (need >= 2 tokens per row)")
        return math.exp(nll / count)


def make_task(loaded: Any, task: str | None, pairs: int = 500) -> tuple[str, Callable[[Any], float]]:
    """(metric name, fn(model) -> score): ``--task file.py:fn`` (higher is better), ``--task perplexity``
    (lower is better: :class:`PerplexityTask` on the model's batches, i.e. ``--data``), or the built-in one."""
    if task == "perplexity":
        return PerplexityTask.name, PerplexityTask(loaded.batches)
    if task:
        from autocomp.models.intake import resolve_callable

        fn = resolve_callable(task, what="task")

        def score(m: Any) -> float:
            try:
                value = fn(m)
                return float(value)
            except AutocompError:
                raise
            except Exception as e:  # user code: say which function failed and how it is called
                raise AutocompError(f"task {task!r} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                    f"; it is called as fn(model) and must return a number (higher is better)") from None

        return getattr(fn, "__name__", "task"), score
    if loaded.spec == "minilm":
        from autocomp.models.minilm import load_tokenizer
        from autocomp.models.retrieval import RetrievalTask

        t = RetrievalTask(load_tokenizer(), n=pairs)
        return "mrr", t
    if loaded.spec in ("clip-digits", "clip-digits-fusion"):
        from autocomp.models.clip_digits import ZeroShotTask
        from autocomp.models.minilm import load_tokenizer

        return ZeroShotTask.name, ZeroShotTask(load_tokenizer())
    raise AutocompError(f"model {loaded.spec!r} has no built-in task metric; pass --task file.py:fn "
                        f"(fn(model) -> float, higher is better)")


def model_for(loaded: Any, plan: Plan | None, desc: Any, weights: Path | None) -> tuple[Any, Any]:
    """(model to score, context manager to score it in): the simulated plan, a training checkpoint, or an
    export file."""
    import contextlib

    if weights is None:
        if plan is None:
            return loaded.module, contextlib.nullcontext()
        from autocomp.compressors.apply import PlanApplier

        return loaded.module, PlanApplier(loaded.module, desc).applied(plan)
    if Path(weights).suffix == ".onnx":  # an `export --format onnx` file: scored as ONNX Runtime runs it
        from autocomp.ort import OrtModel

        ort_model = OrtModel(weights)
        if ort_model.meta.get("fingerprint") != desc.fingerprint:
            raise AutocompError(f"{str(weights)!r} was exported from a model with another layout than "
                                f"{loaded.spec!r}; pass the --model it was exported from")
        if plan is not None and (ort_model.plan is None or ort_model.plan.key() != plan.key()):
            raise AutocompError(f"{str(weights)!r} was exported from another plan than the --plan given (it records "
                                f"its own); drop --plan to score it")
        return ort_model, contextlib.nullcontext()
    from autocomp.artifact import FORMAT_VERSION, safetensors_metadata

    header = safetensors_metadata(weights)
    if header.get("autocomp_format") == FORMAT_VERSION:
        import copy
        import json

        from autocomp.artifact import load

        recorded = Plan.from_dict(json.loads(header["plan"]), source=f"the plan recorded in {str(weights)!r}")
        if plan is not None and recorded.key() != plan.key():
            raise AutocompError(f"{str(weights)!r} was exported from another plan than {plan.model_name or 'the'} "
                                f"--plan given (it records its own); drop --plan to score it, or pass the plan it "
                                f"was exported from")

        return load(weights, model=copy.deepcopy(loaded.module)), contextlib.nullcontext()
    if plan is None:
        raise AutocompError("--weights from `autocomp train` need the --plan they were trained with")
    from autocomp.training import finalize, load_student

    student, _ = load_student(loaded.module, plan, desc, weights)
    return finalize(student), contextlib.nullcontext()


def evaluate_plan(loaded: Any, plan: Plan | None, desc: Any, weights: Path | None, task: str | None,
                  pairs: int = 500) -> dict[str, Any]:
    import torch

    name, fn = make_task(loaded, task, pairs)
    model, ctx = model_for(loaded, plan, desc, weights)  # outside inference mode: it may build a student
    with torch.inference_mode():
        fp32 = fn(loaded.module)
        with ctx:
            value = fn(model)
    out = {"metric": name, "value": float(value), "fp32_value": float(fp32)}
    if name == "perplexity":
        import math

        out.update(bits_per_token=math.log2(value), fp32_bits_per_token=math.log2(fp32))
    return out


def proxy_fidelity(loaded: Any, desc: Any, n_plans: int, budget: str, space_name: str = "default",
                   study: str | None = None, storage: str | None = None, studies_dir: Path | None = None,
                   task: str | None = None, pairs: int = 500, seed: int = 0,
                   log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Proxy vs true metric over ``n_plans`` random plans (repaired onto ``budget``) and, with ``study``,
    the study's Pareto plans. -> {"metric", "spearman_proxy_vs_metric", "rows": [{"proxy", "value"}]}."""
    import torch
    from scipy.stats import spearmanr

    from autocomp.budget import parse_budget
    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.search.repair import repair, size_limit
    from autocomp.space import SearchSpace

    if n_plans < 0:
        raise AutocompError(f"--random-plans must be >= 0, got {n_plans}")
    space = SearchSpace.from_yaml(space_name, desc)
    nbytes = parse_budget(budget, desc.fp32_bytes)
    from autocomp.cost.size import plan_bytes

    smallest = plan_bytes(desc, space.decode(space.smallest_assignment()))
    if nbytes < smallest:
        raise AutocompError(f"budget {budget} is below the smallest plan this space allows ({smallest} bytes); "
                            f"raise --budget")
    rng = random.Random(seed)
    plans: list[Plan] = []
    for _ in range(n_plans):
        a = {p: rng.choice(o) for p, o in space.params.items()}
        fixed, _ = repair(space, a, [size_limit(space, nbytes)])
        plans.append(space.decode(fixed))
    handle = None
    n_random = len(plans)
    trial_of: list[int | None] = [None] * n_random
    if study:
        from autocomp.search.study import check_study_model, front_trials, open_study, plan_of

        handle = open_study(study, storage, studies_dir or Path("studies"))
        check_study_model(handle, desc)
        front = front_trials(handle.study, handle.budget_bytes)
        plans += [plan_of(t, handle) for t in front]
        trial_of += [t.number for t in front]
    if len(plans) < 3:
        raise AutocompError("need at least 3 plans for a rank correlation; raise --random-plans or pass --study")
    name, fn = make_task(loaded, task, pairs)
    ev = ProxyEvaluator(loaded, desc)
    tower = None
    if ev.metric.startswith("alignment"):  # dual encoders: also per-tower drift, to show what alignment adds
        import dataclasses

        tower = ProxyEvaluator(dataclasses.replace(loaded, metric="tower"), desc, applier=ev.applier)
    from autocomp.compressors.apply import PlanApplier

    applier = PlanApplier(loaded.module, desc)
    rows = []
    for i, plan in enumerate(plans):
        proxy = ev(plan)
        with torch.inference_mode(), applier.applied(plan):
            value = fn(loaded.module)
        rows.append({"proxy": float(proxy), "value": float(value)})
        if handle is not None:  # which rows are the study's own plans (the report tells them apart)
            rows[-1]["source"] = "random" if i < n_random else f"trial {trial_of[i]}"
        if tower is not None:
            rows[-1]["tower_drift"] = float(tower(plan))
        log(f"  plan {i + 1}/{len(plans)}: proxy {proxy:.5f}, {name} {value:.4f}")
    v = [r["value"] for r in rows]

    def rho(key: str) -> float:
        # proxy is a distortion (lower is better), the metric a score (higher is better): report agreement as
        # a positive number when lower proxy goes with higher metric
        p = [r[key] for r in rows]
        sign = 1.0 if name in LOWER_IS_BETTER else -1.0  # perplexity: lower proxy with lower metric agrees
        return sign * float(spearmanr(p, v).statistic) if len(set(p)) > 1 and len(set(v)) > 1 else 0.0

    out = {"metric": name, "spearman_proxy_vs_metric": rho("proxy"), "rows": rows}
    if tower is not None:
        out["spearman_tower_drift_vs_metric"] = rho("tower_drift")
    if handle is not None:
        from autocomp.fidelity import record

        record(handle.study, "metric", {**out, "budget": budget, "random_plans": n_random})
    return out


def restrict_plan(plan: Plan, desc: Any, modality: str) -> Plan:
    """The plan with only ``modality``'s layers (and structured groups) compressed; the rest kept as is."""
    import dataclasses

    from autocomp.plan import LayerPlan

    by_name = desc.by_name
    layers = {n: (c if by_name[n].modality == modality else LayerPlan()) for n, c in plan.layers.items()}
    groups = {k: g for k, g in plan.structured.items() if by_name[g.producers[0]].modality == modality}
    return dataclasses.replace(plan, layers=layers, structured=groups)


def modality_breakdown(plans: list[Plan], desc: Any, loaded: Any = None, cost: Any = None) -> list[dict[str, Any]]:
    """Per plan: modality -> {size_bytes, share, [latency_ms], [proxy]}. ``proxy`` (with ``loaded``) is the
    proxy of the plan with only that modality compressed: its contribution to the drift (contributions
    need not add up to the whole plan's proxy: compression in one tower can mask or compound another's)."""
    from autocomp.modality import bytes_by_modality

    ev = None
    if loaded is not None:
        from autocomp.evaluators.proxy import ProxyEvaluator

        ev = ProxyEvaluator(loaded, desc)
    out = []
    for plan in plans:
        sizes = bytes_by_modality(desc, plan)
        total = sum(sizes.values())
        row: dict[str, Any] = {m: {"size_bytes": int(v), "share": v / total if total else 0.0} for m, v in sizes.items()}
        if cost is not None:  # the layers' own kernel time; ops outside the layers are not split
            from autocomp.cost.size import structured_shape

            for m in row:
                row[m]["latency_ms"] = 0.0
            for layer in desc.layers:
                rows, cols = structured_shape(layer, plan.structured)
                row.setdefault(layer.modality, {"size_bytes": 0, "share": 0.0, "latency_ms": 0.0})
                row[layer.modality]["latency_ms"] += 1e3 * cost.layer(layer, plan.layer(layer.name), rows, cols)[0]
        if ev is not None:
            for m in row:
                row[m]["proxy"] = float(ev(restrict_plan(plan, desc, m))) if any(
                    layer.modality == m for layer in desc.layers) else 0.0
        out.append(row)
    return out
