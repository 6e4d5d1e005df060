"""From plan to deployed model: ``train``, ``export``, ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from autocomp.cli.common import SPACE_HELP, STUDIES_DIR, cli, console, fidelity_study, resolve_studies_dir
from autocomp.errors import AutocompError
from autocomp.compressors.quantize import CLIPS


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
@click.option("--clip", default="learned", show_default=True, type=click.Choice(CLIPS),
              help="Quantization ranges. learned: start from each group's least-error clipping range, then train "
                   "one clipping ratio per group (best; slower steps); mse: that start, ranges then follow the "
                   "weights; minmax: the plan's plain min/max ranges throughout.")
@click.option("--json", "as_json", is_flag=True)
def train(plan_path: Path, model: str | None, data: str | None, steps: int, out: Path, lr: float, distill: str,
          temperature: float, amp: str, schedule: str, task_loss: str | None, checkpoint_every: int,
          train_embeddings: bool, clip: str, as_json: bool) -> None:
    """Quantization-aware training with distillation from the original model."""
    import math

    from autocomp.files import check_output

    if steps < 1:
        raise AutocompError(f"--steps must be >= 1, got {steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise AutocompError(f"--lr must be a positive number, got {lr}; e.g. --lr 2e-4")
    if not (math.isfinite(temperature) and temperature > 0):
        raise AutocompError(f"--temperature must be a positive number, got {temperature}; e.g. --temperature 2")
    if checkpoint_every < 0:
        raise AutocompError(f"--checkpoint-every must be >= 0 (0: only at the end), got {checkpoint_every}")
    check_output(out)  # before minutes (or hours) of training
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
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console(),
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
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="The plan to export (required for the packed format; without it --format onnx writes the fp32 "
                   "reference of --model).")
@click.option("--model", default=None, help="Default: the model the plan was made for.")
@click.option("--data", default=None, help="Calibration data spec recorded for user models (file.py:fn).")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="A checkpoint from `autocomp train`.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--format", "fmt", default="packed", show_default=True, type=click.Choice(["packed", "onnx"]),
              help="packed: autocomp's safetensors format (exactly the predicted bytes; autocomp.load). onnx: one "
                   "ONNX file for ONNX Runtime, quantized layers as its integer kernels (MatMulNBits, "
                   "MatMulInteger, GatherBlockQuantized); autocomp.load(path, runtime='ort') serves it.")
@click.option("--accuracy-level", default=4, show_default=True, type=click.IntRange(0, 4),
              help="--format onnx: MatMulNBits' compute type. 4: activations quantized to int8 per block, the fast CPU "
                   "path (on MiniLM +0.0006 cosine drift at 4g128); 0: float, exactly the searched model, but 2- and "
                   "8-bit layers then run ~10x slower than fp32 here (docs/BENCHMARKS.md).")
@click.option("--int8-kernel", default="portable", show_default=True, type=click.Choice(["portable", "vnni"]),
              help="--format onnx, W8A8 layers: portable runs ORT's u8 x u8 kernel, exact on every CPU; vnni its "
                   "u8 x s8 kernel, 1.4-2.7x faster per layer on CPUs with VNNI (AVX-512 VNNI / AVX-VNNI) and wrong "
                   "on x86 CPUs without it (autocomp.load refuses the file there).")
@click.option("--study", default=None,
              help="Record predicted vs real bytes in this study for its report (default: the study the plan came "
                   "from, when it is found).")
@click.option("--storage", default=None)
@click.option("--clip", default="minmax", show_default=True, type=click.Choice([c for c in CLIPS if c != "learned"]),
              help="Without --weights: minmax exports exactly what the search scored; mse first clamps each "
                   "quantization group to its least-error range (same size, usually a better model).")
@click.option("--json", "as_json", is_flag=True)
@STUDIES_DIR
def export(plan_path: Path | None, model: str | None, data: str | None, weights: Path | None, out: Path, fmt: str,
           accuracy_level: int, int8_kernel: str, study: str | None, storage: str | None, clip: str, as_json: bool,
           studies_dir: Path | None) -> None:
    """Write the packed model (safetensors, docs/FORMAT.md; its payload is exactly the predicted size) or,
    with --format onnx, an ONNX Runtime model."""
    from autocomp.deploy import load_for_plan
    from autocomp.files import check_output

    check_output(out)
    if weights is not None and clip != "minmax":
        raise AutocompError("--clip applies to plans exported without --weights; a trained checkpoint keeps the "
                            "clipping it was trained with (autocomp train --clip)")
    if plan_path is None:
        if fmt != "onnx":
            raise AutocompError("--plan is required (only --format onnx exports a model without a plan: its fp32 "
                                "reference)")
        if weights is not None:
            raise AutocompError("--weights needs the --plan it was trained with")
        from autocomp.models import load_model
        from autocomp.models.introspect import introspect

        loaded = load_model(model or "minilm", data=data)
        result = _export_onnx(loaded, introspect(loaded), None, out, None, model or "minilm", accuracy_level,
                              int8_kernel)
        _print_export(result, out, as_json)
        return
    plan_obj, loaded, desc = load_for_plan(plan_path, model, data, resolve_studies_dir(studies_dir))
    handle = fidelity_study(study, storage, studies_dir, plan_obj.meta.get("study"), desc)
    if weights is not None:
        from autocomp.training import load_student

        student, _ = load_student(loaded.module, plan_obj, desc, weights)
    else:
        from autocomp.compressors.student import prepare_for_training, start_training

        student = prepare_for_training(loaded.module, plan_obj, desc)
        start_training(student, clip)
    if fmt == "onnx":
        result = _export_onnx(loaded, desc, plan_obj, out, student if weights is not None or clip != "minmax" else None,
                              model or plan_obj.model_spec, accuracy_level, int8_kernel)
    else:
        from autocomp.artifact import export as do_export

        result = do_export(student, plan_obj, out, spec=model or plan_obj.model_spec,
                           data_spec=data or (loaded.data_spec if ":" in (loaded.data_spec or "") and not
                                              loaded.data_spec.startswith("builtin:") else None), desc=desc)
    if handle is not None:
        from autocomp.fidelity import record

        record(handle.study, "export", {**result, "path": str(out.resolve()), "trial": plan_obj.meta.get("trial"),
                                        "trained": weights is not None})
    _print_export(result, out, as_json)


def _export_onnx(loaded: Any, desc: Any, plan: Any, out: Path, student: Any, spec: str,
                 accuracy_level: int = 4, int8_kernel: str = "portable") -> dict[str, Any]:
    """The ONNX export of ``plan`` (None: fp32); ``student``: trained (or clipped) weights to export instead
    of the plan applied to the original ones."""
    from autocomp.ort import export_onnx

    module, parts = loaded.module, None
    if student is not None:
        from autocomp.compressors.student import compressed_parts, finalize

        by_layer = compressed_parts(student)
        module, parts = finalize(student), by_layer.get
    name = "embeddings" if loaded.metric == "cosine" else "logits" if loaded.metric == "kl" else "output"
    return export_onnx(module, desc, plan, out, loaded.batches[0], parts=parts, spec=spec, output_name=name,
                       accuracy_level=accuracy_level, int8_kernel=int8_kernel)


def _print_export(result: dict[str, Any], out: Path, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    from autocomp.budget import format_bytes

    if result.get("format") == "onnx":
        kernels = ", ".join(f"{op} x{n}" for op, n in sorted(result["kernels"].items())) or "none (fp32)"
        click.echo(f"wrote {out}: file {format_bytes(result['file_bytes'])} (plan predicted "
                   f"{format_bytes(result['predicted_bytes'])}); ONNX Runtime kernels: {kernels}")
        for note, layers in result["notes"].items():
            click.echo(f"  {note}: {len(layers)} layer(s), e.g. {layers[0]}")
        if result.get("int8_kernel") == "portable":  # int8f layers (the 7-bit grid runs u8 x s8 already)
            from autocomp.ort import cpu_has_vnni

            if cpu_has_vnni():
                click.echo("  this CPU has VNNI: --int8-kernel vnni runs the W8A8 layers faster (MiniLM 2.03x fp32 "
                           "instead of 1.33x on a Zen 4 VM), for CPUs with VNNI only")
        return
    click.echo(f"wrote {out}: payload {format_bytes(result['payload_bytes'])} (predicted "
               f"{format_bytes(result['predicted_bytes'])}), file {format_bytes(result['file_bytes'])}")


@cli.command()
@click.option("--model", default=None, help="Default: the plan's model, else minilm.")
@click.option("--data", default=None)
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None)
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="A checkpoint from `autocomp train` or an export file (packed, or .onnx: scored in ONNX Runtime).")
@click.option("--task", default=None, help="file.py:fn(model) -> float, higher is better (user models); or "
              "perplexity: next-token perplexity of a causal LM on --data (lower is better).")
@click.option("--pairs", default=500, show_default=True, type=int, help="Retrieval pairs of the built-in task.")
@click.option("--random-plans", default=None, type=int, help="Proxy fidelity: this many random plans within --budget.")
@click.option("--budget", default=None, help="Budget for --random-plans.")
@click.option("--study", default=None, help="Also score this study's Pareto plans (proxy fidelity).")
@click.option("--storage", default=None)
@click.option("--space", default="default", show_default=True, help=SPACE_HELP)
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
        con = console()
        result = proxy_fidelity(loaded, desc, random_plans or 0, budget or "100%", space, study, storage,
                                resolve_studies_dir(studies_dir), task, pairs, seed, log=con.print)
        click.echo(json.dumps(result) if as_json else
                   f"{result['metric']}: Spearman(proxy, metric) {result['spearman_proxy_vs_metric']:.3f} over "
                   f"{len(result['rows'])} plans (sign: lower proxy with higher metric is positive)" + (
                       f"; per-tower drift {result['spearman_tower_drift_vs_metric']:.3f}"
                       if "spearman_tower_drift_vs_metric" in result else ""))
        return
    if plan_path is not None:
        plan_obj, loaded, desc = load_for_plan(plan_path, model, data, resolve_studies_dir(studies_dir))
    else:
        from autocomp.models import load_model
        from autocomp.models.introspect import introspect

        if weights is not None and weights.suffix == ".onnx":  # an ONNX export names its model
            from autocomp.ort import OrtModel

            model = model or OrtModel(weights).meta.get("model_spec") or None
        elif weights is not None:  # an export names its model and data; a training checkpoint needs its plan
            from autocomp.artifact import FORMAT_VERSION, safetensors_metadata

            header = safetensors_metadata(weights)
            if header.get("autocomp_format") != FORMAT_VERSION:
                raise AutocompError(f"--weights {str(weights)!r} is not an export (a training checkpoint?); pass "
                                    f"the --plan it was trained with")
            model = model or header.get("model_spec") or None
            data = data or header.get("data_spec") or None
        plan_obj, loaded = None, load_model(model or "minilm", data=data)
        desc = introspect(loaded)
    console().print(f"scoring the task metric of the original model and of {'the plan' if plan_obj else 'the weights'}…")
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
