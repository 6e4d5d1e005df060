"""``autocomp`` command line. Heavy imports (torch, optuna, transformers) happen inside commands."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from autocomp.errors import AutocompError

STUDIES_DIR = click.option("--studies-dir", type=click.Path(path_type=Path), default=None,
                           help="Where studies live (default: $AUTOCOMP_STUDIES or ./studies).")


def _studies_dir(value: Path | None) -> Path:
    return value or Path(os.environ.get("AUTOCOMP_STUDIES", "studies"))


def _console(stderr: bool = True) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 140)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="autocomp")
def cli() -> None:
    """Search per-layer compression plans (quantization, pruning, low-rank) under a size budget."""


# -- search ------------------------------------------------------------------------------------------------
@cli.command()
@click.option("--budget", required=True, help="Size limit: 200MB, 1.5GB (10^n), 30MiB (2^n), 25% of fp32, or bytes.")
@click.option("--model", default="minilm", show_default=True, help="minilm | file.py:fn | pkg.module:fn | hf:DIR")
@click.option("--data", default=None, help="Calibration batches: file.py:fn | pkg.module:fn (default: the model's own).")
@click.option("--study", default=None, help="Study name (default: from --model and --budget, so re-running resumes).")
@click.option("--storage", default=None, help="Optuna storage URL (default: sqlite:///studies/<study>.db).")
@click.option("--space", default="default", show_default=True, help="Search space: a name in search_spaces/ or a YAML path.")
@click.option("--trials", default=100, show_default=True, type=int, help="Total finished trials the study should have.")
@click.option("--sampler", default="refine", show_default=True, type=click.Choice(["tpe", "nsga2", "random", "refine"]),
              help="refine: mutate front plans (level switches between layers), EvoPress-style; tpe: multivariate TPE.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--metric", default="auto", show_default=True, type=click.Choice(["auto", "cosine", "kl", "mse", "alignment", "alignment-i2t", "alignment-t2i", "tower"]),
              help="Output distortion; auto: the model's own (cosine for embeddings, kl for logits, else mse).")
@click.option("--repair/--no-repair", default=True, show_default=True,
              help="Move over-budget proposals onto the budget instead of skipping them.")
@click.option("--hardware", default=None, help="Device for latency/energy: a name from `autocomp hardware list`, "
              "cpu-local (after calibrate) or a device YAML.")
@click.option("--workload", default=None, help="BATCH or BATCHxSEQ for latency (default 1x128 for sequence models).")
@click.option("--latency-budget", default=None, help="Latency limit on --hardware, e.g. 40ms; checked before the proxy.")
@click.option("--bitops-budget", default=None, help="BitOps limit, e.g. 300G; checked before the proxy.")
@click.option("--objectives", default="proxy,size", show_default=True,
              help="2 or 3 of proxy, size, latency, bitops, energy (must include proxy).")
@click.option("--seeds", default="ilp", show_default=True, type=click.Choice(["uniform", "ilp", "none"]),
              help="First trials of a new study: uniform plans, or also the additive integer program's plans "
                   "over a sensitivity database (profiled once, cached under studies/sensitivity/).")
@click.option("--sensitivity", default="fisher", show_default=True, type=click.Choice(["measured", "fisher"]),
              help="How --seeds ilp gets per-option sensitivities: one proxy evaluation each, or the cheaper "
                   "squared-gradient (Fisher) estimate.")
@click.option("--staged/--no-staged", default=False, show_default=True,
              help="Score the first calibration batch first and skip candidates the front clearly beats.")
@click.option("--min-bits", default=None, help="Per-modality weight-bit floors, e.g. vision=8 or vision=8,text=4.")
@click.option("--max-sparsity", default=None, help="Per-modality pruning caps, e.g. text=0.5 (structured, 2:4 "
                                                   "and unstructured).")
@click.option("--budget-split", default=None, help="Per-modality shares of the byte budget, e.g. text=70%% "
                                                   "(unlisted modalities share the rest).")
@click.option("--backend", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="Where proxy evaluations run: this process, or Ray actors (each loads the model once).")
@click.option("--workers", default=2, show_default=True, type=int, help="Ray actors (--backend ray).")
@click.option("--address", default=None, help="An existing Ray cluster: auto or ray://host:port (--backend ray).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@STUDIES_DIR
def search(budget: str, model: str, data: str | None, study: str | None, storage: str | None, space: str,
           trials: int, sampler: str, seed: int, metric: str, repair: bool, hardware: str | None,
           workload: str | None, latency_budget: str | None, bitops_budget: str | None, objectives: str,
           seeds: str, sensitivity: str, staged: bool, min_bits: str | None, max_sparsity: str | None,
           budget_split: str | None, backend: str, workers: int, address: str | None, as_json: bool,
           studies_dir: Path | None) -> None:
    """Search compression plans under --budget; resumes the study if it exists."""
    from autocomp.engine import SearchConfig, run_search

    cfg = SearchConfig(budget=budget, model=model, data=data, study=study, storage=storage, space=space,
                       trials=trials, sampler=sampler, seed=seed, metric=metric, repair=repair,
                       studies_dir=_studies_dir(studies_dir), hardware=hardware, workload=workload,
                       latency_budget=latency_budget, bitops_budget=bitops_budget, objectives=objectives,
                       seeds=seeds, staged=staged, sensitivity=sensitivity, min_bits=min_bits,
                       max_sparsity=max_sparsity, budget_split=budget_split, backend=backend, workers=workers,
                       address=address)
    progress = _SearchProgress(_console())
    try:
        result = run_search(cfg, on_event=progress.event)
    finally:
        progress.close()
    _print_result(result, as_json)


class _SearchProgress:
    """Rich progress bar on stderr: trials done and the best feasible proxy so far."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.progress: Any = None
        self.task: Any = None
        self.budget = 0

    def _best(self, front: list[Any]) -> str:
        from autocomp.budget import format_bytes

        if not front:
            return "no feasible plan yet"
        proxy, size = min(front)
        return f"best proxy {proxy:.4g} at {format_bytes(size)}  (front: {len(front)})"

    def event(self, kind: str, data: dict[str, Any]) -> None:
        from autocomp.budget import format_bytes

        if kind == "status":
            self.console.print(f"[dim]{data['message']}…[/dim]")
        elif kind == "warning":
            self.console.print(f"[yellow]warning:[/yellow] {data['message']}")
        elif kind == "start":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.console.print(
                f"study [bold]{data['study']}[/bold] ({data['storage']}): budget {format_bytes(data['budget_bytes'])} "
                f"of {format_bytes(data['fp32_bytes'])} fp32, smallest plan {format_bytes(data['smallest_bytes'])}, "
                f"{data['params']} choices; {data['done']}/{data['total']} trials done"
            )
            self.progress = Progress(TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                     TextColumn("{task.fields[best]}"), console=self.console, transient=False)
            self.progress.start()
            front = [(e["proxy"], e["size_bytes"]) for e in data["front"]]
            self.task = self.progress.add_task("search", total=data["total"], completed=data["done"],
                                               best=self._best(front))
        elif kind == "trial" and self.progress is not None:
            self.progress.update(self.task, completed=data["done"], best=self._best(data["front"]))
        elif kind == "interrupted":
            self.close()
        elif kind == "done":
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _print_result(result: dict[str, Any], as_json: bool, by_modality: bool = False) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    from rich.table import Table

    from autocomp.budget import format_bytes

    con = _console(stderr=False)
    fp32 = result["model"]["fp32_bytes"]
    table = Table(title=f"Pareto front of {result['study']} (budget {format_bytes(result['budget_bytes'])}, "
                        f"{result['trials_complete']} complete, {result['trials_failed']} failed)")
    hw = "latency_ms" in (result["pareto"][0] if result["pareto"] else {})
    cols = ("trial", "size", "of fp32", "proxy", *(("ms", "GBitOps", "energy") if hw else ()), "plan")
    for col in cols:
        table.add_column(col, justify="right" if col != "plan" else "left")
    for e in result["pareto"]:
        extra = (f"{e['latency_ms']:.2f}", f"{e['bitops']:.1f}", f"{e['energy']:.2f}") if hw else ()
        table.add_row(str(e["trial"]), format_bytes(e["size_bytes"]), f"{e['size_bytes'] / fp32:.1%}",
                      f"{e['proxy']:.5f}", *extra, e["plan_path"])
    con.print(table)
    if not result["pareto"]:
        con.print("no feasible plan yet")
    if by_modality and result["pareto"]:
        mt = Table(title="By modality (proxy: that modality compressed alone)")
        for col in ("trial", "modality", "size", "share", "ms", "proxy"):
            mt.add_column(col, justify="right")
        for e in result["pareto"]:
            for m, v in e.get("by_modality", {}).items():
                mt.add_row(str(e["trial"]), m, format_bytes(v["size_bytes"]), f"{v.get('share', 0):.1%}",
                           f"{v['latency_ms']:.2f}" if "latency_ms" in v else "-",
                           f"{v['proxy']:.5f}" if "proxy" in v else "-")
        con.print(mt)


