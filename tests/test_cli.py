"""The CLI as a user runs it: the JSON contract, resume after Ctrl-C / kill -9, and bad input."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from autocomp.plan import Plan
from conftest import ROOT, TINY, run_cli

TINY_ARGS = ["--model", f"{TINY}:tiny", "--data", f"{TINY}:calib"]
CONTRACT_KEYS = {"study", "storage", "trials_complete", "trials_failed", "model", "budget_bytes", "pareto"}


def search(capsys, studies, *extra, trials=12, budget="40%", study="t"):
    args = ["search", *TINY_ARGS, "--budget", budget, "--trials", str(trials), "--study", study,
            "--studies-dir", str(studies), "--json", *extra]
    return run_cli(args, capsys)


def check_contract(result, studies):
    assert set(result) == CONTRACT_KEYS
    assert set(result["model"]) == {"name", "params", "fp32_bytes"}
    front = result["pareto"]
    assert front, "expected a non-empty front"
    assert [e["size_bytes"] for e in front] == sorted(e["size_bytes"] for e in front)
    for e in front:
        assert set(e) == {"trial", "size_bytes", "proxy", "plan_path"}
        assert e["size_bytes"] <= result["budget_bytes"]
        assert Path(e["plan_path"]).is_file()
        plan = Plan.load(e["plan_path"])
        assert plan.metrics["size_bytes"] == e["size_bytes"]
        for o in front:  # non-dominated
            assert not (o["size_bytes"] <= e["size_bytes"] and o["proxy"] <= e["proxy"]
                        and (o["size_bytes"], o["proxy"]) != (e["size_bytes"], e["proxy"]))


def load(studies, name="t"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{studies}/{name}.db")


@pytest.mark.parametrize("interval", [0.0, 3600.0])
def test_the_front_files_follow_the_run_and_end_with_it(capsys, studies, monkeypatch, interval):
    """Rewritten at most once a FRONT_WRITE_S while trials run (every change at 0), and always at the end:
    pareto.json and every plan file it names are the final front's."""
    from autocomp.search import engine, study

    writes = []
    real = study.write_front
    monkeypatch.setattr(engine, "FRONT_WRITE_S", interval)
    monkeypatch.setattr(study, "write_front", lambda handle, front: writes.append(len(front)) or real(handle, front))
    code, out, err = search(capsys, studies)
    assert code == 0, err
    result = json.loads(out)
    check_contract(result, studies)
    assert json.loads((studies / "t" / "pareto.json").read_text()) == result
    assert len(writes) > 3 if interval == 0 else len(writes) <= 3  # opening, the end (and the first trial's)


