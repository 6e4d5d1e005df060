"""A trial's bookkeeping in a few transactions (issue #14): held writes are invisible to other readers of the
storage until the plan is decided, visible to this worker at once, and a killed worker's trial is still
retried with its parameters."""

from __future__ import annotations

import os

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

from autocomp.search.batching import batched
from autocomp.search.study import open_storage, recover_stale

PG = os.environ.get("AUTOCOMP_TEST_POSTGRES")
KINDS = ["sqlite", "journal", pytest.param("postgresql", marks=pytest.mark.skipif(not PG, reason="no PostgreSQL server"))]


def _url(kind, tmp_path):
    return {"sqlite": f"sqlite:///{tmp_path / 's.db'}", "journal": str(tmp_path / "s.log")}.get(kind, PG)


def _study(kind, tmp_path, name):
    url = _url(kind, tmp_path)
    inner = open_storage(url)
    try:
        optuna.delete_study(study_name=name, storage=inner)
    except KeyError:
        pass
    wrapped = batched(inner)
    return optuna.create_study(study_name=name, storage=wrapped, directions=["minimize", "minimize"]), url


def _raw_statements(monkeypatch) -> list[str]:
    """Every statement psycopg sends on any connection from now on (COPY included), in order."""
    import psycopg

    seen: list[str] = []
    execute, copy = psycopg.Cursor.execute, psycopg.Cursor.copy

    def executed(self, query, *args, **kwargs):
        seen.append(str(query))
        return execute(self, query, *args, **kwargs)

    def copied(self, statement, *args, **kwargs):
        seen.append(str(statement))
        return copy(self, statement, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", executed)
    monkeypatch.setattr(psycopg.Cursor, "copy", copied)
    return seen


def _writes(study, url, monkeypatch):
    """Count write transactions on the inner storage (commits on a database, appends on a journal). On
    PostgreSQL a trial's rows go in on the driver's own connection (:func:`autocomp.search.batching._pg_connection`),
    which SQLAlchemy's events do not see: each of its uses that wrote counts as one."""
    import contextlib

    import autocomp.search.batching as batching

    base = study._storage.inner
    if type(base).__name__ == "_CachedStorage":  # Optuna's read cache over the database
        base = base._backend
    count = [0]
    if hasattr(base, "engine"):
        from sqlalchemy import event

        wrote = [False]  # Optuna commits after reads too: count the transactions that wrote

        def statement(conn, cursor, sql, *args):
            wrote[0] = wrote[0] or sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))

        def commit(conn):
            count[0] += wrote[0]
            wrote[0] = False

        event.listen(base.engine, "before_cursor_execute", statement)
        event.listen(base.engine, "commit", commit)
        event.listen(base.engine, "rollback", lambda conn: wrote.__setitem__(0, False))
        if base.engine.dialect.name == "postgresql":
            raw, real = _raw_statements(monkeypatch), batching._pg_connection

            @contextlib.contextmanager
            def counted(storage, autocommit=False):
                n = len(raw)
                with real(storage, autocommit) as pg:
                    yield pg
                count[0] += any(("INSERT" in q or "UPDATE" in q or q.startswith("COPY")) for q in raw[n:])

            monkeypatch.setattr(batching, "_pg_connection", counted)
    else:
        backend = base._backend
        append = backend.append_logs

        def counted_logs(logs):
            count[0] += 1
            return append(logs)

        backend.append_logs = counted_logs
    return count


@pytest.mark.parametrize("kind", KINDS)
def test_a_trial_is_three_writes_and_others_see_it_only_when_flushed(kind, tmp_path, monkeypatch):
    study, url = _study(kind, tmp_path, f"b-{kind}")
    count = _writes(study, url, monkeypatch)
    trial = study.ask()
    params = {f"layer{i}:q": trial.suggest_categorical(f"layer{i}:q", ["keep", "8c", "4g128"]) for i in range(60)}
    for i in range(8):
        trial.set_user_attr(f"attr{i}", {"i": i})
    trial.set_constraint("size", -1.0)
    assert trial.params == params and study._storage.get_trial(trial._trial_id).user_attrs["attr3"] == {"i": 3}
    other = optuna.load_study(study_name=f"b-{kind}", storage=open_storage(url))  # another worker's view
    assert other.trials[0].state == optuna.trial.TrialState.RUNNING and other.trials[0].params == {}
    study._storage.flush(trial._trial_id)
    other = optuna.load_study(study_name=f"b-{kind}", storage=open_storage(url))
    assert other.trials[0].params == params and other.trials[0].user_attrs["attr7"] == {"i": 7}
    trial.set_user_attr("eval_seconds", 0.1)
    study.tell(trial, [0.5, 100.0])
    # create, flush, tell (a journal appends the last attributes apart: one more)
    assert count[0] <= (4 if kind == "journal" else 3), f"{count[0]} write transactions for one trial"
    done = optuna.load_study(study_name=f"b-{kind}", storage=open_storage(url)).trials[0]
    assert done.values == [0.5, 100.0] and done.user_attrs["eval_seconds"] == 0.1
    assert done.constraints == {"size": -1.0}


