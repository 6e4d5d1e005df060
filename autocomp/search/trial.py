"""One trial, one way: decode the sampler's proposal -> size and cost -> repair onto the budgets -> set the
constraints -> evaluate the proxy (unless a budget is still broken, or the same compressed model was scored
before) -> the values the engine tells the study.

Everything a trial records lives in the trial's user attributes (plan, summary, bytes per modality, repair,
``skipped`` / ``fail_reason``), so a study can be read back without the model.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from autocomp.compressors.calibration import plan_needs
from autocomp.desc import ModelDesc
from autocomp.search.study import front_trials, trial_metric

__all__ = ["TrialContext", "run_trial", "stage_front"]

_SCALE = {"latency": 1e3}  # constraints are stored in bytes, ms and GBitOps


@dataclass
class TrialContext:
    """What every trial of one search shares (read-only while trials run, except ``known``)."""

    space: Any
    desc: ModelDesc
    limits: list[Any]
    cost: Any
    objectives: list[str]
    known: dict[str, tuple[float, int]]  # plan digest -> (proxy, trial number): evaluated compressed models
    repair: bool = True
    sensitivity: Any = None  # param -> option -> proxy increase (repair's guide), or None
    lock: Any = field(default_factory=threading.Lock)  # guards ``known`` (Ray driver threads share it)
    calibration: str | None = None  # key of the calibration statistics (recorded in plans that use them)


def stage_front(study: Any, objectives: list[str]) -> list[tuple[float, float]]:
    """(size, first-batch proxy) of the current front's trials, for staged evaluation."""
    out = []
    for t in front_trials(study, 2**62, objectives):
        if "proxy_stage1" in t.user_attrs:
            out.append((trial_metric(t, "size", objectives), float(t.user_attrs["proxy_stage1"])))
    return out


def _figures(ctx: TrialContext, assignment: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    from autocomp.cost.size import plan_bytes
    from autocomp.modality import bytes_by_modality

    plan = ctx.space.decode(assignment)
    out: dict[str, Any] = {"size_bytes": float(plan_bytes(ctx.desc, plan)), "by_modality": bytes_by_modality(ctx.desc, plan)}
    if ctx.cost is not None:
        out.update(ctx.cost.evaluate(plan))
    return plan, out


def _excess(ctx: TrialContext, fig: dict[str, Any]) -> dict[str, float]:
    """Per budget: how far the plan is over it (<= 0: within)."""
    got = {"size": fig["size_bytes"], "latency": fig.get("latency_ms", 0) / 1e3, "bitops": fig.get("bitops", 0),
           **{f"size:{m}": float(v) for m, v in fig["by_modality"].items()}}
    return {lim.name: got.get(lim.name, 0.0) - lim.budget for lim in ctx.limits}


def _record(trial: Any, ctx: TrialContext, plan: Any, fig: dict[str, Any], excess: dict[str, float]) -> None:
    for name, v in excess.items():
        trial.set_constraint(name, float(v * _SCALE.get(name, 1.0)))
    trial.set_user_attr("size_bytes", int(fig["size_bytes"]))
    trial.set_user_attr("by_modality", fig["by_modality"])
    for k in ("latency_ms", "bitops", "energy"):
        if k in fig:
            trial.set_user_attr(k, float(fig[k]))


def _evaluate(trial: Any, evaluator: Any, plan: Any, size: float, front: list[tuple[float, float]] | None) -> float | None:
    """The proxy; staged (EvoPress-style): the first calibration batch first, and a candidate that a
    no-larger front plan beats by more than 10% on that batch goes no further (None)."""
    if front is None:
        return evaluator(plan)
    n0, d0 = evaluator.partial(plan, [0])
    first = evaluator.finish(n0, d0)
    trial.set_user_attr("proxy_stage1", first)
    if any(s <= size and s1 * 1.1 < first for s, s1 in front):
        trial.set_user_attr("skipped", f"staged: first-batch proxy {first:.4g} is dominated by the front")
        return None
    n1, d1 = evaluator.partial(plan, range(1, len(evaluator.batches)))
    return evaluator.finish(n0 + n1, d0 + d1)


def run_trial(trial: Any, ctx: TrialContext, evaluator: Any,
              front: list[tuple[float, float]] | None = None) -> tuple[Any, list[float] | None]:
    """-> (Optuna trial state, objective values or None). ``front``: staged evaluation's reference."""
    import optuna

    from autocomp.search.repair import repair

    S = optuna.trial.TrialState
    assignment = {p: trial.suggest_categorical(p, list(opts)) for p, opts in ctx.space.params.items()}
    plan, fig = _figures(ctx, assignment)
    if ctx.repair and any(v > 0 for v in _excess(ctx, fig).values()):
        fixed, _ = repair(ctx.space, assignment, ctx.limits, ctx.sensitivity)
        trial.set_user_attr("repair", {p: [assignment[p], fixed[p]] for p in fixed if fixed[p] != assignment[p]})
        plan, fig = _figures(ctx, fixed)
    excess = _excess(ctx, fig)
    _record(trial, ctx, plan, fig, excess)
    if any(v > 0 for v in excess.values()):  # never evaluated
        trial.set_user_attr("skipped", "over budget: " + ", ".join(k for k, v in excess.items() if v > 0))
        return S.PRUNED, None
    key = plan.digest()
    if ctx.calibration and plan_needs(plan):  # export / train / evaluate refuse other calibration data
        plan = dataclasses.replace(plan, meta={**plan.meta, "calibration": ctx.calibration})
    body = plan.to_dict()
    body.pop("metrics", None)
    trial.set_user_attr("plan_key", key)
    trial.set_user_attr("plan", body)
    trial.set_user_attr("plan_summary", plan.summary(len(ctx.desc.layers)))  # for optuna-dashboard and reports
    named = {"size": fig["size_bytes"], "latency": fig.get("latency_ms"), "bitops": fig.get("bitops"),
             "energy": fig.get("energy")}
    with ctx.lock:
        hit = ctx.known.get(key)
    if hit is not None:
        trial.set_user_attr("duplicate_of", hit[1])
        trial.set_user_attr("evaluated", False)
        return S.COMPLETE, [float({**named, "proxy": hit[0]}[o]) for o in ctx.objectives]
    flush = getattr(trial.storage, "flush", None)
    if flush is not None:  # the plan is decided: its parameters and figures reach the storage in one batch
        flush(trial._trial_id)  # noqa: SLF001 - Optuna's id of the trial
    t0 = time.perf_counter()
    proxy = _evaluate(trial, evaluator, plan, fig["size_bytes"], front)
    trial.set_user_attr("eval_seconds", round(time.perf_counter() - t0, 4))
    if proxy is None:
        return S.PRUNED, None
    if not math.isfinite(proxy):
        trial.set_user_attr("fail_reason", "proxy is not finite (NaN/inf outputs)")
        return S.FAIL, None
    with ctx.lock:
        ctx.known.setdefault(key, (proxy, trial.number))
    return S.COMPLETE, [float({**named, "proxy": proxy}[o]) for o in ctx.objectives]
