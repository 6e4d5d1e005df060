"""Sensitivity database figures (issue #4 part 1): measured vs the squared-gradient (Fisher) estimate.

    .venv/bin/python benchmarks/bench_sensitivity.py [--model minilm] [--space default]

On the profiling slice the search uses (first calibration batch), prints: profiling time and evaluations
of each, how the two tables agree (Spearman over every (choice, option), overall and per kind of option;
fraction of options within 2x), and the additive-ILP seed each table yields at 10/12/15% of fp32 size with
its jointly measured proxy on the full calibration set. Caches go to a temporary folder (cold runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--space", default="default")
    ap.add_argument("--probes", type=int, default=8)
    args = ap.parse_args()
    import numpy as np
    from scipy.stats import spearmanr

    from autocomp.cost.size import plan_bytes
    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.search.sensitivity import fisher_profile, ilp_assignment, profile
    from autocomp.space import SearchSpace

    loaded = load_model(args.model)
    desc = introspect(loaded)
    space = SearchSpace.from_yaml(args.space, desc)
    full = ProxyEvaluator(loaded, desc)
    fast = ProxyEvaluator(dataclasses.replace(loaded, batches=loaded.batches[:1], metric=full.metric), desc)
    tmp = Path(tempfile.mkdtemp(prefix="autocomp-sens-"))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {args.model}, space {args.space}: {len(space.params)} choices, "
          f"{sum(len(o) - 1 for o in space.params.values())} non-neutral options")
    measured = profile(space, fast, tmp / "m", {"w": 1})
    fisher = fisher_profile(space, fast, tmp / "f", {"w": 1}, probes=args.probes)
    print(f"measured: {measured.evals} proxy evaluations, {measured.seconds:.1f} s")
    backward = args.probes * len(fast.batches)
    print(f"fisher:   {backward} backward passes ({args.probes} probes) + {fisher.evals - backward} proxy evaluations "
          f"(choices with >= 5% of the bytes, measured), {fisher.seconds:.1f} s "
          f"({measured.seconds / fisher.seconds:.1f}x faster)")
    rows = [(p, o, measured.table[p][o], fisher.table[p][o]) for p in space.params for o in space.params[p]
            if measured.table[p][o] > 0 or fisher.table[p][o] > 0]
    a = np.array([r[2] for r in rows])
    b = np.array([r[3] for r in rows])
    print(f"agreement over {len(rows)} options: Spearman {spearmanr(a, b).statistic:.3f}; "
          f"within 2x {np.mean((b <= 2 * a) & (a <= 2 * b)):.0%}; median fisher/measured {np.median(b / np.maximum(a, 1e-12)):.2f}")
    for dim, name in (("q", "quantization"), ("p", "pruning"), ("r", "rank"), ("keep", "structured")):
        sel = [i for i, r in enumerate(rows) if r[0].rpartition(":")[2] == dim]
        if len(sel) > 2:
            print(f"  {name:12s} {len(sel):4d} options: Spearman {spearmanr(a[sel], b[sel]).statistic:.3f}, "
                  f"within 2x {np.mean((b[sel] <= 2 * a[sel]) & (a[sel] <= 2 * b[sel])):.0%}")
    for frac in (0.10, 0.12, 0.15):
        budget = int(desc.fp32_bytes * frac)
        out = []
        for label, sens in (("measured", measured), ("fisher", fisher)):
            asg = ilp_assignment(space, sens, budget)
            if asg is None:
                out.append(f"{label} -")
                continue
            plan = space.decode(asg)
            out.append(f"{label} {full(plan):.4f} ({plan_bytes(desc, plan) / desc.fp32_bytes:.1%})")
        print(f"ILP seed at {frac:.0%} of fp32, joint proxy: " + "; ".join(out))


if __name__ == "__main__":
    main()
