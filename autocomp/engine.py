"""The trial loop: ask -> plan -> size -> (repair) -> budget check -> proxy -> tell; anytime persistence.

The study is a normal Optuna study (two objectives, both minimized: proxy, size_bytes) with a ``size``
constraint (``size_bytes - budget <= 0`` is feasible) set on every trial before its proxy runs.
Everything needed to read the study back without the model (model description, budget, search-space
hash, calibration-data hash) is stored in the study's user attributes under ``autocomp``.

Resume: opening an existing study checks it was made for the same model / data / space / budget, fails
trials a killed process left RUNNING (marked ``autocomp_stale``) and enqueues their parameters again,
then runs only the missing trials. ``--trials N`` counts finished trials (complete, or failed with a
reason such as a non-finite proxy); stale ones do not count and are retried.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from autocomp.budget import format_bytes, parse_budget
from autocomp.desc import ModelDesc
from autocomp.errors import AutocompError
from autocomp.plan import Plan, atomic_write_text
from autocomp.search.pareto import feasible, pareto_front

__all__ = ["SearchConfig", "run_search", "StudyHandle", "open_study", "study_result", "default_study_name",
           "check_study_name", "ENGINE_VERSION"]

ENGINE_VERSION = 1
ATTR = "autocomp"
_STUDY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


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
    sensitivity: str = "fisher"  # "measured" (one proxy evaluation per option) | "fisher" (squared gradients)


OBJECTIVES = ("proxy", "size", "latency", "bitops", "energy")
_METRIC_ATTR = {"size": "size_bytes", "latency": "latency_ms", "bitops": "bitops", "energy": "energy"}


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


def check_study_name(name: str) -> str:
    if not _STUDY_RE.match(name) or ".." in name:
        raise AutocompError(
            f"study name {name!r} is not allowed; use letters, digits, '-', '_' and '.' (no '/' or '..'), "
            "at most 100 characters"
        )
    return name


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "x"


def default_study_name(model_spec: str, budget_text: str, hardware: str | None = None, objectives: str = "proxy,size",
                       latency: str | None = None, bitops: str | None = None, workload: str | None = None) -> str:
    """Deterministic from the command, so re-running the same command resumes the same study; commands
    that differ in what they optimize get different studies."""
    if model_spec.startswith("hf:"):
        model = "hf-" + Path(model_spec[3:].rstrip("/")).name
    elif ":" in model_spec:
        target, _, fn = model_spec.rpartition(":")
        model = f"{Path(target).stem if target.endswith('.py') else target.rsplit('.', 1)[-1]}-{fn}"
    else:
        model = model_spec
    parts = [model, budget_text.strip().replace("%", "pct")]
    if hardware:
        parts.append(Path(hardware).stem)
    if objectives.replace(" ", "") != "proxy,size":
        parts.append(objectives.replace(" ", "").replace(",", "+"))
    parts += [x for x in (latency, f"{bitops}ops" if bitops else None, workload) if x]
    return _slug("-".join(parts))[:100]


def _mask_url(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _storage_url(cfg_storage: str | None, studies_dir: Path, study: str) -> str:
    if cfg_storage:
        return cfg_storage
    studies_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(studies_dir / f'{study}.db').as_posix()}"


def _open_storage(url: str) -> Any:
    import optuna

    try:
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///"):])
            if not path.parent.is_dir():
                raise AutocompError(f"storage {url!r} cannot be opened: folder {str(path.parent)!r} does not exist")
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
            _sqlite_wal(storage.engine)
            return storage
        if url.endswith((".log", ".jsonl")) and "://" not in url:
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(url))
        for attempt in range(10):
            try:
                return optuna.storages.get_storage(url)
            except Exception as e:  # two workers creating Optuna's tables in a new database at once
                text = str(e).lower()
                if attempt == 9 or not ("duplicate key" in text or "already exists" in text):
                    raise
                time.sleep(0.3 * (attempt + 1))
    except AutocompError:
        raise
    except ImportError:
        scheme = url.split("://", 1)[0]
        hint = ("pip install 'psycopg[binary]' (or pip install 'autocomp[distributed]')" if scheme.startswith("postgres")
                else "pip install pymysql and use mysql+pymysql://" if scheme.startswith("mysql")
                else "install the database driver SQLAlchemy names for it")
        raise AutocompError(f"storage {_mask_url(url)!r} needs a database driver that is not installed: {hint}") from None
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "connection" in first.lower() or "could not connect" in first.lower() or "refused" in first.lower():
            raise AutocompError(f"database {_mask_url(url)!r} is unreachable ({first[:200]}); start the server or fix "
                                f"the host/port in --storage") from None
        raise AutocompError(f"storage {_mask_url(url)!r} cannot be opened: {first[:300]}") from None


def _sqlite_wal(engine: Any) -> None:
    """WAL journal + synchronous=NORMAL: each commit is appended to the WAL without an fsync, so the
    ~120 parameter writes of a trial cost milliseconds instead of ~0.8 s. A killed process loses nothing
    it committed (the WAL is in the OS); only a power cut can drop the last commits, never corrupt."""
    from sqlalchemy import event

    def on_connect(dbapi_conn: Any, record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(engine, "connect", on_connect)
    engine.dispose()  # connections made while creating the tables predate the listener


@dataclass
class StudyHandle:
    """An opened autocomp study plus what it was made for."""

    study: Any
    name: str
    storage_url: str
    meta: dict[str, Any]
    out_dir: Path

    @property
    def desc(self) -> ModelDesc:
        return ModelDesc.from_dict(self.meta["model"])

    @property
    def budget_bytes(self) -> int:
        return int(self.meta["budget_bytes"])


def open_study(name: str, storage: str | None = None, studies_dir: Path = Path("studies"),
               must_exist: bool = True) -> StudyHandle:
    """Open an existing autocomp study (for ``pareto``, ``plan``); no model is loaded."""
    import optuna

    check_study_name(name)
    if storage is None and must_exist and not (studies_dir / f"{name}.db").is_file():
        raise AutocompError(f"study {name!r} not found under {str(studies_dir)!r}; run `autocomp search ... --study {name}` first"
                            " or pass --storage")
    url = _storage_url(storage, studies_dir, name)
    st = _open_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=st)
    except KeyError:
        raise AutocompError(f"study {name!r} does not exist in {_mask_url(url)!r}") from None
    meta = study.user_attrs.get(ATTR)
    if not meta:
        raise AutocompError(f"study {name!r} was not made by autocomp (no '{ATTR}' attributes)")
    return StudyHandle(study, name, url, meta, studies_dir / name)


# -- results ------------------------------------------------------------------------------------------------
def _finished(trial: Any) -> bool:
    import optuna

    S = optuna.trial.TrialState
    return trial.state == S.COMPLETE or (trial.state == S.FAIL and not trial.user_attrs.get("autocomp_stale"))


def check_study_model(handle: StudyHandle, desc: Any) -> None:
    """Refuse a study searched for another model than ``desc``'s (figures recorded in it would mislead)."""
    if handle.meta.get("fingerprint") != desc.fingerprint:
        raise AutocompError(f"study {handle.name!r} was made for model {handle.meta.get('model_spec')!r}, not this "
                            f"one; pass the study's --model")


