"""Bad input and faults through the CLI: exit 2, one ``error:`` line naming the problem and the fix, no
traceback, and nothing created or changed on disk (listing and hashes compared before and after).

Part 1: the cases a new user and a fault run hit (issue #13). Part 2: a generated suite in the style of
scikit-learn's ``check_param_validation``: every search setting with a declared type or range in
:data:`autocomp.search.config.SETTINGS` (plus the free-form flags) fed out-of-range, wrong-type and extreme
values (inf, nan, 1e999, negative, empty, unicode).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from autocomp.search.config import SETTINGS
from conftest import TINY, run_cli

TINY_ARGS = ["--model", f"{TINY}:tiny", "--data", f"{TINY}:calib"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a hash of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def refused(capsys, args: list[str], fragment: str, root: Path) -> str:
    before = snapshot(root)
    code, out, err = run_cli(args, capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code == 2, (code, err)
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err and out == ""
    assert snapshot(root) == before, "a refused command changed files"
    return lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """A finished 6-trial study of the tiny model, its best plan and that plan's export."""
    root = tmp_path_factory.mktemp("study")
    from autocomp.cli import main

    assert main(["search", *TINY_ARGS, "--budget", "40%", "--trials", "6", "--study", "s", "--studies-dir",
                 str(root / "studies")]) == 0
    assert main(["plan", "--study", "s", "--studies-dir", str(root / "studies"), "--out", str(root / "best.json")]) == 0
    assert main(["plan", "--study", "s", "--studies-dir", str(root / "studies"), "--pick", "smallest", "--out",
                 str(root / "small.json")]) == 0
    assert main(["export", "--plan", str(root / "small.json"), "--data", f"{TINY}:calib", "--out",
                 str(root / "small.acz.safetensors"), "--studies-dir", str(root / "studies")]) == 0
    return root


# -- part 1: what a new user and a fault run hit ------------------------------------------------------------------
@pytest.mark.parametrize("args,fragment", [
    (["--budget", "1e999MB"], "not a finite size"),
    (["--budget", "1e30GB"], "larger than any model"),
    (["--budget", "40%", "--trials", "abc"], "'abc' is not a valid integer"),
    (["--budget", "40%", "--sampler", "zzz"], "'zzz' is not one of"),
    (["--budget", "40%", "--space", "nospace"], "search space 'nospace' not found"),
    (["--budget", "40%", "--storage", "sqlite:////nonexistent/dir/x.db"], "does not exist"),
])
def test_refused_search_writes_nothing(capsys, work, args, fragment):
    refused(capsys, ["search", *TINY_ARGS, *args, "--studies-dir", str(work / "studies")], fragment, work)
    assert not (work / "studies").exists()  # not even the folder


def test_a_file_that_is_not_a_study_database(capsys, work):
    (work / "studies").mkdir()
    (work / "studies" / "empty.db").write_bytes(b"")
    (work / "studies" / "junk.db").write_bytes(b"not sqlite at all")
    refused(capsys, ["pareto", "--study", "empty", "--studies-dir", "studies"], "not a study database", work)
    refused(capsys, ["search", *TINY_ARGS, "--budget", "40%", "--study", "junk", "--studies-dir", "studies"],
            "not a study database; move it away", work)
    code, out, _ = run_cli(["studies", "--studies-dir", "studies", "--json"], capsys)
    assert code == 0 and json.loads(out) == [] and (work / "studies" / "empty.db").stat().st_size == 0


