"""Issue #6 figures on the built-in multimodal demo (clip-digits).

    .venv/bin/python benchmarks/bench_multimodal.py --json

1. fp32 zero-shot accuracy of the demo (497 held-out digits, one caption per class);
2. proxy fidelity: over --plans random plans repaired onto --budget, Spearman of the alignment proxy and of
   per-tower embedding drift against zero-shot accuracy;
3. the best plan of an autocomp search at --budget (--trials trials, default settings) and the best
   uniform plan that fits, zero-shot accuracy before and after --steps steps of distillation training
   (response + relation + contrastive, `autocomp train`'s defaults for dual encoders).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="clip-digits")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--plans", type=int, default=30)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--studies-dir", default=None, help="keep the study here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from autocomp.budget import parse_budget
    from autocomp.compressors.apply import PlanApplier
    from autocomp.cost.size import plan_bytes
    from autocomp.deploy import make_task, proxy_fidelity
    from autocomp.engine import SearchConfig, front_trials, open_study, plan_of, run_search
    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.space import SearchSpace, reference_assignments
    from autocomp.training import finalize, train

    studies = Path(args.studies_dir) if args.studies_dir else Path(tempfile.mkdtemp(prefix="autocomp-mm-"))
    out: dict = {"model": args.model, "budget": args.budget}
    try:
        loaded = load_model(args.model)
        desc = introspect(loaded)
        name, task = make_task(loaded, None)
        with torch.inference_mode():
            out["fp32_accuracy"] = task(loaded.module)
        log(f"fp32 {name}: {out['fp32_accuracy']:.4f}")

        t0 = time.perf_counter()
        fid = proxy_fidelity(loaded, desc, args.plans, args.budget, log=log)
        out["fidelity"] = {"plans": args.plans, "spearman_alignment": fid["spearman_proxy_vs_metric"],
                           "spearman_tower_drift": fid["spearman_tower_drift_vs_metric"],
                           "accuracy_range": [min(r["value"] for r in fid["rows"]), max(r["value"] for r in fid["rows"])],
                           "seconds": time.perf_counter() - t0, "rows": fid["rows"]}
        log(f"Spearman vs accuracy: alignment {out['fidelity']['spearman_alignment']:.3f}, "
            f"tower drift {out['fidelity']['spearman_tower_drift']:.3f}")

        t0 = time.perf_counter()
        run_search(SearchConfig(budget=args.budget, model=args.model, trials=args.trials, study="mm-bench",
                                studies_dir=studies))
        handle = open_study("mm-bench", None, studies)
        budget = parse_budget(args.budget, desc.fp32_bytes)
        front = front_trials(handle.study, budget)
        best = plan_of(min(front, key=lambda t: t.values[0]), handle)
        out["search_seconds"] = time.perf_counter() - t0

        space = SearchSpace.from_yaml("default", desc)
        applier = PlanApplier(loaded.module, desc)
        ev = ProxyEvaluator(loaded, desc)

        def acc(plan) -> float:
            with torch.inference_mode(), applier.applied(plan):
                return task(loaded.module)

        uniforms = []
        for label, a in reference_assignments(space).items():
            plan = space.decode(a)
            if plan_bytes(desc, plan) <= budget:
                uniforms.append((acc(plan), label, plan))
        u_acc, u_label, u_plan = max(uniforms, key=lambda x: x[0])
        rows = {}
        batches = loaded.train_batches()
        for key, plan, label in (("searched", best, f"trial best (proxy {ev(best):.4g})"), ("uniform", u_plan, u_label)):
            before = acc(plan)
            ck = studies / f"{key}.safetensors"
            ck.unlink(missing_ok=True)
            t0 = time.perf_counter()
            res = train(loaded, plan, desc, args.steps, ck, batches,
                        distill=("response", "relation", "contrastive"), checkpoint_every=0)
            student = finalize(res["student"])
            with torch.inference_mode():
                after = task(student)
            rows[key] = {"plan": label, "size_bytes": plan_bytes(desc, plan), "size_frac": plan_bytes(desc, plan) / desc.fp32_bytes,
                         "proxy": ev(plan), "accuracy_before": before, "accuracy_after": after,
                         "train_seconds": time.perf_counter() - t0, "items_per_second": res["items_per_second"]}
            log(f"{key} {label}: {before:.4f} -> {after:.4f} after {args.steps} steps")
        out["plans"] = rows
        print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    finally:
        if not args.studies_dir:
            shutil.rmtree(studies, ignore_errors=True)


if __name__ == "__main__":
    main()