# -- pareto / plan -----------------------------------------------------------------------------------------
@cli.command()
@click.option("--study", required=True)
@click.option("--storage", default=None, help="Optuna storage URL (default: sqlite:///studies/<study>.db).")
@click.option("--by-modality", is_flag=True,
              help="Per modality: bytes, share, layer latency (with --hardware studies) and proxy contribution "
                   "(the plan with only that modality compressed; loads the model).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@STUDIES_DIR
def pareto(study: str, storage: str | None, by_modality: bool, as_json: bool, studies_dir: Path | None) -> None:
    """Show the stored Pareto front of a study (runs no trials; loads the model only for --by-modality)."""
    from autocomp.engine import open_study, plan_of, study_result

    handle = open_study(study, storage, _studies_dir(studies_dir))
    result = study_result(handle)
    if by_modality and result["pareto"]:
        from autocomp.deploy import modality_breakdown
        from autocomp.desc import ModelDesc
        from autocomp.models import load_model

        meta = handle.meta
        desc = ModelDesc.from_dict(meta["model"])
        data = str(meta.get("data_spec") or "")
        loaded = load_model(meta["model_spec"], data=data if ":" in data and not data.startswith("builtin:") else None,
                            metric=meta.get("metric", "auto"))
        cost = None
        if meta.get("hardware"):
            from autocomp.cost.device import load_device
            from autocomp.cost.latency import CostModel, parse_workload

            cost = CostModel(load_device(meta["hardware"]), desc, parse_workload(meta.get("workload"), desc))
        by_trial = {t.number: t for t in handle.study.get_trials(deepcopy=False)}
        rows = modality_breakdown([plan_of(by_trial[e["trial"]], handle) for e in result["pareto"]], desc, loaded, cost)
        for e, row in zip(result["pareto"], rows):
            e["by_modality"] = row
    _print_result(result, as_json, by_modality=by_modality)


@cli.command()
@click.option("--study", required=True)
@click.option("--storage", default=None)
@click.option("--pick", default="best", show_default=True,
              help="best (lowest proxy) | smallest | knee | trial:N (a front trial number)")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Where to write the plan JSON.")
@STUDIES_DIR
def plan(study: str, storage: str | None, pick: str, out: Path, studies_dir: Path | None) -> None:
    """Write one plan of the study's Pareto front to --out."""
    from autocomp.engine import front_trials, open_study, plan_of
    from autocomp.search.pareto import knee_index

    handle = open_study(study, storage, _studies_dir(studies_dir))
    front = front_trials(handle.study, handle.budget_bytes)
    from autocomp.engine import trial_metric

    objs = handle.meta.get("objectives", ["proxy", "size"])
    if not front:
        raise AutocompError(f"study {study!r} has no feasible plan yet; run `autocomp search` first")
    if pick == "best":
        chosen = min(front, key=lambda t: (trial_metric(t, "proxy", objs), trial_metric(t, "size", objs)))
    elif pick == "smallest":
        chosen = front[0]
    elif pick == "knee":
        chosen = front[knee_index([(trial_metric(t, "size", objs), trial_metric(t, "proxy", objs)) for t in front])]
    elif pick.startswith("trial:") and pick[6:].isdigit():
        number = int(pick[6:])
        match = [t for t in handle.study.get_trials(deepcopy=False) if t.number == number and t.values]
        if not match or "plan" not in match[0].user_attrs:
            raise AutocompError(f"study {study!r} has no completed trial {number}")
        chosen = match[0]
    else:
        raise AutocompError(f"--pick {pick!r} is not best, smallest, knee or trial:N")
    p = plan_of(chosen, handle)
    p = type(p)(**{**p.__dict__, "meta": {**p.meta, "study": study, "trial": chosen.number,
                                           "budget_bytes": handle.budget_bytes}})
    p.save(out)
    from autocomp.budget import format_bytes

    _console().print(f"wrote {out}: trial {chosen.number}, {format_bytes(p.metrics['size_bytes'])}, "
                     f"proxy {p.metrics['proxy']:.5f}")


# -- layers / score ----------------------------------------------------------------------------------------
@cli.command()
@click.option("--model", default="minilm", show_default=True)
@click.option("--data", default=None)
@click.option("--json", "as_json", is_flag=True)
def layers(model: str, data: str | None, as_json: bool) -> None:
    """List the compressible layers of a model: shape, parameters, FLOPs per sample, block, modality."""
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect

    desc = introspect(load_model(model, data=data))
    if as_json:
        click.echo(json.dumps(desc.to_dict()))
        return
    from rich.table import Table

    from autocomp.budget import format_bytes

    table = Table(title=f"{desc.name}: {desc.params:,} parameters, {format_bytes(desc.fp32_bytes)}")
    for col in ("layer", "type", "shape", "params", "MFLOPs/sample", "block", "modality"):
        table.add_column(col, justify="left" if col in ("layer", "type", "modality") else "right")
    for lay in desc.layers:
        table.add_row(lay.name, lay.type, f"{lay.rows}x{lay.cols}", f"{lay.params:,}",
                      f"{lay.flops_per_sample / 1e6:.2f}", "" if lay.block is None else str(lay.block), lay.modality)
    _console(stderr=False).print(table)


def _fidelity_study(study: str | None, storage: str | None, studies_dir: Path | None, default: str | None,
                    desc: Any) -> Any:
    """The study a fidelity figure is recorded in: ``study`` (must exist and fit the model), else the plan's
    own study where it is found (quietly none where it is not: plans travel without their studies)."""
    from autocomp.engine import check_study_model, open_study

    name = study or default
    if not name:
        return None
    try:
        handle = open_study(name, storage, _studies_dir(studies_dir))
    except AutocompError:
        if study:
            raise
        return None
    try:
        check_study_model(handle, desc)
    except AutocompError:
        if study:
            raise
        return None
    return handle


@cli.command()
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True)
@click.option("--model", default=None, help="Default: the model the plan was made for.")
@click.option("--data", default=None)
@click.option("--metric", default="auto", type=click.Choice(["auto", "cosine", "kl", "mse", "alignment", "alignment-i2t", "alignment-t2i", "tower"]))
@click.option("--json", "as_json", is_flag=True)
def score(plan_path: Path, model: str | None, data: str | None, metric: str, as_json: bool) -> None:
    """Apply a plan to its model and report exact size and proxy (checks the plan fits the model)."""
    from autocomp.compressors.apply import check_plan
    from autocomp.cost.size import plan_bytes
    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.plan import Plan

    p = Plan.load(plan_path)
    spec = model or p.model_spec
    if not spec:
        raise AutocompError(f"plan {str(plan_path)!r} names no model; pass --model")
    loaded = load_model(spec, data=data, metric=metric)
    desc = introspect(loaded)
    check_plan(p, desc)
    out = {"model": spec, "size_bytes": plan_bytes(desc, p), "fp32_bytes": desc.fp32_bytes,
           "proxy": ProxyEvaluator(loaded, desc)(p)}
    click.echo(json.dumps(out) if as_json else
               f"{spec}: {out['size_bytes']} bytes ({out['size_bytes'] / desc.fp32_bytes:.1%} of fp32), proxy {out['proxy']:.5f}")


