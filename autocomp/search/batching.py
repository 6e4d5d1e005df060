"""A trial's bookkeeping in a few transactions instead of one per parameter and attribute.

Optuna writes each suggested parameter, user attribute and system attribute (a constraint) of a trial in its
own storage transaction: ~130 for a MiniLM trial. :class:`BatchedStorage` wraps the storage a worker opened
and holds those writes for the trials this worker created, in memory, until

* :meth:`BatchedStorage.flush` -- the engine calls it once the plan is decided, before the proxy runs: the
  parameters (and the plan, bytes, constraints...) reach the storage in one transaction, so a killed
  worker's trial is failed and retried with its exact parameters, as before; and
* ``set_trial_state_values`` (``tell``) -- what the evaluation added, then the state and values.

So a trial costs four write transactions: create (RUNNING and visible at once, with its heartbeat, which is
written through), the flush, the last attributes and the tell. Reads of a trial with held writes see them
(Optuna's samplers and ``set_constraint`` read back what was just written). One transaction per batch on
SQLite / PostgreSQL / MySQL (Optuna's RDB storage), one append per batch on a journal file; any other
storage gets the writes one by one. Thread-safe (the Ray backend's driver threads share one storage).

Reads are bounded too: a trial this worker created or finished is never read back (the new one comes from
Optuna's cache, the told one is kept as told: :meth:`BatchedStorage.told`), and the queue of waiting trials
that every ``ask`` looks at is asked of the database alone, not by refreshing every unfinished trial first:
25 statements a MiniLM-sized trial on a database (42 before).
"""

from __future__ import annotations

import copy
import datetime
import threading
from typing import Any, Sequence

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

__all__ = ["BatchedStorage", "batched", "tell", "WRITE_THROUGH"]

WRITE_THROUGH = frozenset({"autocomp_heartbeat", "autocomp_stale"})  # other workers must see these at once


def batched(storage: BaseStorage) -> "BatchedStorage":
    """``storage`` (as :func:`autocomp.search.study.open_storage` opened it) with batched trial writes; an RDB
    storage keeps Optuna's cache of finished trials underneath, as ``optuna.create_study`` would add it."""
    from optuna.storages import RDBStorage
    from optuna.storages._cached_storage import _CachedStorage

    return BatchedStorage(_CachedStorage(storage) if isinstance(storage, RDBStorage) else storage)


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

    def view(self) -> FrozenTrial:
        t = copy.copy(self.snap)
        t._params, t._distributions = dict(self.snap.params), dict(self.snap.distributions)
        t._user_attrs, t._system_attrs = dict(self.snap.user_attrs), dict(self.snap.system_attrs)
        return t


class BatchedStorage(BaseStorage):
    """Wraps ``inner``; see the module docstring. Every method not about this worker's running trials is
    ``inner``'s."""

    def __init__(self, inner: BaseStorage) -> None:
        self.inner = inner
        self._own: dict[int, _Own] = {}
        self._told: dict[int, FrozenTrial] = {}  # own trials just finished, as told (see told())
        self._lock = threading.RLock()

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
        trial_id = self.inner.create_new_trial(study_id, template_trial)
        if template_trial is None or template_trial.state == TrialState.RUNNING:  # asked here, not enqueued
            self._adopt(trial_id, created=True)
        return trial_id

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution: Any) -> None:
        own = self._mine(trial_id)
        if own is None:
            return self.inner.set_trial_param(trial_id, param_name, param_value_internal, distribution)
        with self._lock:
            own.held.params[param_name] = (param_value_internal, distribution)
            own.snap._params[param_name] = distribution.to_external_repr(param_value_internal)  # noqa: SLF001
            own.snap._distributions[param_name] = distribution  # noqa: SLF001
        return None

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        own = self._mine(trial_id)
        if own is None or key in WRITE_THROUGH:
            self.inner.set_trial_user_attr(trial_id, key, value)
        if own is not None:
            kept = copy.deepcopy(value)  # one copy for both: neither is ever changed in place
            with self._lock:
                if key not in WRITE_THROUGH:
                    own.held.user[key] = kept
                own.snap._user_attrs[key] = kept  # noqa: SLF001
        return None

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        own = self._mine(trial_id)
        if own is None:
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
        _write(self.inner, trial_id, held)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        own = None
        if state.is_finished():
            try:
                self.flush(trial_id)
            finally:
                with self._lock:
                    own = self._own.pop(trial_id, None)
        ok = self.inner.set_trial_state_values(trial_id, state, values)
        if ok and state == TrialState.RUNNING:  # a queued trial this worker took
            self._adopt(trial_id)
        if ok and own is not None:
            done = own.view()
            done.state, done.values = state, None if values is None else list(values)
            done.datetime_complete = datetime.datetime.now()  # the storage's own stamp differs by microseconds
            with self._lock:
                self._told[trial_id] = done
                while len(self._told) > 64:  # a trial nobody asked for (e.g. one failed on the way) is not kept
                    self._told.pop(next(iter(self._told)))
        return ok

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
        if states is not None and set(states) == {TrialState.WAITING} and hasattr(backend, "_get_trials"):
            # Optuna's ask looks for queued trials every time: over a database, ask for those alone instead of
            # refreshing every unfinished trial (and its parameters) in Optuna's cache first
            return backend.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        trials = self.inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        with self._lock:
            if not self._own:
                return trials
            return [self._own[t._trial_id].view() if t._trial_id in self._own and t.state == TrialState.RUNNING
                    else t for t in trials]

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
        self.inner.set_trial_intermediate_value(trial_id, step, intermediate_value)

    def remove_session(self) -> None:
        self.inner.remove_session()

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self.inner.check_trial_is_updatable(trial_id, trial_state)


