"""Reports: the HTML file (checked in headless Chromium where installed), PNGs, `autocomp studies`, and a
study read by optuna-dashboard's server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest

from conftest import TINY
from test_multimodal import cli

pytest.importorskip("plotly", reason="reports need plotly and matplotlib: pip install 'autocomp[report]'")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from autocomp.cli import main

    d = tmp_path_factory.mktemp("studies")
    assert main(["search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib", "--budget", "40%", "--trials", "16",
                 "--study", "rep", "--studies-dir", str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def fid_study(study, tmp_path_factory):
    """A copy of the study with all three fidelity figures recorded by the commands that measure them."""
    from autocomp.cli import main

    d = tmp_path_factory.mktemp("fid")
    import sqlite3

    with sqlite3.connect(study / "rep.db") as src, sqlite3.connect(d / "rep.db") as dst:
        src.backup(dst)  # (a file copy would miss what is still in the WAL)
    common = ["--model", f"{TINY}:tiny", "--data", f"{TINY}:calib"]
    assert main(["plan", "--study", "rep", "--studies-dir", str(d), "--out", str(d / "p.json")]) == 0
    for name in ("a", "b", "a"):  # the plan names its study: export records itself there, one row per file
        assert main(["export", "--plan", str(d / "p.json"), *common, "--studies-dir", str(d),
                     "--out", str(d / f"{name}.acz.safetensors")]) == 0
    assert main(["evaluate", *common, "--task", f"{TINY}:agreement", "--random-plans", "3", "--budget", "40%",
                 "--study", "rep", "--studies-dir", str(d), "--json"]) == 0
    assert main(["hardware", "validate", *common, "--hardware", "x86-avx512-vnni", "--plans", "3", "--runs", "2",
                 "--study", "rep", "--studies-dir", str(d), "--json"]) == 0
    # ONNX Runtime: an export and a validation of the same study, drawn in panels of their own
    assert main(["export", "--plan", str(d / "p.json"), *common, "--studies-dir", str(d), "--format", "onnx",
                 "--out", str(d / "c.onnx")]) == 0
    assert main(["hardware", "calibrate", "--runtime", "ort", "--quick", *common, "--out", str(d / "ort.yaml")]) == 0
    assert main(["hardware", "validate", "--runtime", "ort", *common, "--hardware", str(d / "ort.yaml"), "--plans", "3",
                 "--runs", "2", "--study", "rep", "--studies-dir", str(d), "--json"]) == 0
    return d


def test_fidelity_figures_are_recorded_and_drawn(fid_study, tmp_path, capsys):
    from autocomp.fidelity import read

    fid = read(optuna.load_study(study_name="rep", storage=f"sqlite:///{fid_study}/rep.db"))
    assert set(fid) == {"latency", "latency_ort", "export", "metric"}
    assert sorted(os.path.basename(r["path"]) for r in fid["export"]) == ["a.acz.safetensors", "b.acz.safetensors",
                                                                          "c.onnx"]
    for r in fid["export"]:
        assert r.get("payload_bytes", r["predicted_bytes"]) == r["predicted_bytes"]
        assert r["file_bytes"] == os.path.getsize(r["path"]) and (r.get("format") == "onnx") == r["path"].endswith(".onnx")
    assert fid["latency_ort"]["hardware"] == "ort-cpu" and len(fid["latency_ort"]["rows"]) >= 3
    front = [r for r in fid["metric"]["rows"] if r["source"] != "random"]
    assert len(fid["metric"]["rows"]) == 3 + len(front) and front and all(r["source"].startswith("trial ") for r in front)
    assert len(fid["latency"]["rows"]) == 3 + len(front) and fid["latency"]["hardware"] == "x86-avx512-vnni"
    assert [r["source"] for r in fid["latency"]["rows"]] == ["random"] * 3 + [r["source"] for r in front]
    out = tmp_path / "f.html"
    code, _, err = cli(capsys, "report", "--study", "rep", "--studies-dir", fid_study, "--out", out)
    assert code == 0, err
    page = out.read_text()
    assert all(f'id="fig-fidelity-{k}"' in page for k in ("latency", "latency-ort", "bytes", "metric"))
    assert "Fidelity panels not drawn" not in page and "payload == prediction for 2 of 3" in page
    assert "latency in ONNX Runtime on ort-cpu" in page
    code, _, err = cli(capsys, "report", "--study", "rep", "--studies-dir", fid_study, "--format", "png",
                       "--out", tmp_path / "figs")
    assert code == 0, err
    assert {"fidelity-latency.png", "fidelity-latency-ort.png", "fidelity-bytes.png", "fidelity-metric.png"} <= {
        p.name for p in (tmp_path / "figs").glob("*.png")}


def test_fidelity_against_another_models_study_is_refused(fid_study, capsys):
    code, _, err = cli(capsys, "evaluate", "--model", f"{TINY}:tiny_conv", "--data", f"{TINY}:conv_calib", "--task",
                       f"{TINY}:agreement", "--random-plans", "3", "--budget", "40%", "--study", "rep",
                       "--studies-dir", fid_study)
    assert code == 2 and "was made for model" in err.strip().splitlines()[-1]
    code, _, err = cli(capsys, "hardware", "validate", "--study", "nope", "--studies-dir", fid_study)
    assert code == 2 and "not found" in err.strip().splitlines()[-1]


def test_html_report_is_self_contained(study, tmp_path, capsys):
    out = tmp_path / "r" / "report.html"
    code, _, err = cli(capsys, "report", "--study", "rep", "--studies-dir", study, "--out", out)
    assert code == 0, err
    page = out.read_text()
    from html.parser import HTMLParser

    class Fetches(HTMLParser):  # tags that would make a browser fetch something at view time
        found: list = []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if (tag == "script" and a.get("src")) or (tag == "link" and a.get("href")) or \
                    (tag in ("img", "iframe") and str(a.get("src", "")).startswith("http")):
                self.found.append((tag, a))

    parser = Fetches()
    parser.feed(page)
    assert parser.found == []  # self-contained: plotly.js is inlined
    for div in ("fig-pareto", "fig-plan-best", "fig-plan-knee", "fig-plan-smallest", "fig-sensitivity"):
        assert f'id="{div}"' in page, div
    assert "Pareto front" in page and "budget" in page and "plan table" in page
    assert "Fidelity panels not drawn" in page and "autocomp hardware validate --study rep" in page
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)


def test_png_report_and_studies_listing(study, tmp_path, capsys):
    code, _, err = cli(capsys, "report", "--study", "rep", "--studies-dir", study, "--format", "png", "--out", tmp_path / "figs")
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "figs").glob("*.png"))
    assert names == ["pareto.png", "plan-best.png", "plan-knee.png", "plan-smallest.png", "sensitivity.png"]
    assert all((tmp_path / "figs" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    code, out, err = cli(capsys, "studies", "--studies-dir", study, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["study"] for r in rows] == ["rep"] and rows[0]["trials_complete"] == 16 and rows[0]["best_proxy"] >= 0


def test_empty_unknown_and_unwritable(study, tmp_path, capsys):
    from autocomp.engine import ATTR

    url = f"sqlite:///{study}/rep.db"
    meta = optuna.load_study(study_name="rep", storage=url).user_attrs[ATTR]
    empty = optuna.create_study(study_name="empty", storage=f"sqlite:///{study}/empty.db",
                                directions=["minimize", "minimize"])
    empty.set_user_attr(ATTR, meta)  # an autocomp study whose search never finished a trial
    code, _, err = cli(capsys, "report", "--study", "empty", "--studies-dir", study, "--out", tmp_path / "e.html")
    assert code == 0 and "no finished trials" in err
    assert "no finished trials yet" in (tmp_path / "e.html").read_text()
    code, _, err = cli(capsys, "report", "--study", "nope", "--studies-dir", study, "--out", tmp_path / "n.html")
    assert code == 2 and "not found" in err.strip().splitlines()[-1]
    code, _, err = cli(capsys, "report", "--study", "rep", "--studies-dir", study, "--out", "/proc/nope/r.html")
    assert code == 2 and "cannot write" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_report_renders_in_headless_chromium(fid_study, tmp_path, capsys):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    out = tmp_path / "report.html"
    assert cli(capsys, "report", "--study", "rep", "--studies-dir", fid_study, "--out", out)[0] == 0
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'prof'}",
            "--virtual-time-budget=10000"]
    dom = subprocess.run([*base, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="main-svg"') >= 7, dom[:500]  # plotly drew the figures, fidelity panels too, into SVG
    import re

    assert re.search(r"<html[^>]*>", dom) and not re.search(r"<html[^>]*data-errors", dom)  # no script error
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,900", out.as_uri()], capture_output=True,
                   timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_optuna_dashboard_reads_our_study(study):
    pytest.importorskip("optuna_dashboard")
    url = f"sqlite:///{study}/rep.db"
    st = optuna.load_study(study_name="rep", storage=url)
    assert all("plan_summary" in t.user_attrs for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "optuna-dashboard")
    proc = subprocess.Popen([exe, url, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.loads(r.read())["study_summaries"]
                    break
            except OSError:
                assert time.time() - t0 < 60 and proc.poll() is None
                time.sleep(0.3)
        sid = next(s["study_id"] for s in studies if s["study_name"] == "rep")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{sid}?after=0", timeout=30) as r:
            assert r.status == 200
            body = r.read().decode()
        assert "plan_summary" in body
    finally:
        proc.terminate()
        proc.wait(timeout=30)
