"""Figures for issue #5 that are not a single CLI call (docs/BENCHMARKS.md). Prints; asserts nothing.

    .venv/bin/python benchmarks/bench_deploy.py [--plan plan.json] [--steps 8] [--rounds 3]

1. training throughput with and without bf16 autocast, measured side by side: ``rounds`` alternations of
   ``steps`` steps each (fp32, bf16, fp32, ...), median items/s of each, and the ratio;
2. the packed export of the plan: payload bytes vs predicted, header overhead of the file.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", default=None, help="default: the ILP plan at 10%% of fp32 size")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from autocomp.artifact import export
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.plan import Plan
    from autocomp.training import prepare_for_training, train

    loaded = load_model("minilm")
    desc = introspect(loaded)
    if args.plan:
        plan = Plan.load(args.plan)
    else:
        import dataclasses

        from autocomp.evaluators.proxy import ProxyEvaluator
        from autocomp.search.sensitivity import fisher_profile, ilp_assignment
        from autocomp.space import SearchSpace

        space = SearchSpace.from_yaml("default", desc)
        fast = ProxyEvaluator(dataclasses.replace(loaded, batches=loaded.batches[:1], metric="cosine"), desc)
        tmp = Path(tempfile.mkdtemp())
        sens = fisher_profile(space, fast, tmp, {"bench": 1})
        plan = space.decode(ilp_assignment(space, sens, int(0.10 * desc.fp32_bytes)))
    batches = loaded.train_batches()
    rates: dict[str, list[float]] = {"none": [], "bf16": []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            for amp in ("none", "bf16"):
                out = Path(d) / f"{amp}-{r}.safetensors"
                res = train(loaded, plan, desc, args.steps, out, batches[r * args.steps:], amp=amp,
                            checkpoint_every=0, resume=False)
                rates[amp].append(res["items_per_second"])
        fp32, bf16 = statistics.median(rates["none"]), statistics.median(rates["bf16"])
        print(f"training throughput (items/s, median of {args.rounds} x {args.steps} steps, interleaved): "
              f"fp32 {fp32:.1f}, bf16 autocast {bf16:.1f} (bf16/fp32 = {bf16 / fp32:.2f})")
        r = export(prepare_for_training(loaded.module, plan, desc), plan, Path(d) / "m.safetensors", spec="minilm",
                   desc=desc)
        print(f"export: predicted {r['predicted_bytes']}, payload {r['payload_bytes']} "
              f"({'exact' if r['payload_bytes'] == r['predicted_bytes'] else 'MISMATCH'}), file {r['file_bytes']} "
              f"(header {r['file_bytes'] - r['payload_bytes']} bytes, "
              f"{(r['file_bytes'] - r['payload_bytes']) / r['file_bytes']:.2%} of the file)")


if __name__ == "__main__":
    main()
