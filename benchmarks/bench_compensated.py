"""Issue #10's figures: error-compensating options (GPTQ, SparseGPT, activation-aware low rank) on MiniLM.

    .venv/bin/python benchmarks/bench_compensated.py --json [--trials 100] [--parts uniform,costs,search,speed]

Prints one JSON object (asserts nothing):

* ``costs``: the statistics pass (seconds, MiB), and the time to compute one compensated option for every
  Linear layer (GPTQ 4g128, SparseGPT u50, activation-aware rank 1/2);
* ``uniform``: each option applied to every Linear layer alone (the embedding table kept), round-to-nearest
  (magnitude, plain SVD) vs compensated: drift on the calibration data (what the search scores) and on
  held-out text (256 sentences of the training split, never used for calibration), and the bytes;
* ``search``: per budget (10 / 12 / 15% of fp32) one search per space (``default``: round-to-nearest options
  only; ``compensated``), the same trials and seed, in this process: the best calibration proxy within the
  budget and its held-out drift, the study's first (ILP) seed, seconds to the first front; beside them the
  bits-only round-to-nearest additive ILP over measured sensitivities (the HAWQ-style baseline) and the
  compensated space's additive ILP plan;
* ``tables``: the embedding tables (the word table alone, then all three) with their output-side statistic:
  round to nearest vs the clipped grid (``/mse``) vs GPTQ / SparseGPT, calibration and held-out drift;
* ``others``: the digits model (Conv2d + Linear; zero-shot accuracy on its held-out digits) and a GPT-2-shaped
  causal LM with random weights (HF Conv1D; KL proxy), uniform options, round to nearest vs compensated;
* ``speed``: warm proxy evaluations per second of a round-to-nearest and a compensated plan of the same
  bytes, interleaved (a trial still costs one forward pass);
* ``sequential`` (``--plans P1.json,P2.json``, their statistics in ``--studies-dir``): each plan with the
  search's statistics and with sequential ones (``autocomp plan --sequential``): calibration and held-out
  drift, MRR, and the seconds the sequential pass took.
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
    ("u50+4g128", "u50/sparsegpt+4g128/gptq", "both"), ("vq4x256", "vq4x256/gptq", "codebook"),
]
BUDGETS = (0.10, 0.12, 0.15)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def linear_plan(desc, label: str, types=("Linear",)):
    """``label`` (``4g128/gptq``, ``u50``, ``u50/sparsegpt+4g128/gptq``) on every layer of ``types``."""
    from autocomp.compressors.base import option_of, technique
    from autocomp.plan import LayerPlan, Plan

    layers = {}
    for layer in desc.layers:
        if layer.type not in types:
            continue
        configs = []
        for part in label.split("+"):
            name = "lowrank" if part.startswith("r") else "prune" if part.startswith(("u", "2:4")) else "quantize"
            t, option = option_of(technique(name), part)  # a codebook label is an alternative on the quant axis
            c = t.bind(option, layer, [(layer.rows, layer.cols)])
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
    from autocomp.compressors.apply import PlanApplier
    from autocomp.compressors.calibration import gather

    data = loaded.stats_batches() if loaded.stats_batches is not None else loaded.batches
    t0 = time.perf_counter()
    stats = gather(loaded.module, desc, data)
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


TABLE_OPTIONS = [  # (round to nearest, clipped grid, compensated) on embedding tables
    ("2g32", "2g32/mse", "2g32/gptq"), ("3g64", "3g64/mse", "3g64/gptq"), ("3g32", "3g32/mse", "3g32/gptq"),
    ("4g128", "4g128/mse", "4g128/gptq"), ("u60", "u60", "u60/sparsegpt"),
    ("u60+3g64", "u60+3g64/mse", "u60/sparsegpt+3g64/gptq"),
]


def part_tables(loaded, desc, out):
    """Embedding tables with their output-side statistic: the word table alone, then all three tables;
    round to nearest, the clipped grid (``/mse``) and GPTQ / SparseGPT; calibration and held-out drift."""
    import dataclasses as dc

    from autocomp.compressors.calibration import ensure
    from autocomp.evaluators.proxy import ProxyEvaluator

    ensure(loaded, desc, None)
    ev = ProxyEvaluator(loaded, desc)
    ho = ProxyEvaluator(held_out(loaded), desc)
    rows = []
    for scope in ("word", "all"):
        for labels in TABLE_OPTIONS:
            row = {"scope": scope, "option": labels[0]}
            for key, label in zip(("rtn", "mse", "comp"), labels):
                plan = linear_plan(desc, label, types=("Embedding",))
                if scope == "word":
                    plan = dc.replace(plan, layers={n: c for n, c in plan.layers.items() if "word_embeddings" in n})
                row[f"{key}_calib"], row[f"{key}_heldout"] = round(ev(plan), 5), round(ho(plan), 5)
            row["heldout_vs_mse"] = round(row["comp_heldout"] / row["mse_heldout"], 3)
            rows.append(row)
            log(f"tables {scope} {labels[0]}: held-out rtn {row['rtn_heldout']:.5f}, mse {row['mse_heldout']:.5f}, "
                f"compensated {row['comp_heldout']:.5f} ({row['heldout_vs_mse']})")
    out["tables"] = rows


def part_search(loaded, desc, out, trials: int, seed: int, studies: Path, budgets=BUDGETS,
                spaces=("default", "compensated"), baselines: bool = True):
    import optuna

    from autocomp.compressors.calibration import attach, ensure, plan_needs
    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.plan import Plan
    from autocomp.search.config import SearchConfig
    from autocomp.search.engine import run_search
    from autocomp.search.pareto import hypervolume
    from autocomp.search.sensitivity import (
        Sensitivity,
        fisher_profile,
        ilp_assignment,
        profile,
    )
    from autocomp.space import SearchSpace, neutral_assignment

    fp32 = desc.fp32_bytes
    ho = ProxyEvaluator(held_out(loaded), desc)
    res: dict[str, dict] = {s: {} for s in spaces}
    for frac in budgets:  # one search per budget, as a user runs it: `autocomp search --budget X% --trials N`
        for space in spaces:
            marks: dict[str, float] = {}
            t0 = time.perf_counter()

            def on_event(kind, data, marks=marks, t0=t0):
                if kind == "start":
                    marks["start"] = time.perf_counter() - t0
                if kind == "trial":
                    marks[f"trial{data['number']}"] = time.perf_counter() - t0

            name = f"{space}-{round(frac * 100)}-{seed}"
            run_search(SearchConfig(budget=str(int(fp32 * frac)), model="minilm", trials=trials, seed=seed, study=name,
                                    space=space, studies_dir=studies), on_event=on_event)
            study = optuna.load_study(study_name=name, storage=f"sqlite:///{studies}/{name}.db")
            attach(loaded.module, None)
            done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            seeded = [t.number for t in done if t.user_attrs.get("reference")]
            best = min((t for t in done if t.values[1] <= fp32 * frac), key=lambda t: t.values[0])
            first_seed = next(t for t in done if t.user_attrs.get("reference") == "ilp-1.00")  # ILP at the budget
            plan = Plan.from_dict(best.user_attrs["plan"])
            if plan_needs(plan):  # the search's statistics, for scoring its plans on held-out text here
                ensure(loaded, desc, studies / "calibration")
            pts = [(t.values[1] / fp32, t.values[0]) for t in done]
            res[space][f"{frac:.2f}"] = {
                "proxy": round(best.values[0], 5), "heldout": round(ho(plan), 5), "trial": best.number,
                "own_first_ilp_seed_proxy": round(first_seed.values[0], 5),
                "hypervolume": round(hypervolume(pts, (frac, 1.0)), 5), "seconds": round(time.perf_counter() - t0, 1),
                "seconds_to_first_front": round(marks.get(f"trial{max(seeded)}", float("nan")), 1) if seeded else None,
                "seconds_before_first_trial": round(marks.get("start", float("nan")), 1),
                "summary": best.user_attrs.get("plan_summary")}
            log(f"search {space} {frac:.0%}: {json.dumps(res[space][f'{frac:.2f}'])}")
    out["search"] = res
    if not baselines:
        return
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


STRUCT_SPACE = """version: 1
layers:
  - types: [Embedding]
    quant: [keep, 8c]