# -- train / export / evaluate -------------------------------------------------------------------------------
@cli.command()
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True)
@click.option("--model", default=None, help="Default: the model the plan was made for.")
@click.option("--data", default=None, help="Training batches, file.py:fn or pkg.module:fn (built-in models bring "
                                           "their own, disjoint from the calibration data).")
@click.option("--steps", default=300, show_default=True, type=int)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint (safetensors); resumed if it exists.")
@click.option("--lr", default=2e-4, show_default=True, type=float,
              help="AdamW peak learning rate (2e-4 beat 5e-5 on MiniLM from both starting points; docs/BENCHMARKS.md).")
@click.option("--distill", default="auto", show_default=True,
              help="Distillation losses: any of response, feature, relation, contrastive (dual encoders). "
                   "auto: response,relation (+ contrastive for dual encoders).")
@click.option("--temperature", default=2.0, show_default=True, type=float, help="Softening for KL (logit outputs).")
@click.option("--amp", default="none", show_default=True, type=click.Choice(["none", "bf16"]))
@click.option("--schedule", default="fixed", show_default=True, type=click.Choice(["fixed", "progressive"]),
              help="progressive: unstructured sparsity ramps up over the first 30% of steps.")
@click.option("--task-loss", default=None, help="file.py:fn(output, batch) -> loss tensor, added when you have labels.")
@click.option("--checkpoint-every", default=50, show_default=True, type=int)
@click.option("--train-embeddings", is_flag=True,
              help="Also train embedding tables through their fake quantization (slower steps; they are often "
                   "half of a small encoder's weights).")
