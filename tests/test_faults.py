"""Fault suite: ``kill -9`` at random points (seeded) of a search (while profiling, seeding, repairing and
later trials), a training run and an export, several cycles each, then the same command again. Nothing
finished is lost or redone, no trial is left RUNNING, seed labels survive retries, no output is ever
partial, and the temp files a killed write left are gone after the next run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from conftest import ROOT, TINY

TINY_ARGS = ["--model", f"{TINY}:tiny", "--data", f"{TINY}:calib"]
CYCLES = 4


def _env(sleep: str) -> dict[str, str]:
    return {**os.environ, "TINY_SLEEP": sleep, "PYTHONPATH": str(ROOT)}


def _kill_after(cmd: list[str], delay: float, sleep: str) -> int:
    proc = subprocess.Popen(cmd, env=_env(sleep), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return proc.returncode


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")]


def test_search_survives_kill_cycles(tmp_path):
    studies = tmp_path / "studies"
    cmd = [sys.executable, "-m", "autocomp.cli", "search", *TINY_ARGS, "--budget", "40%", "--trials", "30",
           "--study", "k", "--studies-dir", str(studies)]
    rng = random.Random(7)
    kills = 0
    finished: dict[int, tuple[float, ...]] = {}
    for _ in range(CYCLES):
        kills += _kill_after(cmd, rng.uniform(1.5, 6.0), "0.05") == -signal.SIGKILL
        try:  # killed before the studies folder, the database or the study was created: nothing to check yet
            trials = (optuna.load_study(study_name="k", storage=f"sqlite:///{studies / 'k.db'}").trials
                      if (studies / "k.db").exists() else [])
        except KeyError:
            trials = []
        for t in trials:
            if True:
                if t.state == optuna.trial.TrialState.COMPLETE:
                    assert finished.setdefault(t.number, tuple(t.values)) == tuple(t.values)  # never redone
    assert kills >= 2, "the kills must land mid-run for this test to mean anything"
    done = subprocess.run(cmd, env=_env("0"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    trials = optuna.load_study(study_name="k", storage=f"sqlite:///{studies / 'k.db'}").trials
    states = [t.state for t in trials]
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states) == 30
    assert optuna.trial.TrialState.RUNNING not in states and optuna.trial.TrialState.WAITING not in states
    assert all(tuple(trials[n].values) == v for n, v in finished.items())
    # every seed plan queued when the study was made ran to completion under its label, retried or not
    labels = {t.user_attrs["reference"] for t in trials if "reference" in t.user_attrs}
    complete = {t.user_attrs["reference"] for t in trials if "reference" in t.user_attrs and t.values}
    assert labels and labels == complete
    assert not _temps(studies)


def _plan(tmp_path: Path) -> None:
    """A plan of a short tiny-model search at ``tmp_path / "p.json"``."""
    from autocomp.cli import main

    studies = tmp_path / "studies"
    assert main(["search", *TINY_ARGS, "--budget", "40%", "--trials", "4", "--seeds", "uniform", "--study", "s",
                 "--studies-dir", str(studies)]) == 0
    assert main(["plan", "--study", "s", "--studies-dir", str(studies), "--out", str(tmp_path / "p.json")]) == 0


def test_training_survives_kill_cycles(tmp_path):
    _plan(tmp_path)
    out = tmp_path / "t.safetensors"
    cmd = [sys.executable, "-m", "autocomp.cli", "train", "--plan", str(tmp_path / "p.json"), "--data",
           f"{TINY}:train_data", "--steps", "40", "--checkpoint-every", "1", "--out", str(out)]
    rng = random.Random(3)
    for _ in range(CYCLES):
        _kill_after(cmd, rng.uniform(2.0, 4.0), "0.01")
        if out.exists():  # whatever the kill interrupted, the checkpoint on disk is whole
            from safetensors import safe_open

            with safe_open(str(out), framework="pt") as f:
                assert int(f.metadata()["step"]) <= 40
    done = subprocess.run(cmd, env=_env("0"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["step"] == "40"
    assert not _temps(tmp_path)


@pytest.mark.parametrize("seed", [0, 1])
def test_export_is_whole_or_absent_under_kills(tmp_path, seed):
    _plan(tmp_path)
    out = tmp_path / "m.acz.safetensors"
    cmd = [sys.executable, "-m", "autocomp.cli", "export", "--plan", str(tmp_path / "p.json"), "--data",
           f"{TINY}:calib", "--out", str(out)]
    rng = random.Random(seed)
    import autocomp

    for _ in range(CYCLES):
        _kill_after(cmd, rng.uniform(0.5, 3.0), "0")
        if out.exists():
            autocomp.load(out)  # a file that exists is complete: its checksum holds
    t0 = time.time()
    assert subprocess.run(cmd, env=_env("0"), capture_output=True, timeout=300).returncode == 0
    assert time.time() - t0 < 300 and out.exists() and not _temps(tmp_path)