def test_read_commands_change_no_study(capsys, tiny_study):
    db = tiny_study / "studies" / "s.db"
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    for args in (["pareto", "--study", "s"], ["studies"]):
        code, _, err = run_cli([*args, "--studies-dir", str(tiny_study / "studies")], capsys)
        assert code == 0, err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("make_out,fragment", [
    (lambda w: w, "is a folder"),
    (lambda w: (w / "afile").write_text("x") and w / "afile" / "p.json", "which is a file, not a folder"),
])
@pytest.mark.parametrize("command", ["plan", "export", "train"])
def test_unwritable_out_is_refused_before_the_work(capsys, work, tiny_study, make_out, fragment, command):
    out = make_out(work)
    args = {"plan": ["plan", "--study", "s", "--studies-dir", str(tiny_study / "studies")],
            "export": ["export", "--plan", str(tiny_study / "best.json"), "--data", f"{TINY}:calib"],
            "train": ["train", "--plan", str(tiny_study / "best.json"), "--data", f"{TINY}:train_data", "--steps", "2"]}
    refused(capsys, [*args[command], "--out", str(out)], fragment, work)


@pytest.mark.parametrize("flag,value,fragment", [
    ("--lr", "-1", "--lr must be a positive number"), ("--lr", "nan", "--lr must be a positive number"),
    ("--temperature", "0", "--temperature must be a positive number"),
    ("--checkpoint-every", "-3", "--checkpoint-every must be >= 0"), ("--steps", "0", "--steps must be >= 1"),
])
def test_bad_training_settings(capsys, work, tiny_study, flag, value, fragment):
    refused(capsys, ["train", "--plan", str(tiny_study / "best.json"), "--data", f"{TINY}:train_data", "--out",
                     str(work / "t.safetensors"), flag, value], fragment, work)


@pytest.mark.parametrize("layer,fragment", [
    ({"quantize": {"bits": "eight"}}, "bits must be an integer in 2..16"),
    ({"quantize": {"bits": 1}}, "bits must be an integer in 2..16"),
    ({"quantize": {"bits": 4, "colour": "red"}}, "layer 'fc1': quantize has no field 'colour'; allowed: bits"),
    ({"prune": {"kind": "unstructured", "sparsity": 1.5}}, "sparsity must be in (0, 1)"),
])
def test_bad_plan_files(capsys, work, tiny_study, layer, fragment):
    d = json.loads((tiny_study / "best.json").read_text())
    d["layers"]["fc1"] = layer
    (work / "bad.json").write_text(json.dumps(d))
    refused(capsys, ["score", "--plan", "bad.json", "--data", f"{TINY}:calib"], fragment, work)


def test_evaluate_refuses_an_export_of_another_plan_and_names_a_failing_task(capsys, work, tiny_study):
    refused(capsys, ["evaluate", "--plan", str(tiny_study / "best.json"), "--weights",
                     str(tiny_study / "small.acz.safetensors"), "--data", f"{TINY}:calib", "--task",
                     f"{TINY}:agreement"], "exported from another plan", work)
    (work / "tasks.py").write_text("def boom(model):\n    raise RuntimeError('no labels here')\n"
                                   "def two(model, extra):\n    return 1.0\n")
    for fn, fragment in (("boom", "RuntimeError: no labels here"), ("two", "missing 1 required positional")):
        line = refused(capsys, ["evaluate", "--plan", str(tiny_study / "best.json"), "--data", f"{TINY}:calib",
                                "--task", f"tasks.py:{fn}"], fragment, work)
        assert "called as fn(model)" in line
    # an export names its model and data, so it is scored without --plan or --model
    code, out, err = run_cli(["evaluate", "--weights", str(tiny_study / "small.acz.safetensors"), "--task",
                              f"{TINY}:agreement", "--json"], capsys)
    assert code == 0 and 0 <= json.loads(out)["value"] <= 1, err


def test_a_checkpoint_without_its_plan_says_so(capsys, work, tiny_study):
    code, _, err = run_cli(["train", "--plan", str(tiny_study / "best.json"), "--data", f"{TINY}:train_data",
                            "--steps", "1", "--out", str(work / "t.safetensors")], capsys)
    assert code == 0, err
    refused(capsys, ["evaluate", "--weights", str(work / "t.safetensors"), "--model", f"{TINY}:tiny"],
            "pass the --plan it was trained with", work)