def test_search_json_contract_and_pareto(capsys, studies):
    code, out, err = search(capsys, studies)
    assert code == 0, err
    result = json.loads(out)  # stdout is exactly one JSON object
    check_contract(result, studies)
    assert result["trials_complete"] == 12 and result["trials_failed"] == 0
    assert result["model"]["fp32_bytes"] == result["budget_bytes"] * 100 // 40 or \
        abs(result["budget_bytes"] - 0.4 * result["model"]["fp32_bytes"]) < 1
    assert "trials" in err  # progress went to stderr
    assert json.loads((studies / "t" / "pareto.json").read_text()) == result

    code, out2, _ = run_cli(["pareto", "--study", "t", "--studies-dir", str(studies), "--json"], capsys)
    assert code == 0 and json.loads(out2) == result

    for pick in ("best", "smallest", "knee"):
        dest = studies / f"{pick}.json"
        code, _, err = run_cli(["plan", "--study", "t", "--pick", pick, "--out", str(dest),
                                "--studies-dir", str(studies)], capsys)
        assert code == 0, err
        plan = Plan.load(dest)
        assert plan.model_spec == TINY_ARGS[1] and plan.meta["study"] == "t"
    best = Plan.load(studies / "best.json").metrics["proxy"]
    assert best == min(e["proxy"] for e in result["pareto"])
    smallest = Plan.load(studies / "smallest.json").metrics["size_bytes"]
    assert smallest == result["pareto"][0]["size_bytes"]

    code, out, err = run_cli(["score", "--plan", str(studies / "best.json"), "--data", TINY_ARGS[3], "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["proxy"] == pytest.approx(best, rel=1e-6)


def test_rerun_resumes_and_extends(capsys, studies):
    assert search(capsys, studies, trials=8)[0] == 0
    before = {t.number: t.values for t in load(studies).trials}
    assert search(capsys, studies, trials=8)[0] == 0  # same command: nothing to do
    assert {t.number: t.values for t in load(studies).trials} == before
    code, out, _ = search(capsys, studies, trials=14)  # a larger N extends
    assert code == 0 and json.loads(out)["trials_complete"] == 14
    after = {t.number: t.values for t in load(studies).trials}
    assert all(after[n] == v for n, v in before.items() if v is not None)  # seeds still queued then have run


def test_references_seed_a_new_study(capsys, studies):
    search(capsys, studies, trials=10, budget="90%")  # default --seeds ilp: the additive sweep, then uniform plans
    refs = [t.user_attrs.get("reference") for t in load(studies).trials if t.user_attrs.get("reference")]
    first_uniform = refs.index("uniform-8c")
    assert first_uniform > 0 and all(r.startswith("ilp-") for r in refs[:first_uniform]) and "uniform-4g128" in refs
    search(capsys, studies, "--seeds", "uniform", trials=10, budget="90%", study="u")
    refs = [t.user_attrs.get("reference") for t in load(studies, "u").trials if t.user_attrs.get("reference")]
    assert refs[0] == "uniform-8c" and not any(r.startswith("ilp-") for r in refs)
    code, _, err = search(capsys, studies, trials=12, budget="90%", study="u")  # resumes under the default --seeds
    assert code == 0, err
    assert sum(t.values is not None for t in load(studies, "u").trials) == 12


def test_stale_running_trial_is_failed_and_retried(capsys, studies):
    # uniform seeds only, so that no queued seed stands before the retry when the search resumes
    assert search(capsys, studies, "--seeds", "uniform", trials=6)[0] == 0
    study = load(studies)
    orphan = study.ask()  # a trial a killed process would leave RUNNING
    for p, opts in study.trials[0].distributions.items():
        orphan.suggest_categorical(p, opts.choices)
    assert search(capsys, studies, "--seeds", "uniform", trials=8)[0] == 0
    trials = load(studies).trials
    stale = trials[orphan.number]
    assert stale.state == optuna.trial.TrialState.FAIL and stale.user_attrs["autocomp_stale"]
    retried = [t for t in trials if t.user_attrs.get("retry_of") == orphan.number]
    assert len(retried) == 1 and retried[0].params == stale.params
    assert retried[0].state == optuna.trial.TrialState.COMPLETE
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 8


def _cmd(studies, trials):
    return [sys.executable, "-m", "autocomp.cli", "search", *TINY_ARGS, "--budget", "40%", "--trials", str(trials),
            "--study", "k", "--studies-dir", str(studies), "--json"]


def _complete(studies):
    try:
        with sqlite3.connect(studies / "k.db", timeout=30) as c:
            return c.execute("select count(*) from trials where state='COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _wait_for(studies, n, proc, timeout=120):
    t0 = time.time()
    while _complete(studies) < n:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.time() - t0 < timeout
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_search_resumes(capsys, studies, sig):
    env = {**os.environ, "TINY_SLEEP": "0.15", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_cmd(studies, 40), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(studies, 5, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "run the same command again to resume" in err
        assert Path(studies / "k" / "pareto.json").is_file()
    else:
        assert proc.returncode == -signal.SIGKILL
    done = {t.number: t.values for t in load(studies, "k").trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(done) >= 5
    code, out, err = run_cli(_cmd(studies, 40)[3:], capsys)
    assert code == 0, err
    trials = load(studies, "k").trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 40  # exactly the requested total
    assert all(trials[n].values == v for n, v in done.items())  # nothing finished was lost or redone
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    check_contract(json.loads(out), studies)


# -- bad input: one line, exit 2, nothing lost ----------------------------------------------------------
BAD = [
    (["--budget", "-5MB"], "must be positive"),
    (["--budget", "lots"], "not a size"),
    (["--budget", "10B"], "below the smallest plan"),
    (["--budget", "40%", "--model", "gpt9"], "unknown model 'gpt9'"),
    (["--budget", "40%", "--model", "nofile.py:f"], "does not exist"),
    (["--budget", "40%", "--model", f"{TINY}:not_a_module"], "not a torch.nn.Module"),
    (["--budget", "40%", "--data", f"{TINY}:empty_data"], "returned no batches"),
    (["--budget", "40%", "--data", f"{TINY}:wrong_shape_data"], "does not fit"),
    (["--budget", "40%", "--model", f"{TINY}:no_layers"], "no compressible layers"),
    (["--budget", "40%", "--study", "../evil"], "study name '../evil' is not allowed"),
    (["--budget", "40%", "--storage", "postgresql+nosuchdriver://x@127.0.0.1/db"], "cannot be opened"),
    (["--budget", "40%", "--storage", "sqlite:////nonexistent/dir/x.db"], "cannot be opened"),
    (["--budget", "40%", "--space", "nospace"], "search space 'nospace' not found"),
]


@pytest.mark.parametrize("args,fragment", BAD, ids=[b[1] for b in BAD])
def test_bad_search_input(capsys, studies, args, fragment):
    base = {"--model": f"{TINY}:tiny", "--data": f"{TINY}:calib"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    flat = [x for kv in base.items() for x in kv]
    code, out, err = run_cli(["search", *flat, "--trials", "3", "--studies-dir", str(studies)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1], err
    assert "Traceback" not in err and out == ""


def test_malformed_space_file(capsys, studies, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nlayers:\n  - quant: [keep, 4z]\n")
    code, _, err = run_cli(["search", *TINY_ARGS, "--budget", "40%", "--space", str(bad), "--studies-dir", str(studies)], capsys)
    assert code == 2 and str(bad) in err and "quant" in err


def test_changed_settings_refused_and_study_untouched(capsys, studies):
    assert search(capsys, studies, trials=5)[0] == 0
    before = [(t.number, t.state, t.values) for t in load(studies).trials]
    code, out, err = search(capsys, studies, trials=9, budget="60%")
    assert code == 2 and "different --budget" in err and "new --study" in err
    assert [(t.number, t.state, t.values) for t in load(studies).trials] == before


def test_plan_for_another_model(capsys, studies, tmp_path):
    assert search(capsys, studies, trials=5)[0] == 0
    dest = tmp_path / "p.json"
    assert run_cli(["plan", "--study", "t", "--out", str(dest), "--studies-dir", str(studies)], capsys)[0] == 0
    code, _, err = run_cli(["score", "--plan", str(dest), "--model", f"{TINY}:tiny_conv",
                            "--data", f"{TINY}:conv_calib"], capsys)
    assert code == 2 and "made for" in err and "Traceback" not in err


def test_pareto_of_missing_study(capsys, studies):
    code, _, err = run_cli(["pareto", "--study", "ghost", "--studies-dir", str(studies)], capsys)
    assert code == 2 and "study 'ghost' not found" in err


def test_nan_proxy_fails_the_trial_and_search_goes_on(capsys, studies):
    code, out, err = run_cli(["search", "--model", f"{TINY}:nan_model", "--data", f"{TINY}:calib", "--budget", "40%",
                              "--trials", "3", "--studies-dir", str(studies), "--json"], capsys)
    assert code == 2 and "not finite" in err  # the original model itself is broken: refused up front


def test_help_is_light():
    code = ("import sys, autocomp.cli; "
            "bad = [m for m in ('torch', 'optuna', 'transformers') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "autocomp.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "search" in res.stdout
    assert time.time() - t0 < 10  # generous: the point is no torch import (which alone takes seconds cold)


def test_no_repair_never_evaluates_over_budget_plans(capsys, studies):
    code, out, err = search(capsys, studies, "--no-repair", "--sampler", "random", trials=16, budget="25%")
    assert code == 0, err
    trials = load(studies).trials
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 16 and pruned, "a random sampler at 25% should propose over-budget plans"
    budget = json.loads(out)["budget_bytes"]
    for t in pruned:
        assert t.user_attrs["size_bytes"] > budget and "plan" not in t.user_attrs  # over budget, not staged
        assert t.constraints["size"] > 0
    for t in complete:
        assert t.values[1] <= budget and t.constraints["size"] <= 0


def test_budget_above_model_size_warns_and_searches(capsys, studies):
    code, out, err = search(capsys, studies, trials=4, budget="1GB")
    assert code == 0 and "above the model's fp32 size" in err
    result = json.loads(out)
    assert result["budget_bytes"] == 10**9 and result["pareto"]


def test_default_study_names_follow_the_command():
    from autocomp.engine import default_study_name as name

    assert name("minilm", "30MB") == "minilm-30MB"
    assert name("hf:/models/bert/", "25%") == "hf-bert-25pct"
    assert name("src/m.py:build", "1GB") == "m-build-1GB"
    assert name("minilm", "30MB", hardware="cpu-local", objectives="proxy,latency", latency="40ms") == \
        "minilm-30MB-cpu-local-proxy-latency-40ms"
    assert name("minilm", "30MB", hardware="hw/x.yaml") != name("minilm", "30MB")
