"""Reading studies: ``pareto``, ``plan``, ``report``, ``studies``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from autocomp.cli.common import STUDIES_DIR, cli, console, print_result, resolve_studies_dir
from autocomp.errors import AutocompError


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
    from autocomp.search.study import open_study, plan_of, study_result

    handle = open_study(study, storage, resolve_studies_dir(studies_dir), read_only=True)
    result = study_result(handle, write="if-possible")
    if by_modality and result["pareto"]:
        from autocomp.deploy import modality_breakdown
        from autocomp.desc import ModelDesc

        meta = handle.meta
        desc = ModelDesc.from_dict(meta["model"])
        loaded = _study_model(handle)
        cost = None
        if meta.get("hardware"):
            from autocomp.cost.device import load_device
            from autocomp.cost.latency import CostModel, parse_workload

            cost = CostModel(load_device(meta["hardware"]), desc, parse_workload(meta.get("workload"), desc))
        by_trial = {t.number: t for t in handle.study.get_trials(deepcopy=False)}
        rows = modality_breakdown([plan_of(by_trial[e["trial"]], handle) for e in result["pareto"]], desc, loaded, cost)
        for e, row in zip(result["pareto"], rows):
            e["by_modality"] = row
    print_result(result, as_json, by_modality=by_modality)


def _study_model(handle: Any) -> Any:
    """The study's model, loaded with its calibration data and proxy metric."""
    from autocomp.models import load_model

    meta = handle.meta
    data = str(meta.get("data_spec") or "")
    return load_model(meta["model_spec"], data=data if ":" in data and not data.startswith("builtin:") else None,
                      metric=meta.get("metric", "auto"))


@cli.command()
@click.option("--study", required=True)
@click.option("--storage", default=None)
@click.option("--pick", default="best", show_default=True,
              help="best (lowest proxy) | smallest | knee | trial:N (a front trial number)")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Where to write the plan JSON.")
@click.option("--sequential", is_flag=True,
              help="Compute the plan's compensated layers again in forward order, each on the inputs the layers "
                   "before it give once compressed (GPTQ's sequential mode; loads the model: ~1.5 min for MiniLM). "
                   "The statistics go beside the search's; evaluate, train and export use them.")
@STUDIES_DIR
def plan(study: str, storage: str | None, pick: str, out: Path, sequential: bool, studies_dir: Path | None) -> None:
    """Write one plan of the study's Pareto front to --out."""
    from autocomp.files import check_output
    from autocomp.search.pareto import knee_index
    from autocomp.search.study import front_trials, open_study, plan_of

    check_output(out)
    handle = open_study(study, storage, resolve_studies_dir(studies_dir), read_only=True)
    front = front_trials(handle.study, handle.budget_bytes)
    from autocomp.search.study import trial_metric

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
    if sequential:
        p = _sequential(p, handle, resolve_studies_dir(studies_dir))
    p.save(out)
    from autocomp.budget import format_bytes

    console().print(f"wrote {out}: trial {chosen.number}, {format_bytes(p.metrics['size_bytes'])}, "
                     f"proxy {p.metrics['proxy']:.5f}" + (" (the search's, before --sequential)"
                                                         if "sequential" in p.meta else ""))


def _sequential(p: Any, handle: Any, studies: Path) -> Any:
    """``p`` with sequential statistics of its own (saved in ``studies/calibration``, recorded in its meta)."""
    from autocomp.compressors.calibration import attached, ensure, plan_needs
    from autocomp.compressors.sequential import sequential_statistics
    from autocomp.models.introspect import introspect

    con = console()
    if not plan_needs(p):
        con.print("--sequential: this plan has no compensated (GPTQ / SparseGPT / activation-aware) layers; "
                  "nothing to recompute")
        return p
    loaded = _study_model(handle)
    desc = introspect(loaded)
    cache = studies / "calibration"
    ensure(loaded, desc, cache, p, con.print)
    base = attached(loaded.module)
    seq = sequential_statistics(loaded, desc, p, con.print)
    seq.save(cache / f"{seq.key}.safetensors")
    meta = {**p.meta, "calibration": seq.key, "sequential": {"base": base.key, "seconds": round(seq.seconds, 1)}}
    return type(p)(**{**p.__dict__, "meta": meta})



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
    from autocomp.files import check_output
    from autocomp.report import collect, write_html, write_pngs
    from autocomp.search.study import open_study

    if fmt == "html":
        check_output(out)
    handle = open_study(study, storage, resolve_studies_dir(studies_dir), read_only=True)
    data = collect(handle)
    if fmt == "html":
        if out.is_dir():
            raise AutocompError(f"--out {str(out)!r} is a folder; give the HTML file's path (e.g. {out / 'report.html'})")
        path = write_html(data, out)
        console().print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {len(data['points'])} trials)")
    else:
        paths = write_pngs(data, out)
        console().print(f"wrote {len(paths)} PNGs to {out}")
    if not data["points"]:
        console().print(f"study {study!r} has no finished trials yet; the report says so")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@STUDIES_DIR
def studies(as_json: bool, studies_dir: Path | None) -> None:
    """The studies under the studies folder: trials, budget, best plan."""
    import optuna

    import os

    from autocomp.search.study import ATTR, front_trials, open_storage, trial_metric

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = resolve_studies_dir(studies_dir)
    if root.exists() and not (root.is_dir() and os.access(root, os.R_OK | os.X_OK)):
        raise AutocompError(f"studies folder {str(root)!r} cannot be read (not a folder, or no permission); pass "
                            f"--studies-dir")
    rows = []
    for db in sorted(root.glob("*.db")) if root.is_dir() else []:
        url = f"sqlite:///{db.as_posix()}"
        try:  # read only: a foreign or empty .db file is skipped, never given Optuna's tables
            storage = open_storage(url, read_only=True)
            summaries = optuna.get_all_study_summaries(storage=storage, include_best_trial=False)
        except (AutocompError, Exception):
            continue
        for summ in summaries:
            meta = summ.user_attrs.get(ATTR)
            if not meta:
                continue
            st = optuna.load_study(study_name=summ.study_name, storage=storage)
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
    console(stderr=False).print(table if rows else f"no autocomp studies under {root}")
    caches = _caches(root)
    if caches:
        console(stderr=False).print(f"caches (safe to delete; rebuilt when needed): {caches}")


def _caches(root: Path) -> str:
    """What the cache folders under the studies folder hold: ``weights 858 MB (772 files), ...``."""
    from autocomp.budget import format_bytes

    parts = []
    for name in ("weights", "sensitivity", "calibration"):
        d = root / name
        if not d.is_dir():
            continue
        files = [f for f in d.iterdir() if f.is_file() and not f.name.startswith(".")]
        if files:
            size = sum(f.stat().st_size for f in files)
            parts.append(f"{name}/ {format_bytes(size)} ({len(files)} file{'s' if len(files) != 1 else ''})")
    return ", ".join(parts)
