"""Models and plans: ``layers``, ``score``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from autocomp.cli.common import STUDIES_DIR, cli, console, resolve_studies_dir
from autocomp.errors import AutocompError
from autocomp.evaluators.proxy import METRICS


@cli.command()
@click.option("--model", default="minilm", show_default=True)
@click.option("--data", default=None)
@click.option("--json", "as_json", is_flag=True)
def layers(model: str, data: str | None, as_json: bool) -> None:
    """List the compressible layers of a model (shape, parameters, FLOPs per sample, block, modality) and every
    parameter it keeps as it is, with the reason; the bytes add up to the fp32 model's."""
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
    out = console(stderr=False)
    out.print(table)
    kept = desc.info.get("kept", [])
    matrices = [k for k in kept if len(k["shape"]) >= 2]
    vectors = [k for k in kept if len(k["shape"]) < 2]
    layer_bytes = sum(lay.nbytes for lay in desc.layers)
    for k in matrices:
        out.print(f"kept  {k['name']} {'x'.join(map(str, k['shape']))} ({format_bytes(k['bytes'])}): {k['reason']}",
                  markup=False, highlight=False)
    if vectors:
        out.print(f"kept  {len(vectors)} vectors and scalars (biases outside the layers, norms, scales): "
                  f"{format_bytes(sum(k['bytes'] for k in vectors))}", markup=False, highlight=False)
    kept_bytes = sum(k["bytes"] for k in kept)
    out.print(f"total {len(desc.layers)} compressible layers {layer_bytes:,} B + kept {kept_bytes:,} B = "
              f"{layer_bytes + kept_bytes:,} B (fp32 model: {desc.fp32_bytes:,} B)", markup=False, highlight=False)



@cli.command()
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True)
@click.option("--model", default=None, help="Default: the model the plan was made for.")
@click.option("--data", default=None)
@click.option("--metric", default="auto", type=click.Choice(METRICS))
@click.option("--json", "as_json", is_flag=True)
@STUDIES_DIR
def score(plan_path: Path, model: str | None, data: str | None, metric: str, as_json: bool,
          studies_dir: Path | None) -> None:
    """Apply a plan to its model and report exact size and proxy (checks the plan fits the model)."""
    from autocomp.compressors.apply import check_plan
    from autocomp.compressors.calibration import ensure
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
    # compensated options: the statistics the plan records (the search's, or its --sequential ones)
    ensure(loaded, desc, resolve_studies_dir(studies_dir) / "calibration", p)
    out = {"model": spec, "size_bytes": plan_bytes(desc, p), "fp32_bytes": desc.fp32_bytes,
           "proxy": ProxyEvaluator(loaded, desc)(p)}
    click.echo(json.dumps(out) if as_json else
               f"{spec}: {out['size_bytes']} bytes ({out['size_bytes'] / desc.fp32_bytes:.1%} of fp32), proxy {out['proxy']:.5f}")
