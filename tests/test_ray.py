"""The Ray backend on a real local Ray runtime (started and shut down by the search itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY

pytest.importorskip("ray", reason="the Ray backend needs ray: pip install 'autocomp[distributed]'")


def _search(tmp_path, *extra, home=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path / "tmp"), "HOME": str(home or tmp_path / "home")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    (tmp_path / "home").mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "autocomp.cli", "search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib",
           "--budget", "40%", "--trials", "12", "--study", "S", "--studies-dir", str(tmp_path / "studies"), "--json",
           *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_ray_backend_contract_same_study_clean_shutdown(tmp_path):
    from pathlib import Path

    before = set(Path("/tmp").glob("acray-*"))
    r = _search(tmp_path, "--backend", "ray", "--workers", "2")
    assert r.returncode == 0, r.stderr
    ray_result = json.loads(r.stdout)
    assert ray_result["backend"] == "ray" and ray_result["trials_complete"] == 12
    local = _search(tmp_path, "--trials", "14")  # the same study, resumed by the local backend
    assert local.returncode == 0, local.stderr
    local_result = json.loads(local.stdout)
    assert set(ray_result) - {"backend"} == set(local_result)
    assert local_result["trials_complete"] == 14
    # Ray's files went to a temp folder that is gone, nothing under $HOME, and no Ray process is left
    assert not list((tmp_path / "tmp").glob("acray-*")) and set(Path("/tmp").glob("acray-*")) <= before
    assert not any((tmp_path / "home").iterdir())
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "tmp") not in ps


def test_unreachable_ray_address_is_one_line(tmp_path):
    r = _search(tmp_path, "--backend", "ray", "--address", "127.0.0.1:1")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "unreachable" in last and "--address" in last and "Traceback" not in r.stderr


def test_ray_workers_score_compensated_options_with_the_drivers_statistics(tmp_path):
    """The actors read the statistics the driver gathered (its cache file): the proxy they report for a plan
    with GPTQ options equals the one computed here with those statistics."""
    import torch

    from autocomp.compressors.calibration import CalibrationStats, attach, plan_needs
    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.models.introspect import introspect
    from autocomp.plan import Plan
    from conftest import tiny_loaded

    space = tmp_path / "comp.yaml"
    space.write_text("version: 1\nlayers:\n  - types: [Embedding]\n    quant: [keep, 4g16/mse]\n"
                     "  - types: [Linear]\n    quant: [keep, 3g16/gptq, 4g16]\n")
    r = _search(tmp_path, "--backend", "ray", "--workers", "1", "--space", str(space), "--seeds", "uniform")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    (cache,) = (tmp_path / "studies" / "calibration").glob("*.safetensors")
    entry = next(e for e in res["pareto"] if plan_needs(Plan.load(e["plan_path"])))
    loaded = tiny_loaded()
    attach(loaded.module, CalibrationStats.load(cache, cache.stem))
    with torch.no_grad():
        local = ProxyEvaluator(loaded, introspect(loaded))(Plan.load(entry["plan_path"]))
    assert abs(local - entry["proxy"]) <= 1e-6 * max(1.0, abs(local))