@click.option("--clip", default="learned", show_default=True, type=click.Choice(["learned", "mse", "minmax"]),
              help="Quantization ranges. learned: start from each group's least-error clipping range, then train "
                   "one clipping ratio per group (best; slower steps); mse: that start, ranges then follow the "
                   "weights; minmax: the plan's plain min/max ranges throughout.")
@click.option("--json", "as_json", is_flag=True)
def train(plan_path: Path, model: str | None, data: str | None, steps: int, out: Path, lr: float, distill: str,
          temperature: float, amp: str, schedule: str, task_loss: str | None, checkpoint_every: int,
          train_embeddings: bool, clip: str, as_json: bool) -> None:
    """Quantization-aware training with distillation from the original model."""
    if steps < 1:
        raise AutocompError(f"--steps must be >= 1, got {steps}")
    from autocomp.deploy import load_for_plan
    from autocomp.training import train as run_train

    plan_obj, loaded, desc = load_for_plan(plan_path, model, data)
    if data:
        batches = loaded.batches  # the given data, loaded and checked against the model
    elif loaded.train_batches is not None:
        batches = loaded.train_batches()
    else:
        raise AutocompError(f"model {loaded.spec!r} brings no training data; pass --data file.py:fn")
    loss_fn = None
    if task_loss:
        from autocomp.models.intake import resolve_callable

        loss_fn = resolve_callable(task_loss, what="task loss")
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    if distill.strip() == "auto":
        dual = loaded.metric.startswith("alignment") or (loaded.metric == "auto" and loaded.info.get("dual_encoder"))
        distill = "response,relation" + (",contrastive" if dual else "")
    kinds = tuple(k.strip() for k in distill.split(",") if k.strip())
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=_console(),
                  transient=False) as bar:
        tid = bar.add_task("train", total=steps, info="")

        def on_step(done: int, total: int, losses: dict[str, float], rate: float) -> None:
            bar.update(tid, completed=done, info=f"loss {losses['loss']:.5f}  {rate:.1f} items/s")

        result = run_train(loaded, plan_obj, desc, steps, out, batches, lr=lr, distill=kinds,
                           temperature=temperature, amp=amp, schedule=schedule, task_loss=loss_fn,
                           checkpoint_every=checkpoint_every, on_step=on_step, train_embeddings=train_embeddings,
                           clip=clip)
    summary = {"out": str(out), "steps": result["steps"], "start_step": result["start_step"],
               "seconds": round(result["seconds"], 2), "items_per_second": round(result["items_per_second"], 2),
               "final_loss": result["final_loss"]}
    click.echo(json.dumps(summary) if as_json else
               f"wrote {out}: {steps} steps ({result['start_step']} resumed), final loss "
               f"{result['final_loss'].get('loss', float('nan')):.5f}, {summary['items_per_second']} items/s")


