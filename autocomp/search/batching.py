"""A trial's bookkeeping in a few transactions instead of one per parameter and attribute.

Optuna writes each suggested parameter, user attribute and system attribute (a constraint) of a trial in its
own storage transaction: ~130 for a MiniLM trial. :class:`BatchedStorage` wraps the storage a worker opened
and holds those writes for the trials this worker created, in memory, until

* :meth:`BatchedStorage.flush` -- the engine calls it once the plan is decided, before the proxy runs: the
  parameters (and the plan, bytes, constraints, a shared worker's first heartbeat...) reach the storage in one
  transaction, so a killed worker's trial is failed and retried with its exact parameters, as before; and
* ``set_trial_state_values`` (``tell``) -- what the evaluation added, the values and the state, in one
  transaction on a database (which refuses, writing nothing, a trial another worker failed meanwhile).

So a trial costs three write transactions on a database: create (RUNNING and visible at once; later
heartbeats are written through), the flush and the tell. Reads of a trial with held writes see them
(Optuna's samplers and ``set_constraint`` read back what was just written). One transaction per batch on
SQLite / PostgreSQL / MySQL (Optuna's RDB storage), one append per batch on a journal file; any other
storage gets the writes one by one. Thread-safe (the Ray backend's driver threads share one storage).

Reads are bounded too: a trial this worker created or finished is never read back (the new one comes from
its own insert, the told one is kept as told: :meth:`BatchedStorage.told`), the queue of waiting trials
that every ``ask`` looks at is asked of the database alone, in one statement, and attributes this worker
never wrote are inserted without looking them up first: 9 statements a MiniLM-sized trial on a database, plus
what the sampler reads (42 before, then 25 with the sampler's read). A sole writer (a single-writer SQLite study)
reads the study's trials once and keeps them as it writes them: 8 statements a trial, none of them a read of
the study. In a shared study a read of the study's trials asks which trials changed (one light statement) and
reads in full only those this worker does not know (:func:`_refresh_cache`): not its own running trial, nor
the one it just told, which Optuna's cache re-read on every read.

On PostgreSQL through psycopg 3 the same transactions are a few plain statements on the driver's connection
(:func:`_write_pg`): the parameters by ``COPY``, the attributes with the state check as one statement
(upserts: a row another worker wrote is updated), a tell as one statement in autocommit mode. A MiniLM trial
then waits on the server 9 times (was 14) and skips SQLAlchemy's statement building; its storage loop
went from ~20 to ~13 ms over loopback (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import threading
from typing import Any, Sequence

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

__all__ = ["BatchedStorage", "batched", "tell", "WRITE_THROUGH"]

WRITE_THROUGH = frozenset({"autocomp_heartbeat", "autocomp_stale"})  # other workers must see these at once


def batched(storage: BaseStorage, sole: bool = False) -> "BatchedStorage":
    """``storage`` (as :func:`autocomp.search.study.open_storage` opened it) with batched trial writes; an RDB
    storage keeps Optuna's cache of finished trials underneath, as ``optuna.create_study`` would add it.
    ``sole``: this process is the only one writing trials to it (see :class:`BatchedStorage`)."""
    from optuna.storages import RDBStorage
    from optuna.storages._cached_storage import _CachedStorage

    return BatchedStorage(_CachedStorage(storage) if isinstance(storage, RDBStorage) else storage, sole=sole)


def tell(study: Any, trial: Any, values: Sequence[float] | None = None, state: TrialState | None = None) -> None:
    """``study.tell`` without the deep copy of the finished trial it returns, which nobody here reads (121
    parameters, their distributions and a plan attribute: ~1 ms a MiniLM trial, a tenth of the storage work
    on SQLite). Any Optuna without the internal entry point gets ``study.tell``."""
    try:
        from optuna.study._tell import _tell_with_warning
    except ImportError:  # pragma: no cover - another Optuna
        study.tell(trial, values=values, state=state)
        return
    _tell_with_warning(study=study, trial=trial, value_or_values=values, state=state)


class _Held:
    def __init__(self) -> None:
        self.params: dict[str, tuple[float, Any]] = {}
        self.user: dict[str, Any] = {}
        self.system: dict[str, Any] = {}

    def __bool__(self) -> bool:
        return bool(self.params or self.user or self.system)


class _Own:
    """A trial this worker runs: the writes not yet in the storage, and the trial as this worker knows it
    (only this worker writes to it, so reads need not go to the storage)."""

    def __init__(self, snap: FrozenTrial) -> None:
        self.snap = snap
        self.held = _Held()
        # the attribute keys the storage already has for this trial: a held one among them is updated, any
        # other inserted without looking first
        self.stored = (set(snap.user_attrs), set(snap.system_attrs))
        self.flushed = False  # nothing of it was written since it was created or taken from the queue

    def view(self) -> FrozenTrial:
        t = copy.copy(self.snap)
        t._params, t._distributions = dict(self.snap.params), dict(self.snap.distributions)
        t._user_attrs, t._system_attrs = dict(self.snap.user_attrs), dict(self.snap.system_attrs)
        return t


class BatchedStorage(BaseStorage):
    """Wraps ``inner``; see the module docstring. Every method not about this worker's running trials is
    ``inner``'s.

    ``sole``: no other process writes trials to this storage (a single-writer SQLite study holds its lock). The
    study's trials are then read once and kept as this worker writes them: a trial it creates is added, one it
    tells is replaced by what it told. Optuna refreshes its cache from the database on every read of the
    study's trials, which re-reads the running trial with its parameters and the trial just told: the sampler
    and the front do so 2-3 times a trial, ~7 ms each on SQLite for MiniLM. Any other write (a queued trial,
    a dead process's trial failed, another trial's attribute) drops the kept list, and the next read refreshes."""

    def __init__(self, inner: BaseStorage, sole: bool = False) -> None:
        self.inner = inner
        self.sole = sole
        self._own: dict[int, _Own] = {}
        self._told: dict[int, FrozenTrial] = {}  # own trials just finished, as told (see told())
        self._finished: dict[int, FrozenTrial] = {}  # the same, until a read of the study's trials takes them
        self._kept: dict[int, dict[int, FrozenTrial]] = {}  # sole writer: study -> number -> trial
        self._study_of: dict[int, int] = {}  # own running trial -> its study (sole writer)
        self._writes = 0
        self._lock = threading.RLock()

    def _keep(self, study_id: int | None, trial: FrozenTrial | None) -> None:
        """Record ``trial`` in the kept list of ``study_id``, or (None) drop every kept list: the next read refreshes."""
        with self._lock:
            self._writes += 1  # a read that began before this write must not keep what it read
            if study_id is None or trial is None:
                self._kept.clear()
            elif study_id in self._kept:
                self._kept[study_id][trial.number] = trial

    # -- the trials this worker runs -------------------------------------------------------------------------
    def _adopt(self, trial_id: int, created: bool = False) -> None:
        snap = self._created(trial_id) if created else None
        own = _Own(snap if snap is not None else self.inner.get_trial(trial_id))
        with self._lock:
            self._own[trial_id] = own

    def _created(self, trial_id: int) -> FrozenTrial | None:
        """A trial just created, as Optuna's cache over a database recorded it (no read back), or None."""
        ids = getattr(self.inner, "_trial_id_to_study_id_and_number", None)
        studies = getattr(self.inner, "_studies", None)
        if not isinstance(ids, dict) or not isinstance(studies, dict) or trial_id not in ids:
            return None
        study_id, number = ids[trial_id]
        t = getattr(studies.get(study_id), "trials", {}).get(number)
        if t is None or t._trial_id != trial_id or t.state != TrialState.RUNNING:
            return None
        t = copy.copy(t)  # the cache's own object must not change with this worker's held writes
        t._params, t._distributions = dict(t.params), dict(t.distributions)
        t._user_attrs, t._system_attrs = dict(t.user_attrs), dict(t.system_attrs)
        return t

    def _mine(self, trial_id: int) -> _Own | None:
        with self._lock:
            return self._own.get(trial_id)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        frozen = _create_rdb(self.inner, study_id) if template_trial is None else None
        trial_id = frozen._trial_id if frozen is not None else self.inner.create_new_trial(study_id, template_trial)  # noqa: SLF001
        if template_trial is None:  # asked here, not enqueued
            self._adopt(trial_id, created=True)
            if self.sole:
                own = self._mine(trial_id)
                with self._lock:
                    self._study_of[trial_id] = study_id
                    self._keep(study_id, own.view())
        else:
            if template_trial.state == TrialState.RUNNING:
                self._adopt(trial_id, created=True)
            self._keep(None, None)
        return trial_id

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution: Any) -> None:
        own = self._mine(trial_id)
        if own is None:
            self._keep(None, None)
            return self.inner.set_trial_param(trial_id, param_name, param_value_internal, distribution)
        with self._lock:
            own.held.params[param_name] = (param_value_internal, distribution)
            own.snap._params[param_name] = distribution.to_external_repr(param_value_internal)  # noqa: SLF001
            own.snap._distributions[param_name] = distribution  # noqa: SLF001
        return None

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        own = self._mine(trial_id)
        if own is None:
            self._keep(None, None)
            self.inner.set_trial_user_attr(trial_id, key, value)
        elif key in WRITE_THROUGH:  # at once, in one transaction that knows whether the row exists
            with self._lock:
                stored = (set(own.stored[0]), set())
            now = _Held()
            now.user[key] = value
            _write(self.inner, trial_id, now, stored)
            with self._lock:
                own.stored[0].add(key)
        if own is not None:
            kept = copy.deepcopy(value)  # one copy for both: neither is ever changed in place
            with self._lock:
                if key not in WRITE_THROUGH:
                    own.held.user[key] = kept
                own.snap._user_attrs[key] = kept  # noqa: SLF001
        return None

    def hold_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        """Set ``key`` on this worker's trial with the trial's first batch, even a write-through key: the first
        heartbeat of a trial whose plan is not decided yet needs no transaction of its own, as nothing of the
        trial is in the storage but its RUNNING row (other workers go by its start until then). Written at once
        if the trial was flushed already, or if it is not this worker's."""
        own = self._mine(trial_id)
        if own is None or own.flushed:
            return self.set_trial_user_attr(trial_id, key, value)
        kept = copy.deepcopy(value)
        with self._lock:
            own.held.user[key] = kept
            own.snap._user_attrs[key] = kept  # noqa: SLF001
        return None

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        own = self._mine(trial_id)
        if own is None:
            self._keep(None, None)
            return self.inner.set_trial_system_attr(trial_id, key, value)
        kept = copy.deepcopy(value)
        with self._lock:
            own.held.system[key] = kept
            own.snap._system_attrs[key] = kept  # noqa: SLF001
        return None

    def flush(self, trial_id: int) -> None:
        """Write what is held for ``trial_id`` (one transaction where the storage allows)."""
        with self._lock:
            own = self._own.get(trial_id)
            if own is None or not own.held:
                return
            held, own.held = own.held, _Held()
            stored = (set(own.stored[0]), set(own.stored[1]))
            own.flushed = True
        _write(self.inner, trial_id, held, stored)
        with self._lock:
            own.stored[0].update(held.user)
            own.stored[1].update(held.system)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        own, now = None, None
        if state.is_finished():
            with self._lock:
                own = self._own.pop(trial_id, None)
                held, stored = (own.held, own.stored) if own is not None else (_Held(), (set(), set()))
            now = datetime.datetime.now()
            # what is still held, the values and the state in one transaction where the storage allows
            ok = _write(self.inner, trial_id, held, stored, (state, values, now)) if own is not None else None
            if ok is None:  # this storage writes the held rows, then tells as usual
                _write(self.inner, trial_id, held, stored)
                ok = self.inner.set_trial_state_values(trial_id, state, values)
        else:
            ok = _take_rdb(self.inner, trial_id) if state == TrialState.RUNNING and values is None else None
            if ok is None:
                ok = self.inner.set_trial_state_values(trial_id, state, values)
        if ok and state == TrialState.RUNNING:  # a queued trial this worker took
            self._adopt(trial_id)
        if ok and own is not None:
            done = own.view()
            done.state, done.values = state, None if values is None else list(values)
            done.datetime_complete = now  # as written (the storage's own stamp, where it sets one, differs by µs)
            with self._lock:
                self._told[trial_id] = done
                while len(self._told) > 64:  # a trial nobody asked for (e.g. one failed on the way) is not kept
                    self._told.pop(next(iter(self._told)))
                if not self.sole:
                    self._finished[trial_id] = done
                    while len(self._finished) > 256:  # no read took it: the next read reads it from the storage
                        self._finished.pop(next(iter(self._finished)))
                study_id = self._study_of.pop(trial_id, None)
            self._keep(study_id, done)
        else:  # another trial's state (a queued one taken, a dead worker's failed), or a refused tell
            self._keep(None, None)
        return ok

    def progress(self, study_id: int, below: int | None = None) -> tuple[int, int] | None:
        """(finished, running) trials of the study numbered below ``below``, finished as
        :func:`autocomp.search.study.is_finished` says (COMPLETE, or FAIL not marked ``autocomp_stale``), in
        one statement on a database -- None elsewhere. Counting through Optuna's cache re-reads every running
        trial with its parameters first: per trial, work that grows with the number of workers."""
        backend = _rdb(self.inner)
        if backend is None:
            return None
        from optuna.storages._rdb import models
        from sqlalchemy import and_, exists, func, not_, select

        t, a = models.TrialModel.__table__, models.TrialUserAttributeModel.__table__
        stale = exists().where(a.c.trial_id == t.c.trial_id, a.c.key == "autocomp_stale", a.c.value_json == "true")
        counted = not_(and_(t.c.state == TrialState.FAIL, stale))
        query = (select(t.c.state, func.count()).where(
            t.c.study_id == study_id, t.c.state.in_([TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING]), counted)
            .group_by(t.c.state))
        if below is not None:
            query = query.where(t.c.number < below)
        with _autocommit(backend) as conn:
            n = {state: count for state, count in conn.execute(query)}
        return n.get(TrialState.COMPLETE, 0) + n.get(TrialState.FAIL, 0), n.get(TrialState.RUNNING, 0)

    def told(self, trial_id: int) -> FrozenTrial | None:
        """This worker's trial ``trial_id`` as it was just finished (state, values, parameters, attributes; the
        completion time by this worker's clock), without a storage read; once: the copy is then dropped.
        None if not kept."""
        with self._lock:
            return self._told.pop(trial_id, None)

    # -- reads: this worker's running trials as it knows them ------------------------------------------------
    def get_trial(self, trial_id: int) -> FrozenTrial:
        own = self._mine(trial_id)
        if own is not None:
            with self._lock:
                return own.view()
        with self._lock:
            done = self._told.get(trial_id)  # a finished trial does not change: no read back after the tell
        return done if done is not None else self.inner.get_trial(trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        backend = getattr(self.inner, "_backend", None)
        if self.sole and states is not None and set(states) == {TrialState.WAITING}:
            with self._lock:  # a kept list has every queued trial: only this worker queues them
                kept = self._kept.get(study_id)
                if kept is not None:
                    waiting = sorted((t for t in kept.values() if t.state == TrialState.WAITING), key=lambda t: t.number)
                    return copy.deepcopy(waiting) if deepcopy else waiting
        if states is not None and set(states) == {TrialState.WAITING} and hasattr(backend, "_get_trials"):
            # Optuna's ask looks for queued trials every time: over a database, ask for those alone instead of
            # refreshing every unfinished trial (and its parameters) in Optuna's cache first; and as the queue is
            # empty almost always, ask whether it is with one statement outside a transaction first
            if not _any_waiting(backend, study_id):
                return []
            return backend.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        if self.sole:
            with self._lock:
                kept, writes = self._kept.get(study_id), self._writes
            if kept is None:
                fresh = {t.number: t for t in self.inner.get_all_trials(study_id, deepcopy=False)}
                with self._lock:  # kept only if no thread of this worker wrote while it was read
                    kept = self._kept.setdefault(study_id, fresh) if self._writes == writes else fresh
            with self._lock:
                trials = [t for t in kept.values() if states is None or t.state in states]
                trials.sort(key=lambda t: t.number)
            if deepcopy:
                trials = copy.deepcopy(trials)
        else:
            trials = self._cached_trials(study_id, deepcopy, states)
            if trials is None:
                trials = self.inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        with self._lock:
            if not self._own and not self._finished:
                return trials
            # this worker's running trials as it holds them; one another thread of it told meanwhile, as told
            return [t if t.state != TrialState.RUNNING else self._own[t._trial_id].view() if t._trial_id in self._own
                    else self._finished.get(t._trial_id, t) for t in trials]

    def _cached_trials(self, study_id: int, deepcopy: bool, states: Any) -> list[FrozenTrial] | None:
        """The study's trials from Optuna's cache over a database, brought up to date by :func:`_refresh_cache`
        (this worker's running and just-told trials not read back) -- or None where the storage is not that."""
        with self._lock:
            mine, finished = set(self._own), dict(self._finished)
        took = _refresh_cache(self.inner, study_id, mine, finished)
        if took is None:
            return None
        with self._lock:
            for trial_id in took:
                self._finished.pop(trial_id, None)
        with self.inner._lock:  # noqa: SLF001 - as Optuna's cache lists them
            cached = self.inner._studies[study_id].trials  # noqa: SLF001
            trials = sorted((t for t in cached.values() if states is None or t.state in states), key=lambda t: t.number)
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return self.get_trial(trial_id).params

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self.get_trial(trial_id).user_attrs

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return self.get_trial(trial_id).system_attrs

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        own = self._mine(trial_id)
        if own is not None and param_name in own.snap.distributions:
            with self._lock:
                return own.snap.distributions[param_name].to_internal_repr(own.snap.params[param_name])
        return self.inner.get_trial_param(trial_id, param_name)

    # -- everything else is the inner storage's --------------------------------------------------------------
    def create_new_study(self, directions: Any, study_name: str | None = None) -> int:
        return self.inner.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self._keep(None, None)
        self.inner.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self.inner.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self.inner.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self.inner.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self.inner.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> Any:
        return self.inner.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self.inner.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self.inner.get_study_system_attrs(study_id)

    def get_all_studies(self) -> Any:
        return self.inner.get_all_studies()

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self.inner.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self.inner.get_trial_number_from_id(trial_id)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._keep(None, None)
        self.inner.set_trial_intermediate_value(trial_id, step, intermediate_value)

    def remove_session(self) -> None:
        self.inner.remove_session()

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self.inner.check_trial_is_updatable(trial_id, trial_state)


def _rdb(storage: Any) -> Any:
    """The RDB storage under ``storage`` (Optuna's cache unwrapped), or None if it is not a database."""
    from optuna.storages import RDBStorage
    from optuna.storages._cached_storage import _CachedStorage

    base = storage._backend if isinstance(storage, _CachedStorage) else storage  # noqa: SLF001 - Optuna's cache
    return base if isinstance(base, RDBStorage) else None


def _refresh_cache(cache: Any, study_id: int, mine: set[int], finished: dict[int, FrozenTrial]) -> set[int] | None:
    """Optuna's cache over a database (``cache``) brought up to date for ``study_id`` as its own refresh does --
    every trial still unfinished when last read, and every trial after the last finished one -- but without
    reading back, with all their rows, the trials this worker knows: its running ones (``mine``, their rows are
    its own; the cache keeps them as created, and reads see them through :meth:`BatchedStorage.get_all_trials`)
    and the ones it just finished (``finished``, as told, put in the cache). One light statement (ids, numbers,
    states) says which trials changed; only the others' are read in full. Optuna's refresh re-read the worker's
    running trial (~120 parameters and the plan) on every read of the study: 3 reads a trial with the default
    sampler, 18 ms a MiniLM trial on PostgreSQL over loopback. Returns the ids taken from ``finished``; None,
    having read nothing, where ``cache`` is not Optuna's cache over a database as this module knows it."""
    try:
        from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
        from sqlalchemy import or_, orm, select

        backend = _rdb(cache) if isinstance(cache, _CachedStorage) else None
        if backend is None:
            return None
        build = backend._build_frozen_trial_from_trial_model  # noqa: SLF001 - Optuna's own reader
        lock, studies, index = cache._lock, cache._studies, cache._trial_id_to_study_id_and_number  # noqa: SLF001
        add = cache._add_trials_to_cache  # noqa: SLF001
    except (ImportError, AttributeError):  # pragma: no cover - another Optuna
        return None
    t = models.TrialModel
    took: set[int] = set()
    with lock:  # as Optuna's refresh: one thread at a time
        info = studies.setdefault(study_id, _StudyInfo())
        if _pg(backend) is not None:  # the same statement on the driver's connection (no statement building)
            rows = _pg_retrying(backend, lambda: _pg_changed(backend, study_id, info))
        else:
            changed = t.trial_id > info.last_finished_trial_id
            if info.unfinished_trial_ids:
                changed = or_(changed, t.trial_id.in_(sorted(info.unfinished_trial_ids)))
            with _autocommit(backend) as conn:
                rows = conn.execute(select(t.trial_id, t.number, t.state).where(t.study_id == study_id, changed)).all()
        fresh, need = [], []
        for trial_id, number, state in rows:
            if state == TrialState.RUNNING and trial_id in mine and index.get(trial_id) == (study_id, number):
                continue
            done = finished.get(trial_id)
            if done is not None and done.state == state and done.number == number:
                fresh.append(done)
                took.add(trial_id)
            else:
                need.append(trial_id)
        if need or not rows:
            with _create_scoped_session(backend.scoped_session) as session:
                if not rows:
                    models.StudyModel.find_or_raise_by_id(study_id, session)  # KeyError, as Optuna's refresh
                for i in range(0, len(need), 500):  # bounded IN lists (SQLite's limit on variables)
                    query = (session.query(t).options(orm.selectinload(t.params), orm.selectinload(t.values),
                                                      orm.selectinload(t.user_attributes),
                                                      orm.selectinload(t.system_attributes),
                                                      orm.selectinload(t.intermediate_values))
                             .filter(t.trial_id.in_(need[i:i + 500])))
                    fresh += [build(m) for m in query.all()]
        add(study_id, fresh)
        now = {trial_id: state for trial_id, _, state in rows}
        now.update((f._trial_id, f.state) for f in fresh)  # as read in full (it may have moved on meanwhile)
        for trial_id in sorted(now):  # as Optuna's refresh keeps its marks
            if now[trial_id].is_finished():
                info.last_finished_trial_id = max(info.last_finished_trial_id, trial_id)
                info.unfinished_trial_ids.discard(trial_id)
            else:
                info.unfinished_trial_ids.add(trial_id)
    return took


def _pg_changed(storage: Any, study_id: int, info: Any) -> list[tuple[int, int, TrialState]]:
    """:func:`_refresh_cache`'s light statement on PostgreSQL through psycopg, in autocommit mode."""
    from optuna.storages._rdb import models

    with _pg_connection(storage, autocommit=True) as pg:
        rows = pg.execute(f"SELECT trial_id, number, state::text FROM {models.TrialModel.__tablename__} "
                          "WHERE study_id = %s AND (trial_id > %s OR trial_id = ANY(%s))",
                          (study_id, info.last_finished_trial_id, sorted(info.unfinished_trial_ids))).fetchall()
    return [(trial_id, number, TrialState[state]) for trial_id, number, state in rows]


def _autocommit(storage: Any) -> Any:
    """A connection of the RDB ``storage`` for one read outside a transaction (no BEGIN / COMMIT round trips)."""
    return storage.engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def _create_rdb(storage: Any, study_id: int) -> FrozenTrial | None:
    """A new RUNNING trial in ``storage`` (Optuna's cache over an RDB storage) in two statements, not four:
    the study row locked as Optuna locks it, then the trial inserted with its number (the count of the
    study's trials: under that lock, the trials created before it) returned by the insert. Added to the cache
    as Optuna's ``create_new_trial`` adds it. None, having written nothing, where that is not possible (another
    Optuna, a database without INSERT ... RETURNING)."""
    try:
        from optuna.storages._cached_storage import _CachedStorage, _StudyInfo  # noqa: F401 - _cached_new uses it
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
        from sqlalchemy import func, literal, select

        backend = _rdb(storage) if isinstance(storage, _CachedStorage) else None
        if backend is None or not backend.engine.dialect.insert_returning:
            return None
        if not all(hasattr(storage, a) for a in ("_add_trials_to_cache", "_lock", "_studies")):  # Optuna's cache
            return None
        studies, trials = models.StudyModel.__table__, models.TrialModel.__table__
    except (ImportError, AttributeError):  # pragma: no cover - another Optuna
        return None
    now = datetime.datetime.now()
    if _pg(backend) is not None:
        return _cached_new(storage, study_id, *_create_pg(backend, study_id, now), now)
    c = trials.c
    count = select(literal(study_id, c.study_id.type), func.count(), literal(TrialState.RUNNING, c.state.type),
                   literal(now, c.datetime_start.type)).select_from(trials)
    with _create_scoped_session(backend.scoped_session) as session:
        if session.execute(studies.select().with_only_columns(studies.c.study_id)
                           .where(studies.c.study_id == study_id).with_for_update()).first() is None:
            raise KeyError(models.NOT_FOUND_MSG)
        trial_id, number = session.execute(
            trials.insert().from_select(["study_id", "number", "state", "datetime_start"], count.where(c.study_id == study_id))
            .returning(c.trial_id, c.number)).one()
    return _cached_new(storage, study_id, trial_id, number, now)


def _create_pg(storage: Any, study_id: int, now: datetime.datetime) -> tuple[int, int]:
    """(trial id, number) of a new RUNNING trial, on PostgreSQL through psycopg: :func:`_create_rdb`'s two
    statements on the driver's connection. (Sent together with the commit in pipeline mode they were no
    faster over loopback: 2.3-3.3 against 1.8-2.4 ms, interleaved.)"""
    from optuna.storages._rdb import models

    studies, trials = models.StudyModel.__tablename__, models.TrialModel.__tablename__

    def once() -> tuple[int, int]:
        with _pg_connection(storage) as pg:
            if pg.execute(f"SELECT 1 FROM {studies} WHERE study_id = %s FOR UPDATE", (study_id,)).fetchone() is None:
                raise KeyError(models.NOT_FOUND_MSG)
            row = pg.execute(f"INSERT INTO {trials} (study_id, number, state, datetime_start) SELECT %s, count(*), "
                             f"'RUNNING', %s FROM {trials} WHERE study_id = %s RETURNING trial_id, number",
                             (study_id, now, study_id)).fetchone()
        return row[0], row[1]

    return _pg_retrying(storage, once)


def _cached_new(storage: Any, study_id: int, trial_id: int, number: int, now: datetime.datetime) -> FrozenTrial:
    """The RUNNING trial just inserted, added to Optuna's cache ``storage`` as its ``create_new_trial`` adds it."""
    from optuna.storages._cached_storage import _StudyInfo

    frozen = FrozenTrial(number=number, state=TrialState.RUNNING, value=None, values=None, datetime_start=now,
                         datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
                         intermediate_values={}, trial_id=trial_id)
    with storage._lock:  # noqa: SLF001 - Optuna's cache
        storage._studies.setdefault(study_id, _StudyInfo())  # noqa: SLF001
        storage._add_trials_to_cache(study_id, [frozen])  # noqa: SLF001
    return frozen


def _take_rdb(storage: Any, trial_id: int) -> bool | None:
    """Take the queued trial ``trial_id`` (WAITING -> RUNNING) in one conditional update: True if this call
    took it, False if someone else had, UpdateFinishedTrialError if it is finished; None (nothing written)
    where the storage is not a database. Optuna reads the state, then writes it, and on SQLite (no row
    locks) two threads of one worker could both take the same trial that way."""
    base = _rdb(storage)
    if base is None:
        return None
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        trials = models.TrialModel.__table__
    except (ImportError, AttributeError):  # pragma: no cover - another Optuna
        return None
    with _create_scoped_session(base.scoped_session) as session:
        took = session.execute(trials.update().where(trials.c.trial_id == trial_id, trials.c.state == TrialState.WAITING)
                               .values(state=TrialState.RUNNING, datetime_start=datetime.datetime.now())).rowcount
        if took == 1:
            return True
        state = session.execute(trials.select().with_only_columns(trials.c.state)
                                .where(trials.c.trial_id == trial_id)).scalar_one_or_none()
    if state is None:
        raise KeyError(models.NOT_FOUND_MSG)
    base.check_trial_is_updatable(trial_id, state)  # raises if it is finished
    return False


def _any_waiting(storage: Any, study_id: int) -> bool:
    """Whether the RDB storage's study has a WAITING trial: one statement in autocommit mode (no BEGIN or
    COMMIT round trips); True (look the usual way) if this Optuna's tables are not what they were."""
    try:
        from optuna.storages._rdb import models

        trials = models.TrialModel.__table__
        if _pg(storage) is not None:
            def look() -> bool:
                with _pg_connection(storage, autocommit=True) as pg:
                    return pg.execute(f"SELECT 1 FROM {trials.name} WHERE study_id = %s AND state = 'WAITING' LIMIT 1",
                                      (study_id,)).fetchone() is not None

            return _pg_retrying(storage, look)
        query = (trials.select().with_only_columns(trials.c.trial_id)
                 .where(trials.c.study_id == study_id, trials.c.state == TrialState.WAITING).limit(1))
        with _autocommit(storage) as conn:
            return conn.execute(query).first() is not None
    except (ImportError, AttributeError):  # pragma: no cover - another Optuna
        return True


def _write(storage: BaseStorage, trial_id: int, held: _Held, stored: tuple[set[str], set[str]],
           finish: tuple[TrialState, Sequence[float] | None, datetime.datetime] | None = None) -> bool | None:
    """Write ``held`` for ``trial_id``; with ``finish`` (state, values, completion time) also finish the trial
    in the same transaction and return ``set_trial_state_values``'s answer -- or None where this storage
    cannot, having written nothing."""
    from optuna.storages._cached_storage import _CachedStorage
    from optuna.storages.journal import JournalStorage

    if finish is None and not held:
        return None
    base = storage._backend if isinstance(storage, _CachedStorage) else storage  # noqa: SLF001 - Optuna's cache
    try:  # the batched paths use Optuna 5's storage internals; another Optuna gets the writes one by one
        pg = _pg(base)
        if pg is not None:
            return _write_pg(pg, trial_id, held, finish)
        if _rdb(base) is not None:
            return _write_rdb(base, trial_id, held, stored, finish)
        if isinstance(base, JournalStorage) and finish is None:
            return _write_journal(base, trial_id, held)
    except (ImportError, AttributeError):  # raised before anything is written (a database rolls back)
        pass
    if finish is not None:
        return None
    for name, (value, dist) in held.params.items():
        storage.set_trial_param(trial_id, name, value, dist)
    for key, value in held.user.items():
        storage.set_trial_user_attr(trial_id, key, value)
    for key, value in held.system.items():
        storage.set_trial_system_attr(trial_id, key, value)
    return None


def _write_rdb(storage: Any, trial_id: int, held: _Held, stored: tuple[set[str], set[str]],
               finish: tuple[TrialState, Sequence[float] | None, datetime.datetime] | None) -> bool | None:
    """One transaction: the trial checked (with ``finish``: finished, if it was not) and its new rows
    inserted together; an attribute ``stored`` says the storage has is updated in place. If an insert meets
    a row written meanwhile by someone else, the transaction is redone looking the attributes up first."""
    from sqlalchemy import exc as sqlalchemy_exc

    try:
        return _write_rdb_once(storage, trial_id, held, stored, finish)
    except sqlalchemy_exc.IntegrityError:
        return _write_rdb_once(storage, trial_id, held, None, finish)


def _write_rdb_once(storage: Any, trial_id: int, held: _Held, stored: tuple[set[str], set[str]] | None,
                    finish: tuple[TrialState, Sequence[float] | None, datetime.datetime] | None) -> bool | None:
    import json

    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    trials = models.TrialModel.__table__
    with _create_scoped_session(storage.scoped_session) as session:
        if finish is None:
            state = session.execute(trials.select().with_only_columns(trials.c.state)
                                    .where(trials.c.trial_id == trial_id)).scalar_one_or_none()
            if state is None:
                raise KeyError(models.NOT_FOUND_MSG)
            storage.check_trial_is_updatable(trial_id, state)
        else:  # finished here unless it already is (the row stays locked until the commit, as Optuna's tell)
            state, values, now = finish
            changed = session.execute(
                trials.update().where(trials.c.trial_id == trial_id,
                                      trials.c.state.in_([TrialState.RUNNING, TrialState.WAITING]))
                .values(state=state, datetime_complete=now)).rowcount
            if changed != 1:
                trial = models.TrialModel.find_or_raise_by_id(trial_id, session)  # KeyError if there is none
                storage.check_trial_is_updatable(trial_id, trial.state)  # raises: it was finished meanwhile
                raise AssertionError(f"trial {trial_id} is {trial.state.name} and was not finished")
        if held.params:  # all rows in one call (the ORM's per-object bookkeeping is most of the cost otherwise)
            _insert(session, models.TrialParamModel.__table__, [
                {"trial_id": trial_id, "param_name": name, "param_value": value,
                 "distribution_json": _distribution_json(dist)} for name, (value, dist) in held.params.items()])
        for i, (model, attrs) in enumerate(((models.TrialUserAttributeModel, held.user),
                                            (models.TrialSystemAttributeModel, held.system))):
            if not attrs:
                continue
            table = model.__table__
            have = (stored[i] if stored is not None else
                    set(session.scalars(table.select().with_only_columns(table.c.key).where(table.c.trial_id == trial_id))))
            for key in attrs.keys() & have:
                session.execute(table.update().where(table.c.trial_id == trial_id, table.c.key == key)
                                .values(value_json=json.dumps(attrs[key])))
            new = [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()
                   if k not in have]
            if new:
                _insert(session, table, new)
        if finish is not None and values is not None:
            rows = []
            for objective, v in enumerate(values):
                stored_value, kind = models.TrialValueModel.value_to_stored_repr(v)
                rows.append({"trial_id": trial_id, "objective": objective, "value": stored_value, "value_type": kind})
            _insert(session, models.TrialValueModel.__table__, rows)
    return True if finish is not None else None


_JSON: dict[Any, str] = {}  # distribution's fields -> its JSON (a search suggests the same few every trial)


def _distribution_json(dist: Any) -> str:
    """``optuna.distributions.distribution_to_json(dist)``, made once per distinct distribution (a MiniLM
    trial's 121 took ~0.9 ms a trial). Keyed by the class and the fields' repr: a distribution's own ``__eq__``
    is slower than the JSON, and equality would mix up choices (1, 0), (1.0, 0.0) and (True, False)."""
    from optuna.distributions import distribution_to_json

    key = (type(dist), repr(dist.__dict__))
    text = _JSON.get(key)
    if text is not None:
        return text
    text = distribution_to_json(dist)
    if len(_JSON) > 4096:
        _JSON.clear()
    _JSON[key] = text
    return text


def _pg(storage: Any) -> Any:
    """The RDB storage under ``storage`` if it is PostgreSQL through psycopg 3 -- whose trial writes and reads
    here go as a few plain statements on the driver's connection (:func:`_write_pg`) -- else None."""
    base = _rdb(storage)
    if base is None:
        return None
    dialect = base.engine.dialect
    return base if dialect.name == "postgresql" and dialect.driver == "psycopg" else None


@contextlib.contextmanager
def _pg_connection(storage: Any, autocommit: bool = False) -> Any:
    """A psycopg connection of the RDB ``storage``'s pool: in a transaction committed at the end (or in
    autocommit mode: each statement its own transaction, one round trip), rolled back if the block raises.
    psycopg's errors are raised as SQLAlchemy raises them (what Optuna's callers catch); a connection found
    broken is dropped from the pool."""
    import psycopg
    from psycopg.pq import TransactionStatus
    from sqlalchemy import exc as sqlalchemy_exc

    raw = storage.engine.raw_connection()
    pg = raw.driver_connection
    try:
        pg.autocommit = autocommit
        yield pg
        if not autocommit:
            pg.commit()
    except psycopg.Error as e:
        lost = pg.closed or pg.broken
        raise sqlalchemy_exc.DBAPIError.instance(None, None, e, psycopg.Error, connection_invalidated=lost,
                                                 dialect=storage.engine.dialect) from e
    finally:
        try:
            if not pg.closed and pg.info.transaction_status != TransactionStatus.IDLE:
                pg.rollback()
            if not pg.closed:
                pg.autocommit = False  # as the pool lent it
        except psycopg.Error:
            pass
        if pg.closed or pg.broken or pg.autocommit:
            raw.invalidate()
        raw.close()


RETRY_WAITS = (0.0, 0.5, 1.0, 2.0, 4.0)  # seconds before each retry after a lost PostgreSQL connection (7.5 s in all)


def _pg_retrying(storage: Any, work: Any) -> Any:
    """``work()`` (statements through :func:`_pg_connection`), tried again after a lost connection or a
    transaction the server aborted (a restarted server, a dropped connection, a deadlock): the storage's pool
    is renewed -- Optuna's own statements then get fresh connections too -- and the work redone after
    :data:`RETRY_WAITS`. Each try is one transaction, rolled back by the server if it broke off, so a redo
    writes nothing twice (unless the connection was lost after the server committed and before it answered:
    the redo then meets the rows it wrote and fails). The last error is raised as it came."""
    import time

    from sqlalchemy import exc as sqlalchemy_exc

    for wait in (*RETRY_WAITS, None):
        try:
            return work()
        except sqlalchemy_exc.OperationalError:  # the connection, the server or the transaction, not the data
            if wait is None:
                raise
            storage.engine.dispose()  # every pooled connection may be to the old server
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


@functools.lru_cache(maxsize=64)
def _pg_statement(finish: bool, users: int, systems: int, values: int) -> str:
    """The statement that writes a trial's ``users`` user and ``systems`` system attributes and (``finish``) its
    ``values`` values and finished state in one round trip, every row only if the trial is still running or
    waiting: attributes as upserts (a row another worker wrote meanwhile is updated, not duplicated), rows as
    ``VALUES`` lists (arrays of a plan's JSON took ~4x longer to parse). It returns the trial's state before
    (flush; no row: there is no such trial) or the number of trials it finished (tell: 1, or 0 if the trial was
    not running). Parameters: ``t``, ``state``, ``now``, ``u0k``/``u0j``..., ``y0k``/``y0j``..., ``v0x``/``v0k``..."""
    from optuna.storages._rdb import models
    from sqlalchemy.dialects import postgresql

    dialect = postgresql.dialect()
    state = models.TrialModel.__table__.c.state.type.compile(dialect=dialect)
    kind = models.TrialValueModel.__table__.c.value_type.type.compile(dialect=dialect)
    trials = models.TrialModel.__tablename__
    live = "('RUNNING', 'WAITING')"
    if finish:
        parts = [f"s AS (UPDATE {trials} SET state = %(state)s::{state}, datetime_complete = %(now)s "
                 f"WHERE trial_id = %(t)s AND state IN {live} RETURNING trial_id)", "ok AS (SELECT 1 FROM s)"]
        result = "SELECT count(*) FROM s"
    else:
        parts = [f"s AS (SELECT state FROM {trials} WHERE trial_id = %(t)s)", f"ok AS (SELECT 1 FROM s WHERE state IN {live})"]
        result = "SELECT state::text FROM s"
    for name, model, n in (("u", models.TrialUserAttributeModel, users), ("y", models.TrialSystemAttributeModel, systems)):
        if n:
            rows = ", ".join(f"(%({name}{i}k)s, %({name}{i}j)s)" for i in range(n))
            parts.append(f"{name} AS (INSERT INTO {model.__tablename__} (trial_id, key, value_json) "
                         f"SELECT %(t)s, r.k, r.j FROM (VALUES {rows}) AS r(k, j) WHERE EXISTS (SELECT 1 FROM ok) "
                         "ON CONFLICT (trial_id, key) DO UPDATE SET value_json = EXCLUDED.value_json)")
    if values:
        rows = ", ".join(f"({i}, %(v{i}x)s::float8, %(v{i}k)s::{kind})" for i in range(values))
        parts.append(f"v AS (INSERT INTO {models.TrialValueModel.__tablename__} (trial_id, objective, value, value_type) "
                     f"SELECT %(t)s, r.o, r.x, r.k FROM (VALUES {rows}) AS r(o, x, k) WHERE EXISTS (SELECT 1 FROM ok))")
    return "WITH " + ", ".join(parts) + " " + result


def _write_pg(storage: Any, trial_id: int, held: _Held,
              finish: tuple[TrialState, Sequence[float] | None, datetime.datetime] | None) -> bool | None:
    """:func:`_write_rdb` on PostgreSQL through psycopg: the parameter rows by ``COPY`` (a MiniLM trial's
    ~120), then one statement for the attributes, the values and the state (:func:`_pg_statement`); without
    parameters that statement alone, in autocommit mode. A flush waits on the server 4 times instead of 6, a
    tell once instead of 4, and SQLAlchemy's statement building (~1 ms a statement) is skipped. A lost
    connection is retried (:func:`_pg_retrying`)."""
    import json

    from optuna.storages._rdb import models

    args: dict[str, Any] = {"t": trial_id}
    for name, attrs in (("u", held.user), ("y", held.system)):
        for i, (key, value) in enumerate(attrs.items()):
            args[f"{name}{i}k"], args[f"{name}{i}j"] = key, json.dumps(value)
    values: Sequence[float] = ()
    if finish is not None:
        state, values, now = finish
        values = values or ()
        args.update(state=state.name, now=now)
        for i, v in enumerate(values):
            x, kind = models.TrialValueModel.value_to_stored_repr(v)
            args[f"v{i}x"], args[f"v{i}k"] = x, kind.name
    statement = _pg_statement(finish is not None, len(held.user), len(held.system), len(values))
    return _pg_retrying(storage, lambda: _write_pg_once(storage, trial_id, held, finish is None, statement, args))


def _write_pg_once(storage: Any, trial_id: int, held: _Held, flush: bool, statement: str,
                   args: dict[str, Any]) -> bool | None:
    from optuna.storages._rdb import models

    with _pg_connection(storage, autocommit=not held.params) as pg:
        if held.params:
            table = models.TrialParamModel.__tablename__
            with pg.cursor() as cursor, cursor.copy(
                    f"COPY {table} (trial_id, param_name, param_value, distribution_json) FROM STDIN") as copy:
                for name, (value, dist) in held.params.items():
                    copy.write_row((trial_id, name, value, _distribution_json(dist)))
        row = pg.execute(statement, args).fetchone()
        if flush:
            if row is None:
                raise KeyError(models.NOT_FOUND_MSG)
            storage.check_trial_is_updatable(trial_id, TrialState[row[0]])  # raises (rolled back) if finished
            return None
        if row[0] == 1:
            return True
        found = pg.execute(f"SELECT state::text FROM {models.TrialModel.__tablename__} WHERE trial_id = %s",
                           (trial_id,)).fetchone()
        if found is None:
            raise KeyError(models.NOT_FOUND_MSG)
        storage.check_trial_is_updatable(trial_id, TrialState[found[0]])  # raises: it was finished meanwhile
        raise AssertionError(f"trial {trial_id} is {found[0]} and was not finished")


def _insert(session: Any, table: Any, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` into ``table`` in the session's transaction, in one call (the ORM's per-object
    bookkeeping is most of the cost otherwise). PostgreSQL through psycopg does not come here (:func:`_write_pg`)."""
    session.execute(table.insert(), rows)


def _write_journal(storage: Any, trial_id: int, held: _Held) -> None:
    """One append of all the logs (one file lock), then the storage catches up with the journal."""
    from optuna.storages.journal._storage import JournalOperation

    worker = storage._replay_result.worker_id  # noqa: SLF001
    lock, append, sync = storage._thread_lock, storage._backend.append_logs, storage._sync_with_backend  # noqa: SLF001
    logs = [{"op_code": JournalOperation.SET_TRIAL_PARAM, "worker_id": worker, "trial_id": trial_id,
             "param_name": name, "param_value_internal": value, "distribution": _distribution_json(dist)}
            for name, (value, dist) in held.params.items()]
    logs += [{"op_code": JournalOperation.SET_TRIAL_USER_ATTR, "worker_id": worker, "trial_id": trial_id,
              "user_attr": {key: value}} for key, value in held.user.items()]
    logs += [{"op_code": JournalOperation.SET_TRIAL_SYSTEM_ATTR, "worker_id": worker, "trial_id": trial_id,
              "system_attr": {key: value}} for key, value in held.system.items()]
    with lock:
        append(logs)
        sync()
