"""The study room: opening Optuna storages (SQLite with WAL and a single-writer lock, journal files,
PostgreSQL / MySQL), the study's stored settings, reading its front and writing ``pareto.json`` and plan
files atomically, failing trials a dead process left RUNNING (stale recovery), and the heartbeat that lets
workers sharing a study tell a dead one from a slow one.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from autocomp.desc import ModelDesc
from autocomp.errors import AutocompError
from autocomp.plan import Plan, atomic_write_text
from autocomp.search.config import METRIC_ATTR
from autocomp.search.pareto import feasible, pareto_front

__all__ = ["ATTR", "SEEDED_ATTR", "HEARTBEAT_INTERVAL", "HEARTBEAT_GRACE", "StudyHandle", "open_study", "open_storage",
           "storage_url", "check_storage", "mask_url", "check_study_name", "default_study_name", "check_study_model", "is_finished",
           "trial_metric", "front_trials", "plan_of", "write_front", "study_result", "recover_stale", "progress",
           "wait_for", "requeue", "Heartbeat", "single_writer_lock", "sigterm_as_interrupt"]

ATTR = "autocomp"
_STUDY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


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


def mask_url(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def storage_url(cfg_storage: str | None, studies_dir: Path, study: str, create: bool = True) -> str:
    """The study's storage URL (default: SQLite under ``studies_dir``, created when ``create``)."""
    if cfg_storage:
        return cfg_storage
    if create:
        studies_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(studies_dir / f'{study}.db').as_posix()}"


def check_storage(url: str) -> None:
    """What can be checked of a storage URL without opening it (a SQLite file's folder must exist)."""
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if not path.parent.is_dir():
            raise AutocompError(f"storage {url!r} cannot be opened: folder {str(path.parent)!r} does not exist")
        _check_sqlite_file(path)


def _sqlite_read_only(path: Path) -> Any:
    """A SQLite study opened for reading only: nothing is created or changed (a 0-byte or foreign file is
    refused, not given Optuna's tables), and a study in a read-only folder can be read."""
    import optuna
    from urllib.parse import quote

    _check_sqlite_file(path, empty_ok=False)
    last: Exception | None = None
    for flags in ("mode=ro", "immutable=1"):  # immutable: a read-only folder, where SQLite cannot lock
        try:
            storage = optuna.storages.RDBStorage(f"sqlite:///file:{quote(str(path.resolve()))}?{flags}&uri=true",
                                                 skip_table_creation=True)
            storage.get_all_studies()
            return storage
        except Exception as e:  # noqa: PERF203 - two tries
            last = e
    first = str(last).splitlines()[0] if last else ""
    if "no such table" in first or "not a database" in first:
        raise AutocompError(f"{str(path)!r} is not a study database; move it away or pass another --study")
    raise AutocompError(f"study database {str(path)!r} cannot be read ({first[:200]}); check its permissions")


def open_storage(url: str, read_only: bool = False) -> Any:
    """An Optuna storage for ``url`` (SQLite with WAL, a journal file, or a database server); with
    ``read_only`` a SQLite file is opened for reading only."""
    import optuna

    try:
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///"):])
            if not path.parent.is_dir():
                raise AutocompError(f"storage {url!r} cannot be opened: folder {str(path.parent)!r} does not exist")
            if read_only:
                return _sqlite_read_only(path)
            _check_sqlite_file(path)
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
        raise AutocompError(f"storage {mask_url(url)!r} needs a database driver that is not installed: {hint}") from None
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "connection" in first.lower() or "could not connect" in first.lower() or "refused" in first.lower():
            raise AutocompError(f"database {mask_url(url)!r} is unreachable ({first[:200]}); start the server or fix "
                                f"the host/port in --storage") from None
        raise AutocompError(f"storage {mask_url(url)!r} cannot be opened: {first[:300]}") from None


def _check_sqlite_file(path: Path, empty_ok: bool = True) -> None:
    """An existing file that is not a SQLite database is refused (Optuna would report a SQL error); so is an
    empty one where a study is to be read (``empty_ok=False``)."""
    if not path.is_file():
        return
    if path.stat().st_size == 0:
        if empty_ok:
            return
        raise AutocompError(f"{str(path)!r} is an empty file, not a study database; move it away or pass another "
                            f"--study")
    with open(path, "rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            raise AutocompError(f"{str(path)!r} is not a study database; move it away or pass another --study")


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
               must_exist: bool = True, read_only: bool = False) -> StudyHandle:
    """Open an existing autocomp study (for ``pareto``, ``plan``, ``report``); no model is loaded.
    ``read_only``: change nothing in the storage (commands that only read)."""
    import optuna

    check_study_name(name)
    if storage is None and must_exist and not (studies_dir / f"{name}.db").is_file():
        raise AutocompError(f"study {name!r} not found under {str(studies_dir)!r}; run `autocomp search ... --study {name}` first"
                            " or pass --storage")
    url = storage_url(storage, studies_dir, name, create=False)
    st = open_storage(url, read_only=read_only)
    try:
        study = optuna.load_study(study_name=name, storage=st)
    except KeyError:
        raise AutocompError(f"study {name!r} does not exist in {mask_url(url)!r}") from None
    meta = study.user_attrs.get(ATTR)
    if not meta:
        raise AutocompError(f"study {name!r} was not made by autocomp (no '{ATTR}' attributes)")
    return StudyHandle(study, name, url, meta, studies_dir / name)