@pytest.mark.skipif(not PG, reason="no PostgreSQL server")
def test_postgresql_rows_go_in_by_copy_and_one_statement_and_read_back_exactly(tmp_path, monkeypatch):
    """On PostgreSQL a trial's many parameter rows reach the database by COPY, its attributes in one statement
    with the state check (a flush), its last attributes, values and state in one statement (a tell), and what
    Optuna reads back is what was written: names and values with quotes, backslashes, tabs, newlines and
    non-ASCII text, infinite objective values."""
    study, url = _study("postgresql", tmp_path, "copy-pg")
    trial = study.ask()
    names = ['a"b', "c\\d", "e\tf", "g\nh", "ü:q", "plain", *(f"layer{i}:q" for i in range(20))]
    params = {n: trial.suggest_categorical(n, ["keep", "x\ty", 'q"uote']) for n in names}
    trial.set_user_attr("plan", {"text": 'tab\there "quoted" back\\slash\nnew line ∑'})
    trial.set_user_attr('odd"key\t', [1.5, None, "ü"])
    trial.set_constraint("size", -1.0)
    seen = _raw_statements(monkeypatch)
    study._storage.flush(trial._trial_id)
    flushed = list(seen)
    trial.set_user_attr("eval_seconds", 0.25)
    study.tell(trial, [float("inf"), -float("inf")])
    told = seen[len(flushed):]
    done = optuna.load_study(study_name="copy-pg", storage=open_storage(PG)).trials[0]
    assert done.params == params and done.values == [float("inf"), -float("inf")]
    assert done.user_attrs["plan"] == {"text": 'tab\there "quoted" back\\slash\nnew line ∑'}
    assert done.user_attrs['odd"key\t'] == [1.5, None, "ü"] and done.user_attrs["eval_seconds"] == 0.25
    assert done.constraints == {"size": -1.0} and done.state == optuna.trial.TrialState.COMPLETE
    assert len(flushed) == 2 and flushed[0].startswith("COPY trial_params"), flushed
    assert all(f"INSERT INTO {t} " in flushed[1] for t in ("trial_user_attributes", "trial_system_attributes"))
    assert len(told) == 1 and all(f"{w} {t} " in told[0] for w, t in (
        ("UPDATE", "trials"), ("INSERT INTO", "trial_user_attributes"), ("INSERT INTO", "trial_values"))), told


@pytest.mark.parametrize("kind", KINDS)
def test_a_killed_trial_is_retried_with_its_parameters(kind, tmp_path):
    study, url = _study(kind, tmp_path, f"k-{kind}")
    study.enqueue_trial({"x:q": "8c"}, user_attrs={"reference": "uniform-8c"})
    seed = study.ask()  # killed before its plan was decided: nothing flushed
    seed.suggest_categorical("x:q", ["keep", "8c"])
    fresh = study.ask()  # killed while evaluating: parameters flushed
    fresh.suggest_categorical("x:q", ["keep", "8c"])
    study._storage.flush(fresh._trial_id)
    reader = optuna.load_study(study_name=f"k-{kind}", storage=open_storage(url))
    assert recover_stale(reader) == 2
    queued = {t.user_attrs["retry_of"]: t for t in reader.get_trials(states=[optuna.trial.TrialState.WAITING])}
    assert queued[seed.number].system_attrs["fixed_params"] == {"x:q": "8c"}
    assert queued[seed.number].user_attrs["reference"] == "uniform-8c"
    assert queued[fresh.number].system_attrs["fixed_params"] == {"x:q": fresh.params["x:q"]}


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_told_trial_is_kept_once_as_the_storage_has_it(kind, tmp_path):
    """The engine's single-writer front reads the trial it just told from the wrapper, not the storage."""
    study, url = _study(kind, tmp_path, f"t-{kind}")
    trial = study.ask()
    trial.suggest_categorical("layer0:q", ["keep", "8c"])
    trial.set_user_attr("plan", {"layers": {"a": "8c"}})
    trial.set_constraint("size", -2.0)
    study.tell(trial, [0.25, 10.0])
    kept = study._storage.told(trial._trial_id)
    stored = optuna.load_study(study_name=f"t-{kind}", storage=open_storage(url)).trials[0]
    assert kept is not None and study._storage.told(trial._trial_id) is None
    for field in ("number", "state", "values", "params", "user_attrs", "constraints"):
        assert getattr(kept, field) == getattr(stored, field), field
    pruned = study.ask()
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    assert study._storage.told(pruned._trial_id).state == optuna.trial.TrialState.PRUNED