structured:
  - kind: neurons
    producers: ['(?P<p>.+)\\.intermediate\\.dense']
    consumers: ['{p}.output.dense']
    keep: [1.0, 0.75, 0.5]
    importance: IMPORTANCE
    refit: REFIT
  - kind: heads
    producers: ['(?P<p>.+\\.attention)\\.self\\.query', '{p}.self.key', '{p}.self.value']
    consumers: ['{p}.output.dense']
    keep: [1.0, 0.75, 0.5]
    importance: IMPORTANCE
    refit: REFIT
"""


def part_structured(loaded, desc, out, studies: Path):
    """Structured FFN-neuron and head pruning on every block (keep 3/4 and 1/2), units ranked by weight norm or
    Fisher, with and without the least-squares refit of the consumers: calibration and held-out drift."""
    from autocomp.compressors.calibration import ensure
    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.search.config import SearchConfig
    from autocomp.search.seeds import unit_orders
    from autocomp.space import SearchSpace

    ensure(loaded, desc, studies / "calibration")
    ev = ProxyEvaluator(loaded, desc)
    ho = ProxyEvaluator(held_out(loaded), desc)
    rows = []
    for importance in ("weight", "fisher"):
        for refit in ("false", "true"):
            path = studies / f"struct-{importance}-{refit}.yaml"
            path.write_text(STRUCT_SPACE.replace("IMPORTANCE", importance).replace("REFIT", refit))
            space = SearchSpace.from_yaml(path, desc)
            if importance == "fisher":
                space.unit_orders = unit_orders(SearchConfig(budget="1", studies_dir=studies), loaded, desc, space, ev,
                                                lambda *a: None)
            for kind in ("neurons", "heads"):
                for label in ("k0.75", "k0.5"):
                    a = {p: (label if p.startswith(kind) and label in opts else opts[0])
                         for p, opts in space.params.items()}
                    plan = space.decode(a)
                    rows.append({"kind": kind, "keep": label[1:], "importance": importance, "refit": refit == "true",
                                 "calib": round(ev(plan), 5), "heldout": round(ho(plan), 5)})
                    log(f"structured {rows[-1]}")
    out["structured"] = rows


def gpt2_dir(path: Path) -> str:
    """A GPT-2-shaped causal LM (4 layers, d=256, MiniLM's tokenizer and vocabulary) with seeded random
    weights, saved as a local transformers directory: no causal LM's weights exist offline here."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from autocomp.models.minilm import load_tokenizer

    tok = load_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=256, n_layer=4, n_head=4)
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return f"hf:{path}"