@cli.command()
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True)
@click.option("--model", default=None, help="Default: the model the plan was made for.")
@click.option("--data", default=None, help="Calibration data spec recorded for user models (file.py:fn).")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="A checkpoint from `autocomp train`.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--study", default=None,
              help="Record predicted vs real bytes in this study for its report (default: the study the plan came "
                   "from, when it is found).")
@click.option("--storage", default=None)
@click.option("--clip", default="minmax", show_default=True, type=click.Choice(["minmax", "mse"]),
              help="Without --weights: minmax exports exactly what the search scored; mse first clamps each "
                   "quantization group to its least-error range (same size, usually a better model).")
@click.option("--json", "as_json", is_flag=True)
@STUDIES_DIR
def export(plan_path: Path, model: str | None, data: str | None, weights: Path | None, out: Path, study: str | None,
           storage: str | None, clip: str, as_json: bool, studies_dir: Path | None) -> None:
    """Write the packed model (safetensors, docs/FORMAT.md); its payload is exactly the predicted size."""
    from autocomp.deploy import load_for_plan
    from autocomp.artifact import export as do_export

    if weights is not None and clip != "minmax":
        raise AutocompError("--clip applies to plans exported without --weights; a trained checkpoint keeps the "
                            "clipping it was trained with (autocomp train --clip)")
    plan_obj, loaded, desc = load_for_plan(plan_path, model, data)
    handle = _fidelity_study(study, storage, studies_dir, plan_obj.meta.get("study"), desc)
    if weights is not None:
        from autocomp.training import load_student

        student, _ = load_student(loaded.module, plan_obj, desc, weights)
    else:
        from autocomp.compressors.student import prepare_for_training, start_training

        student = prepare_for_training(loaded.module, plan_obj, desc)
        start_training(student, clip)
    result = do_export(student, plan_obj, out, spec=model or plan_obj.model_spec,
                       data_spec=data or (loaded.data_spec if ":" in (loaded.data_spec or "") and not
                                          loaded.data_spec.startswith("builtin:") else None), desc=desc)
    if handle is not None:
        from autocomp.fidelity import record

        record(handle.study, "export", {**result, "path": str(out.resolve()), "trial": plan_obj.meta.get("trial"),
                                        "trained": weights is not None})
    if as_json:
        click.echo(json.dumps(result))
    else:
        from autocomp.budget import format_bytes

        click.echo(f"wrote {out}: payload {format_bytes(result['payload_bytes'])} (predicted "
                   f"{format_bytes(result['predicted_bytes'])}), file {format_bytes(result['file_bytes'])}")