def _write(storage: BaseStorage, trial_id: int, held: _Held) -> None:
    from optuna.storages import RDBStorage
    from optuna.storages._cached_storage import _CachedStorage
    from optuna.storages.journal import JournalStorage

    base = storage._backend if isinstance(storage, _CachedStorage) else storage  # noqa: SLF001 - Optuna's cache
    try:  # the batched paths use Optuna 5's storage internals; another Optuna gets the writes one by one
        if isinstance(base, RDBStorage):
            return _write_rdb(base, trial_id, held)
        if isinstance(base, JournalStorage):
            return _write_journal(base, trial_id, held)
    except (ImportError, AttributeError):  # raised before anything is written (a database rolls back)
        pass
    for name, (value, dist) in held.params.items():
        storage.set_trial_param(trial_id, name, value, dist)
    for key, value in held.user.items():
        storage.set_trial_user_attr(trial_id, key, value)
    for key, value in held.system.items():
        storage.set_trial_system_attr(trial_id, key, value)
    return None


def _write_rdb(storage: Any, trial_id: int, held: _Held) -> None:
    """One transaction: the trial is looked up and checked once, its new rows inserted together, an
    attribute it already has updated in place."""
    import json

    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
        storage.check_trial_is_updatable(trial_id, trial.state)
        if held.params:  # one multi-row INSERT (the ORM's per-object bookkeeping is most of the cost otherwise)
            session.execute(models.TrialParamModel.__table__.insert(), [
                {"trial_id": trial_id, "param_name": name, "param_value": value,
                 "distribution_json": distribution_to_json(dist)} for name, (value, dist) in held.params.items()])
        for model, attrs in ((models.TrialUserAttributeModel, held.user), (models.TrialSystemAttributeModel, held.system)):
            if not attrs:
                continue
            existing = {row.key: row for row in session.query(model).filter(model.trial_id == trial_id)}
            for key in attrs.keys() & existing.keys():
                existing[key].value_json = json.dumps(attrs[key])
            new = [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()
                   if k not in existing]
            if new:
                session.execute(model.__table__.insert(), new)


def _write_journal(storage: Any, trial_id: int, held: _Held) -> None:
    """One append of all the logs (one file lock), then the storage catches up with the journal."""
    from optuna.distributions import distribution_to_json
    from optuna.storages.journal._storage import JournalOperation

    worker = storage._replay_result.worker_id  # noqa: SLF001
    lock, append, sync = storage._thread_lock, storage._backend.append_logs, storage._sync_with_backend  # noqa: SLF001
    logs = [{"op_code": JournalOperation.SET_TRIAL_PARAM, "worker_id": worker, "trial_id": trial_id,
             "param_name": name, "param_value_internal": value, "distribution": distribution_to_json(dist)}
            for name, (value, dist) in held.params.items()]
    logs += [{"op_code": JournalOperation.SET_TRIAL_USER_ATTR, "worker_id": worker, "trial_id": trial_id,
              "user_attr": {key: value}} for key, value in held.user.items()]
    logs += [{"op_code": JournalOperation.SET_TRIAL_SYSTEM_ATTR, "worker_id": worker, "trial_id": trial_id,
              "system_attr": {key: value}} for key, value in held.system.items()]
    with lock:
        append(logs)
        sync()
