from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
TINY = f"{TESTS / 'tiny_models.py'}"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(TESTS))


@pytest.fixture
def studies(tmp_path: Path) -> Path:
    d = tmp_path / "studies"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def minilm():
    from autocomp.models import load_model

    return load_model("minilm")


@pytest.fixture(scope="session")
def minilm_desc(minilm):
    from autocomp.models.introspect import introspect

    return introspect(minilm)


def tiny_loaded(fn: str = "tiny", data: str = "calib"):
    from autocomp.models import load_model

    return load_model(f"{TINY}:{fn}", data=f"{TINY}:{data}")


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from autocomp.cli import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err