def test_the_front_grows_trial_by_trial_as_a_full_read_finds_it(tmp_path):
    """front_of(front so far + new trial) == front of every trial, duplicates and infeasible ones included."""
    import random

    from autocomp.search.study import front_of

    study, _ = _study("sqlite", tmp_path, "f")
    rng = random.Random(0)
    front = []
    for i in range(120):
        trial = study.ask()
        trial.set_constraint("size", rng.choice([-1.0, -1.0, -1.0, 0.5]))
        values = [rng.choice([0.1, 0.2, 0.3]) if i % 7 == 0 else rng.random(), float(rng.randint(1, 40))]
        study.tell(trial, values if i % 11 else None, state=None if i % 11 else optuna.trial.TrialState.FAIL)
        front = front_of([*front, study._storage.told(trial._trial_id)], 30, ["proxy", "size"])
        full = front_of(study.get_trials(deepcopy=False), 30, ["proxy", "size"])
        assert [t.number for t in front] == [t.number for t in full]
    assert len(front) >= 2


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "journal"])
def test_a_trial_reads_back_nothing_it_wrote(kind, tmp_path):
    """ask + tell cost 16 statements on a database, 7 of them the sampler's read of the study (42 before: the
    new trial and the told one were read back, every ask refreshed every unfinished trial to look for queued
    ones, the last attributes and the tell were two transactions, attributes were looked up before insert)."""
    from sqlalchemy import event

    study, _ = _study(kind, tmp_path, f"r-{kind}")
    engine = study._storage.inner._backend.engine
    for _ in range(3):  # other unfinished trials in the study: an ask must not read them
        study.enqueue_trial({"layer0:q": "8c"}) if _ == 0 else study.ask()
    seen = []
    event.listen(engine, "before_cursor_execute", lambda conn, cursor, sql, *a: seen.append(sql))
    for _ in range(2):
        seen.clear()
        trial = study.ask()
        for i in range(60):
            trial.suggest_categorical(f"layer{i}:q", ["keep", "8c", "4g128"])
        trial.set_user_attr("plan", {"layers": {}})
        trial.set_constraint("size", -1.0)
        study._storage.flush(trial._trial_id)
        done = study.tell(trial, [0.5, 100.0])
        assert done.values == [0.5, 100.0] and done.user_attrs["plan"] == {"layers": {}}
        assert len(seen) <= 16, f"{len(seen)} statements for one trial"


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "journal"])
def test_a_trial_failed_meanwhile_by_another_worker_is_not_told_over(kind, tmp_path):
    """The tell (held attributes, values and state in one transaction) refuses a trial another worker failed
    (its heartbeat looked stopped), writes nothing of it, and the storage keeps the other worker's FAIL."""
    study, url = _study(kind, tmp_path, f"m-{kind}")
    trial = study.ask()
    trial.suggest_categorical("layer0:q", ["keep", "8c"])
    study._storage.flush(trial._trial_id)
    trial.set_user_attr("eval_seconds", 0.1)  # held until the tell
    other = optuna.load_study(study_name=f"m-{kind}", storage=open_storage(url))
    assert recover_stale(other) == 1
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        study.tell(trial, [0.5, 1.0])
    done = optuna.load_study(study_name=f"m-{kind}", storage=open_storage(url)).trials[0]
    assert done.state == optuna.trial.TrialState.FAIL and done.values is None
    assert "eval_seconds" not in done.user_attrs and done.user_attrs["autocomp_stale"] is True


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "journal"])
def test_an_attribute_another_worker_wrote_meanwhile_is_updated_not_duplicated(kind, tmp_path):
    """Attributes this worker never wrote are inserted without a look-up; a row written meanwhile by someone
    else makes the insert fail on SQLite, and the batch is redone with the look-up; on PostgreSQL the insert is
    an upsert. Either way one row, this worker's value."""
    study, url = _study(kind, tmp_path, f"a-{kind}")
    trial = study.ask()
    trial.set_user_attr("note", "mine")
    open_storage(url).set_trial_user_attr(trial._trial_id, "note", "theirs")
    study._storage.flush(trial._trial_id)
    study.tell(trial, [0.5, 1.0])
    done = optuna.load_study(study_name=f"a-{kind}", storage=open_storage(url)).trials[0]
    assert done.user_attrs == {"note": "mine"} and done.state == optuna.trial.TrialState.COMPLETE