def part_others(out, studies: Path):
    """The digits CNN/ViT (Conv2d statistics from unfolded patches; zero-shot accuracy on 497 held-out
    digits) and a causal LM (HF Conv1D; KL proxy): round to nearest vs compensated, uniform options."""
    from autocomp.compressors.calibration import attach, ensure
    from autocomp.deploy import make_task
    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect

    res = {}
    for spec in ("clip-digits", gpt2_dir(studies / "gpt2-tiny")):
        loaded = load_model(spec)
        desc = introspect(loaded)
        ensure(loaded, desc, studies / "calibration")
        ev = ProxyEvaluator(loaded, desc)
        types = ("Linear", "Conv2d", "Conv1D")
        task = make_task(loaded, None)[1] if spec == "clip-digits" else None
        rows = []
        for rtn, comp in (("3g32", "3g32/gptq"), ("4g32", "4g32/gptq"), ("4c", "4c/gptq"), ("u50", "u50/sparsegpt"),
                          ("2:4", "2:4/sparsegpt"), ("r0.5", "r0.5/aa")):
            row = {"option": rtn}
            for key, label in (("rtn", rtn), ("comp", comp)):
                plan = linear_plan(desc, label, types)
                row[f"{key}_proxy"] = round(ev(plan), 5)
                if task is not None:
                    import torch

                    from autocomp.compressors.apply import PlanApplier

                    with torch.inference_mode(), PlanApplier(loaded.module, desc).applied(plan):
                        row[f"{key}_accuracy"] = round(float(task(loaded.module)), 4)
            rows.append(row)
            log(f"{spec} {rtn}: {row}")
        name = "clip-digits" if spec == "clip-digits" else "gpt2-shaped (random weights)"
        res[name] = {"metric": ev.metric, "layers_with_statistics": sum(1 for l in desc.layers if l.type in types),
                     "rows": rows}
        if task is not None:
            import torch

            with torch.inference_mode():
                res[name]["fp32_accuracy"] = round(float(task(loaded.module)), 4)
        attach(loaded.module, None)
    out["others"] = res