def trial_metric(t: Any, name: str, objectives: list[str]) -> float:
    """A trial's figure: from its objective values, else from its user attributes."""
    if name in objectives:
        return float(t.values[objectives.index(name)])
    return float(t.user_attrs[_METRIC_ATTR.get(name, name)])


def front_trials(study: Any, budget: int, objectives: list[str] | None = None) -> list[Any]:
    """Feasible, non-dominated trials in the study's objectives, sorted by size."""
    import optuna

    objectives = objectives or study.user_attrs.get(ATTR, {}).get("objectives", ["proxy", "size"])
    done = [t for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
            if t.values and all(math.isfinite(v) for v in t.values)
            and feasible(t)
            and trial_metric(t, "size", objectives) <= budget]
    idx = pareto_front([tuple(t.values) for t in done])
    front = [done[i] for i in idx]
    return sorted(front, key=lambda t: (trial_metric(t, "size", objectives), trial_metric(t, "proxy", objectives)))


def plan_of(trial: Any, handle: StudyHandle) -> Plan:
    d = trial.user_attrs.get("plan")
    if d is None:
        raise AutocompError(f"trial {trial.number} of study {handle.name!r} has no stored plan")
    plan = Plan.from_dict(d, source=f"trial {trial.number}")
    objectives = handle.meta.get("objectives", ["proxy", "size"])
    extra = {k: trial.user_attrs[k] for k in ("latency_ms", "bitops", "energy") if k in trial.user_attrs}
    return plan.with_metrics(proxy=trial_metric(trial, "proxy", objectives),
                             size_bytes=int(trial_metric(trial, "size", objectives)), **extra)


def _entry(t: Any, handle: StudyHandle) -> dict[str, Any]:
    objectives = handle.meta.get("objectives", ["proxy", "size"])
    e = {"trial": t.number, "size_bytes": int(trial_metric(t, "size", objectives)),
         "proxy": trial_metric(t, "proxy", objectives),
         "plan_path": str(handle.out_dir / "plans" / f"trial-{t.number}.json")}
    by_mod = t.user_attrs.get("by_modality")
    if by_mod is None and "plan" in t.user_attrs:  # a study from before per-modality bytes were stored
        from autocomp.modality import bytes_by_modality

        by_mod = bytes_by_modality(ModelDesc.from_dict(handle.meta["model"]), Plan.from_dict(t.user_attrs["plan"]))
    if by_mod is not None and len(by_mod) > 1:  # multimodal models only (single-modality entries stay as in #2)
        e["by_modality"] = {m: {"size_bytes": int(v)} for m, v in by_mod.items()}
    if handle.meta.get("hardware"):
        for k in ("latency_ms", "bitops", "energy"):
            e[k] = round(float(t.user_attrs[k]), 6)
    return e


def write_front(handle: StudyHandle, front: list[Any]) -> list[dict[str, Any]]:
    """Write plan files for the front, then pareto.json (atomically): a killed run leaves both valid."""
    entries = []
    for t in front:
        e = _entry(t, handle)
        if not Path(e["plan_path"]).is_file():
            plan_of(t, handle).save(e["plan_path"])
        entries.append(e)
    return entries