def _asked_by_threads(study, threads: int, each: int) -> list[int]:
    """``threads`` threads started together, each asking and telling ``each`` trials (one parameter); the
    numbers they got. Fails on any error in a thread."""
    import threading

    numbers, errors = [], []
    start = threading.Barrier(threads)

    def work():
        try:
            start.wait()
            for _ in range(each):
                trial = study.ask()
                trial.suggest_categorical("layer0:q", ["keep", "8c"])
                numbers.append(trial.number)
                study.tell(trial, [0.5, 1.0])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    running = [threading.Thread(target=work) for _ in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    assert not errors
    return numbers


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "journal"])
def test_trials_asked_at_once_by_threads_get_distinct_consecutive_numbers(kind, tmp_path):
    """A new trial's number comes from the insert itself, under Optuna's lock on the study row."""
    study, url = _study(kind, tmp_path, f"n-{kind}")
    study.enqueue_trial({"layer0:q": "8c"})  # created by Optuna's own path (a template)
    first = study.ask()
    study.tell(first, [0.5, 1.0])
    numbers = [first.number] + _asked_by_threads(study, threads=3, each=12)
    stored = optuna.load_study(study_name=f"n-{kind}", storage=open_storage(url)).trials
    assert sorted(numbers) == list(range(37)) == [t.number for t in stored]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in stored)


@pytest.mark.parametrize("kind", KINDS)
def test_the_first_heartbeat_goes_with_the_flush_and_later_ones_at_once(kind, tmp_path, monkeypatch):
    from autocomp.search.study import Heartbeat

    study, url = _study(kind, tmp_path, f"h-{kind}")
    count = _writes(study, url, monkeypatch)
    beat = Heartbeat(study)
    try:
        trial = study.ask()
        beat.watch(trial)  # the plan is not decided yet: held
        other = optuna.load_study(study_name=f"h-{kind}", storage=open_storage(url))
        assert "autocomp_heartbeat" not in other.trials[0].user_attrs
        trial.suggest_categorical("layer0:q", ["keep", "8c"])
        study._storage.flush(trial._trial_id)
        first = optuna.load_study(study_name=f"h-{kind}", storage=open_storage(url)).trials[0].user_attrs
        assert count[0] == 2  # create, flush (with the beat)
        beat._beat()  # a periodic beat, after the flush: at once
        later = optuna.load_study(study_name=f"h-{kind}", storage=open_storage(url)).trials[0].user_attrs
        assert count[0] == 3 and later["autocomp_heartbeat"] > first["autocomp_heartbeat"]
    finally:
        beat.stop()


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "journal"])
def test_threads_never_take_the_same_queued_trial(kind, tmp_path):
    """Taking a queued trial is one conditional update (WAITING -> RUNNING): of two threads that saw it queued,
    one gets it. (Optuna's read-then-write let two threads on SQLite both run it; the second tell then failed.)"""
    study, url = _study(kind, tmp_path, f"q-{kind}")
    for i in range(24):
        study.enqueue_trial({"layer0:q": "8c" if i % 2 else "keep"})
    taken = _asked_by_threads(study, threads=4, each=6)
    assert sorted(taken) == list(range(24))
    stored = optuna.load_study(study_name=f"q-{kind}", storage=open_storage(url)).trials
    assert [t.state for t in stored] == [optuna.trial.TrialState.COMPLETE] * 24


