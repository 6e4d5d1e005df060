"""Issue #7 figures: storage overhead per trial, trials per second with 1 and 2 workers (local processes on a
shared study, and Ray actors), Ray start-up cost and memory per worker.

    .venv/bin/python benchmarks/bench_distributed.py [--postgres URL] [--trials 40] --json

Storage overhead: a trial's storage traffic without any evaluation -- ask, suggest the 121 categorical
parameters of MiniLM's default space, write the plan JSON and the other user attributes autocomp writes,
tell -- with the random sampler (no model-based sampling cost), 100 trials per storage: the time spent in the
storage's methods (the loop around them reported beside it).
Throughput: `autocomp search --model minilm --budget 15%` for --trials trials (no seeds, random sampler, so
every trial is a proxy evaluation), timed from the first trial's start to the last trial's end in the
study (model loading and Ray start-up excluded; reported separately).

Two workers against one on a shared study (issue #14), interleaved rounds, a fresh studies folder per run
(so the weight store starts empty), `--threads 1` for each of the two:

    .venv/bin/python benchmarks/bench_distributed.py --postgres URL --pair --trials 40 --rounds 2 \
        --extra="--space compensated" [--extra="--space compensated --weights-cache 0"]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _timed(storage: Any) -> Any:
    """``storage`` with the time spent in its methods added up in ``storage.timed_seconds``: every public method
    called on it (by Optuna's study and trial, by the loop) is timed once, the calls it makes on itself or on the
    storage it wraps inside that time (a depth count, so nothing is counted twice). Patched on the instance, so
    ``isinstance`` checks still see the storage's own class."""
    depth = [0]
    storage.timed_seconds = 0.0

    def wrap(method: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if depth[0]:
                return method(*args, **kwargs)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                storage.timed_seconds += time.perf_counter() - t0
                depth[0] -= 1
        return timed

    for name in dir(type(storage)):
        if not name.startswith("_") and callable(getattr(type(storage), name, None)):
            setattr(storage, name, wrap(getattr(storage, name)))
    return storage


def storage_overhead(url_or_path: str, n: int = 100, batched: bool = True, warmup: int = 0,
                     sampler: str = "random") -> dict[str, float]:
    """Seconds per trial of a trial's storage work, as the engine does it (``batched``: the trial's writes held
    and written in one batch once the plan is decided, the rest with the tell), or one transaction per write.

    The loop is a random MiniLM trial's ask / suggest / tell with the writes autocomp makes. Two figures:
    ``storage``, the time spent inside the storage's methods (creating the trial, holding and writing its
    parameters and attributes, the reads Optuna makes, the tell) -- the storage work; and ``loop``, the whole
    loop, which adds Optuna's per-parameter suggest machinery, the sampler's draws and the plan's decoding.
    ``":memory:"`` runs the loop on Optuna's in-memory storage (no batching). ``sampler``: random by default (no
    reads of the study, no model-based sampling cost); the engine's default, ``refine``, adds the reads a
    search's sampler makes each trial (and its own work, to the loop). ``warmup`` trials run first,
    untimed (the process's first trials on a storage pay one-time costs -- connections, compiled statements --
    that a search spreads over all of its trials)."""
    import optuna
    from optuna.storages import RDBStorage
    from optuna.storages._cached_storage import _CachedStorage

    from autocomp.engine import open_storage as _open_storage
    from autocomp.search.batching import batched as _batched
    from autocomp.search.batching import tell as _tell
    from autocomp.search.samplers import make_sampler
    from autocomp.models import load_model
    from autocomp.models.introspect import describe_static
    from autocomp.space import SearchSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    desc = describe_static(load_model("minilm"))
    space = SearchSpace.from_yaml("default", desc)
    if url_or_path == ":memory:":
        storage, batched = optuna.storages.InMemoryStorage(), False
    else:
        storage = _open_storage(url_or_path)
    # as the engine opens it: a SQLite study has one writer, which keeps the study's trials as it writes them
    storage = _batched(storage, sole=url_or_path.startswith("sqlite")) if batched else storage
    if isinstance(storage, RDBStorage):  # as optuna.create_study would wrap it, but timed as a whole
        storage = _CachedStorage(storage)
    storage = _timed(storage)
    study = optuna.create_study(study_name=f"ovh-{uuid.uuid4().hex[:8]}", storage=storage,
                                sampler=make_sampler(sampler, 0), directions=["minimize", "minimize"])
    t0 = time.perf_counter()
    for i in range(warmup + n):
        if i == warmup:
            t0, storage.timed_seconds = time.perf_counter(), 0.0
        trial = study.ask()
        a = {p: trial.suggest_categorical(p, list(o)) for p, o in space.params.items()}
        plan = space.decode(a)
        trial.set_user_attr("plan", plan.to_dict())
        trial.set_user_attr("plan_key", "x" * 40)
        trial.set_user_attr("size_bytes", 1)
        trial.set_user_attr("by_modality", {"text": 1})
        if batched:  # a shared worker's first beat, as Heartbeat.watch sends it: with the trial's first batch
            storage.hold_user_attr(trial._trial_id, "autocomp_heartbeat", time.time())
        else:
            trial.set_user_attr("autocomp_heartbeat", time.time())
        trial.set_constraint("size", -1.0)
        if batched:
            storage.flush(trial._trial_id)  # the plan is decided: the engine writes before evaluating
        trial.set_user_attr("eval_seconds", 0.1)
        if batched:
            _tell(study, trial, [0.1, 1.0])  # as the engine tells (no copy of the told trial)
        else:
            study.tell(trial, [0.1, 1.0])
    return {"loop": (time.perf_counter() - t0) / n, "storage": storage.timed_seconds / n}


def _span(storage: str, study: str) -> tuple[int, float]:
    import optuna

    from autocomp.engine import open_storage as _open_storage

    st = optuna.load_study(study_name=study, storage=_open_storage(storage))
    done = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    start = min(t.datetime_start for t in done)
    end = max(t.datetime_complete for t in done)
    return len(done), (end - start).total_seconds()


def run_search(storage: str, study: str, trials: int, procs: int = 1, extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "autocomp.cli", "search", "--model", "minilm", "--budget", "15%", "--trials",
           str(trials), "--study", study, "--storage", storage, "--seeds", "none", "--sampler", "random", "--json",
           *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    ps = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(procs)]
    outs = [p.communicate() for p in ps]
    wall = time.perf_counter() - t0
    for p, (_, err) in zip(ps, outs):
        if p.returncode != 0:
            raise SystemExit(err[-2000:])
    n, span = _span(storage, study)
    row = {"trials": n, "trials_per_second": n / span, "wall_seconds": wall}
    m = re.search(r"Ray up in ([\d.]+) s, (\d+) workers ready in ([\d.]+) s \(max RSS per worker (\d+) MB\)",
                  "".join(e for _, e in outs))
    if m:
        row.update(ray_startup_seconds=float(m.group(1)), ray_ready_seconds=float(m.group(3)),
                   worker_max_rss_mb=int(m.group(4)))
    return row


def pair(storage: str, trials: int, rounds: int, extra: tuple[str, ...]) -> list[dict]:
    """Two workers (``--threads 1`` each) vs one on ``storage``, ``rounds`` interleaved rounds."""
    import random

    rows = []
    for _ in range(rounds):
        r: dict = {}
        for name in random.sample(["one", "two"], 2):
            folder = tempfile.mkdtemp(prefix="autocomp-pair-")
            procs, more = (1, ()) if name == "one" else (2, ("--threads", "1"))
            r[name] = run_search(storage, f"pair-{name}-{uuid.uuid4().hex[:6]}", trials, procs,
                                 ("--studies-dir", folder, *more, *extra))["trials_per_second"]
            shutil.rmtree(folder, ignore_errors=True)
        r["two_vs_one"] = round(r["two"] / r["one"], 3)
        print(json.dumps(r), file=sys.stderr, flush=True)
        rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--postgres", default=os.environ.get("AUTOCOMP_TEST_POSTGRES"))
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--pair", action="store_true", help="only two workers vs one on the shared storage")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--extra", default="", help="more search flags for --pair, e.g. '--space compensated'")
    args = ap.parse_args()
    if args.pair:
        shared = args.postgres or str(Path(tempfile.mkdtemp(prefix="autocomp-pair-")) / "shared.log")
        print(json.dumps({"storage": "postgresql" if args.postgres else "journal", "extra": args.extra,
                          "rounds": pair(shared, args.trials, args.rounds, tuple(args.extra.split()))}))
        return
    import warnings

    warnings.filterwarnings("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="autocomp-dist-"))
    out: dict = {"storage_seconds_per_trial": {}, "throughput": {}}
    stores = {"sqlite": f"sqlite:///{tmp}/o.db", "journal": str(tmp / "o.log")}
    if args.postgres:
        stores["postgresql"] = args.postgres
    for name, url in stores.items():
        spent = storage_overhead(url)
        out["storage_seconds_per_trial"][name] = spent["storage"]
        print(f"storage {name}: {spent['storage'] * 1e3:.1f} ms/trial (the whole loop {spent['loop'] * 1e3:.1f} ms)",
              file=sys.stderr)
    shared = args.postgres or str(tmp / "shared.log")
    runs = {
        "local_1": (f"sqlite:///{tmp}/l1.db", 1, ()),
        "local_2_processes": (shared, 2, ()),
        "ray_1": (f"sqlite:///{tmp}/r1.db", 1, ("--backend", "ray", "--workers", "1")),
        "ray_2": (f"sqlite:///{tmp}/r2.db", 1, ("--backend", "ray", "--workers", "2")),
    }
    for name, (storage, procs, extra) in runs.items():
        out["throughput"][name] = run_search(storage, f"tp-{name}-{uuid.uuid4().hex[:6]}", args.trials, procs,
                                             ("--studies-dir", str(tmp / "studies"), *extra))
        print(f"{name}: {out['throughput'][name]}", file=sys.stderr)
    out["shared_storage"] = "postgresql" if args.postgres else "journal"
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