def part_sequential(desc, out, plans: list[str], studies: Path):
    from autocomp.compressors.calibration import attach, attached
    from autocomp.compressors.sequential import sequential_statistics
    from autocomp.deploy import evaluate_plan, load_for_plan
    from autocomp.evaluators.proxy import ProxyEvaluator

    rows = []
    for path in plans:
        plan, loaded, desc = load_for_plan(Path(path), None, None, studies)
        row = {"plan": path, "size_bytes": plan.metrics.get("size_bytes")}
        base = attached(loaded.module)
        seq = sequential_statistics(loaded, desc, plan)
        row["sequential_seconds"] = round(seq.seconds, 1)
        for key, stats in (("search", base), ("sequential", seq)):
            attach(loaded.module, stats)
            row[f"{key}_calib"] = round(ProxyEvaluator(loaded, desc)(plan), 5)
            row[f"{key}_heldout"] = round(ProxyEvaluator(held_out(loaded), desc)(plan), 5)
            r = evaluate_plan(loaded, plan, desc, None, None)
            row[f"{key}_mrr"], row["fp32_mrr"] = round(r["value"], 5), round(r["fp32_value"], 5)
        row["heldout_ratio"] = round(row["sequential_heldout"] / row["search_heldout"], 3)
        rows.append(row)
        log(f"sequential {path}: held-out {row['search_heldout']:.4f} -> {row['sequential_heldout']:.4f}, MRR "
            f"{row['search_mrr']:.4f} -> {row['sequential_mrr']:.4f} (fp32 {row['fp32_mrr']:.4f}), "
            f"{row['sequential_seconds']} s")
    out["sequential"] = rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="costs,uniform,search,speed")
    ap.add_argument("--studies-dir", default=None)
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    ap.add_argument("--spaces", nargs="+", default=["default", "compensated"])
    ap.add_argument("--no-baselines", action="store_true", help="skip the ILP baselines of the search part")
    ap.add_argument("--plans", default="", help="--parts sequential: comma-separated plan files")
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
    if "tables" in parts:
        part_tables(loaded, desc, out)
    attach(loaded.module, None)
    if "search" in parts:
        part_search(loaded, desc, out, args.trials, args.seed, studies, tuple(args.budgets), tuple(args.spaces),
                    not args.no_baselines)
    if "speed" in parts:
        attach(loaded.module, None)
        part_speed(loaded, desc, out)
    if "others" in parts:
        part_others(out, studies)
    if "structured" in parts:
        part_structured(loaded, desc, out, studies)
    if "sequential" in parts:
        part_sequential(desc, out, [p for p in args.plans.split(",") if p], studies)
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