def test_nan_in_calibration_inputs_is_named(capsys, work):
    (work / "nan.py").write_text("import torch\ndef data():\n    x = torch.randn(4, 3, 8, 8)\n    x[0, 0, 0, 0] = "
                                 "float('nan')\n    return [x]\n")
    refused(capsys, ["search", "--model", f"{TINY}:tiny_conv", "--data", "nan.py:data", "--budget", "50%",
                     "--studies-dir", str(work / "studies")], "holds NaN or inf in its input", work)


def test_yaml_errors_name_line_and_column(capsys, work):
    (work / "bad.yaml").write_text("version: 1\nlayers:\n  - quant: [keep, 8c\n    prune: [none]\n")
    refused(capsys, ["search", *TINY_ARGS, "--budget", "40%", "--space", "bad.yaml", "--studies-dir",
                     str(work / "studies")], "at line 4, column", work)


def test_budget_above_the_model_is_one_rule(capsys, work):
    for budget in ("150%", "1MB"):  # the tiny model is 31 KB
        code, _, err = run_cli(["search", *TINY_ARGS, "--budget", budget, "--trials", "2", "--studies-dir",
                                str(work / "studies")], capsys)
        assert code == 0 and "above the model's fp32 size" in err, err


def test_studies_folder_that_is_a_file(capsys, work):
    (work / "notafolder").write_text("x")
    refused(capsys, ["studies", "--studies-dir", "notafolder"], "cannot be read", work)


def test_export_mode_and_stale_temp_files(capsys, work, tiny_study):
    target = work / "m.acz.safetensors"
    stale = work / ".m.acz.safetensors.999999999.abcd.tmp"  # left by a killed export (no such process)
    live = work / f".m.acz.safetensors.{os.getpid()}.efgh.tmp"  # a running writer's: kept
    stale.write_bytes(b"x" * 100)
    live.write_bytes(b"x")
    code, _, err = run_cli(["export", "--plan", str(tiny_study / "best.json"), "--data", f"{TINY}:calib", "--out",
                            str(target)], capsys)
    assert code == 0, err
    assert not stale.exists() and live.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # like plans, not mkstemp's 0600


def test_a_retried_seed_keeps_its_label(tmp_path):
    import optuna

    from autocomp.search.study import recover_stale

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    study.enqueue_trial({"x": 1.0}, user_attrs={"reference": "uniform-8c"})
    t = study.ask()
    t.suggest_float("x", 0, 2)
    assert recover_stale(study) == 1  # a killed process left it RUNNING
    retry = [x for x in study.trials if x.state == optuna.trial.TrialState.WAITING]
    assert retry and retry[0].user_attrs == {"retry_of": t.number, "reference": "uniform-8c"}


def test_plain_progress_lines_without_a_terminal():
    import io

    from rich.console import Console

    from autocomp.cli.search import _SearchProgress

    buf = io.StringIO()
    p = _SearchProgress(Console(file=buf, force_terminal=False, width=120))
    p.PLAIN_EVERY_S = 0.0
    p.event("start", {"study": "s", "storage": "x", "budget_bytes": 10, "fp32_bytes": 100, "smallest_bytes": 5,
                      "params": 3, "done": 0, "total": 3, "front": []})
    for i in range(1, 4):
        p.event("trial", {"done": i, "total": 3, "front": [(0.5 / i, 9)]})
    lines = buf.getvalue().splitlines()
    assert lines[-1].startswith("trials 3/3: best proxy 0.1667") and len(lines) == 5


def test_search_help_shows_percent_signs(capsys):
    code, out, _ = run_cli(["search", "--help"], capsys)
    assert code == 0 and "text=70% " in out and "%%" not in out


# -- part 2: generated bad values for every declared setting ---------------------------------------------------------
EXTREMES = ["", "-1", "0", "1e999", "inf", "nan", "-inf", "ñ", "∞", "1.5", "9" * 30]


