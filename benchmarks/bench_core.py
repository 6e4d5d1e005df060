"""Core figures for docs/BENCHMARKS.md (issue #2). Prints a table; asserts nothing.

    .venv/bin/python benchmarks/bench_core.py            # all figures
    .venv/bin/python benchmarks/bench_core.py --quick    # fewer repetitions

1. proxy evaluations per second on MiniLM with the default calibration set: TPE-like trials (a plan
   changes a few layers from a recent one, so compressed-weight caches hit and the blocks before the first
   change are reused) and cold random plans (every layer changes: the worst case);
2. wall time of `autocomp search --budget 30MB --trials 50` from the command to the written front,
   run as a user would (a fresh process, a fresh study);
3. predicted bytes vs numpy-packed bytes for every layer of MiniLM under several plans (exact?).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def evals_per_second(n: int) -> dict[str, float]:
    import torch

    from autocomp.cost.size import plan_bytes
    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.search.repair import repair, size_limit
    from autocomp.space import SearchSpace, reference_assignments

    loaded = load_model("minilm")
    desc = introspect(loaded)
    space = SearchSpace.from_yaml("default", desc)
    ev = ProxyEvaluator(loaded, desc)
    tokens = sum(int(b["attention_mask"].sum()) for b in loaded.batches)
    padded = sum(b["attention_mask"].numel() for b in loaded.batches)
    rng = random.Random(0)

    def fit(a):
        size = plan_bytes(desc, space.decode(a))
        return repair(space, a, [size_limit(space, 30_000_000)])[0] if size > 30_000_000 else a

    # warm the per-layer caches (SVDs, sort orders) as a search does in its first trials
    for _ in range(10):
        ev(space.decode(fit({p: rng.choice(o) for p, o in space.params.items()})))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(n):
            for b in loaded.batches:
                loaded.module(**b)
    forward = (time.perf_counter() - t0) / n

    cold = [space.decode(fit({p: rng.choice(o) for p, o in space.params.items()})) for _ in range(n)]
    t0 = time.perf_counter()
    for plan in cold:
        ev(plan)
    cold_s = (time.perf_counter() - t0) / n

    # TPE-like: mutate 3 choices of a reference plan each trial
    base = dict(reference_assignments(space)["uniform-6g128"])
    local = []
    for _ in range(n):
        a = dict(base)
        for p in rng.sample(list(space.params), 3):
            a[p] = rng.choice(space.params[p])
        local.append(space.decode(fit(a)))
    t0 = time.perf_counter()
    for plan in local:
        ev(plan)
    local_s = (time.perf_counter() - t0) / n
    return {"calibration_sentences": sum(b["input_ids"].shape[0] for b in loaded.batches),
            "tokens": tokens, "tokens_padded": padded, "forward_s": forward,
            "evals_per_s_local": 1 / local_s, "evals_per_s_cold": 1 / cold_s}


def search_wall_time() -> float:
    tmp = Path(tempfile.mkdtemp(prefix="autocomp-bench-"))
    try:
        t0 = time.perf_counter()
        res = subprocess.run([str(ROOT / ".venv/bin/autocomp"), "search", "--budget", "30MB", "--trials", "50",
                              "--studies-dir", str(tmp), "--json"], capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(res.stderr)
        assert (tmp / "minilm-30MB" / "pareto.json").is_file()
        front = json.loads(res.stdout)["pareto"]
        print(f"  front: {[(e['size_bytes'], round(e['proxy'], 5)) for e in front]}")
        return wall
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bytes_exact() -> tuple[int, int, int]:
    import numpy as np

    from autocomp.compressors.apply import PlanApplier
    from autocomp.compressors.pipeline import pack_layer
    from autocomp.cost.size import plan_bytes
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.space import SearchSpace, reference_assignments

    loaded = load_model("minilm")
    desc = introspect(loaded)
    space = SearchSpace.from_yaml("transformer", desc)
    rng = random.Random(1)
    plans = [space.decode(a) for a in list(reference_assignments(space).values())[:3]]
    plans += [space.decode({p: rng.choice(o) for p, o in space.params.items()}) for _ in range(2)]
    applier = PlanApplier(loaded.module, desc)
    mods = dict(loaded.module.named_modules())
    names = {n for layer in desc.layers for n in (f"{layer.name}.weight", f"{layer.name}.bias")}
    other = sum(p.detach().numpy().nbytes for n, p in loaded.module.named_parameters() if n not in names)
    exact = 0
    for plan in plans:
        total = other
        for layer in desc.layers:
            parts, rows, _ = applier.layer_parts(plan, layer.name)
            bias = getattr(mods[layer.name], "bias", None)
            if bias is not None:
                bias = bias.detach()[rows] if rows is not None else bias.detach()
            total += sum(a.nbytes for a in pack_layer(layer.name, parts, plan.layer(layer.name), bias=bias).values())
        total += sum(np.packbits(np.ones(g.units, bool)).nbytes for g in plan.structured.values())
        predicted = plan_bytes(desc, plan)
        print(f"  plan with {len(plan.layers)} layers, {len(plan.structured)} structured groups: "
              f"predicted {predicted} B, packed {total} B")
        exact += predicted == total
    return exact, len(plans), 0


def uniform_drifts() -> dict[str, float]:
    """The proxy of the uniform plans DESIGN.md's table lists (every layer of the default space alike)."""
    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.space import SearchSpace, uniform_assignment

    loaded = load_model("minilm")
    desc = introspect(loaded)
    space = SearchSpace.from_yaml("default", desc)
    ev = ProxyEvaluator(loaded, desc)
    out = {}
    for label in ("8c", "6g128", "5g128", "4g128", "3g32", "2g32"):
        a = uniform_assignment(space, label)
        if a is not None:
            out[label] = ev(space.decode(a))
    return out


