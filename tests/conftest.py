from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
TINY = f"{TESTS / 'tiny_models.py'}"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(TESTS))

# A test run started as a background job (`make test &`, some CI runners) inherits SIGINT *ignored*, and so
# would every CLI child the interrupt tests start: Python then installs no KeyboardInterrupt handler and the
# child rightly keeps running, as `nohup` users want. Those tests stand for a user pressing Ctrl-C in a
# terminal, so give this process (and, through exec, its children) the default disposition back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