def _cases() -> list[tuple[str, str]]:
    flags = {s.flag: s for s in SETTINGS if s.field is not None}
    out = []
    for flag, s in flags.items():
        if s.choices is not None:
            out += [(flag, v) for v in ("zzz", "", "ñ", s.choices[0].upper() if s.choices[0].upper() != s.choices[0] else "X")]
        elif s.minimum is not None:
            out += [(flag, v) for v in (str(s.minimum - 1), "-1", "abc", "1.5", "1e999", "")]
    for flag in ("--budget", "--latency-budget", "--bitops-budget", "--workload", "--objectives", "--min-bits",
                 "--max-sparsity", "--budget-split"):
        out += [(flag, v) for v in EXTREMES]
    return out


CASES = _cases()


def test_the_generated_suite_covers_every_declared_setting():
    flags = {f for f, _ in CASES}
    assert {s.flag for s in SETTINGS if s.field is not None and (s.choices or s.minimum)} <= flags
    assert len(CASES) >= 120


@pytest.mark.parametrize("flag,value", CASES)
def test_generated_bad_values_are_one_line_and_write_nothing(capsys, work, flag, value):
    base = {"--budget": "40%"}
    extra = {"--latency-budget": ["--hardware", "x86-avx512-vnni"], "--workload": ["--hardware", "x86-avx512-vnni"]}
    args = ["search", *TINY_ARGS, "--trials", "1", "--studies-dir", str(work / "studies"), *extra.get(flag, [])]
    args += [*(x for k, v in base.items() if k != flag for x in (k, v)), flag, value]
    before = snapshot(work)
    code, out, err = run_cli(args, capsys)
    if code == 0:  # a value that is valid after all (e.g. "1.5" as a budget in bytes): it must have searched
        assert json.dumps(out) is not None and (work / "studies").is_dir()
        return
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (flag, value, err)
    assert snapshot(work) == before


def test_a_damaged_sensitivity_cache_is_a_cache_miss(capsys, work):
    args = ["search", *TINY_ARGS, "--budget", "40%", "--trials", "6", "--studies-dir", str(work / "studies")]
    code, _, err = run_cli([*args, "--study", "a"], capsys)
    assert code == 0, err
    caches = list((work / "studies" / "sensitivity").glob("*.json"))
    assert caches
    for c in caches:
        c.write_text('{"_type": "autocomp.Sensitivity", "_vers')  # torn
    code, _, err = run_cli([*args, "--study", "b"], capsys)
    assert code == 0, err
    assert all(json.loads(c.read_text())["_type"] == "autocomp.Sensitivity" for c in caches)  # recomputed


def test_device_yaml_errors_name_line_and_column(capsys, work):
    (work / "dev.yaml").write_text("name: x\npeak_ops: {fp32: [1,\n")
    refused(capsys, ["search", *TINY_ARGS, "--budget", "40%", "--hardware", "dev.yaml", "--studies-dir",
                     str(work / "studies")], "not valid YAML at line", work)


def test_a_database_that_fails_mid_search_is_one_line(capsys, work, monkeypatch):
    """A study database that fails under a running command (here: Optuna's wrapper of SQLAlchemy's error of
    a server that shut down) is one line naming it, with the password masked, and what was kept; other
    errors keep their traceback."""
    import optuna
    from sqlalchemy import exc

    import autocomp.search.engine

    def failing(cfg, on_event=None):
        try:
            try:
                raise RuntimeError("postgresql://u:secret@127.0.0.1:1/db: terminating connection due to "
                                   "administrator command")
            except RuntimeError as e:
                raise exc.OperationalError("SELECT 1", {}, e) from e
        except exc.OperationalError as e:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from e

    monkeypatch.setattr(autocomp.search.engine, "run_search", failing)
    code, out, err = run_cli(["search", *TINY_ARGS, "--budget", "40%", "--storage",
                              "postgresql://u:secret@127.0.0.1:1/db"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "database failed" in lines[0] and "administrator command" in lines[0] and "resume" in lines[0]
    assert "secret" not in err

    def broken(cfg, on_event=None):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(autocomp.search.engine, "run_search", broken)
    with pytest.raises(ZeroDivisionError):
        run_cli(["search", *TINY_ARGS, "--budget", "40%"], capsys)
