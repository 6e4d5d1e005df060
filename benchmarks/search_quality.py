"""Search quality on MiniLM (issue #4's contract): autocomp vs random search vs cold TPE, by hypervolume.

    .venv/bin/python benchmarks/search_quality.py --model minilm --trials 200 --json

Runs, on the same model and calibration data in one process: (a) autocomp's default search (`--seeds ilp
--sensitivity fisher --sampler refine`), (b) random search (budget repair, no seeds), (c) cold TPE (no seeds, no repair), each for
--trials trials and every seed in --seeds, plus (d) every uniform plan, and a reference front: the union
of all runs plus a long random+repair run of --reference-trials. Hypervolume is over (proxy, size / fp32
size), both minimized, with reference point (proxy 1.0, size = the search budget, 15% of fp32).
Per-method figures are medians over seeds. The contract's `ilp` rows are the bits-only additive allocation
(HAWQ-V3 style: per-layer bit-widths chosen by an integer program over measured single-layer
sensitivities, pruning and rank priced out), the baseline the issue's figure names ("joint bits + pruning +
rank search must beat bits-only additive allocation"). `ilp_full_space` is the same program over the whole
space (bits, pruning, rank): the plan autocomp's own seeds start from, so autocomp_proxy / its ilp_proxy is
the gain of searching the true joint objective over the additive model alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from autocomp.search.pareto import hypervolume

BUDGET_FRAC = 0.15
REF_PROXY = 1.0


def run(model: str, trials: int, seed: int, sampler: str | None, seeds: str | None, repair: bool, budget: str,
        studies: Path) -> tuple[list[tuple[float, float, int]], float]:
    """One search (None = the engine's default); -> ((size, proxy, number) of completed trials, seconds from
    the call until the seeded first trials (ILP + uniform references) were all evaluated: the first front)."""
    import optuna

    from autocomp.engine import SearchConfig, run_search

    opts = {k: v for k, v in (("sampler", sampler), ("seeds", seeds)) if v is not None}
    name = f"{sampler}-{seeds}-{int(repair)}-{seed}"
    done_at: dict[int, float] = {}
    t0 = time.perf_counter()

    def on_event(kind: str, data: dict) -> None:
        if kind == "trial":
            done_at[data["number"]] = time.perf_counter() - t0

    run_search(SearchConfig(budget=budget, model=model, trials=trials, seed=seed, repair=repair, study=name,
                            studies_dir=studies, **opts), on_event=on_event)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{studies}/{name}.db")
    seeded = [t.number for t in study.trials if t.user_attrs.get("reference")]
    first = done_at.get(max(seeded), float("nan")) if seeded else min(done_at.values(), default=float("nan"))
    return [(t.values[1], t.values[0], t.number) for t in study.trials
            if t.state == optuna.trial.TrialState.COMPLETE], first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--reference-trials", type=int, default=3000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--studies-dir", default=None,
                    help="keep the runs' studies here (default: a temporary folder, deleted); a rerun with the "
                         "same folder reuses every finished run, so an interrupted benchmark resumes")
    ap.add_argument("--compare-samplers", nargs="*", default=[],
                    help="also run the default seeds with these samplers (e.g. tpe nsga2 refine) and report "
                         "their hypervolumes under 'variants' (how the default was chosen)")
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect

    desc = introspect(load_model(args.model))
    fp32 = desc.fp32_bytes
    budget = str(int(fp32 * BUDGET_FRAC))
    studies = Path(args.studies_dir) if args.studies_dir else Path(tempfile.mkdtemp(prefix="autocomp-sq-"))
    studies.mkdir(parents=True, exist_ok=True)
    ref = (BUDGET_FRAC, REF_PROXY)
    methods = {"autocomp": (None, None, True), "random": ("random", "none", True), "cold_tpe": ("tpe", "none", False)}
    methods.update({f"autocomp+{s}": (s, None, True) for s in args.compare_samplers})
    results: dict[str, list[list[tuple[float, float, int]]]] = {m: [] for m in methods}
    first_front: list[float] = []
    t_start = time.perf_counter()
    try:
        for m, (sampler, seeds, repair) in methods.items():
            for seed in args.seeds:
                t0 = time.perf_counter()
                pts, first = run(args.model, args.trials, seed, sampler, seeds, repair, budget, studies)
                results[m].append(pts)
                if m == "autocomp":
                    first_front.append(first)
                print(f"  {m} seed {seed}: {len(pts)} trials in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if not [x for x in first_front if x == x] and results["autocomp"]:
            # every autocomp run was resumed from --studies-dir (no timing): time a cold start once, in a
            # fresh folder (sensitivity profiled again), up to the last seeded trial
            import optuna

            st = optuna.load_study(study_name="None-None-1-" + str(args.seeds[0]),
                                   storage=f"sqlite:///{studies}/None-None-1-{args.seeds[0]}.db")
            n_seeded = sum(1 for t in st.trials if t.user_attrs.get("reference"))
            cold = studies / "first-front"
            shutil.rmtree(cold, ignore_errors=True)
            cold.mkdir(parents=True)
            first_front.append(run(args.model, n_seeded, args.seeds[0], None, None, True, budget, cold)[1])
        union = [p for runs in results.values() for pts in runs for p in pts]
        if args.reference_trials:
            union += run(args.model, args.reference_trials, 99, "random", "uniform", True, budget, studies)[0]
        norm = lambda pts: [(s / fp32, p) for s, p, _ in pts]  # noqa: E731
        hv_ref = hypervolume(norm(union), ref)
        hv = {m: statistics.median(hypervolume(norm(pts), ref) for pts in runs) for m, runs in results.items()}

        from autocomp.evaluators.proxy import ProxyEvaluator
        from autocomp.search.sensitivity import ilp_assignment, profile, weights_hash
        from autocomp.space import SearchSpace, reference_assignments

        loaded = load_model(args.model)
        space = SearchSpace.from_yaml("default", desc)
        ev = ProxyEvaluator(loaded, desc)
        from autocomp.cost.size import plan_bytes

        uniforms = [(plan_bytes(desc, space.decode(a)), ev(space.decode(a))) for a in reference_assignments(space).values()]
        import dataclasses

        sens = profile(space, ProxyEvaluator(dataclasses.replace(loaded, batches=loaded.batches[:1]), desc),
                       studies / "sensitivity", {"weights": weights_hash(loaded.module), "bench": 1})
        from autocomp.search.sensitivity import Sensitivity
        from autocomp.space import neutral_assignment

        neutral = neutral_assignment(space)  # bits only: every pruning / rank / structured option priced out
        bits = Sensitivity({p: {o: (v if p.endswith(":q") or o == neutral[p] else float("inf")) for o, v in row.items()}
                            for p, row in sens.table.items()}, sens.base, sens.seconds, sens.evals)
        rows_u, rows_i, rows_f = [], [], []
        for frac in (0.10, 0.12, 0.15):
            b = fp32 * frac
            best = statistics.median(min((p for s, p, _ in pts if s <= b), default=float("nan"))
                                     for pts in results["autocomp"])
            fit = [p for s, p in uniforms if s <= b]
            rows_u.append({"budget_frac": frac, "uniform_proxy": min(fit) if fit else None, "autocomp_proxy": best})
            a = ilp_assignment(space, bits, int(b))
            rows_i.append({"budget_frac": frac, "ilp_proxy": ev(space.decode(a)) if a else None, "autocomp_proxy": best})
            a = ilp_assignment(space, sens, int(b))
            rows_f.append({"budget_frac": frac, "ilp_proxy": ev(space.decode(a)) if a else None, "autocomp_proxy": best})
        t0 = time.perf_counter()
        plan = space.decode(reference_assignments(space)["uniform-6g128"])
        for _ in range(10):
            ev(plan)
        eps = 10 / (time.perf_counter() - t0)
        variants = {m: hv.pop(m) for m in list(hv) if m.startswith("autocomp+")}
        out = {"trials": args.trials, "hv_reference": hv_ref, "hv": hv,
               "hv_ratio_vs_reference": hv["autocomp"] / hv_ref if hv_ref else 0.0,
               "hv_ratio_vs_random": hv["autocomp"] / hv["random"] if hv["random"] else float("inf"),
               "uniform": rows_u, "ilp": rows_i, "ilp_full_space": rows_f, "evals_per_second": eps,
               "seconds_to_first_front": statistics.median(f) if (f := [x for x in first_front if x == x]) else None}
        if variants:
            out["variants"] = variants
        print(json.dumps(out) if args.json else json.dumps(out, indent=1))
        print(f"  total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    finally:
        if not args.studies_dir:
            shutil.rmtree(studies, ignore_errors=True)


if __name__ == "__main__":
    main()
