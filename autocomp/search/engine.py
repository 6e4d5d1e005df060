"""The trial loop: ``run_search`` checks the request, prepares the model, space and budgets (a refused request
writes nothing), opens the study (:mod:`autocomp.search.study`), queues the seeds (:mod:`~.seeds`) and runs
trials (:mod:`~.trial`) until the study has ``--trials`` finished ones; anytime persistence of the front.

The study is a normal Optuna study (objectives minimized: proxy, size_bytes, or the ones chosen) with a
``size`` constraint (``size_bytes - budget <= 0`` is feasible) set on every trial before its proxy runs.
Everything needed to read the study back without the model (model description, budget, search-space hash,
calibration-data hash) is stored in the study's user attributes under ``autocomp``.

Resume: opening an existing study checks it was made for the same model / data / space / budget (the
settings table of :mod:`~.config`), fails trials a killed process left RUNNING (``autocomp_stale``) and
enqueues their parameters again, then runs only the missing trials. ``--trials N`` counts finished trials
(complete, or failed with a reason such as a non-finite proxy); stale ones do not count and are retried.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from autocomp.budget import format_bytes, parse_budget
from autocomp.desc import ModelDesc
from autocomp.errors import AutocompError
from autocomp.memory import LARGE_MODEL_BYTES, large_blocks_to_mmap, release, settle_for
from autocomp.plan import Plan, atomic_write_text
from autocomp.search.config import (METRIC_ATTR, SearchConfig, check_same, parse_count, parse_objectives,
                                    parse_time_ms, space_hash, validate)
from autocomp.search.study import (ATTR, HEARTBEAT_GRACE, HEARTBEAT_INTERVAL, SEEDED_ATTR, Heartbeat, StudyHandle,
                                   check_storage, check_study_name, default_study_name, front_of, front_trials,
                                   is_finished, mask_url, open_storage, progress, recover_stale, requeue,
                                   sigterm_as_interrupt, single_writer_lock, storage_url, study_result, trial_metric,
                                   wait_for)
from autocomp.search.batching import batched, tell
from autocomp.search.trial import TrialContext, run_trial, stage_front

__all__ = ["run_search", "ENGINE_VERSION"]

ENGINE_VERSION = 1
FRONT_WRITE_S = 1.0  # the front's files are rewritten at most this often while trials run (and at the end)


@dataclass
class _Request:
    """The checked request: everything decided before any file is touched."""

    name: str
    space_path: Path
    objectives: list[str]
    latency_ms: float | None
    bitops: float | None
    store_bytes: int = 0  # --weights-cache



@dataclass
class _Prepared:
    """Model, space, budgets and cost model; built before the storage is opened."""

    loaded: Any
    space: Any
    desc: ModelDesc
    constraints: Any
    budget: int
    smallest: int
    limits: list[Any]
    cost: Any
    device: Any
    evaluator: Any  # teacher outputs computed: bad calibration data is refused before the storage is opened
    calibration: str | None = None  # the key of the calibration statistics compensated options use
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of this run (the result's "phases")


@dataclass
class _Counters:
    """What the worker loops share (one per Ray actor, or one): read and written under ``lock``."""

    done: int
    max_attempts: int
    attempts: int = 0
    front_ids: list[int] = field(default_factory=list)
    front: list[Any] | None = None  # the study's front as of the last trial told (single writer)
    recovered: float = float("-inf")  # time.monotonic() of the last look for dead workers' trials (shared)
    written: float = float("-inf")  # time.monotonic() the front's files were last written
    lock: threading.Lock = field(default_factory=threading.Lock)


def run_search(cfg: SearchConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a search; returns the contract result (see ``autocomp search --json``).

    Several processes may run it on one study in a shared storage (PostgreSQL / MySQL URL or a journal
    file): ``trials`` is then the study's shared total, one worker enqueues the seeds, and a worker's trial
    whose heartbeat stops (killed process) is failed and retried by the others. A SQLite study takes one
    writer at a time (a lock file next to the database)."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    large_blocks_to_mmap()
    emit = on_event or (lambda kind, data: None)
    req = _check(cfg)
    if cfg.storage:
        check_storage(cfg.storage)
    prep = _prepare(cfg, req, emit)
    url = storage_url(cfg.storage, cfg.studies_dir, req.name)  # nothing is written before this line
    check_storage(url)
    shared = not url.startswith("sqlite")  # several workers may share this study
    lock = None if shared else single_writer_lock(url, req.name)
    try:
        # single writer (the lock held): the study's trials are read once and then kept as this process writes them
        return _Search(cfg, req, prep, url, batched(open_storage(url), sole=not shared), shared, emit).run()
    finally:
        if lock is not None:
            lock.close()


def _check(cfg: SearchConfig) -> _Request:
    """Every check that needs neither the model nor the storage."""
    from autocomp.search.samplers import make_sampler
    from autocomp.space import resolve_space_path

    validate(cfg)
    name = check_study_name(cfg.study or default_study_name(
        cfg.model, cfg.budget, hardware=cfg.hardware, objectives=cfg.objectives, latency=cfg.latency_budget,
        bitops=cfg.bitops_budget, workload=cfg.workload))
    space_path = resolve_space_path(cfg.space)
    make_sampler(cfg.sampler, cfg.seed)
    parse_budget(cfg.budget, fp32_bytes=1)  # syntax check before loading the model
    objectives = parse_objectives(cfg.objectives, cfg.hardware)
    latency = parse_time_ms(cfg.latency_budget) if cfg.latency_budget else None
    bitops = parse_count(cfg.bitops_budget, "--bitops-budget") if cfg.bitops_budget else None
    store_bytes = parse_store_bytes(cfg.weights_cache)
    if cfg.address and cfg.backend != "ray":
        raise AutocompError("--address is a Ray cluster address; add --backend ray")
    if cfg.address:
        from autocomp.raybackend import reachable

        try:
            reachable(cfg.address)
        except RuntimeError as e:
            raise AutocompError(f"Ray cluster at {cfg.address!r} is unreachable: {e}; check --address (or leave it "
                                f"out to start Ray here)") from None
    if latency is not None and not cfg.hardware:
        raise AutocompError("--latency-budget needs --hardware (e.g. cpu-local or x86-avx512-vnni)")
    if cfg.hardware or bitops is not None or "bitops" in objectives:
        from autocomp.cost.device import load_device

        load_device(cfg.hardware or "x86-avx512-vnni")  # a bad --hardware fails before anything is opened
    return _Request(name, space_path, objectives, latency, bitops, store_bytes)


def parse_store_bytes(text: str) -> int:
    """``--weights-cache``: a size (2GiB, 500MB), or 0 / off for none."""
    if str(text).strip().lower() in ("0", "off", "none"):
        return 0
    if str(text).strip().endswith("%"):
        raise AutocompError(f"--weights-cache {text!r}: give a size on disk, e.g. 2GiB or 500MB (0 for none)")
    try:
        return parse_budget(text)
    except AutocompError:
        raise AutocompError(f"--weights-cache {text!r} is not a size; use e.g. 2GiB or 500MB (0 for none)") from None


def _prepare(cfg: SearchConfig, req: _Request, emit: Any) -> _Prepared:
    """Load the model, bind the space, check the budgets against what the space allows."""
    from autocomp.cost.size import plan_bytes
    from autocomp.modality import parse_constraints
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.search.repair import size_limit
    from autocomp.space import SearchSpace

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    emit("status", {"message": f"loading model {cfg.model}"})
    t0 = time.perf_counter()
    loaded = load_model(cfg.model, data=cfg.data, metric=cfg.metric)
    t1 = time.perf_counter()
    space = SearchSpace.from_yaml(req.space_path, introspect(loaded))
    t2 = time.perf_counter()
    desc = space.desc  # with the space's modality tags, if it has any
    settle_for(desc.fp32_bytes)
    constraints = parse_constraints(desc, cfg.min_bits, cfg.max_sparsity, cfg.budget_split)
    if constraints.min_bits or constraints.max_sparsity:
        space.restrict(constraints.min_bits, constraints.max_sparsity)
    if cfg.hardware:
        from autocomp.cost.device import load_device

        if load_device(cfg.hardware).runtime == "ort":  # plans whose ONNX file holds exactly the predicted format
            space.restrict_to_stored_formats()
    budget = parse_budget(cfg.budget, fp32_bytes=desc.fp32_bytes)
    _warn_kept(desc, emit)
    smallest = plan_bytes(desc, space.decode(space.smallest_assignment()))
    if budget < smallest:
        raise AutocompError(
            f"budget {cfg.budget} ({format_bytes(budget)}) is below the smallest plan this search space allows "
            f"({format_bytes(smallest)}, {smallest} bytes); raise --budget or allow more compression in the space"
        )
    if budget >= desc.fp32_bytes:
        emit("warning", {"message": f"budget {format_bytes(budget)} is above the model's fp32 size "
                                    f"({format_bytes(desc.fp32_bytes)}); searching the proxy/size trade-off under it"})
    limits = [size_limit(space, budget), *_split_limits(space, desc, constraints, budget)]
    cost, device, more = _cost_limits(cfg, req, space, desc)
    from autocomp.evaluators.proxy import ProxyEvaluator

    emit("status", {"message": "computing teacher outputs"})
    t3 = time.perf_counter()
    evaluator = ProxyEvaluator(loaded, desc)
    if line := evaluator.unpadded.describe(loaded.batches):  # the blocks that run on real tokens only
        emit("status", {"message": line})
    from autocomp.space import peer_choices

    evaluator.applier.peers = peer_choices(space)  # the profile asks for each: techniques may batch them
    if req.store_bytes:  # compressed weights shared with other workers and later searches of this model
        from autocomp.compressors.store import WeightStore

        evaluator.applier.store = WeightStore(cfg.studies_dir / "weights", req.store_bytes)
    phases = {"load": t1 - t0, "introspect": t2 - t1, "teacher": time.perf_counter() - t3}
    return _Prepared(loaded, space, desc, constraints, budget, smallest, limits + more, cost, device, evaluator,
                     phases=phases)


KEPT_WARN_SHARE = 0.01


def _warn_kept(desc: ModelDesc, emit: Any) -> None:
    """Name the matrices no technique can reach (parameters outside any layer autocomp has a unit for, e.g.
    nn.LSTM kernels, a bare position table) when they hold at least 1% of the model: never a silent skip."""
    kept = [k for k in desc.info.get("kept", []) if len(k["shape"]) >= 2]
    total = sum(k["bytes"] for k in kept)
    if kept and total >= KEPT_WARN_SHARE * desc.fp32_bytes:
        names = ", ".join(k["name"] for k in kept[:4]) + (f" and {len(kept) - 4} more" if len(kept) > 4 else "")
        emit("warning", {"message": f"{len(kept)} parameter(s) ({format_bytes(total)}, {total / desc.fp32_bytes:.1%} of "
                                    f"the model) are outside any Linear / Conv1d / Conv2d / Embedding / Conv1D layer and "
                                    f"stay as they are: {names} (`autocomp layers` lists why)"})


def _split_limits(space: Any, desc: ModelDesc, constraints: Any, budget: int) -> list[Any]:
    from autocomp.modality import bytes_by_modality
    from autocomp.search.repair import modality_size_limit

    limits = []
    for mod, share in constraints.budget_split.items():
        limits.append(modality_size_limit(space, mod, int(budget * share)))
        least = bytes_by_modality(desc, space.decode(space.smallest_assignment()))[mod]
        if least > budget * share:
            raise AutocompError(f"--budget-split {mod}={share:.0%} allows {format_bytes(int(budget * share))}, below "
                                f"the smallest {mod} part this space allows ({format_bytes(least)}); raise its share "
                                f"or --budget")
    return limits


def _cost_limits(cfg: SearchConfig, req: _Request, space: Any, desc: ModelDesc) -> tuple[Any, Any, list[Any]]:
    """(cost model or None, device or None, latency / BitOps limits), checked against what the space allows."""
    if not (cfg.hardware or req.bitops is not None or "bitops" in req.objectives):
        return None, None, []
    from autocomp.cost.device import load_device
    from autocomp.cost.latency import CostModel, parse_workload
    from autocomp.search.repair import Limit

    device = load_device(cfg.hardware or "x86-avx512-vnni")  # BitOps do not depend on the device
    cost = CostModel(device, desc, parse_workload(cfg.workload, desc))

    def layer_seconds(n: str, a: Any) -> float:
        return cost.layer(*space.layer_plan(n, a))[0]

    def layer_gbitops(n: str, a: Any) -> float:
        return cost.layer(*space.layer_plan(n, a))[1] / 1e9

    limits = []
    if req.latency_ms is not None:
        fastest = cost.latency_ms(space.decode(space.smallest_assignment(layer_seconds)))
        if req.latency_ms < fastest:
            raise AutocompError(
                f"latency budget {cfg.latency_budget} is below the fastest plan this space allows on "
                f"{device.name} at workload {cost.workload.label()} ({fastest:.2f} ms); raise --latency-budget")
        limits.append(Limit("latency", layer_seconds, cost.other_cost()[0], req.latency_ms / 1e3))
    if req.bitops is not None:
        least = cost.evaluate(space.decode(space.smallest_assignment(layer_gbitops)))["bitops"]
        if req.bitops / 1e9 < least:
            raise AutocompError(f"BitOps budget {cfg.bitops_budget} is below the least this space allows "
                                f"({least:.4g} G); raise --bitops-budget")
        limits.append(Limit("bitops", layer_gbitops, 0.0, req.bitops / 1e9))
    return cost, device, limits


class _Search:
    """One run over an opened storage: evaluator and seeds, the study, the worker loop(s), the result."""

    def __init__(self, cfg: SearchConfig, req: _Request, prep: _Prepared, url: str, storage: Any, shared: bool,
                 emit: Any) -> None:
        self.cfg, self.req, self.prep, self.url, self.storage, self.shared, self.emit = (
            cfg, req, prep, url, storage, shared, emit)
        self.stop = threading.Event()
        self.out_lock = threading.Lock()  # pareto.json / plan files are written by one thread at a time

    def _calibrate(self) -> None:
        """GPTQ / SparseGPT / activation-aware options and refits: each layer's input second moment, attached
        to the model (cached under ``<studies>/calibration``; written only after every check passed)."""
        from autocomp.compressors.calibration import ensure, space_needs

        prep = self.prep
        if space_needs(prep.space):
            self.emit("status", {"message": "calibration statistics (cached after the first run)"})
            stats = ensure(prep.loaded, prep.desc, self.cfg.studies_dir / "calibration",
                           log=lambda m: self.emit("status", {"message": m}))
            prep.calibration = stats.key

    def run(self) -> dict[str, Any]:
        from autocomp.search.seeds import sensitivity_database, unit_orders

        cfg, prep = self.cfg, self.prep
        self.evaluator = prep.evaluator
        t0 = time.perf_counter()
        self._calibrate()
        t1 = time.perf_counter()
        if any(g.importance == "fisher" for g in prep.space.groups.values()):
            prep.space.unit_orders = unit_orders(cfg, prep.loaded, prep.desc, prep.space, self.evaluator, self.emit)
        self.sens = (sensitivity_database(cfg, prep.loaded, prep.desc, prep.space, self.evaluator, self.emit)
                     if cfg.seeds == "ilp" else None)
        t2 = time.perf_counter()
        self.study, self.handle = self._open()  # seeds: the integer program's plans, queued in a new study
        prep.phases.update(calibration=t1 - t0, sensitivity=t2 - t1, seeds=time.perf_counter() - t2)
        # single writer (SQLite, locked): every RUNNING trial was left by a dead process; shared storages: only
        # trials whose heartbeat stopped
        recover_stale(self.study, grace=HEARTBEAT_GRACE if self.shared else None)
        self.ctx = TrialContext(prep.space, prep.desc, prep.limits, prep.cost, self.req.objectives, self._known(),
                                cfg.repair, self.sens.table if self.sens is not None else None,
                                calibration=prep.calibration)
        done = sum(is_finished(t) for t in self.study.get_trials(deepcopy=False))
        result = study_result(self.handle)
        self.emit("start", {"study": self.req.name, "storage": mask_url(self.url), "done": done, "total": cfg.trials,
                            "budget_bytes": prep.budget, "fp32_bytes": prep.desc.fp32_bytes,
                            "smallest_bytes": prep.smallest, "params": len(prep.space.params), "front": result["pareto"]})
        self.counters = _Counters(done, 20 * max(1, cfg.trials - done) + 100, front_ids=[e["trial"] for e in result["pareto"]])
        pool = None
        if cfg.backend == "ray":
            from autocomp.raybackend import RayPool

            pool = RayPool(cfg, self.evaluator.metric, self.req.name, self.emit, calibration=prep.calibration is not None)
            self.shared = True  # several evaluations in flight: count the total from the study, like shared workers
        t3 = time.perf_counter()
        with sigterm_as_interrupt():
            if pool is None:
                self._loop(self.evaluator)
            else:
                self._run_threads(pool)
        prep.phases["trials"] = time.perf_counter() - t3
        self.trials_run = self.counters.done - done
        return self._finish(pool)

    def _meta(self) -> dict[str, Any]:
        from autocomp.evaluators.proxy import data_fingerprint

        cfg, prep, sens = self.cfg, self.prep, self.sens
        return {
            "engine_version": ENGINE_VERSION, "model_spec": cfg.model, "data_spec": cfg.data or prep.loaded.data_spec,
            "fingerprint": prep.desc.fingerprint, "data_fingerprint": data_fingerprint(prep.loaded.batches),
            "space": str(self.req.space_path), "space_hash": space_hash(self.req.space_path), "budget": cfg.budget,
            "budget_bytes": prep.budget, "metric": self.evaluator.metric, "sampler": cfg.sampler, "seed": cfg.seed,
            "repair": cfg.repair, "smallest_bytes": prep.smallest, "model": prep.desc.to_dict(),
            "objectives": self.req.objectives,
            "hardware": prep.device.name if (prep.device is not None and cfg.hardware) else None,
            "workload": prep.cost.workload.label() if prep.cost else None, "latency_budget_ms": self.req.latency_ms,
            "bitops_budget": self.req.bitops, "seeds": cfg.seeds, "staged": cfg.staged,
            "sensitivity": cfg.sensitivity if cfg.seeds == "ilp" else None,
            "constraints": prep.constraints.to_dict() if prep.constraints else None,
            "sensitivity_file": str(Path(sens.path).resolve()) if sens is not None and sens.path else None,
        }

    def _open(self) -> tuple[Any, StudyHandle]:
        """Create or load the study, check a resumed one matches, queue a new one's seeds."""
        import optuna

        from autocomp.search.samplers import make_sampler
        from autocomp.search.seeds import enqueue_seeds

        cfg, name, url, prep = self.cfg, self.req.name, self.url, self.prep
        meta = self._meta()
        sampler = make_sampler(cfg.sampler, cfg.seed)
        directions = ["minimize"] * len(self.req.objectives)
        created = False
        try:
            if self.shared:  # exactly one worker creates the study (and enqueues its seeds); the others wait
                try:
                    study = optuna.create_study(study_name=name, storage=self.storage, sampler=sampler,
                                                directions=directions)
                    created = True
                except optuna.exceptions.DuplicatedStudyError:
                    study = optuna.load_study(study_name=name, storage=self.storage, sampler=sampler)
            else:
                study = optuna.create_study(study_name=name, storage=self.storage, sampler=sampler,
                                            directions=directions, load_if_exists=True)
        except Exception as e:
            raise AutocompError(f"study {name!r} cannot be created in {mask_url(url)!r}: {e}") from None
        old = study.user_attrs.get(ATTR)
        if self.shared and not created:
            wait_for(study, lambda s: s.user_attrs.get(SEEDED_ATTR) is not None, name, url)
            old = study.user_attrs.get(ATTR)
        if old:
            check_same(old, meta, name)
        elif study.get_trials(deepcopy=False):
            raise AutocompError(f"study {name!r} in {mask_url(url)!r} exists but was not made by autocomp; use "
                                f"another --study")
        else:
            study.set_user_attr(ATTR, meta)
            study.set_metric_names([METRIC_ATTR.get(o, o) for o in self.req.objectives])
        # not seeded yet, or a kill cut the seeding short (only queued seeds so far: enqueue_seeds adds the missing
        # ones); a study from before the mark existed has run trials and is left as it is
        waiting = optuna.trial.TrialState.WAITING
        if SEEDED_ATTR not in study.user_attrs and all(t.state == waiting for t in study.get_trials(deepcopy=False)):
            enqueue_seeds(study, cfg, prep.space, self.sens, prep.budget, prep.smallest,
                          prep.constraints.budget_split, prep.limits)
            study.set_user_attr(SEEDED_ATTR, True)  # last: other workers start once the seeds are queued
        return study, StudyHandle(study, name, url, old or meta, cfg.studies_dir / name)

    def _known(self) -> dict[str, tuple[float, int]]:
        """Plan digest -> (proxy, trial) of every evaluated trial: a duplicate is not evaluated again."""
        import optuna

        known: dict[str, tuple[float, int]] = {}
        for t in self.study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]):
            if "plan_key" in t.user_attrs and t.user_attrs.get("evaluated", True):
                key = t.user_attrs["plan_key"]
                if len(key) != 16 and "plan" in t.user_attrs:  # a trial from before Plan.digest (sha1 of the key)
                    key = Plan.from_dict(t.user_attrs["plan"]).digest()
                known.setdefault(key, (trial_metric(t, "proxy", self.req.objectives), t.number))
        return known

    # -- the worker loop -------------------------------------------------------------------------------------
    def _next(self) -> bool:
        """Whether this worker should ask for another trial (shared storages count the study's total)."""
        c, total = self.counters, self.cfg.trials
        while not self.stop.is_set():
            with c.lock:
                if c.attempts >= c.max_attempts:
                    return False
            if self.shared:  # the total is shared: count what every worker has finished or is running
                with c.lock:  # a trial is dead once its beats are HEARTBEAT_GRACE old: a look every beat suffices
                    due = time.monotonic() - c.recovered >= HEARTBEAT_INTERVAL
                    if due:
                        c.recovered = time.monotonic()
                if due:
                    recover_stale(self.study, grace=HEARTBEAT_GRACE)
                done, running = progress(self.study)
                with c.lock:
                    c.done = done
                if done >= total:
                    return False
                if done + running >= total:  # the rest is running elsewhere; wait in case one dies
                    time.sleep(min(1.0, HEARTBEAT_INTERVAL))
                    continue
            with c.lock:
                if not self.shared and c.done >= total:
                    return False
                c.attempts += 1
            return True
        return False

    def _loop(self, ev: Any) -> None:
        import optuna

        beat = Heartbeat(self.study) if self.shared else None
        try:
            while self._next():
                trial = self.study.ask()
                if beat is not None:
                    beat.watch(trial)
                    if sum(progress(self.study, below=trial.number)) >= self.cfg.trials:
                        # another worker asked at the same moment and got the last slot first
                        trial.set_user_attr("skipped", "surplus: the shared total was already reached")
                        beat.watch(None)
                        self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                        continue
                outcome = self._one(trial, ev, beat)
                if outcome is not None:
                    self._told(trial, *outcome)
                if self.prep.desc.fp32_bytes > LARGE_MODEL_BYTES:
                    release()  # a large model's freed activations go back before the next trial
        finally:
            if beat is not None:
                beat.stop()

    def _one(self, trial: Any, ev: Any, beat: Any) -> tuple[Any, Any] | None:
        """Run one trial and tell the study; None when another worker failed it meanwhile."""
        import optuna

        staged = self.cfg.staged and len(getattr(ev, "batches", ())) > 1
        try:
            state, values = run_trial(trial, self.ctx, ev, stage_front(self.study, self.req.objectives) if staged else None)
        except optuna.exceptions.UpdateFinishedTrialError:
            # another worker took this trial for dead (no heartbeat within the grace period) and re-enqueued
            # it; leave it to that retry
            self.emit("warning", {"message": f"trial {trial.number} was failed by another worker meanwhile; its "
                                             f"retry will score it"})
            return None
        except KeyboardInterrupt:
            if beat is not None:
                beat.stop()
            trial.set_user_attr("autocomp_stale", True)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if trial.params:
                requeue(self.study, trial.number, trial.params, trial.user_attrs)
            with self.out_lock:
                study_result(self.handle)  # the front so far is on disk before we stop
            self.emit("interrupted", {"done": self.counters.done, "total": self.cfg.trials})
            raise KeyboardInterrupt from None
        if beat is not None:
            beat.watch(None)
        try:
            tell(self.study, trial, values=values, state=state)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            return None  # failed by another worker meanwhile (see above)
        return state, values

    def _told(self, trial: Any, state: Any, values: Any) -> None:
        """Count the trial, rewrite the front's files when it changed, report progress."""
        import optuna

        objectives, c = self.req.objectives, self.counters
        counted = state != optuna.trial.TrialState.PRUNED
        with c.lock:
            if counted and not self.shared:
                c.done += 1
            done = c.done + (self.shared and counted)
        finished = self.storage.told(trial._trial_id)
        with self.out_lock:
            if self.shared or c.front is None or finished is None:  # other workers add trials too: read them
                front = front_trials(self.study, self.prep.budget, objectives)
            else:  # this worker alone writes the study: its front so far plus the trial just told
                front = front_of([*c.front, finished], self.prep.budget, objectives)
            c.front = front
            # the files follow the front at most once a FRONT_WRITE_S (each write is synced to disk: 13 ms, and
            # the front changes on almost every trial at first); the end of the run, or a Ctrl-C, writes the last
            if [t.number for t in front] != c.front_ids and time.monotonic() - c.written >= FRONT_WRITE_S:
                c.front_ids = [t.number for t in front]
                study_result(self.handle, front=front)
                c.written = time.monotonic()
            self.emit("trial", {"number": trial.number, "state": state.name, "values": values, "done": done,
                                "total": self.cfg.trials,
                                "front": [(trial_metric(t, "proxy", objectives), trial_metric(t, "size", objectives))
                                          for t in front]})

    def _run_threads(self, pool: Any) -> None:
        """One driver thread per Ray actor, each running the loop; Ctrl-C lets each finish its trial."""
        threads = [threading.Thread(target=self._loop, args=(pool.evaluator(i),), daemon=True)
                   for i in range(pool.workers)]
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.2)
        except KeyboardInterrupt:
            self.stop.set()  # each driver thread finishes the trial it runs, then stops
            for t in threads:
                t.join()
            with self.out_lock:
                study_result(self.handle)
            self.emit("interrupted", {"done": progress(self.study)[0], "total": self.cfg.trials})
            raise
        finally:
            pool.close()

    def _finish(self, pool: Any) -> dict[str, Any]:
        done = progress(self.study)[0] if self.shared else self.counters.done
        if done < self.cfg.trials:
            self.emit("warning", {"message": f"stopped after {self.counters.attempts} proposals: only {done} of "
                                             f"{self.cfg.trials} trials fit the budget; enable --repair or loosen --budget"})
        result = study_result(self.handle)
        if pool is not None:
            result["backend"] = "ray"
        # where this run's time went (seconds; seconds_per_trial: the trials phase over the trials this run
        # finished): printed after the front and kept in <study>/phases.json, outside the --json contract
        run = getattr(self, "trials_run", 0)
        timing = {"phases": {k: round(v, 3) for k, v in self.prep.phases.items()},
                  "seconds_per_trial": round(self.prep.phases.get("trials", 0.0) / run, 3) if run > 0 else None,
                  "trials_this_run": run}
        atomic_write_text(self.handle.out_dir / "phases.json", json.dumps(timing))
        self.emit("done", {"done": done, "total": self.cfg.trials, "result": result, **timing})
        return result
