"""Several workers on one study: a real PostgreSQL server (started by .ci/run; its URL in
$AUTOCOMP_TEST_POSTGRES), a journal file, and SQLite's one-writer lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest

from conftest import ROOT, TINY

PG = os.environ.get("AUTOCOMP_TEST_POSTGRES")
needs_pg = pytest.mark.skipif(not PG, reason="no PostgreSQL server: set AUTOCOMP_TEST_POSTGRES (.ci/run starts one "
                                             "with .ci/postgres.sh)")


def _cmd(storage: str, study: str, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "autocomp.cli", "search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib",
            "--budget", "40%", "--trials", str(trials), "--study", study, "--storage", storage, "--json", *extra]


def _env(sleep: str = "0") -> dict[str, str]:
    return {**os.environ, "TINY_SLEEP": sleep, "PYTHONPATH": str(ROOT), "AUTOCOMP_HEARTBEAT_S": "0.5"}


def _finished(trials):
    S = optuna.trial.TrialState
    return [t for t in trials if t.state == S.COMPLETE or (t.state == S.FAIL and not t.user_attrs.get("autocomp_stale"))]


@pytest.mark.parametrize("kind", ["postgresql", "journal"])
def test_two_workers_share_one_study(kind, tmp_path):
    if kind == "postgresql" and not PG:
        pytest.skip("no PostgreSQL server: set AUTOCOMP_TEST_POSTGRES (.ci/run starts one)")
    storage = PG if kind == "postgresql" else str(tmp_path / "shared.log")
    study = f"w2-{uuid.uuid4().hex[:8]}"
    procs = [subprocess.Popen(_cmd(storage, study, 24), env=_env("0.02"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    st = optuna.load_study(study_name=study, storage=storage if kind == "postgresql" else
                           optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage)))
    trials = st.trials
    assert len(_finished(trials)) == 24  # the shared total, not 24 each
    refs = [t.user_attrs["reference"] for t in trials if "reference" in t.user_attrs]
    assert refs and len(refs) == len(set(refs))  # seeds enqueued once
    evaluated = [t.user_attrs["plan_key"] for t in trials if t.user_attrs.get("evaluated", True) and "plan_key" in t.user_attrs]
    assert len(evaluated) >= 12
    # both workers did work, and both report the same front
    fronts = [[e["trial"] for e in json.loads(out)["pareto"]] for out, _ in outs]
    assert fronts[0] and set(fronts[0]) <= {t.number for t in trials}
    if kind == "postgresql":
        from autocomp.cli import main

        assert main(["pareto", "--study", study, "--storage", storage, "--json",
                     "--studies-dir", str(tmp_path / "studies")]) == 0  # it writes the front's plans there


@needs_pg
def test_killed_worker_trial_is_failed_and_retried(tmp_path):
    study = f"kill-{uuid.uuid4().hex[:8]}"
    slow = _env("0.25")  # ~1 s per trial (4 calibration batches)
    a = subprocess.Popen(_cmd(PG, study, 16), env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path)  # the studies folder of each worker: not the checkout's
    b = subprocess.Popen(_cmd(PG, study, 16), env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path)
    t0 = time.time()

    def stale_seen() -> bool:
        return any(t.user_attrs.get("autocomp_stale") for t in optuna.load_study(study_name=study, storage=PG).trials)

    while True:  # until A is frozen in the middle of a trial, which B then fails (its heartbeat stopped)
        assert time.time() - t0 < 180 and a.poll() is None
        try:
            st = optuna.load_study(study_name=study, storage=PG)
            ready = len(_finished(st.trials)) >= 3 and any(t.state == optuna.trial.TrialState.RUNNING for t in st.trials)
        except KeyError:
            ready = False
        if ready:
            # freezing A (not killing it yet) closes the race of A finishing its trial between the check and the
            # kill: if A was between two trials, no trial goes stale and A is let go again
            a.send_signal(signal.SIGSTOP)
            deadline = time.time() + 5
            while time.time() < deadline and not stale_seen():
                time.sleep(0.2)
            if stale_seen():
                break
            a.send_signal(signal.SIGCONT)
        time.sleep(0.2)
    a.send_signal(signal.SIGKILL)
    a.communicate()
    out, err = b.communicate(timeout=300)
    assert b.returncode == 0, err
    trials = optuna.load_study(study_name=study, storage=PG).trials
    assert len(_finished(trials)) == 16
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    stale = [t for t in trials if t.user_attrs.get("autocomp_stale")]
    assert stale, "the killed worker's trial was not failed"
    retried = {t.user_attrs.get("retry_of") for t in trials}
    assert all(t.number in retried for t in stale if t.params)
    front = json.loads(out)["pareto"]
    best = min(t.values[0] for t in trials if t.state == optuna.trial.TrialState.COMPLETE
               and t.user_attrs["size_bytes"] <= json.loads(out)["budget_bytes"])
    assert min(e["proxy"] for e in front) == best  # a correct front


def test_sqlite_takes_one_writer(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    cmd = [sys.executable, "-m", "autocomp.cli", "search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib",
           "--budget", "40%", "--trials", "40", "--study", "one", "--studies-dir", str(studies)]
    a = subprocess.Popen(cmd, env=_env("0.1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (studies / "one.db.lock").exists() or not (studies / "one.db").exists():
        assert time.time() - t0 < 60 and a.poll() is None
        time.sleep(0.1)
    time.sleep(1.0)
    b = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    a.send_signal(signal.SIGINT)
    a.communicate(timeout=60)
    assert b.returncode == 2
    last = b.stderr.strip().splitlines()[-1]
    assert "another process" in last and "postgresql://" in last and "journal" in last, b.stderr


def test_driverless_and_unreachable_databases_are_one_line(capsys):
    from autocomp.cli import main

    base = ["search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib", "--budget", "40%", "--trials", "2"]
    assert main([*base, "--storage", "postgresql://u:pw@127.0.0.1:1/db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unreachable" in err and "pw" not in err
    assert main([*base, "--storage", "mysql+nosuchdriver://u:pw@127.0.0.1/db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "pw" not in err


@needs_pg
def test_same_study_name_other_model_is_refused(capsys, tmp_path, monkeypatch):
    from autocomp.cli import main

    monkeypatch.chdir(tmp_path)  # its studies folder, not the checkout's
    study = f"clash-{uuid.uuid4().hex[:8]}"
    assert main(["search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib", "--budget", "40%", "--trials", "2",
                 "--study", study, "--storage", PG]) == 0
    capsys.readouterr()
    assert main(["search", "--model", f"{TINY}:tiny_conv", "--data", f"{TINY}:conv_calib", "--budget", "40%",
                 "--trials", "2", "--study", study, "--storage", PG]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "different --model" in err