@pytest.mark.parametrize("kind", KINDS)
def test_progress_counts_in_one_statement_what_the_trials_say(kind, tmp_path):
    """The shared count (finished as is_finished says, running; below a number or not) is one statement on a
    database and equals the count over every trial read in full."""
    from autocomp.search.study import progress

    S = optuna.trial.TrialState
    study, url = _study(kind, tmp_path, f"p-{kind}")
    for i in range(9):
        trial = study.ask()
        if i % 3 == 0:
            study.tell(trial, [0.5, 1.0])
        elif i == 1:
            trial.set_user_attr("autocomp_stale", True)  # failed by a dead worker's recovery: not counted
            study.tell(trial, state=S.FAIL)
        elif i == 4:
            study.tell(trial, state=S.FAIL)  # a real failure: counted
        elif i == 5:
            study.tell(trial, state=S.PRUNED)
    study.enqueue_trial({"layer0:q": "8c"})
    reader = optuna.load_study(study_name=f"p-{kind}", storage=open_storage(url))  # no lean path: full read
    for below in (None, 0, 2, 5, 9, 20):
        assert progress(study, below) == progress(reader, below)
    assert progress(study) == (4, 3)
    if kind != "journal":
        from sqlalchemy import event

        seen = []
        event.listen(study._storage.inner._backend.engine, "before_cursor_execute", lambda *a: seen.append(1))
        progress(study, 5)
        assert len(seen) == 1


def _decided(study, i):
    """A new trial of ``study`` with 20 parameters, a plan and a constraint, flushed as the engine does once the
    plan is decided."""
    trial = study.ask()
    for j in range(20):
        trial.suggest_categorical(f"layer{j}:q", ["keep", "8c", "4g128"])
    trial.set_user_attr("plan", {"i": i})
    trial.set_constraint("size", -1.0)
    study._storage.flush(trial._trial_id)
    return trial


def test_a_sole_writer_reads_the_study_once_and_sees_what_a_fresh_read_sees(tmp_path):
    """Single writer (SQLite, the lock held): the study's trials are read once, then kept as this worker writes
    them; a queued trial and a dead process's trial failed drop the kept list. Every read equals a fresh load
    of the study."""
    from sqlalchemy import event

    url = f"sqlite:///{tmp_path / 's.db'}"
    left = optuna.create_study(study_name="sole", storage=url, directions=["minimize", "minimize"])
    dead = left.ask()  # a killed process's trial, still RUNNING
    study = optuna.load_study(study_name="sole", storage=batched(open_storage(url), sole=True),
                              sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2))
    engine = study._storage.inner._backend.engine
    seen = []
    event.listen(engine, "before_cursor_execute", lambda conn, cursor, sql, *a: seen.append(sql))

    def fields(trials):
        return [(t.number, t.state, t.values, t.params, t.user_attrs, t.system_attrs) for t in trials]

    def one(i):
        trial = _decided(study, i)
        study.tell(trial, [0.1 * i, 100.0 - i])
        assert fields(study.get_trials()) == fields(optuna.load_study(study_name="sole", storage=url).trials)

    for i in range(4):
        one(i)
    seen.clear()
    for i in range(4, 8):
        one(i)
    # no refresh of the running or the told trial through Optuna's cache (its read asks for trial_id > last)
    assert seen and not any("trial_id >" in sql for sql in seen)
    # per trial: the new trial (2), the flush (a state check and 3 inserts), the tell (2); no read of the study
    # for the sampler, the queue or the front
    assert len(seen) <= 8 * 4, f"{len(seen) / 4} statements a trial"
    study._storage.set_trial_state_values(dead._trial_id, optuna.trial.TrialState.FAIL)  # as recover_stale does
    assert study.get_trials()[0].state == optuna.trial.TrialState.FAIL
    study.enqueue_trial({"layer0:q": "8c"})  # a queued trial: the kept list is dropped, the queue is seen
    assert study.get_trials()[-1].state == optuna.trial.TrialState.WAITING
    one(8)  # takes the queued trial
    assert study.get_trials()[-1].params["layer0:q"] == "8c"
    assert fields(study.get_trials()) == fields(optuna.load_study(study_name="sole", storage=url).trials)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "journal"])