@cli.command()
@click.option("--model", default=None, help="Default: the plan's model, else minilm.")
@click.option("--data", default=None)
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None)
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="A checkpoint from `autocomp train` or an export file.")
@click.option("--task", default=None, help="file.py:fn(model) -> float, higher is better (user models).")
@click.option("--pairs", default=500, show_default=True, type=int, help="Retrieval pairs of the built-in task.")
@click.option("--random-plans", default=None, type=int, help="Proxy fidelity: this many random plans within --budget.")
@click.option("--budget", default=None, help="Budget for --random-plans.")
@click.option("--study", default=None, help="Also score this study's Pareto plans (proxy fidelity).")
@click.option("--storage", default=None)
@click.option("--space", default="default", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--by-modality", is_flag=True, help="Add per-modality bytes, share and proxy contribution of --plan.")
@click.option("--json", "as_json", is_flag=True)
@STUDIES_DIR
def evaluate(model: str | None, data: str | None, plan_path: Path | None, weights: Path | None, task: str | None,
             pairs: int, random_plans: int | None, budget: str | None, study: str | None, storage: str | None,
             space: str, seed: int, by_modality: bool, as_json: bool, studies_dir: Path | None) -> None:
    """The true task metric of a plan (or of trained / exported weights), or proxy-vs-metric fidelity."""
    from autocomp.deploy import evaluate_plan, load_for_plan, proxy_fidelity

    if pairs < 10:
        raise AutocompError(f"--pairs must be >= 10, got {pairs}")
    if random_plans is not None or study:
        if random_plans and not budget:
            raise AutocompError("--random-plans needs --budget (e.g. --budget 30MB)")
        from autocomp.models import load_model
        from autocomp.models.introspect import introspect

        loaded = load_model(model or "minilm", data=data)
        desc = introspect(loaded)
        con = _console()
        result = proxy_fidelity(loaded, desc, random_plans or 0, budget or "100%", space, study, storage,
                                _studies_dir(studies_dir), task, pairs, seed, log=con.print)
        click.echo(json.dumps(result) if as_json else
                   f"{result['metric']}: Spearman(proxy, metric) {result['spearman_proxy_vs_metric']:.3f} over "
                   f"{len(result['rows'])} plans (sign: lower proxy with higher metric is positive)" + (
                       f"; per-tower drift {result['spearman_tower_drift_vs_metric']:.3f}"
                       if "spearman_tower_drift_vs_metric" in result else ""))
        return
    if plan_path is not None:
        plan_obj, loaded, desc = load_for_plan(plan_path, model, data)
    else:
        from autocomp.models import load_model
        from autocomp.models.introspect import introspect

        plan_obj, loaded = None, load_model(model or "minilm", data=data)
        desc = introspect(loaded)
    result = evaluate_plan(loaded, plan_obj, desc, weights, task, pairs)
    if by_modality:
        if plan_obj is None:
            raise AutocompError("--by-modality needs --plan")
        from autocomp.deploy import modality_breakdown

        result["by_modality"] = modality_breakdown([plan_obj], desc, loaded)[0]
    click.echo(json.dumps(result) if as_json else
               f"{result['metric']}: {result['value']:.4f} (fp32 {result['fp32_value']:.4f})" + (
                   "".join(f"\n  {m}: {v['size_bytes']} bytes ({v['share']:.1%}), proxy alone {v['proxy']:.5f}"
                           for m, v in result["by_modality"].items()) if by_modality else ""))


# -- reports -----------------------------------------------------------------------------------------------
@cli.command()
@click.option("--study", required=True)
@click.option("--storage", default=None, help="Optuna storage URL (default: sqlite:///studies/<study>.db).")
@click.option("--format", "fmt", default="html", show_default=True, type=click.Choice(["html", "png"]))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The HTML file, or the folder for the PNGs.")
@STUDIES_DIR
def report(study: str, storage: str | None, fmt: str, out: Path, studies_dir: Path | None) -> None:
    """One self-contained HTML report (opens offline) or PNG figures: Pareto view, plan maps, sensitivity,
    fidelity (predicted vs measured latency and bytes, proxy vs true metric)."""
    try:
        import matplotlib  # noqa: F401
        import plotly  # noqa: F401
    except ImportError:
        raise AutocompError("reports need plotly and matplotlib; pip install 'autocomp[report]'") from None
    from autocomp.engine import open_study
    from autocomp.report import collect, write_html, write_pngs

    handle = open_study(study, storage, _studies_dir(studies_dir))
    data = collect(handle)
    if fmt == "html":
        if out.is_dir():
            raise AutocompError(f"--out {str(out)!r} is a folder; give the HTML file's path (e.g. {out / 'report.html'})")
        path = write_html(data, out)
        _console().print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {len(data['points'])} trials)")
    else:
        paths = write_pngs(data, out)
        _console().print(f"wrote {len(paths)} PNGs to {out}")
    if not data["points"]:
        _console().print(f"study {study!r} has no finished trials yet; the report says so")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@STUDIES_DIR