# -- results ------------------------------------------------------------------------------------------------
def is_finished(trial: Any) -> bool:
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
    return float(t.user_attrs[METRIC_ATTR.get(name, name)])


def front_trials(study: Any, budget: int, objectives: list[str] | None = None) -> list[Any]:
    """Feasible, non-dominated trials in the study's objectives, sorted by size."""
    import optuna

    objectives = objectives or study.user_attrs.get(ATTR, {}).get("objectives", ["proxy", "size"])
    return front_of(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]), budget, objectives)


def front_of(trials: list[Any], budget: int, objectives: list[str]) -> list[Any]:
    """:func:`front_trials` of these trials (COMPLETE ones). The front of a front plus new trials is the front
    of all of them, so a worker that alone writes a study can keep it up to date trial by trial."""
    import optuna

    done = sorted((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
                   and t.values and all(math.isfinite(v) for v in t.values)
                   and feasible(t)
                   and trial_metric(t, "size", objectives) <= budget), key=lambda t: t.number)
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


def write_front(handle: StudyHandle, front: list[Any]) -> list[dict[str, Any]]:  # noqa: D103
    """Write plan files for the front, then pareto.json (atomically): a killed run leaves both valid."""
    entries = []
    for t in front:
        e = _entry(t, handle)
        if not Path(e["plan_path"]).is_file():
            plan_of(t, handle).save(e["plan_path"])
        entries.append(e)
    return entries


def study_result(handle: StudyHandle, write: bool | str = True, front: list[Any] | None = None) -> dict[str, Any]:
    """The ``--json`` contract of a study; ``write`` also writes the front's plan files and pareto.json
    (``"if-possible"``: skipped where the folder cannot be written, e.g. a read-only copy of a study).
    ``front``: the study's :func:`front_trials`, where the caller has it."""
    if write == "if-possible":
        try:
            return study_result(handle, write=True, front=front)
        except AutocompError:
            return study_result(handle, write=False, front=front)
    import optuna

    S = optuna.trial.TrialState
    trials = handle.study.get_trials(deepcopy=False)
    if front is None:
        front = front_trials(handle.study, handle.budget_bytes)
    entries = write_front(handle, front) if write else [_entry(t, handle) for t in front]
    model = handle.meta["model"]
    result = {
        "study": handle.name,
        "storage": mask_url(handle.storage_url),
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


HEARTBEAT_INTERVAL = float(os.environ.get("AUTOCOMP_HEARTBEAT_S", "10"))  # seconds between a trial's beats
HEARTBEAT_GRACE = 3 * HEARTBEAT_INTERVAL  # a RUNNING trial silent this long belongs to a dead worker
SEEDED_ATTR = "autocomp_seeded"


def recover_stale(study: Any, grace: float | None = None) -> int:
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
        # a trial killed before its parameters were written (they are written once the plan is decided) is
        # retried with the parameters it was queued with, if it was queued (a seed)
        params = t.params or t.system_attrs.get("fixed_params") or {}
        if params:
            requeue(study, t.number, params, t.user_attrs)
        n += 1
    return n


def requeue(study: Any, number: int, params: dict[str, Any], user_attrs: dict[str, Any]) -> None:
    """Queue a trial that did not finish (killed, interrupted) to run again, keeping its seed label."""
    keep = {k: user_attrs[k] for k in ("reference",) if k in user_attrs}
    study.enqueue_trial(params, user_attrs={"retry_of": number, **keep})


def progress(study: Any, below: int | None = None) -> tuple[int, int]:
    """(finished, running) trials of the study (numbered below ``below``); finished as in ``is_finished``."""
    import optuna

    S = optuna.trial.TrialState
    counted = getattr(study._storage, "progress", None)  # one statement on a database (see BatchedStorage)
    n = counted(study._study_id, below) if counted is not None else None
    if n is not None:
        return n
    fin = run = 0
    for t in study.get_trials(deepcopy=False, states=[S.COMPLETE, S.FAIL, S.RUNNING]):
        if below is not None and t.number >= below:
            continue
        if t.state == S.RUNNING:
            run += 1
        elif is_finished(t):
            fin += 1
    return fin, run


def wait_for(study: Any, ready: Callable[[Any], bool], name: str, url: str, timeout: float = 600.0) -> None:
    """Wait until another worker has finished creating the study (its seeds are queued)."""
    t0 = time.perf_counter()
    while not ready(study):
        if time.perf_counter() - t0 > timeout:
            raise AutocompError(f"study {name!r} in {mask_url(url)!r} was created by another worker that never "
                                f"finished setting it up; delete the study or use another --study")
        time.sleep(0.5)


class Heartbeat:
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

    def _beat(self, first: bool = False) -> None:
        # a trial's first beat goes with its first batch of writes where the storage batches them (it is
        # written before the evaluation starts; until then other workers go by the trial's start)
        write = (getattr(self.storage, "hold_user_attr", None) if first else None) or self.storage.set_trial_user_attr
        with self.lock:
            if self.trial_id is not None:
                try:
                    write(self.trial_id, "autocomp_heartbeat", time.time())
                except Exception:  # finished meanwhile
                    pass

    def _run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_INTERVAL):
            self._beat()

    def watch(self, trial: Any) -> None:
        with self.lock:
            self.trial_id = None if trial is None else trial._trial_id
        self._beat(first=True)

    def stop(self) -> None:
        self.stopped.set()
        with self.lock:
            self.trial_id = None


def single_writer_lock(url: str, name: str) -> Any:
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


class sigterm_as_interrupt:
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