def study_result(handle: StudyHandle, write: bool = True) -> dict[str, Any]:
    import optuna

    S = optuna.trial.TrialState
    trials = handle.study.get_trials(deepcopy=False)
    front = front_trials(handle.study, handle.budget_bytes)
    entries = write_front(handle, front) if write else [_entry(t, handle) for t in front]
    model = handle.meta["model"]
    result = {
        "study": handle.name,
        "storage": _mask_url(handle.storage_url),
        "trials_complete": sum(t.state == S.COMPLETE for t in trials),
        "trials_failed": sum(t.state == S.FAIL and not t.user_attrs.get("autocomp_stale") for t in trials),
        "model": {"name": model["name"], "params": int(model["params"]), "fp32_bytes": int(model["fp32_bytes"])},
        "budget_bytes": handle.budget_bytes,
        "pareto": entries,
    }
    if handle.meta.get("hardware"):
        result["hardware"] = handle.meta["hardware"]
    if write:
        atomic_write_text(handle.out_dir / "pareto.json", json.dumps(result, indent=1) + "\n")
    return result


# -- the search -------------------------------------------------------------------------------------------
def _space_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _check_same(meta: dict[str, Any], new: dict[str, Any], name: str) -> None:
    checks = (
        ("objectives", "--objectives"), ("hardware", "--hardware"), ("workload", "--workload"),
        ("latency_budget_ms", "--latency-budget"), ("bitops_budget", "--bitops-budget"),
        ("model_spec", "--model"), ("fingerprint", "--model (its weights' layout)"),
        ("data_fingerprint", "--data (calibration data)"), ("space_hash", "--space (file contents)"),
        ("budget_bytes", "--budget"), ("metric", "--metric"),
        ("constraints", "--min-bits / --max-sparsity / --budget-split"),
    )
    # --seeds / --sensitivity only shape a new study's first trials, so a resume may differ in them
    defaults = {"objectives": ["proxy", "size"]}
    for key, flag in checks:
        if meta.get(key, defaults.get(key)) != new.get(key, defaults.get(key)):
            raise AutocompError(
                f"study {name!r} was made with a different {flag}: {meta.get(key)!r}, now {new.get(key)!r}; "
                f"rerun with the original settings to resume, or use a new --study"
            )