def studies(as_json: bool, studies_dir: Path | None) -> None:
    """The studies under the studies folder: trials, budget, best plan."""
    import optuna

    from autocomp.engine import ATTR, front_trials, trial_metric

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = _studies_dir(studies_dir)
    rows = []
    for db in sorted(root.glob("*.db")) if root.is_dir() else []:
        url = f"sqlite:///{db.as_posix()}"
        try:
            summaries = optuna.get_all_study_summaries(storage=url, include_best_trial=False)
        except Exception:
            continue
        for summ in summaries:
            meta = summ.user_attrs.get(ATTR)
            if not meta:
                continue
            st = optuna.load_study(study_name=summ.study_name, storage=url)
            objectives = meta.get("objectives", ["proxy", "size"])
            front = front_trials(st, meta["budget_bytes"], objectives)
            best = min(front, key=lambda t: trial_metric(t, "proxy", objectives)) if front else None
            rows.append({"study": summ.study_name, "model": meta.get("model_spec"), "storage": url,
                         "trials_complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in st.trials),
                         "budget_bytes": meta["budget_bytes"], "best_trial": best.number if best else None,
                         "best_proxy": trial_metric(best, "proxy", objectives) if best else None,
                         "best_size_bytes": int(trial_metric(best, "size", objectives)) if best else None})
    if as_json:
        click.echo(json.dumps(rows))
        return
    from rich.table import Table

    from autocomp.budget import format_bytes

    table = Table(title=f"studies in {root}")
    for col in ("study", "model", "trials", "budget", "best proxy", "best size", "best trial"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["study"], str(r["model"]), str(r["trials_complete"]), format_bytes(r["budget_bytes"]),
                      f"{r['best_proxy']:.5f}" if r["best_proxy"] is not None else "-",
                      format_bytes(r["best_size_bytes"]) if r["best_size_bytes"] else "-", str(r["best_trial"]))
    _console(stderr=False).print(table if rows else f"no autocomp studies under {root}")


# -- hardware ----------------------------------------------------------------------------------------------
@cli.group()
def hardware() -> None:
    """Devices for the latency / BitOps / energy cost model: list, calibrate this machine, validate."""


@hardware.command("list")
@click.option("--json", "as_json", is_flag=True)
def hardware_list(as_json: bool) -> None:
    """Devices with their figures and where each figure comes from."""
    from autocomp.cost.device import list_devices

    devices = list_devices()
    if as_json:
        click.echo(json.dumps([d.summary() for d in devices]))
        return
    from rich.table import Table

    table = Table(title="devices (dense peaks; sparse figures are never used as peaks)")
    for col in ("name", "kind", "fp32 TFLOP/s", "fp16", "int8 TOP/s", "GB/s", "accelerates", "calibrated"):
        table.add_column(col)
    for d in devices:
        acc = ", ".join(x for x in ("int8" if d.int8 else "", f"w{'/'.join(map(str, d.weight_only_bits))}-only"
                                    if d.weight_only_bits else "", "2:4" if d.sparse_2_4 else "") if x)
        pk = d.peak_ops
        table.add_row(d.name, d.kind, f"{pk.get('fp32', 0) / 1e12:.3g}", f"{pk.get('fp16', 0) / 1e12:.3g}",
                      f"{pk.get('int8', 0) / 1e12:.3g}", f"{d.memory_bandwidth / 1e9:.4g}", acc or "-",
                      "yes" if d.correction else "no")
    con = _console(stderr=False)
    con.print(table)
    for d in devices:
        con.print(f"[bold]{d.name}[/bold] ({d.path}): {d.description}")
        for k, v in d.sources.items():
            con.print(f"   {k}: {v}")


@hardware.command("calibrate")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Device file to write (default: studies/hardware/cpu-local.yaml, found as --hardware cpu-local).")
@click.option("--name", default="cpu-local", show_default=True)
@click.option("--model", default="minilm", show_default=True,
              help="Also time real compressed versions of this model and fit a whole-model correction for it "
                   "('none' to time kernels only).")
