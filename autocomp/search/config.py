"""What a search is asked to do: :class:`SearchConfig`, and one table of its settings (:data:`SETTINGS`) that
drives the command line's choices and checks, the engine's checks before anything is opened, and the
comparison a resumed study makes against what it was made with. No torch here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocomp.errors import AutocompError
from autocomp.search.samplers import SAMPLERS

__all__ = ["SearchConfig", "Setting", "SETTINGS", "setting", "validate", "check_same", "space_hash", "OBJECTIVES",
           "METRIC_ATTR", "parse_objectives", "parse_time_ms", "parse_count", "SEEDS", "SENSITIVITIES", "BACKENDS"]

SEEDS = ("uniform", "ilp", "none")
SENSITIVITIES = ("measured", "fisher", "both")
BACKENDS = ("local", "ray")


@dataclass
class SearchConfig:
    budget: str
    model: str = "minilm"
    data: str | None = None
    study: str | None = None
    storage: str | None = None
    space: str = "default"
    trials: int = 100
    sampler: str = "refine"
    seed: int = 0
    metric: str = "auto"
    repair: bool = True
    studies_dir: Path = field(default_factory=lambda: Path("studies"))
    hardware: str | None = None
    workload: str | None = None
    latency_budget: str | None = None
    bitops_budget: str | None = None
    objectives: str = "proxy,size"
    seeds: str = "ilp"  # "uniform" | "ilp" (sensitivity database + additive integer program + uniform)
    staged: bool = False  # score the first calibration batch first; skip candidates the front clearly beats
    min_bits: str | None = None  # per-modality floors, "vision=8,text=4"
    max_sparsity: str | None = None  # per-modality caps, "text=0.5"
    budget_split: str | None = None  # per-modality shares of the byte budget, "text=70%"
    backend: str = "local"  # "local" | "ray": proxy evaluations in Ray actors (model loaded once per actor)
    workers: int = 2  # Ray actors (one CPU each)
    address: str | None = None  # an existing Ray cluster ("auto", "ray://host:10001"); default: start one here
    sensitivity: str = "fisher"  # "measured" (one proxy evaluation per option) | "fisher" (squared gradients) |
    # "both" (Fisher for repair and the refiner, the integer program's seeds from each table)
    threads: int | None = None  # torch threads of this worker (default: torch's, every core)
    weights_cache: str = "2GiB"  # compressed weights kept on disk under <studies>/weights/ ("0": none)


OBJECTIVES = ("proxy", "size", "latency", "bitops", "energy")
METRIC_ATTR = {"size": "size_bytes", "latency": "latency_ms", "bitops": "bitops", "energy": "energy"}


def parse_objectives(text: str, hardware: str | None) -> list[str]:
    objs = [o.strip() for o in text.split(",") if o.strip()]
    bad = [o for o in objs if o not in OBJECTIVES]
    if bad:
        raise AutocompError(f"--objectives: unknown {bad[0]!r}; choose 2 or 3 of {', '.join(OBJECTIVES)}")
    if not 2 <= len(objs) <= 3 or len(set(objs)) != len(objs):
        raise AutocompError(f"--objectives {text!r}: give 2 or 3 different objectives, e.g. proxy,size or proxy,latency")
    if "proxy" not in objs:
        raise AutocompError(f"--objectives {text!r} must include proxy (the quality of a plan)")
    if hardware is None and any(o in ("latency", "energy") for o in objs):
        raise AutocompError("--objectives latency/energy need --hardware (e.g. cpu-local or x86-avx512-vnni)")
    return objs


def parse_time_ms(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|us)\s*", text or "")
    if not m or float(m.group(1)) <= 0:
        raise AutocompError(f"--latency-budget {text!r} is not a positive time; use e.g. 40ms, 0.5s or 800us")
    return float(m.group(1)) * {"ms": 1.0, "s": 1e3, "us": 1e-3}[m.group(2)]


def parse_count(text: str, flag: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)\s*", text or "")
    if not m or float(m.group(1)) <= 0:
        raise AutocompError(f"{flag} {text!r} is not a positive count; use e.g. 250G (GBitOps) or 2.5e11")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2).lower()]


@dataclass(frozen=True)
class Setting:
    """One search setting. ``field``: the :class:`SearchConfig` attribute (None for a value derived from
    one); ``flag``: how users name it; ``choices`` / ``minimum``: its allowed values; ``resume``: the key of
    the study's stored settings that a resumed study must match (None: a resume may change it, e.g.
    ``--seeds`` only shapes a new study's first trials)."""

    field: str | None
    flag: str
    choices: tuple[str, ...] | None = None
    minimum: int | None = None
    resume: str | None = None


def _metrics() -> tuple[str, ...]:
    from autocomp.evaluators.proxy import METRICS

    return METRICS


SETTINGS: tuple[Setting, ...] = (
    Setting("trials", "--trials", minimum=1),
    Setting("workers", "--workers", minimum=1),
    Setting("threads", "--threads", minimum=1),
    Setting("sampler", "--sampler", choices=SAMPLERS),
    Setting("seeds", "--seeds", choices=SEEDS),
    Setting("sensitivity", "--sensitivity", choices=SENSITIVITIES),
    Setting("backend", "--backend", choices=BACKENDS),
    Setting("metric", "--metric", choices=_metrics(), resume="metric"),
    Setting("objectives", "--objectives", resume="objectives"),
    Setting("hardware", "--hardware", resume="hardware"),
    Setting("workload", "--workload", resume="workload"),
    Setting("latency_budget", "--latency-budget", resume="latency_budget_ms"),
    Setting("bitops_budget", "--bitops-budget", resume="bitops_budget"),
    Setting("model", "--model", resume="model_spec"),
    Setting(None, "--model (its weights' layout)", resume="fingerprint"),
    Setting(None, "--data (calibration data)", resume="data_fingerprint"),
    Setting(None, "--space (file contents)", resume="space_hash"),
    Setting("budget", "--budget", resume="budget_bytes"),
    Setting(None, "--min-bits / --max-sparsity / --budget-split", resume="constraints"),
)


def setting(name: str) -> Setting:
    return next(s for s in SETTINGS if s.field == name)


def validate(cfg: SearchConfig) -> None:
    """Check every setting with choices or a minimum (one line naming the flag, the value and the rule)."""
    for s in SETTINGS:
        if s.field is None:
            continue
        value = getattr(cfg, s.field)
        if value is None:  # an optional setting left unset
            continue
        if s.choices is not None and value not in s.choices:
            raise AutocompError(f"{s.flag} {value!r} is not one of {', '.join(s.choices)}")
        if s.minimum is not None and not (isinstance(value, int) and value >= s.minimum):
            raise AutocompError(f"{s.flag} must be >= {s.minimum}, got {value!r}")


def space_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def check_same(meta: dict[str, Any], new: dict[str, Any], name: str) -> None:
    """Refuse resuming a study with settings other than those it was made with (naming the flag)."""
    defaults = {"objectives": ["proxy", "size"]}
    for s in SETTINGS:
        key = s.resume
        if key is None:
            continue
        if meta.get(key, defaults.get(key)) != new.get(key, defaults.get(key)):
            raise AutocompError(
                f"study {name!r} was made with a different {s.flag}: {meta.get(key)!r}, now {new.get(key)!r}; "
                f"rerun with the original settings to resume, or use a new --study"
            )