def run_search(cfg: SearchConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a search; returns the contract result (see ``autocomp search --json``).

    Several processes may run it on one study in a shared storage (PostgreSQL / MySQL URL or a journal
    file): ``trials`` is then the study's shared total, one worker enqueues the seeds, and a worker's trial
    whose heartbeat stops (killed process) is failed and retried by the others. A SQLite study takes one
    writer at a time (a lock file next to the database)."""
    import optuna

    from autocomp.search.samplers import make_sampler
    from autocomp.space import resolve_space_path

    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    emit = on_event or (lambda kind, data: None)
    if cfg.trials < 1:
        raise AutocompError(f"--trials must be >= 1, got {cfg.trials}")
    name = check_study_name(cfg.study or default_study_name(
        cfg.model, cfg.budget, hardware=cfg.hardware, objectives=cfg.objectives, latency=cfg.latency_budget,
        bitops=cfg.bitops_budget, workload=cfg.workload))
    space_path = resolve_space_path(cfg.space)
    make_sampler(cfg.sampler, cfg.seed)  # validate the name before loading anything heavy
    parse_budget(cfg.budget, fp32_bytes=1)  # syntax check before loading the model
    objectives = parse_objectives(cfg.objectives, cfg.hardware)
    latency_budget = parse_time_ms(cfg.latency_budget) if cfg.latency_budget else None
    bitops_budget = parse_count(cfg.bitops_budget, "--bitops-budget") if cfg.bitops_budget else None
    if cfg.backend not in ("local", "ray"):
        raise AutocompError(f"--backend {cfg.backend!r} is not local or ray")
    if cfg.backend == "ray" and cfg.workers < 1:
        raise AutocompError(f"--workers must be >= 1, got {cfg.workers}")
    if cfg.address and cfg.backend != "ray":
        raise AutocompError("--address is a Ray cluster address; add --backend ray")
    if cfg.address:
        from autocomp.raybackend import reachable

        try:
            reachable(cfg.address)
        except RuntimeError as e:
            raise AutocompError(f"Ray cluster at {cfg.address!r} is unreachable: {e}; check --address (or leave it "
                                f"out to start Ray here)") from None
    if latency_budget is not None and not cfg.hardware:
        raise AutocompError("--latency-budget needs --hardware (e.g. cpu-local or x86-avx512-vnni)")
    if cfg.hardware or bitops_budget is not None or "bitops" in objectives:
        from autocomp.cost.device import load_device

        load_device(cfg.hardware or "x86-avx512-vnni")  # a bad --hardware fails before anything is opened
    url = _storage_url(cfg.storage, cfg.studies_dir, name)
    storage = _open_storage(url)
    shared = not url.startswith("sqlite")  # several workers may share this study
    lock = None if shared else _single_writer_lock(url, name)
    try:
        return _run(cfg, on_event, emit, name, url, storage, shared, objectives, latency_budget, bitops_budget,
                    space_path)
    finally:
        if lock is not None:
            lock.close()


def _run(cfg: SearchConfig, on_event: Any, emit: Any, name: str, url: str, storage: Any, shared: bool,
         objectives: list[str], latency_budget: Any, bitops_budget: Any, space_path: Any) -> dict[str, Any]:
    import optuna

    from autocomp.cost.size import plan_bytes
    from autocomp.evaluators.proxy import ProxyEvaluator, data_fingerprint
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.search.samplers import make_sampler
    from autocomp.space import SearchSpace, reference_assignments

    device = None
    if cfg.hardware or bitops_budget is not None or "bitops" in objectives:
        from autocomp.cost.device import load_device

        device = load_device(cfg.hardware or "x86-avx512-vnni")  # BitOps do not depend on the device

    emit("status", {"message": f"loading model {cfg.model}"})
    loaded = load_model(cfg.model, data=cfg.data, metric=cfg.metric)
    from autocomp.modality import bytes_by_modality, parse_constraints

    space = SearchSpace.from_yaml(space_path, introspect(loaded))
    desc = space.desc  # with the space's modality tags, if it has any
    constraints = parse_constraints(desc, cfg.min_bits, cfg.max_sparsity, cfg.budget_split)
    if constraints.min_bits or constraints.max_sparsity:
        space.restrict(constraints.min_bits, constraints.max_sparsity)
    budget = parse_budget(cfg.budget, fp32_bytes=desc.fp32_bytes)
    smallest = plan_bytes(desc, space.decode(space.smallest_assignment()))
    if budget < smallest:
        raise AutocompError(
            f"budget {cfg.budget} ({format_bytes(budget)}) is below the smallest plan this search space allows "
            f"({format_bytes(smallest)}, {smallest} bytes); raise --budget or allow more compression in the space"
        )
    if budget >= desc.fp32_bytes:
        emit("warning", {"message": f"budget {format_bytes(budget)} is above the model's fp32 size "
                                    f"({format_bytes(desc.fp32_bytes)}); searching the proxy/size trade-off under it"})
    from autocomp.search.repair import Limit, modality_size_limit, size_limit

    limits = [size_limit(space, budget)]
    for mod, share in constraints.budget_split.items():
        limits.append(modality_size_limit(space, mod, int(budget * share)))
        least = bytes_by_modality(desc, space.decode(space.smallest_assignment()))[mod]
        if least > budget * share:
            raise AutocompError(f"--budget-split {mod}={share:.0%} allows {format_bytes(int(budget * share))}, below "
                                f"the smallest {mod} part this space allows ({format_bytes(least)}); raise its share "
                                f"or --budget")
    cost = None
    if device is not None:
        from autocomp.cost.latency import CostModel, parse_workload

        cost = CostModel(device, desc, parse_workload(cfg.workload, desc))
        other_s = cost.other_cost()[0]

        def layer_seconds(n: str, a: Any) -> float:
            layer, choice, rows, cols = space.layer_plan(n, a)
            return cost.layer(layer, choice, rows, cols)[0]

        def layer_gbitops(n: str, a: Any) -> float:
            layer, choice, rows, cols = space.layer_plan(n, a)
            return cost.layer(layer, choice, rows, cols)[1] / 1e9

        if latency_budget is not None:
            fastest = cost.latency_ms(space.decode(space.smallest_assignment(layer_seconds)))
            if latency_budget < fastest:
                raise AutocompError(
                    f"latency budget {cfg.latency_budget} is below the fastest plan this space allows on "
                    f"{device.name} at workload {cost.workload.label()} ({fastest:.2f} ms); raise --latency-budget")
            limits.append(Limit("latency", layer_seconds, other_s, latency_budget / 1e3))
        if bitops_budget is not None:
            least = cost.evaluate(space.decode(space.smallest_assignment(layer_gbitops)))["bitops"]
            if bitops_budget / 1e9 < least:
                raise AutocompError(f"BitOps budget {cfg.bitops_budget} is below the least this space allows "
                                    f"({least:.4g} G); raise --bitops-budget")
            limits.append(Limit("bitops", layer_gbitops, 0.0, bitops_budget / 1e9))
    if cfg.seeds not in ("uniform", "ilp", "none"):
        raise AutocompError(f"--seeds {cfg.seeds!r} is not uniform, ilp or none")
    if cfg.sensitivity not in ("measured", "fisher"):
        raise AutocompError(f"--sensitivity {cfg.sensitivity!r} is not measured or fisher")
    emit("status", {"message": "computing teacher outputs"})
    evaluator = ProxyEvaluator(loaded, desc)
    if any(g.importance == "fisher" for g in space.groups.values()):
        space.unit_orders = _unit_orders(cfg, loaded, desc, space, evaluator, emit)
    sens = _sensitivity(cfg, loaded, desc, space, evaluator, emit) if cfg.seeds == "ilp" else None
    meta = {
        "engine_version": ENGINE_VERSION, "model_spec": cfg.model, "data_spec": cfg.data or loaded.data_spec,
        "fingerprint": desc.fingerprint, "data_fingerprint": data_fingerprint(loaded.batches),
        "space": str(space_path), "space_hash": _space_hash(str(space_path)), "budget": cfg.budget,
        "budget_bytes": budget, "metric": evaluator.metric, "sampler": cfg.sampler, "seed": cfg.seed,
        "repair": cfg.repair, "smallest_bytes": smallest, "model": desc.to_dict(), "objectives": objectives,
        "hardware": device.name if (device is not None and cfg.hardware) else None,
        "workload": cost.workload.label() if cost else None, "latency_budget_ms": latency_budget,
        "bitops_budget": bitops_budget, "seeds": cfg.seeds, "staged": cfg.staged,
        "sensitivity": cfg.sensitivity if cfg.seeds == "ilp" else None,
        "constraints": constraints.to_dict() if constraints else None,
        "sensitivity_file": str(Path(sens.path).resolve()) if sens is not None and sens.path else None,
    }
    sampler = make_sampler(cfg.sampler, cfg.seed)
    directions = ["minimize"] * len(objectives)
    created = False
    try:
        if shared:  # exactly one worker creates the study (and enqueues its seeds); the others wait for it
            try:
                study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=directions)
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        else:
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=directions,
                                        load_if_exists=True)
    except Exception as e:
        raise AutocompError(f"study {name!r} cannot be created in {_mask_url(url)!r}: {e}") from None
    old = study.user_attrs.get(ATTR)
    if shared and not created:
        _wait_for(study, lambda s: s.user_attrs.get(SEEDED_ATTR) is not None, name, url)
        old = study.user_attrs.get(ATTR)
    if old:
        _check_same(old, meta, name)
    elif study.get_trials(deepcopy=False):
        raise AutocompError(f"study {name!r} in {_mask_url(url)!r} exists but was not made by autocomp; use another --study")
    else:
        study.set_user_attr(ATTR, meta)
        study.set_metric_names([_METRIC_ATTR.get(o, o) for o in objectives])
    if SEEDED_ATTR not in study.user_attrs and not (old and study.get_trials(deepcopy=False)):
        if cfg.seeds == "ilp":  # plans of the additive model for a sweep of budgets up to the user's
            for frac, assignment in _ilp_seeds(space, sens, budget, smallest, constraints.budget_split,
                                               n=min(12, max(5, cfg.trials // 20)),
                                               limits=[lim for lim in limits if lim.name in ("latency", "bitops")]):
                study.enqueue_trial(assignment, user_attrs={"reference": f"ilp-{frac:.2f}"})
        # start from the uniform reference plans (repaired onto the budget when they do not fit)
        for label, assignment in (reference_assignments(space).items() if cfg.seeds != "none" else ()):
            study.enqueue_trial(assignment, user_attrs={"reference": label})
        study.set_user_attr(SEEDED_ATTR, True)  # last: other workers start once the seeds are queued
    handle = StudyHandle(study, name, url, old or meta, cfg.studies_dir / name)
    # single writer (SQLite, locked): every RUNNING trial was left by a dead process; shared storages: only
    # trials whose heartbeat stopped
    _recover_stale(study, grace=HEARTBEAT_GRACE if shared else None)

    known: dict[str, tuple[float, int]] = {}
    for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]):
        if "plan_key" in t.user_attrs and t.user_attrs.get("evaluated", True):
            key = t.user_attrs["plan_key"]
            if len(key) != 16 and "plan" in t.user_attrs:  # a trial from before Plan.digest (sha1 of the key)
                key = Plan.from_dict(t.user_attrs["plan"]).digest()
            known.setdefault(key, (trial_metric(t, "proxy", objectives), t.number))
    done = sum(_finished(t) for t in study.get_trials(deepcopy=False))
    result = study_result(handle)
    emit("start", {"study": name, "storage": _mask_url(url), "done": done, "total": cfg.trials,
                   "budget_bytes": budget, "fp32_bytes": desc.fp32_bytes, "smallest_bytes": smallest,
                   "params": len(space.params), "front": result["pareto"]})
    front_ids = [e["trial"] for e in result["pareto"]]
    attempts, max_attempts = 0, 20 * max(1, cfg.trials - done) + 100
    import threading

    out_lock = threading.Lock()
    stop = threading.Event()
    pool = None
    if cfg.backend == "ray":
        from autocomp.raybackend import RayPool

        pool = RayPool(cfg, evaluator.metric, name, emit)
        shared = True  # several evaluations in flight: count the total from the study, like shared workers
    # (the other workers of a shared study, or the Ray actors' driver threads, run the same loop)

    def loop(ev: Any) -> None:
        nonlocal attempts, done, front_ids, result
        beat = _Heartbeat(study) if shared else None
        try:
            while attempts < max_attempts and not stop.is_set():
                if shared:  # the total is shared: count what every worker has finished or is running
                    _recover_stale(study, grace=HEARTBEAT_GRACE)
                    done, running = _progress(study)
                    if done >= cfg.trials:
                        break
                    if done + running >= cfg.trials:  # the rest is running elsewhere; wait in case one dies
                        time.sleep(min(1.0, HEARTBEAT_INTERVAL))
                        continue
                elif done >= cfg.trials:
                    break
                attempts += 1
                trial = study.ask()
                if shared:
                    beat.watch(trial)
                    if sum(_progress(study, below=trial.number)) >= cfg.trials:
                        # another worker asked at the same moment and got the last slot first
                        trial.set_user_attr("skipped", "surplus: the shared total was already reached")
                        beat.watch(None)
                        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                        continue
                try:
                    outcome = _run_trial(trial, space, desc, limits, cost, objectives, ev, known, cfg.repair,
                                         sens.table if sens is not None else None,
                                         _stage_front(study, objectives) if cfg.staged and len(ev.batches) > 1 else None)
                except optuna.exceptions.UpdateFinishedTrialError:
                    # another worker took this trial for dead (no heartbeat within the grace period) and
                    # re-enqueued it; leave it to that retry
                    emit("warning", {"message": f"trial {trial.number} was failed by another worker meanwhile; "
                                                f"its retry will score it"})
                    continue
                except KeyboardInterrupt:
                    if beat is not None:
                        beat.stop()
                    trial.set_user_attr("autocomp_stale", True)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    if trial.params:
                        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
                    with out_lock:
                        study_result(handle)  # the front so far is on disk before we stop
                    emit("interrupted", {"done": done, "total": cfg.trials})
                    raise KeyboardInterrupt from None
                state, values = outcome
                if beat is not None:
                    beat.watch(None)
                try:
                    study.tell(trial, values=values, state=state)
                except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
                    continue  # failed by another worker meanwhile (see above)
                if state != optuna.trial.TrialState.PRUNED and not shared:
                    done += 1
                with out_lock:
                    front = front_trials(study, budget, objectives)
                    if [t.number for t in front] != front_ids:
                        front_ids = [t.number for t in front]
                        result = study_result(handle)
                    emit("trial", {"number": trial.number, "state": state.name, "values": values,
                                   "done": done + (shared and state != optuna.trial.TrialState.PRUNED),
                                   "total": cfg.trials,
                                   "front": [(trial_metric(t, "proxy", objectives), trial_metric(t, "size", objectives))
                                             for t in front]})
        finally:
            if beat is not None:
                beat.stop()

    with _sigterm_as_interrupt():
        if pool is None:
            loop(evaluator)
        else:
            threads = [threading.Thread(target=loop, args=(pool.evaluator(i),), daemon=True)
                       for i in range(pool.workers)]
            try:
                for t in threads:
                    t.start()
                while any(t.is_alive() for t in threads):
                    for t in threads:
                        t.join(timeout=0.2)
            except KeyboardInterrupt:
                stop.set()  # each driver thread finishes the trial it runs, then stops
                for t in threads:
                    t.join()
                with out_lock:
                    study_result(handle)
                emit("interrupted", {"done": _progress(study)[0], "total": cfg.trials})
                raise
            finally:
                pool.close()
    if shared:
        done = _progress(study)[0]
    if done < cfg.trials:
        emit("warning", {"message": f"stopped after {attempts} proposals: only {done} of {cfg.trials} trials "
                                    "fit the budget; enable --repair or loosen --budget"})
    result = study_result(handle)
    if pool is not None:
        result["backend"] = "ray"
    emit("done", {"done": done, "total": cfg.trials, "result": result})
    return result


def _sensitivity(cfg: SearchConfig, loaded: Any, desc: ModelDesc, space: Any, evaluator: Any, emit: Any) -> Any:
    """The sensitivity database for this model / data / space, profiled on the first calibration batch."""
    import dataclasses

    from autocomp.evaluators.proxy import ProxyEvaluator, data_fingerprint
    from autocomp.search.sensitivity import fisher_profile, profile, weights_hash

    sliced = dataclasses.replace(loaded, batches=loaded.batches[:1], metric=evaluator.metric)
    fast = ProxyEvaluator(sliced, desc)
    parts = {"weights": weights_hash(loaded.module), "data": data_fingerprint(sliced.batches),
             "metric": evaluator.metric, "evaluator": "proxy-v1"}
    emit("status", {"message": f"{cfg.sensitivity} sensitivity database (cached after the first run)"})
    log = lambda m: emit("status", {"message": m})  # noqa: E731
    if cfg.sensitivity == "fisher":
        return fisher_profile(space, fast, cfg.studies_dir / "sensitivity", parts, log=log)
    return profile(space, fast, cfg.studies_dir / "sensitivity", parts, log=log)


def _unit_orders(cfg: SearchConfig, loaded: Any, desc: ModelDesc, space: Any, evaluator: Any,
                 emit: Any) -> dict[str, tuple[int, ...]]:
    """Data-driven unit rankings for structured groups with ``importance: fisher`` (first calibration batch)."""
    import dataclasses

    from autocomp.evaluators.proxy import ProxyEvaluator, data_fingerprint
    from autocomp.search.sensitivity import unit_importance, weights_hash

    sliced = dataclasses.replace(loaded, batches=loaded.batches[:1], metric=evaluator.metric)
    parts = {"weights": weights_hash(loaded.module), "data": data_fingerprint(sliced.batches),
             "metric": evaluator.metric}
    return unit_importance(space, ProxyEvaluator(sliced, desc), cfg.studies_dir / "sensitivity", parts,
                           log=lambda m: emit("status", {"message": m}))


def _ilp_seeds(space: Any, sens: Any, budget: int, smallest: int, split: Mapping[str, float] | None = None,
               n: int = 5, limits: Sequence[Any] = ()) -> list[tuple[float, dict[str, str]]]:
    """Additive-ILP plans for ``n`` budgets from the user's down to 40% of it (or the smallest plan): the
    front below the budget too, where (size, proxy) trade-offs are steepest. ``n`` grows with the trial count
    (5 for short runs, up to 12). ``limits`` (latency, BitOps) hold for every plan of the sweep."""
    from autocomp.search.sensitivity import ilp_assignment

    seeds, seen = [], set()
    low = max(0.4, smallest / budget)
    for i in range(n):
        frac = 1.0 - (1.0 - low) * i / max(1, n - 1) if n > 1 else 1.0
        b = int(budget * frac)
        if b < smallest:
            continue
        # per-modality shares stay those of the user's budget (they are caps, not targets)
        a = ilp_assignment(space, sens, b, {m: int(budget * f) for m, f in (split or {}).items()}, limits)
        if a is not None and tuple(sorted(a.items())) not in seen:
            seen.add(tuple(sorted(a.items())))
            seeds.append((frac, a))
    return seeds


def _stage_front(study: Any, objectives: list[str]) -> list[tuple[float, float]]:
    """(size, first-batch proxy) of the current front's trials, for staged evaluation."""
    out = []
    for t in front_trials(study, 2**62, objectives):
        if "proxy_stage1" in t.user_attrs:
            out.append((trial_metric(t, "size", objectives), float(t.user_attrs["proxy_stage1"])))
    return out


def _run_trial(trial: Any, space: Any, desc: ModelDesc, limits: list[Any], cost: Any, objectives: list[str],
               evaluator: Any, known: dict[str, tuple[float, int]], do_repair: bool,
               sensitivity: Any = None, stage_front: list[tuple[float, float]] | None = None) -> tuple[Any, Any]:
    import optuna

    from autocomp.cost.size import plan_bytes
    from autocomp.search.repair import repair

    S = optuna.trial.TrialState
    assignment = {p: trial.suggest_categorical(p, list(opts)) for p, opts in space.params.items()}

    from autocomp.modality import bytes_by_modality

    def figures(a: dict[str, str]) -> tuple[Any, dict[str, Any]]:
        plan = space.decode(a)
        out: dict[str, Any] = {"size_bytes": float(plan_bytes(desc, plan)),
                               "by_modality": bytes_by_modality(desc, plan)}
        if cost is not None:
            out.update(cost.evaluate(plan))
        return plan, out

    def over(f: dict[str, Any]) -> dict[str, float]:
        got = {"size": f["size_bytes"], "latency": f.get("latency_ms", 0) / 1e3, "bitops": f.get("bitops", 0),
               **{f"size:{m}": float(v) for m, v in f["by_modality"].items()}}
        return {lim.name: got.get(lim.name, 0.0) - lim.budget for lim in limits}

    plan, fig = figures(assignment)
    if do_repair and any(v > 0 for v in over(fig).values()):
        fixed, _ = repair(space, assignment, limits, sensitivity)
        trial.set_user_attr("repair", {p: [assignment[p], fixed[p]] for p in fixed if fixed[p] != assignment[p]})
        plan, fig = figures(fixed)
    excess = over(fig)
    scale = {"latency": 1e3}  # constraints in bytes, ms, GBitOps
    for name, v in excess.items():
        trial.set_constraint(name, float(v * scale.get(name, 1.0)))
    trial.set_user_attr("size_bytes", int(fig["size_bytes"]))
    trial.set_user_attr("by_modality", fig["by_modality"])
    for k in ("latency_ms", "bitops", "energy"):
        if k in fig:
            trial.set_user_attr(k, float(fig[k]))
    if any(v > 0 for v in excess.values()):  # never evaluated
        trial.set_user_attr("skipped", "over budget: " + ", ".join(k for k, v in excess.items() if v > 0))
        return S.PRUNED, None
    key = plan.digest()
    trial.set_user_attr("plan_key", key)
    body = plan.to_dict()
    body.pop("metrics", None)
    trial.set_user_attr("plan", body)
    trial.set_user_attr("plan_summary", plan.summary(len(desc.layers)))  # for optuna-dashboard and reports

    def values(proxy: float) -> list[float]:
        named = {"proxy": proxy, "size": fig["size_bytes"], "latency": fig.get("latency_ms"),
                 "bitops": fig.get("bitops"), "energy": fig.get("energy")}
        return [float(named[o]) for o in objectives]

    if key in known:
        proxy, source = known[key]
        trial.set_user_attr("duplicate_of", source)
        trial.set_user_attr("evaluated", False)
        return S.COMPLETE, values(proxy)
    t0 = time.perf_counter()
    if stage_front is not None:
        # staged (EvoPress-style): the first calibration batch first; a candidate that a no-larger front plan
        # beats by more than 10% on that batch is not evaluated further (and not stored as complete)
        n0, d0 = evaluator.partial(plan, [0])
        first = evaluator.finish(n0, d0)
        trial.set_user_attr("proxy_stage1", first)
        if any(size <= fig["size_bytes"] and s1 * 1.1 < first for size, s1 in stage_front):
            trial.set_user_attr("skipped", f"staged: first-batch proxy {first:.4g} is dominated by the front")
            trial.set_user_attr("eval_seconds", round(time.perf_counter() - t0, 4))
            return S.PRUNED, None
        n1, d1 = evaluator.partial(plan, range(1, len(evaluator.batches)))
        proxy = evaluator.finish(n0 + n1, d0 + d1)
    else:
        proxy = evaluator(plan)
    trial.set_user_attr("eval_seconds", round(time.perf_counter() - t0, 4))
    if not math.isfinite(proxy):
        trial.set_user_attr("fail_reason", "proxy is not finite (NaN/inf outputs)")
        return S.FAIL, None
    known[key] = (proxy, trial.number)
    return S.COMPLETE, values(proxy)


HEARTBEAT_INTERVAL = float(os.environ.get("AUTOCOMP_HEARTBEAT_S", "10"))  # seconds between a trial's beats
HEARTBEAT_GRACE = 3 * HEARTBEAT_INTERVAL  # a RUNNING trial silent this long belongs to a dead worker
SEEDED_ATTR = "autocomp_seeded"


def _recover_stale(study: Any, grace: float | None = None) -> int:
    """Fail trials a killed process left RUNNING and enqueue their parameters again. ``grace=None``
    (single writer): every RUNNING trial; otherwise those whose last heartbeat (or start) is older."""
    import optuna

    S = optuna.trial.TrialState
    n = 0
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=[S.RUNNING]):
        if grace is not None:
            last = t.user_attrs.get("autocomp_heartbeat") or (t.datetime_start.timestamp() if t.datetime_start else now)
            if now - float(last) <= grace:
                continue
        storage = study._storage
        try:
            storage.set_trial_user_attr(t._trial_id, "autocomp_stale", True)
            storage.set_trial_state_values(t._trial_id, state=S.FAIL)
        except Exception:  # finished meanwhile by its owner
            continue
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        n += 1
    return n


