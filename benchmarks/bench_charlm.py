"""Issue #11's character LM (benchmarks/charlm.py: 4 x nn.TransformerEncoderLayer, d=192, 4 heads, causal),
taken through autocomp as a user would: the smallest plan before -> after nn.MultiheadAttention was split,
and bits per character on held-out text of the best plan at 15% of fp32, untrained and after
`autocomp train` (target: within 2% of fp32).

    .venv/bin/python benchmarks/bench_charlm.py [--trials 100] [--steps 300] [--json]

Trains the fp32 model first if its weights are missing (600 steps, minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
SPEC = str(ROOT / "benchmarks" / "charlm.py")


def cli(*args: str) -> dict:
    proc = subprocess.run([str(ROOT / ".venv/bin/autocomp"), *args, "--json"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"autocomp {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--budget", default="15%")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import charlm

    out: dict = {}
    if not charlm.WEIGHTS.is_file():
        t0 = time.perf_counter()
        charlm.train_fp32()
        out["fp32_training_s"] = round(time.perf_counter() - t0, 1)
    from autocomp.cost.size import plan_bytes
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.plan import LayerPlan
    from autocomp.space import SearchSpace

    loaded = load_model(f"{SPEC}:model", data=f"{SPEC}:calib")
    desc = introspect(loaded)
    from autocomp.evaluators.proxy import ProxyEvaluator

    out["metric"] = ProxyEvaluator(loaded, desc).metric  # what --metric auto resolves to for this model
    out["params"] = desc.params
    out["fp32_bytes"] = desc.fp32_bytes
    space = SearchSpace.from_yaml("default", desc)
    smallest = space.decode(space.smallest_assignment())
    # before the split q/k/v lived in in_proj_weight, which no plan could touch: the same plan with them kept
    before = dataclasses.replace(smallest, layers={n: (LayerPlan() if n.endswith(("q_proj", "k_proj", "v_proj")) else c)
                                                   for n, c in smallest.layers.items()})
    out["smallest_before"] = plan_bytes(desc, before) / desc.fp32_bytes
    out["smallest_after"] = plan_bytes(desc, smallest) / desc.fp32_bytes
    with tempfile.TemporaryDirectory() as tmp:
        studies = str(Path(tmp) / "studies")
        t0 = time.perf_counter()
        res = cli("search", "--model", f"{SPEC}:model", "--data", f"{SPEC}:calib", "--budget", args.budget,
                  "--trials", str(args.trials), "--studies-dir", studies)
        out["search_s"] = round(time.perf_counter() - t0, 1)
        best = min(res["pareto"], key=lambda e: e["proxy"])
        out["best"] = {"size_of_fp32": best["size_bytes"] / desc.fp32_bytes, "proxy": best["proxy"]}
        plan = best["plan_path"]
        ev = cli("evaluate", "--plan", plan, "--data", f"{SPEC}:heldout", "--task", "perplexity")
        out["bpc_fp32"] = ev["fp32_bits_per_token"]
        out["bpc_untrained"] = ev["bits_per_token"]
        ckpt = str(Path(tmp) / "student.safetensors")
        t0 = time.perf_counter()
        cli("train", "--plan", plan, "--data", f"{SPEC}:train", "--steps", str(args.steps), "--out", ckpt)
        out["train_s"] = round(time.perf_counter() - t0, 1)
        ev2 = cli("evaluate", "--plan", plan, "--weights", ckpt, "--data", f"{SPEC}:heldout", "--task", "perplexity")
        out["bpc_trained"] = ev2["bits_per_token"]
    out["untrained_vs_fp32"] = out["bpc_untrained"] / out["bpc_fp32"] - 1
    out["trained_vs_fp32"] = out["bpc_trained"] / out["bpc_fp32"] - 1
    if args.json:
        print(json.dumps(out))
        return
    print(f"char LM: {out['params']:,} parameters, {out['fp32_bytes'] / 1e6:.2f} MB fp32, metric {out['metric']}")
    print(f"smallest plan: {out['smallest_before']:.1%} of fp32 before the split -> {out['smallest_after']:.1%} after")
    print(f"best plan at {args.budget}: {out['best']['size_of_fp32']:.1%} of fp32, proxy {out['best']['proxy']:.4f} "
          f"(search {out['search_s']} s, {args.trials} trials)")
    print(f"held-out bits/char: fp32 {out['bpc_fp32']:.4f}, plan untrained {out['bpc_untrained']:.4f} "
          f"({out['untrained_vs_fp32']:+.2%}), after {args.steps} training steps {out['bpc_trained']:.4f} "
          f"({out['trained_vs_fp32']:+.2%}; train {out['train_s']} s)")
    print(f"# {platform.node()} {platform.machine()}, python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