def test_a_shared_worker_reads_in_full_only_the_trials_others_changed(kind, tmp_path, monkeypatch):
    """Shared mode (workers on one database): a read of the study's trials reads in full neither this worker's
    running trial nor the one it just told -- Optuna's cache re-read both on every read, 3 reads a trial with
    the default sampler, 18 ms a MiniLM trial on PostgreSQL -- but does read another worker's new, running and
    finished trials. Every read equals a fresh load of the study."""
    study, url = _study(kind, tmp_path, f"sh-{kind}")
    other = optuna.load_study(study_name=f"sh-{kind}", storage=batched(open_storage(url)))
    backend = study._storage.inner._backend
    built = []
    build = backend._build_frozen_trial_from_trial_model
    monkeypatch.setattr(backend, "_build_frozen_trial_from_trial_model", lambda m: built.append(m.trial_id) or build(m))

    def fields(trials):
        return [(t.number, t.state, t.values, t.params, t.user_attrs, t.system_attrs, t.datetime_start,
                 t.datetime_complete) for t in trials]

    def fresh():
        return fields(optuna.load_study(study_name=f"sh-{kind}", storage=open_storage(url)).trials)

    def one(s, i, tell=True):
        trial = _decided(s, i)
        running = s.get_trials(deepcopy=False)[-1]  # what a sampler reads while the trial runs: all it wrote
        assert running.params == trial.params and running.user_attrs["plan"] == {"i": i}
        if tell:
            s.tell(trial, [0.1 * i, 100.0 - i])
        return trial

    for i in range(2):
        one(study, i)
    built.clear()
    for i in range(2, 5):
        one(study, i)
        assert fields(study.get_trials()) == fresh()
    assert built == []  # nothing read back in full: the running and the told trials were this worker's
    theirs = one(other, 5, tell=False)
    study.get_trials()
    assert built == [theirs._trial_id]  # another worker's running trial: read (its rows may still change)
    other.tell(theirs, [0.01, 1.0])
    built.clear()
    assert fields(study.get_trials()) == fresh() and built == [theirs._trial_id]  # read once finished
    built.clear()
    one(study, 6)
    assert fields(study.get_trials()) == fresh() and built == []


def test_a_sole_writer_does_not_keep_a_read_another_thread_wrote_during(tmp_path):
    """The Ray backend's driver threads share the storage: a tell landing while another thread reads the study
    must not be lost under a stale copy of the trial (it was: 11 of 12 trials counted)."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="race", storage=batched(open_storage(url), sole=True),
                                sampler=optuna.samplers.RandomSampler(seed=0), directions=["minimize", "minimize"])
    trial = study.ask()  # nothing has read the study's trials yet
    inner = study._storage.inner
    read = inner.get_all_trials

    def read_then_tell(*args, **kwargs):  # the read sees the trial RUNNING; the tell lands before it returns
        trials = read(*args, **kwargs)
        inner.get_all_trials = read
        study.tell(trial, [0.5, 1.0])
        return trials

    inner.get_all_trials = read_then_tell
    study.get_trials()
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE]


def test_a_distribution_s_json_is_made_once_and_never_mixed_up_with_an_equal_one():
    """The JSON kept per distribution tells apart distributions Optuna calls equal whose JSON differs:
    choices (1, 0), (1.0, 0.0) and (True, False) compare equal in Python."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, distribution_to_json

    from autocomp.search.batching import _distribution_json

    dists = [CategoricalDistribution([1, 0]), CategoricalDistribution([1.0, 0.0]), CategoricalDistribution([True, False]),
             FloatDistribution(0.0, 1.0), FloatDistribution(0.0, 1.0, log=False), FloatDistribution(-0.0, 1.0)]
    for _ in range(2):  # made, then kept
        assert [_distribution_json(d) for d in dists] == [distribution_to_json(d) for d in dists]


@pytest.mark.skipif(not PG, reason="no PostgreSQL server")
def test_postgresql_writes_survive_connections_the_server_dropped(tmp_path):
    """The server ends every connection the worker holds (as a restart or an idle timeout does): the flush, the
    next ask and the tell are redone on fresh connections, and the study has the trials exactly once."""
    import psycopg

    study, url = _study("postgresql", tmp_path, "dropped-pg")

    def drop_all():
        with psycopg.connect(PG, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")

    first = study.ask()
    params = {f"layer{i}:q": first.suggest_categorical(f"layer{i}:q", ["keep", "8c"]) for i in range(20)}
    first.set_user_attr("plan", {"p": 1})
    drop_all()
    study._storage.flush(first._trial_id)
    drop_all()
    study.tell(first, [0.5, 1.0])
    drop_all()
    second = study.ask()
    second.suggest_categorical("layer0:q", ["keep", "8c"])
    drop_all()
    study.tell(second, [0.25, 2.0])
    done = optuna.load_study(study_name="dropped-pg", storage=open_storage(url)).trials
    assert [t.number for t in done] == [0, 1] and [t.values for t in done] == [[0.5, 1.0], [0.25, 2.0]]
    assert done[0].params == params and done[0].user_attrs == {"plan": {"p": 1}}
