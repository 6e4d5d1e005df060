"""``autocomp hardware``: list devices, calibrate this machine, validate predictions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from autocomp.cli.common import SPACE_HELP, STUDIES_DIR, cli, console, resolve_studies_dir
from autocomp.errors import AutocompError


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
    con = console(stderr=False)
    con.print(table)
    for d in devices:
        con.print(f"[bold]{d.name}[/bold] ({d.path}): {d.description}")
        for k, v in d.sources.items():
            con.print(f"   {k}: {v}")


@hardware.command("calibrate")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Device file to write (default: studies/hardware/<name>.yaml, found as --hardware <name>).")
@click.option("--runtime", default="torch", show_default=True, type=click.Choice(["torch", "ort"]),
              help="torch: eager torch kernels (device cpu-local). ort: ONNX Runtime's kernels as `export --format "
                   "onnx` uses them (device ort-cpu).")
@click.option("--name", default=None, help="Device name (default: cpu-local, or ort-cpu with --runtime ort).")
@click.option("--threads", default=None, type=int, help="--runtime ort: the session's intra-op threads (default: all cores).")
@click.option("--accuracy-level", default=4, show_default=True, type=click.IntRange(0, 4),
              help="--runtime ort: MatMulNBits' compute type to time (as `export --format onnx --accuracy-level`).")
@click.option("--int8-kernel", default="portable", show_default=True, type=click.Choice(["portable", "vnni"]),
              help="--runtime ort: the W8A8 kernel to time (as `export --format onnx --int8-kernel`; vnni needs a "
                   "CPU with VNNI). `hardware validate` exports with the device's.")
@click.option("--model", default="minilm", show_default=True,
              help="Also time real compressed versions of this model and fit a whole-model correction for it "
                   "('none' to time kernels only).")
@click.option("--data", default=None, help="Calibration data for --model (user models).")
@click.option("--workload", default=None, help="BATCH or BATCHxSEQ for the whole-model runs (default 1x128).")
@click.option("--fit-plans", default=12, show_default=True, type=int, help="Random plans timed for the whole-model fit.")
@click.option("--quick", is_flag=True, help="Fewer kernels (for tests).")
def hardware_calibrate(out: Path | None, runtime: str, name: str | None, threads: int | None, accuracy_level: int,
                       int8_kernel: str, model: str, data: str | None, workload: str | None, fit_plans: int, quick: bool) -> None:
    """Time representative kernels here and fit a correction on top of the analytic model."""
    from autocomp.cost.device import local_dir
    from autocomp.hardware import calibrate

    name = name or ("ort-cpu" if runtime == "ort" else "cpu-local")
    out = out or local_dir() / f"{name}.yaml"
    if threads is not None and (threads < 1 or runtime != "ort"):
        raise AutocompError("--threads takes a positive count and applies to --runtime ort")
    if int8_kernel != "portable":
        from autocomp.ort import cpu_has_vnni

        if runtime != "ort":
            raise AutocompError("--int8-kernel applies to --runtime ort")
        if cpu_has_vnni() is False:
            raise AutocompError("--int8-kernel vnni needs a CPU with VNNI (this x86 CPU has none: ONNX Runtime's "
                                "u8 x s8 kernel saturates here); calibrate with --int8-kernel portable")
    loaded = None
    if model.lower() != "none":
        from autocomp.models import load_model

        if fit_plans < 2:
            raise AutocompError(f"--fit-plans must be >= 2, got {fit_plans}")
        loaded = load_model(model, data=data)  # fails here, before minutes of timing, on a bad --model
    con = console()
    if runtime == "ort":
        from autocomp.ort import _require
        from autocomp.ort_hardware import calibrate_ort

        _require()
        con.print(f"calibrating {name}: timing ONNX Runtime's MatMul, MatMulNBits (2/4/8-bit), MatMulInteger and "
                  f"Gather kernels{' and the fp32 graph of ' + loaded.name if loaded is not None else ''}…")
        calibrate_ort(out, name=name, quick=quick, log=con.print, model=loaded, workload=workload, threads=threads,
                      accuracy_level=accuracy_level, int8_kernel=int8_kernel, fit_plans=fit_plans)
        con.print(f"wrote {out}; use it with --hardware {out if out.parent != local_dir() else name}")
        return
    con.print(f"calibrating {name}: timing matmul, int8 and attention/elementwise kernels…")
    calibrate(out, name=name, quick=quick, log=con.print, model=loaded, workload=workload, fit_plans=fit_plans)
    con.print(f"wrote {out}; use it with --hardware {out if out.parent != local_dir() else name}")


@hardware.command("validate")
@click.option("--model", default=None, help="Default: the --study's model, else minilm.")
@click.option("--data", default=None)
@click.option("--hardware", "hw", default=None,
              help="Device name or file (must describe this machine). Default: the --study's, else cpu-local "
                   "(ort-cpu with --runtime ort).")
@click.option("--runtime", default=None, type=click.Choice(["torch", "ort"]),
              help="What runs the plans: torch eager (the runtime model) or ONNX Runtime (each plan exported with "
                   "`export --format onnx`). Default: the device's runtime.")
@click.option("--space", default="default", show_default=True, help=SPACE_HELP)
@click.option("--plans", default=30, show_default=True, type=int)
@click.option("--draw", default="spread", show_default=True, type=click.Choice(["spread", "uniform"]),
              help="How the random plans are drawn: spread (from fully random to nearly uniform plans, the range a "
                   "front covers) or uniform (each layer's option alone: plans cluster near the average).")
@click.option("--workload", default=None, help="BATCH or BATCHxSEQ (default: 1x128 for sequence models).")
@click.option("--runs", default=15, show_default=True, type=int,
              help="Timed forwards per plan, interleaved with the other plans in shuffled rounds (lower quartile; warm-up excluded).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--study", default=None, help="Record the result in this study (drawn by `autocomp report`).")
@click.option("--storage", default=None)
@click.option("--json", "as_json", is_flag=True)
@STUDIES_DIR
def hardware_validate(model: str | None, data: str | None, hw: str | None, runtime: str | None, space: str, plans: int,
                      draw: str, workload: str | None, runs: int, seed: int, study: str | None, storage: str | None,
                      as_json: bool, studies_dir: Path | None) -> None:
    """Predict, build and time random plans on this machine; report the agreement."""
    from autocomp.cost.device import load_device
    from autocomp.cost.latency import parse_workload
    from autocomp.search.study import check_study_model
    from autocomp.hardware import validate
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.space import SearchSpace

    meta: dict[str, Any] = {}
    handle = None
    if study:  # check the study before minutes of timing
        from autocomp.search.study import open_study

        handle = open_study(study, storage, resolve_studies_dir(studies_dir))
        meta = handle.meta
        if hw and meta.get("hardware") and hw != meta["hardware"] and load_device(hw).name != meta["hardware"]:
            raise AutocompError(f"study {study!r} was searched for hardware {meta['hardware']!r}, not {hw!r}; "
                                f"drop --hardware or pass --hardware {meta['hardware']}")
    hw = hw or meta.get("hardware") or ("ort-cpu" if runtime == "ort" else "cpu-local")
    model = model or meta.get("model_spec") or "minilm"
    data = data or (meta.get("data_spec") if model == meta.get("model_spec") and ":" in (meta.get("data_spec") or "")
                    and not str(meta.get("data_spec")).startswith("builtin:") else None)
    workload = workload or meta.get("workload")
    device = load_device(hw)
    runtime = runtime or device.runtime
    if runtime != device.runtime:
        raise AutocompError(f"device {device.name!r} times runtime {device.runtime!r}, not {runtime!r}; pass a device "
                            f"calibrated for it (--hardware {'ort-cpu' if runtime == 'ort' else 'cpu-local'})")
    if runtime == "ort":
        from autocomp.ort import _require

        _require()
    loaded = load_model(model, data=data)
    desc = introspect(loaded)
    if handle is not None:
        check_study_model(handle, desc)
    wl = parse_workload(workload, desc)
    sp = SearchSpace.from_yaml(space, desc)
    if runtime == "ort":
        sp.restrict_to_stored_formats()
    con = console()
    con.print(f"validating {device.name} ({runtime}) on {model}, workload {wl.label()}, {plans} random plans ({draw}) from {space}…")
    extra = None
    if study:  # the study's own front plans too: the ones a user will pick from
        from autocomp.search.study import front_trials, plan_of

        extra = {f"trial {t.number}": plan_of(t, handle) for t in front_trials(handle.study, handle.budget_bytes)}
    result = validate(loaded, desc, sp, device, wl, plans, seed=seed, runs=runs, log=con.print, extra=extra,
                      runtime=runtime, draw=draw)
    if study:
        from autocomp.fidelity import record

        record(handle.study, "latency" if runtime == "torch" else "latency_ort", {**result, "workload": wl.label()})
    if as_json:
        click.echo(json.dumps(result))
    else:
        ref = result["reference"]
        click.echo(f"{device.name}: Spearman {result['spearman']:.3f}, within ±10% {result['within_10pct']:.0%}, "
                   f"within ±25% {result['within_25pct']:.0%}, MAPE {result['mape']:.1%} over {result['plans']} plans; "
                   f"the uncompressed model ran {ref['speed_factor']:.2f}x its predicted time, and at that speed "
                   f"{ref['within_10pct_at_speed']:.0%} are within ±10%")
