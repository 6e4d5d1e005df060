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
