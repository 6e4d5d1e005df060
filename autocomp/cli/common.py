"""What the command modules share: the ``autocomp`` group, the studies folder, consoles, result tables."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from autocomp.errors import AutocompError

__all__ = ["cli", "STUDIES_DIR", "resolve_studies_dir", "console", "print_result", "fidelity_study", "SPACE_HELP",
           "HARDWARE_HELP"]

STUDIES_DIR = click.option("--studies-dir", type=click.Path(path_type=Path), default=None,
                           help="Where studies live (default: $AUTOCOMP_STUDIES or ./studies).")


def _names(folder: Path) -> str:
    return ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) if folder.is_dir() else ""


def _space_help() -> str:
    from autocomp.space_rules import SPACES_DIR

    return f"Search space: {_names(SPACES_DIR)}, or a YAML path."


def _hardware_help() -> str:
    from autocomp.cost.device import BUILTIN_DIR

    return (f"Device for latency/energy: {_names(BUILTIN_DIR)}, cpu-local (after `autocomp hardware "
            f"calibrate`) or a device YAML.")


SPACE_HELP, HARDWARE_HELP = _space_help(), _hardware_help()


def resolve_studies_dir(value: Path | None) -> Path:
    return value or Path(os.environ.get("AUTOCOMP_STUDIES", "studies"))


def console(stderr: bool = True) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 140)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="autocomp")
def cli() -> None:
    """Search per-layer compression plans (quantization, pruning, low-rank) under a size budget."""



def print_result(result: dict[str, Any], as_json: bool, by_modality: bool = False) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    from rich.table import Table

    from autocomp.budget import format_bytes

    con = console(stderr=False)
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


def fidelity_study(study: str | None, storage: str | None, studies_dir: Path | None, default: str | None,
                    desc: Any) -> Any:
    """The study a fidelity figure is recorded in: ``study`` (must exist and fit the model), else the plan's
    own study where it is found (quietly none where it is not: plans travel without their studies)."""
    from autocomp.search.study import check_study_model, open_study

    name = study or default
    if not name:
        return None
    try:
        handle = open_study(name, storage, resolve_studies_dir(studies_dir))
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
