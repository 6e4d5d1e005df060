"""``autocomp search``: run or resume a search, with a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from autocomp.cli.common import HARDWARE_HELP, SPACE_HELP, STUDIES_DIR, cli, console, print_result, resolve_studies_dir
from autocomp.evaluators.proxy import METRICS
from autocomp.search.config import BACKENDS, SEEDS, SENSITIVITIES, SearchConfig
from autocomp.search.samplers import SAMPLERS


@cli.command()
@click.option("--budget", required=True, help="Size limit: 200MB, 1.5GB (10^n), 30MiB (2^n), 25% of fp32, or bytes.")
@click.option("--model", default="minilm", show_default=True, help="minilm | file.py:fn | pkg.module:fn | hf:DIR")
@click.option("--data", default=None, help="Calibration batches: file.py:fn | pkg.module:fn (default: the model's own).")
@click.option("--study", default=None, help="Study name (default: from --model and --budget, so re-running resumes).")
@click.option("--storage", default=None, help="Optuna storage URL (default: sqlite:///studies/<study>.db).")
@click.option("--space", default="default", show_default=True, help=SPACE_HELP)
@click.option("--trials", default=100, show_default=True, type=int, help="Total finished trials the study should have.")
@click.option("--sampler", default="refine", show_default=True, type=click.Choice(SAMPLERS),
              help="refine: mutate front plans (level switches between layers), EvoPress-style; tpe: multivariate TPE.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--metric", default="auto", show_default=True, type=click.Choice(METRICS),
              help="Output distortion; auto: the model's own (cosine for embeddings, kl for logits, else mse).")
@click.option("--repair/--no-repair", default=True, show_default=True,
              help="Move over-budget proposals onto the budget instead of skipping them.")
@click.option("--hardware", default=None, help=HARDWARE_HELP)
@click.option("--workload", default=None, help="BATCH or BATCHxSEQ for latency (default 1x128 for sequence models).")
@click.option("--latency-budget", default=None, help="Latency limit on --hardware, e.g. 40ms; checked before the proxy.")
@click.option("--bitops-budget", default=None, help="BitOps limit, e.g. 300G; checked before the proxy.")
@click.option("--objectives", default="proxy,size", show_default=True,
              help="2 or 3 of proxy, size, latency, bitops, energy (must include proxy).")
@click.option("--seeds", default="ilp", show_default=True, type=click.Choice(SEEDS),
              help="First trials of a new study: uniform plans, or also the additive integer program's plans "
                   "over a sensitivity database (profiled once, cached under studies/sensitivity/).")
@click.option("--sensitivity", default="fisher", show_default=True, type=click.Choice(SENSITIVITIES),
              help="How --seeds ilp gets per-option sensitivities: one proxy evaluation each, the cheaper "
                   "squared-gradient (Fisher) estimate, or both (the integer program's seeds from each table; "
                   "neither estimate wins at every budget).")
@click.option("--staged/--no-staged", default=False, show_default=True,
              help="Score the first calibration batch first and skip candidates the front clearly beats.")
@click.option("--min-bits", default=None, help="Per-modality weight-bit floors, e.g. vision=8 or vision=8,text=4.")
@click.option("--max-sparsity", default=None, help="Per-modality pruning caps, e.g. text=0.5 (structured, 2:4 "
                                                   "and unstructured).")
@click.option("--budget-split", default=None, help="Per-modality shares of the byte budget, e.g. text=70% "
                                                   "(unlisted modalities share the rest).")
@click.option("--backend", default="local", show_default=True, type=click.Choice(BACKENDS),
              help="Where proxy evaluations run: this process, or Ray actors (each loads the model once).")
@click.option("--workers", default=2, show_default=True, type=int, help="Ray actors (--backend ray).")
@click.option("--threads", default=None, type=int,
              help="Torch threads for this worker (default: every core). Several workers on one machine: give "
                   "each cores / workers, or they slow each other down several times.")
@click.option("--weights-cache", default="2GiB", show_default=True,
              help="Disk kept for compressed weights under studies/weights/, shared by other workers, resumed "
                   "studies and later searches of the same model; 0 for none.")
@click.option("--address", default=None, help="An existing Ray cluster: auto or ray://host:port (--backend ray).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@STUDIES_DIR
def search(as_json: bool, studies_dir: Path | None, **settings: Any) -> None:
    """Search compression plans under --budget; resumes the study if it exists."""
    from autocomp.search.engine import run_search

    # every other option is a SearchConfig field of the same name: a new flag is its option and its field
    cfg = SearchConfig(**settings, studies_dir=resolve_studies_dir(studies_dir))
    progress = _SearchProgress(console())
    try:
        result = run_search(cfg, on_event=progress.event)
    finally:
        progress.close()
    print_result(result, as_json)


class _SearchProgress:
    """Rich progress bar on stderr: trials done and the best feasible proxy so far."""

    PLAIN_EVERY_S = 10.0  # without a terminal (a log file, CI): one plain line at least this often

    def __init__(self, console: Any) -> None:
        self.console = console
        self.progress: Any = None
        self.task: Any = None
        self.budget = 0
        self.plain = not console.is_terminal
        self.last_line = 0.0

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
        elif kind == "start" and self.plain:
            self.console.print(
                f"study {data['study']} ({data['storage']}): budget {format_bytes(data['budget_bytes'])} of "
                f"{format_bytes(data['fp32_bytes'])} fp32, smallest plan {format_bytes(data['smallest_bytes'])}, "
                f"{data['params']} choices; {data['done']}/{data['total']} trials done")
            self._line(data["done"], data["total"], [(e["proxy"], e["size_bytes"]) for e in data["front"]], force=True)
        elif kind == "trial" and self.plain:
            self._line(data["done"], data["total"], data["front"], force=data["done"] >= data["total"])
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
            phases = data.get("phases") or {}
            if phases:
                per = data.get("seconds_per_trial")
                self.console.print("[dim]time: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items() if v >= 0.05)
                                   + (f"; {per:.2f} s per trial" if per else "") + "[/dim]")

    def _line(self, done: int, total: int, front: list[Any], force: bool = False) -> None:
        import time

        now = time.monotonic()
        if force or now - self.last_line >= self.PLAIN_EVERY_S:
            self.last_line = now
            self.console.print(f"trials {done}/{total}: {self._best(front)}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