def storage_ms(postgres: str | None, n: int) -> dict[str, dict[str, float]]:
    """Storage work of one MiniLM-sized trial per storage kind, as the engine does it (batched) and one
    transaction per write (before issue #14), in ms: the time inside the storage's methods and the whole loop
    around them; see benchmarks/bench_distributed.storage_overhead."""
    from bench_distributed import storage_overhead

    tmp = Path(tempfile.mkdtemp(prefix="autocomp-storage-"))
    stores = {"sqlite": f"sqlite:///{tmp}/s.db", "journal": str(tmp / "s.log")}
    if postgres:
        stores["postgresql"] = postgres
    warm = 5  # untimed first trials on each storage (connections, compiled statements: once per search)
    out: dict[str, dict[str, float]] = {f"{w}{x}": {} for w in ("storage", "loop") for x in ("", "_refine", "_single")}
    for k, u in stores.items():
        # the random sampler (no reads of the study), the engine's default sampler (its reads each trial), and
        # the random sampler with one write per transaction (the old way)
        for way, trials, sampler, suffix in ((True, n, "random", ""), (True, n, "refine", "_refine"),
                                             (False, min(n, 30), "random", "_single")):
            spent = storage_overhead(u, trials, batched=way, warmup=warm, sampler=sampler)
            out["storage" + suffix][k], out["loop" + suffix][k] = 1e3 * spent["storage"], 1e3 * spent["loop"]
    memory = storage_overhead(":memory:", n, warmup=warm)  # the same loop on Optuna's in-memory storage
    out["memory"] = {k: 1e3 * v for k, v in memory.items()}
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def search_trials_per_second(trials: int = 100, replay: bool = False) -> tuple[float, dict[str, float] | None]:
    """`autocomp search --model minilm --budget 15% --trials N` in a fresh process and study: trials per second
    from the first trial's start to the last trial's end (model loading and profiling excluded). ``replay``:
    also the search's evaluated plans scored again in order, with and without block reuse (:func:`replay`)."""
    import optuna

    tmp = Path(tempfile.mkdtemp(prefix="autocomp-bench-"))
    try:
        res = subprocess.run([str(ROOT / ".venv/bin/autocomp"), "search", "--budget", "15%", "--trials", str(trials),
                              "--studies-dir", str(tmp), "--study", "t", "--json"], capture_output=True, text=True,
                             cwd=ROOT)
        if res.returncode != 0:
            raise SystemExit(res.stderr)
        done = [t for t in optuna.load_study(study_name="t", storage=f"sqlite:///{tmp}/t.db").trials
                if t.state == optuna.trial.TrialState.COMPLETE]
        span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
        return len(done) / span, replay_plans(done) if replay else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replay_plans(trials: list) -> dict[str, float]:
    """A search's evaluated plans, in the order it scored them, through the proxy without block reuse, with it,
    and with it but padded encoder blocks (one applier, its compressed weights warmed first; each plan through
    each in turn): ms per plan, the ratios, and how many values are bit for bit the same."""
    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.plan import Plan

    plans = [Plan.from_dict(t.user_attrs["plan"]) for t in trials if t.user_attrs.get("evaluated", True)]
    loaded = load_model("minilm")
    desc = introspect(loaded)
    plain = ProxyEvaluator(loaded, desc, reuse_bytes=0)
    reuse = ProxyEvaluator(loaded, desc, applier=plain.applier)
    padded = ProxyEvaluator(loaded, desc, applier=plain.applier, unpadded=False)
    for plan in plans:
        plain(plan)
    spent = {"plain": 0.0, "reuse": 0.0, "padded": 0.0}
    same = 0
    for plan in plans:
        values = []
        for name, ev in (("plain", plain), ("padded", padded), ("reuse", reuse)):
            t0 = time.perf_counter()
            values.append(ev(plan))
            spent[name] += time.perf_counter() - t0
        same += len(set(values)) == 1
    n = len(plans)
    return {"plans": n, "ms_without_reuse": 1e3 * spent["plain"] / n, "ms_with_reuse": 1e3 * spent["reuse"] / n,
            "speedup": spent["plain"] / spent["reuse"], "ms_with_reuse_padded": 1e3 * spent["padded"] / n,
            "unpadded_speedup": spent["padded"] / spent["reuse"], "unpadded_blocks": reuse.unpadded.enabled,
            "identical": same, "block_hits": reuse.reuse.hits, "block_misses": reuse.reuse.misses}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout (the issue #14 contract)")
    ap.add_argument("--postgres", default=None, help="a PostgreSQL URL: also measure its storage work per trial")
    args = ap.parse_args()
    import torch

    if args.json:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        e = evals_per_second(10 if args.quick else 30)
        spent = storage_ms(args.postgres, 10 if args.quick else 100)
        rate, replayed = search_trials_per_second(30 if args.quick else 100, replay=True)
        proxy_ms = 1e3 / e["evals_per_s_local"]
        print(json.dumps({"evals_per_second": e["evals_per_s_local"], "proxy_ms_per_trial": proxy_ms,
                          "evals_per_second_cold": e["evals_per_s_cold"],
                          # the time inside the storage's methods per trial, its share of a proxy evaluation, and
                          # the whole ask / suggest / tell loop around it (Optuna's suggest machinery, the
                          # sampler's draws and the plan's decoding added); the same on Optuna's in-memory storage
                          "storage_ms_per_trial": spent["storage"],
                          "storage_share_of_proxy": {k: v / proxy_ms for k, v in spent["storage"].items()},
                          "storage_ms_per_trial_default_sampler": spent["storage_refine"],
                          "storage_share_of_proxy_default_sampler": {k: v / proxy_ms
                                                                     for k, v in spent["storage_refine"].items()},
                          "loop_ms_per_trial_default_sampler": spent["loop_refine"],
                          "loop_ms_per_trial": spent["loop"], "loop_ms_per_trial_in_memory": spent["memory"]["loop"],
                          "storage_ms_per_trial_in_memory": spent["memory"]["storage"],
                          "storage_ms_per_trial_one_write_per_transaction": spent["storage_single"],
                          "loop_ms_per_trial_one_write_per_transaction": spent["loop_single"],
                          "search_trials_per_second": rate, "search_replayed": replayed}))
        return

    print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, python {platform.python_version()})")
    e = evals_per_second(10 if args.quick else 30)
    print(f"proxy evaluation on MiniLM ({e['calibration_sentences']} sentences, {e['tokens']} tokens, "
          f"{e['tokens_padded']} with padding): forward alone {e['forward_s'] * 1000:.0f} ms")
    print(f"  evaluations/s, TPE-like plans (3 choices changed): {e['evals_per_s_local']:.2f}")
    print(f"  evaluations/s, random plans (every layer changed): {e['evals_per_s_cold']:.2f}")
    drifts = uniform_drifts()
    print("uniform plans, drift: " + ", ".join(f"{k} {v:.4g}" for k, v in drifts.items()))
    exact, n, _ = bytes_exact()
    print(f"predicted == numpy-packed bytes: {exact}/{n} plans exact")
    wall = search_wall_time()
    print(f"autocomp search --budget 30MB --trials 50 (fresh process and study): {wall:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