def _progress(study: Any, below: int | None = None) -> tuple[int, int]:
    """(finished, running) trials of the study (numbered below ``below``); finished as in ``_finished``."""
    import optuna

    S = optuna.trial.TrialState
    fin = run = 0
    for t in study.get_trials(deepcopy=False, states=[S.COMPLETE, S.FAIL, S.RUNNING]):
        if below is not None and t.number >= below:
            continue
        if t.state == S.RUNNING:
            run += 1
        elif _finished(t):
            fin += 1
    return fin, run


def _wait_for(study: Any, ready: Callable[[Any], bool], name: str, url: str, timeout: float = 600.0) -> None:
    """Wait until another worker has finished creating the study (its seeds are queued)."""
    t0 = time.perf_counter()
    while not ready(study):
        if time.perf_counter() - t0 > timeout:
            raise AutocompError(f"study {name!r} in {_mask_url(url)!r} was created by another worker that never "
                                f"finished setting it up; delete the study or use another --study")
        time.sleep(0.5)


class _Heartbeat:
    """Records ``autocomp_heartbeat`` (a timestamp) on the trial this worker runs, every
    ``HEARTBEAT_INTERVAL`` seconds from a daemon thread; other workers fail trials whose beats stopped.
    Works on every storage (Optuna's own heartbeat is RDB-only)."""

    def __init__(self, study: Any) -> None:
        import threading

        self.storage = study._storage
        self.trial_id: int | None = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="autocomp-heartbeat")
        self.thread.start()

    def _beat(self) -> None:
        with self.lock:
            if self.trial_id is not None:
                try:
                    self.storage.set_trial_user_attr(self.trial_id, "autocomp_heartbeat", time.time())
                except Exception:  # finished meanwhile
                    pass

    def _run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_INTERVAL):
            self._beat()

    def watch(self, trial: Any) -> None:
        with self.lock:
            self.trial_id = None if trial is None else trial._trial_id
        self._beat()

    def stop(self) -> None:
        self.stopped.set()
        with self.lock:
            self.trial_id = None


def _single_writer_lock(url: str, name: str) -> Any:
    """An exclusive lock next to a SQLite study database; a second writer gets one clear line."""
    import fcntl

    path = Path(url[len("sqlite:///"):] + ".lock")
    try:
        f = open(path, "a+")  # noqa: SIM115 - held open for the whole search
    except OSError as e:
        raise AutocompError(f"storage {url!r} cannot be locked ({e.strerror}); check the folder's permissions") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise AutocompError(f"study {name!r} is being searched by another process, and SQLite takes one writer per "
                            f"study; for several workers use --storage postgresql://user:pw@host/db or a journal "
                            f"file (--storage studies/{name}.log)") from None
    return f


class _sigterm_as_interrupt:
    """SIGTERM ends the run like Ctrl-C: the current trial is marked for retry and outputs are written."""

    def __enter__(self) -> None:
        self._old = None
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            pass

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    @staticmethod
    def _handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
