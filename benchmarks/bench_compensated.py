"""Issue #10's figures: error-compensating options (GPTQ, SparseGPT, activation-aware low rank) on MiniLM.

    .venv/bin/python benchmarks/bench_compensated.py --json [--trials 100] [--parts uniform,costs,search,speed]

Prints one JSON object (asserts nothing):

* ``costs``: the statistics pass (seconds, MiB), and the time to compute one compensated option for every
  Linear layer (GPTQ 4g128, SparseGPT u50, activation-aware rank 1/2);
* ``uniform``: each option applied to every Linear layer alone (the embedding table kept), round-to-nearest
  (magnitude, plain SVD) vs compensated: drift on the calibration data (what the search scores) and on
  held-out text (256 sentences of the training split, never used for calibration), and the bytes;
* ``search``: one search per space (``default``: round-to-nearest options only; ``compensated``), the same
  trials, seed and 15% budget, in this process: the best calibration proxy under 10 / 12 / 15% of fp32 and
  its held-out drift, the seconds to the first front, the cold profile; beside them the bits-only
  round-to-nearest additive ILP (the HAWQ-style baseline) and the compensated space's own additive ILP plan
  (what its seeds start from) at each budget;
* ``speed``: warm proxy evaluations per second of a round-to-nearest and a compensated plan of the same
  bytes, interleaved (a trial still costs one forward pass).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

PAIRS = [  # (round-to-nearest label, compensated label, axis)
    ("2g32", "2g32/gptq", "quant"), ("2g128", "2g128/gptq", "quant"), ("2c", "2c/gptq", "quant"),
    ("3g32", "3g32/gptq", "quant"), ("3g128", "3g128/gptq", "quant"), ("3c", "3c/gptq", "quant"),
    ("4g32", "4g32/gptq", "quant"), ("4g128", "4g128/gptq", "quant"), ("4c", "4c/gptq", "quant"),
    ("u50", "u50/sparsegpt", "prune"), ("2:4", "2:4/sparsegpt", "prune"), ("r0.5", "r0.5/aa", "rank"),
    ("u50+4g128", "u50/sparsegpt+4g128/gptq", "both"),
]
BUDGETS = (0.10, 0.12, 0.15)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def linear_plan(desc, label: str):
    """``label`` (``4g128/gptq``, ``u50``, ``u50/sparsegpt+4g128/gptq``) on every Linear layer."""
    from autocomp.compressors.base import technique
    from autocomp.plan import LayerPlan, Plan

    layers = {}
    for layer in desc.layers:
        if layer.type != "Linear":
            continue
        configs = []
        for part in label.split("+"):
            name = "lowrank" if part.startswith("r") else "prune" if part.startswith(("u", "2:4")) else "quantize"
            t = technique(name)
            c = t.bind(t.parse(part), layer, [(layer.rows, layer.cols)])
            if c is not None:
                configs.append(c)
        if configs:
            layers[layer.name] = LayerPlan(*configs)
    return Plan(layers=layers, fingerprint=desc.fingerprint, model_spec="minilm", model_name="minilm")


def held_out(loaded):
    from autocomp.models.minilm import load_tokenizer
    from autocomp.models.textdata import calibration_sentences, tokenize_batches

    texts = calibration_sentences(split="train")[:256]
    return dataclasses.replace(loaded, batches=tokenize_batches(load_tokenizer(), texts, max_length=32, batch_size=32))


def part_costs(loaded, desc, out):
    from autocomp.compressors.calibration import gather
    from autocomp.compressors.apply import PlanApplier

    t0 = time.perf_counter()
    stats = gather(loaded.module, desc, loaded.batches)
    out["costs"] = {"statistics_seconds": round(time.perf_counter() - t0, 2), "statistics_mib": round(stats.nbytes() / 2**20, 1),
                    "statistics_layers": len(stats.hessians), "input_rows": max(stats.rows.values())}
    from autocomp.compressors.calibration import attach

    attach(loaded.module, stats)
    n_linear = sum(1 for l in desc.layers if l.type == "Linear")
    for label in ("4g128", "4g128/gptq", "u50/sparsegpt", "r0.5/aa", "u50/sparsegpt+4g128/gptq"):
        plan = linear_plan(desc, label)
        applier = PlanApplier(loaded.module, desc)
        t0 = time.perf_counter()
        for name in plan.layers:
            applier.compressed(plan, name)
        sec = time.perf_counter() - t0
        out["costs"][f"{label}_seconds_all_linear"] = round(sec, 2)
        out["costs"][f"{label}_ms_per_layer"] = round(1e3 * sec / n_linear, 1)
        log(f"cost {label}: {sec:.2f} s for {n_linear} layers")


def part_uniform(loaded, desc, out):
    from autocomp.compressors.calibration import ensure
    from autocomp.cost.size import plan_bytes
    from autocomp.evaluators.proxy import ProxyEvaluator

    ensure(loaded, desc, None)
    ev = ProxyEvaluator(loaded, desc)
    ho = ProxyEvaluator(held_out(loaded), desc)
    rows = []
    for rtn, comp, axis in PAIRS:
        row = {"option": rtn, "compensated": comp, "axis": axis}
        for key, label in (("rtn", rtn), ("comp", comp)):
            plan = linear_plan(desc, label)
            row[f"{key}_calib"] = round(ev(plan), 5)
            row[f"{key}_heldout"] = round(ho(plan), 5)
            row[f"{key}_bytes"] = plan_bytes(desc, plan)
        row["heldout_ratio"] = round(row["comp_heldout"] / row["rtn_heldout"], 3) if row["rtn_heldout"] else None
        rows.append(row)
        log(f"uniform {rtn:>10}: calib {row['rtn_calib']:.4f} -> {row['comp_calib']:.4f}, held-out "
            f"{row['rtn_heldout']:.4f} -> {row['comp_heldout']:.4f} ({row['heldout_ratio']})")
    out["uniform"] = rows


def part_search(loaded, desc, out, trials: int, seed: int, studies: Path):
    import optuna

    from autocomp.compressors.calibration import attach
    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.plan import Plan
    from autocomp.search.config import SearchConfig
    from autocomp.search.engine import run_search
    from autocomp.search.pareto import hypervolume
    from autocomp.search.sensitivity import Sensitivity, fisher_profile, ilp_assignment, profile
    from autocomp.space import SearchSpace, neutral_assignment

    fp32 = desc.fp32_bytes
    budget = str(int(fp32 * max(BUDGETS)))
    ho = ProxyEvaluator(held_out(loaded), desc)
    res: dict[str, dict] = {}
    for space in ("default", "compensated"):
        first: dict[str, float] = {}
        t0 = time.perf_counter()

        def on_event(kind, data, first=first, t0=t0):
            if kind == "status" and "sensitivity" in data.get("message", "") and "profile_start" not in first:
                first["profile_start"] = time.perf_counter() - t0
            if kind == "start":
                first["profile_end"] = time.perf_counter() - t0
            if kind == "trial":
                first.setdefault("first_trial", time.perf_counter() - t0)
                first[f"trial{data['number']}"] = time.perf_counter() - t0

        name = f"{space}-{seed}"
        run_search(SearchConfig(budget=budget, model="minilm", trials=trials, seed=seed, study=name, space=space,
                                studies_dir=studies), on_event=on_event)
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{studies}/{name}.db")
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        seeded = [t.number for t in done if t.user_attrs.get("reference")]
        pts = [(t.values[1] / fp32, t.values[0]) for t in done]
        entry = {"seconds": round(time.perf_counter() - t0, 1), "hypervolume": hypervolume(pts, (max(BUDGETS), 1.0)),
                 "seconds_to_first_front": round(first.get(f"trial{max(seeded)}", float("nan")), 1) if seeded else None,
                 "profile_seconds": round(first.get("profile_end", 0) - first.get("profile_start", 0), 1)}
        for frac in BUDGETS:
            fit = [t for t in done if t.values[1] <= fp32 * frac]
            best = min(fit, key=lambda t: t.values[0]) if fit else None
            if best is None:
                continue
            plan = Plan.from_dict(best.user_attrs["plan"])
            entry[f"{frac:.2f}"] = {"proxy": round(best.values[0], 5), "heldout": round(ho(plan), 5),
                                     "summary": best.user_attrs.get("plan_summary")}
        res[space] = entry
        log(f"search {space}: {json.dumps(entry)}")
    # baselines in the same process: bits-only round-to-nearest ILP over measured sensitivities, and the
    # compensated space's own additive ILP (Fisher, as its seeds)
    attach(loaded.module, None)
    space = SearchSpace.from_yaml("default", desc)
    ev = ProxyEvaluator(loaded, desc)
    sens = profile(space, ProxyEvaluator(dataclasses.replace(loaded, batches=loaded.batches[:1]), desc),
                   studies / "sensitivity-bench", {"bench": "measured-default"})
    neutral = neutral_assignment(space)
    bits = Sensitivity({p: {o: (v if p.endswith(":q") or o == neutral[p] else float("inf")) for o, v in row.items()}
                        for p, row in sens.table.items()}, sens.base, sens.seconds, sens.evals)
    from autocomp.compressors.calibration import ensure

    cspace = SearchSpace.from_yaml("compensated", desc)
    ilp = {}
    for frac in BUDGETS:
        a = ilp_assignment(space, bits, int(fp32 * frac))
        ilp[f"{frac:.2f}"] = {"bits_only_rtn_ilp": round(ev(space.decode(a)), 5) if a else None,
                              "bits_only_rtn_ilp_heldout": round(ho(space.decode(a)), 5) if a else None}
    ensure(loaded, desc, studies / "calibration")
    cev = ProxyEvaluator(loaded, desc)
    csens = fisher_profile(cspace, ProxyEvaluator(dataclasses.replace(loaded, batches=loaded.batches[:1]), desc,
                                                  applier=cev.applier), studies / "sensitivity-bench",
                           {"bench": "fisher-compensated", "calibration": "minilm-32"})
    for frac in BUDGETS:
        a = ilp_assignment(cspace, csens, int(fp32 * frac))
        ilp[f"{frac:.2f}"]["compensated_additive_ilp"] = round(cev(cspace.decode(a)), 5) if a else None
    res["ilp"] = ilp
    out["search"] = res


def part_speed(loaded, desc, out, rounds: int = 5):
    from autocomp.compressors.calibration import ensure
    from autocomp.evaluators.proxy import ProxyEvaluator

    ensure(loaded, desc, None)
    ev = ProxyEvaluator(loaded, desc)
    plans = {"rtn": linear_plan(desc, "4g128"), "compensated": linear_plan(desc, "4g128/gptq")}
    for p in plans.values():
        ev(p)  # warm: compressed weights cached
    rates: dict[str, list[float]] = {k: [] for k in plans}
    for _ in range(rounds):
        for k, p in plans.items():
            t0 = time.perf_counter()
            for _ in range(5):
                ev(p)
            rates[k].append(5 / (time.perf_counter() - t0))
    out["speed"] = {f"{k}_evals_per_second": round(statistics.median(v), 2) for k, v in rates.items()}
    out["speed"]["ratio"] = round(out["speed"]["compensated_evals_per_second"] / out["speed"]["rtn_evals_per_second"], 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="costs,uniform,search,speed")
    ap.add_argument("--studies-dir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from autocomp.compressors.calibration import attach
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect

    loaded = load_model("minilm")
    desc = introspect(loaded)
    studies = Path(args.studies_dir or tempfile.mkdtemp(prefix="autocomp-comp-"))
    out: dict = {"date": time.strftime("%Y-%m-%d"), "trials": args.trials, "seed": args.seed}
    parts = args.parts.split(",")
    if "costs" in parts:
        part_costs(loaded, desc, out)
    if "uniform" in parts:
        part_uniform(loaded, desc, out)
    attach(loaded.module, None)
    if "search" in parts:
        part_search(loaded, desc, out, args.trials, args.seed, studies)
    if "speed" in parts:
        attach(loaded.module, None)
        part_speed(loaded, desc, out)
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
