"""The first trials of a new study: the additive integer program's plans over the sensitivity database (for a
sweep of budgets up to the user's) and the uniform reference plans; plus the data-driven unit rankings of
structured groups with ``importance: fisher``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from autocomp.desc import ModelDesc
from autocomp.search.config import SearchConfig

__all__ = ["sensitivity_database", "unit_orders", "ilp_seeds", "enqueue_seeds"]


def sensitivity_database(cfg: SearchConfig, loaded: Any, desc: ModelDesc, space: Any, evaluator: Any, emit: Any) -> Any:
    """The sensitivity database for this model / data / space, profiled on the first calibration batch."""
    import dataclasses

    from autocomp.evaluators.proxy import ProxyEvaluator, data_fingerprint
    from autocomp.search.sensitivity import fisher_profile, profile, weights_hash

    from autocomp.compressors.calibration import attached

    sliced = dataclasses.replace(loaded, batches=loaded.batches[:1], metric=evaluator.metric)
    stats = attached(loaded.module)
    # the profile shares the search's applier: every option of every layer it compresses (and the SVDs, sort
    # orders and magnitude thresholds behind them) is then warm for the seeds and the first trials (a profile
    # of its own threw them away: ~2 s of cold work in a MiniLM search's first trials). The search's embedding
    # rows are a superset of the first batch's, whose rows alone have Fisher mass, so the values agree.
    fast = ProxyEvaluator(sliced, desc, applier=evaluator.applier)
    from autocomp.compressors.store import code_digest

    # the compressors' code too: an option whose label keeps its meaning can change its weights (e.g. /gptq's
    # clipped grid in quantize version 5), and a profile of the old weights would mislead the seeds
    parts = {"weights": weights_hash(loaded.module), "data": data_fingerprint(sliced.batches),
             "metric": evaluator.metric, "evaluator": "proxy-v1", "code": code_digest()}
    if stats is not None:
        parts["calibration"] = stats.key
    log = lambda m: emit("status", {"message": m})  # noqa: E731
    measured = None
    if cfg.sensitivity in ("measured", "both"):
        emit("status", {"message": "measured sensitivity database (cached after the first run)"})
        measured = profile(space, fast, cfg.studies_dir / "sensitivity", parts, log=log)
        if cfg.sensitivity == "measured":
            return measured
    from autocomp.memory import LARGE_MODEL_BYTES

    emit("status", {"message": "fisher sensitivity database (cached after the first run)"})
    # a large model's backward passes dominate its search (24 GPT-2-medium blocks: ~35 s a probe on 2
    # cores); 2 probes per output row instead of 8
    probes = 2 if desc.fp32_bytes > LARGE_MODEL_BYTES else 8
    sens = fisher_profile(space, fast, cfg.studies_dir / "sensitivity", parts, probes=probes, log=log)
    if measured is not None:  # "both": Fisher drives repair and the refiner; each table gives its seeds
        sens.others = {"measured": measured}
    return sens


def unit_orders(cfg: SearchConfig, loaded: Any, desc: ModelDesc, space: Any, evaluator: Any,
                 emit: Any) -> dict[str, tuple[int, ...]]:
    """Data-driven unit rankings for structured groups with ``importance: fisher`` (first calibration batch)."""
    import dataclasses

    from autocomp.evaluators.proxy import ProxyEvaluator, data_fingerprint
    from autocomp.search.sensitivity import unit_importance, weights_hash

    sliced = dataclasses.replace(loaded, batches=loaded.batches[:1], metric=evaluator.metric)
    parts = {"weights": weights_hash(loaded.module), "data": data_fingerprint(sliced.batches),
             "metric": evaluator.metric}
    return unit_importance(space, ProxyEvaluator(sliced, desc), cfg.studies_dir / "sensitivity", parts,
                           log=lambda m: emit("status", {"message": m}))


def ilp_seeds(space: Any, sens: Any, budget: int, smallest: int, split: Mapping[str, float] | None = None,
               n: int = 5, limits: Sequence[Any] = ()) -> list[tuple[float, dict[str, str]]]:
    """Additive-ILP plans for ``n`` budgets from the user's down to 40% of it (or the smallest plan): the
    front below the budget too, where (size, proxy) trade-offs are steepest. ``n`` grows with the trial count
    (5 for short runs, up to 12). ``limits`` (latency, BitOps) hold for every plan of the sweep."""
    from autocomp.search.sensitivity import ilp_assignment

    seeds, seen = [], set()
    low = max(0.4, smallest / budget)
    for i in range(n):
        frac = 1.0 - (1.0 - low) * i / max(1, n - 1) if n > 1 else 1.0
        b = int(budget * frac)
        if b < smallest:
            continue
        # per-modality shares stay those of the user's budget (they are caps, not targets)
        a = ilp_assignment(space, sens, b, {m: int(budget * f) for m, f in (split or {}).items()}, limits)
        if a is not None and tuple(sorted(a.items())) not in seen:
            seen.add(tuple(sorted(a.items())))
            seeds.append((frac, a))
    return seeds


def enqueue_seeds(study: Any, cfg: SearchConfig, space: Any, sens: Any, budget: int, smallest: int,
                  split: Mapping[str, float], limits: Sequence[Any]) -> None:
    """Queue the seed plans of a new study, labelled (``reference``) so reports can tell them apart. A seed
    already in the study (a run killed while seeding queued it) is not queued twice."""
    from autocomp.space import reference_assignments

    seeds = []
    if cfg.seeds == "ilp":  # plans of the additive model for a sweep of budgets up to the user's
        # with --sensitivity both, the measured table's sweep too (labelled ilp-measured-*): neither estimate
        # gives the better plan at every budget, and the search keeps what scores best
        tables = [("ilp", sens), *((f"ilp-{k}", t) for k, t in sens.others.items())]
        taken = set()
        for prefix, table in tables:
            for frac, assignment in ilp_seeds(space, table, budget, smallest, split,
                                              n=min(12, max(5, cfg.trials // 20)),
                                              limits=[lim for lim in limits if lim.name in ("latency", "bitops")]):
                key = tuple(sorted(assignment.items()))
                if key not in taken:  # the same plan from both tables is queued once
                    taken.add(key)
                    seeds.append((f"{prefix}-{frac:.2f}", assignment))
    # the uniform reference plans (repaired onto the budget when they do not fit)
    seeds += list(reference_assignments(space).items()) if cfg.seeds != "none" else []
    have = {t.user_attrs.get("reference") for t in study.get_trials(deepcopy=False)}
    for label, assignment in seeds:
        if label not in have:
            study.enqueue_trial(assignment, user_attrs={"reference": label})
