"""One conformance suite over every storage kind a study can live in (SQLite with WAL, a journal file, and
PostgreSQL when ``AUTOCOMP_TEST_POSTGRES`` names a server, as .ci/run starts one): Optuna's own storage test
cases on the storage as autocomp opens it, then autocomp's resume contract on each kind."""

from __future__ import annotations

import os

import pytest
from optuna.testing.pytest_storages import StorageTestCase

from autocomp.search.study import open_storage
from conftest import TINY

PG = os.environ.get("AUTOCOMP_TEST_POSTGRES")
KINDS = ["sqlite", "journal", pytest.param("postgresql", marks=pytest.mark.skipif(not PG, reason="no PostgreSQL server"))]


def _url(kind: str, tmp_path, name: str = "s") -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / f'{name}.db'}"
    if kind == "journal":
        return str(tmp_path / f"{name}.log")
    return PG


def _empty(storage):
    """A shared server keeps other tests' studies: Optuna's cases expect an empty storage."""
    for s in storage.get_all_studies():
        storage.delete_study(s._study_id)
    return storage


@pytest.fixture(params=KINDS)
def storage(request, tmp_path):
    return _empty(open_storage(_url(request.param, tmp_path)))


class TestOptunaStorageCases(StorageTestCase):
    """Optuna's storage contract (studies, trials, attributes, states), on each kind as autocomp opens it."""


@pytest.mark.parametrize("kind", KINDS)
def test_a_killed_trial_is_retried_and_the_total_is_exact(kind, tmp_path):
    """A RUNNING trial left by a dead process is failed (stale) and its plan run again on resume; the study
    ends with exactly the requested trials and every reader (autocomp, Optuna) reads it."""
    import optuna

    from autocomp.search.config import SearchConfig
    from autocomp.search.engine import run_search
    from autocomp.search.study import open_study, plan_of

    name = f"st-{kind}-{os.getpid()}"
    url = _url(kind, tmp_path, name)
    if kind == "postgresql":
        try:
            optuna.delete_study(study_name=name, storage=url)
        except KeyError:
            pass
    cfg = SearchConfig(budget="40%", model=f"{TINY}:tiny", data=f"{TINY}:calib", study=name, trials=6,
                       seeds="uniform", studies_dir=tmp_path, storage=None if kind == "sqlite" else url)
    run_search(cfg)
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    ghost = study.ask()  # a worker that died mid-trial
    params = {p: ghost.suggest_categorical(p, list(d.choices)) for p, d in study.trials[0].distributions.items()}
    if kind != "sqlite":  # shared storages fail a trial once its heartbeat is overdue
        study._storage.set_trial_user_attr(ghost._trial_id, "autocomp_heartbeat", 1.0)  # 1970
    cfg.trials = 9
    result = run_search(cfg)
    trials = optuna.load_study(study_name=name, storage=open_storage(url)).trials
    states = [t.state for t in trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert trials[ghost.number].state == optuna.trial.TrialState.FAIL and trials[ghost.number].user_attrs["autocomp_stale"]
    assert [t for t in trials if t.user_attrs.get("retry_of") == ghost.number and t.params == params]
    assert result["trials_complete"] + result["trials_failed"] == 9
    handle = open_study(name, None if kind == "sqlite" else url, tmp_path)
    assert all(plan_of(t, handle).layers is not None for t in trials if t.values)