@click.option("--data", default=None, help="Calibration data for --model (user models).")
@click.option("--workload", default=None, help="BATCH or BATCHxSEQ for the whole-model runs (default 1x128).")
@click.option("--fit-plans", default=12, show_default=True, type=int, help="Random plans timed for the whole-model fit.")
@click.option("--quick", is_flag=True, help="Fewer kernels (for tests).")
def hardware_calibrate(out: Path | None, name: str, model: str, data: str | None, workload: str | None,
                       fit_plans: int, quick: bool) -> None:
    """Time representative kernels here and fit a correction on top of the analytic model."""
    from autocomp.cost.device import local_dir
    from autocomp.hardware import calibrate

    out = out or local_dir() / f"{name}.yaml"
    loaded = None
    if model.lower() != "none":
        from autocomp.models import load_model

        if fit_plans < 2:
            raise AutocompError(f"--fit-plans must be >= 2, got {fit_plans}")
        loaded = load_model(model, data=data)  # fails here, before minutes of timing, on a bad --model
    con = _console()
    con.print(f"calibrating {name}: timing matmul, int8 and attention/elementwise kernels…")
    calibrate(out, name=name, quick=quick, log=con.print, model=loaded, workload=workload, fit_plans=fit_plans)
    con.print(f"wrote {out}; use it with --hardware {out if out.parent != local_dir() else name}")


@hardware.command("validate")
@click.option("--model", default=None, help="Default: the --study's model, else minilm.")
@click.option("--data", default=None)
@click.option("--hardware", "hw", default=None,
              help="Device name or file (must describe this machine). Default: the --study's, else cpu-local.")
@click.option("--space", default="default", show_default=True)
@click.option("--plans", default=30, show_default=True, type=int)
@click.option("--workload", default=None, help="BATCH or BATCHxSEQ (default: 1x128 for sequence models).")
@click.option("--runs", default=15, show_default=True, type=int,
              help="Timed forwards per plan, interleaved with the other plans in shuffled rounds (lower quartile; warm-up excluded).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--study", default=None, help="Record the result in this study (drawn by `autocomp report`).")
@click.option("--storage", default=None)
@click.option("--json", "as_json", is_flag=True)
@STUDIES_DIR
def hardware_validate(model: str | None, data: str | None, hw: str | None, space: str, plans: int,
                      workload: str | None, runs: int, seed: int, study: str | None, storage: str | None,
                      as_json: bool, studies_dir: Path | None) -> None:
    """Predict, build and time random plans on this machine; report the agreement."""
    from autocomp.cost.device import load_device
    from autocomp.cost.latency import parse_workload
    from autocomp.engine import check_study_model
    from autocomp.hardware import validate
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.space import SearchSpace

    meta: dict[str, Any] = {}
    handle = None
    if study:  # check the study before minutes of timing
        from autocomp.engine import open_study

        handle = open_study(study, storage, _studies_dir(studies_dir))
        meta = handle.meta
        if hw and meta.get("hardware") and hw != meta["hardware"] and load_device(hw).name != meta["hardware"]:
            raise AutocompError(f"study {study!r} was searched for hardware {meta['hardware']!r}, not {hw!r}; "
                                f"drop --hardware or pass --hardware {meta['hardware']}")
    hw = hw or meta.get("hardware") or "cpu-local"
    model = model or meta.get("model_spec") or "minilm"
    data = data or (meta.get("data_spec") if model == meta.get("model_spec") and ":" in (meta.get("data_spec") or "")
                    and not str(meta.get("data_spec")).startswith("builtin:") else None)
    workload = workload or meta.get("workload")
    device = load_device(hw)
    loaded = load_model(model, data=data)
    desc = introspect(loaded)
    if handle is not None:
        check_study_model(handle, desc)
    wl = parse_workload(workload, desc)
    sp = SearchSpace.from_yaml(space, desc)
    con = _console()
    con.print(f"validating {device.name} on {model}, workload {wl.label()}, {plans} random plans from {space}…")
    extra = None
    if study:  # the study's own front plans too: the ones a user will pick from
        from autocomp.engine import front_trials, plan_of

        extra = {f"trial {t.number}": plan_of(t, handle) for t in front_trials(handle.study, handle.budget_bytes)}
    result = validate(loaded, desc, sp, device, wl, plans, seed=seed, runs=runs, log=con.print, extra=extra)
    if study:
        from autocomp.fidelity import record

        record(handle.study, "latency", {**result, "workload": wl.label()})
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{device.name}: Spearman {result['spearman']:.3f}, within ±10% {result['within_10pct']:.0%}, "
                   f"within ±25% {result['within_25pct']:.0%}, MAPE {result['mape']:.1%} over {result['plans']} plans")


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; Ctrl-C exits 130 after saving."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except AutocompError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("interrupted: finished trials are saved; run the same command again to resume", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
