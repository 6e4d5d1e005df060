"""Real English text made offline at run time: sentences from the installed Python standard library's
docstrings (nothing downloaded, nothing copied into the repository).

The sentence list is deterministic for a given Python installation; calibration and training slices are
disjoint (``split="calibration"`` takes the first part of a fixed shuffle, ``split="train"`` the rest).

Parsing the ~3 MB of source takes 2-3 s, which every command on the built-in text model would pay, so the
list is cached as JSON under ``$AUTOCOMP_CACHE`` (default ``~/.cache/autocomp``, as the digits model's
weights), keyed by the Python version and the bytes of every parsed file and of this module: any change to
them is a miss and the list is parsed again. An unwritable folder or a damaged file only costs the parse.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import random
import re
import sys
import sysconfig
from pathlib import Path
from typing import Any

from autocomp.errors import AutocompError
from autocomp.files import atomic_write_text, cache_dir

__all__ = ["sentences", "calibration_sentences", "tokenize_batches"]

# Modules with long, well-written prose docstrings. Missing files are skipped.
CALIBRATION_MODULES = (
    "argparse", "asyncio/events", "asyncio/tasks", "base64", "bisect", "calendar", "collections/__init__",
    "concurrent/futures/_base", "configparser", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email/message", "enum", "fractions", "ftplib", "functools", "gettext", "glob", "gzip",
    "heapq", "http/client", "http/server", "imaplib", "inspect", "ipaddress", "json/__init__",
    "logging/__init__", "mailbox", "multiprocessing/pool", "nntplib", "optparse", "os", "pathlib",
    "pickle", "pprint", "queue", "random", "shutil", "smtplib", "socket", "socketserver", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "turtle",
    "typing", "unittest/case", "urllib/parse", "urllib/request", "uuid", "warnings", "zipfile/__init__",
    "zipfile",
)
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_GOOD = re.compile(r"^[A-Z][A-Za-z ,;:'()\-]+[a-z][.!?]$")


def _sources() -> list[bytes]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for mod in CALIBRATION_MODULES:
        path = root / f"{mod}.py"
        if path.is_file():
            out.append(path.read_bytes())
    return out


@functools.lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """All usable sentences, deduplicated, in a fixed shuffled order (cached on disk, see the module doc)."""
    sources = _sources()
    h = hashlib.sha256(sys.version.encode())
    for src in (Path(__file__).read_bytes(), *sources):
        h.update(len(src).to_bytes(8, "little"))
        h.update(src)
    path = cache_dir() / f"sentences-{h.hexdigest()[:24]}.json"
    try:
        got = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(got, list) and got and all(isinstance(s, str) for s in got):
            return tuple(got)
    except (OSError, ValueError):
        pass
    out = _parse(sources)
    try:
        atomic_write_text(path, json.dumps(list(out)))
    except (OSError, AutocompError):
        pass  # a read-only home: parse again next time
    return out


def _parse(sources: list[bytes]) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for raw in sources:
        try:
            tree = ast.parse(raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                for para in re.split(r"\n\s*\n", doc):
                    text = " ".join(para.split())
                    for s in _SPLIT.split(text):
                        if 40 <= len(s) <= 160 and _GOOD.match(s) and len(s.split()) >= 7:
                            found.setdefault(s, None)
    out = list(found)
    random.Random(20261122).shuffle(out)
    return tuple(out)


def calibration_sentences(n: int = 32, split: str = "calibration") -> list[str]:
    """The first ``n`` sentences for calibration, or (``split="train"``) every sentence after the
    calibration pool of 512, so training text never overlaps calibration text."""
    all_s = sentences()
    if split == "calibration":
        return list(all_s[: min(n, 512)])
    if split == "train":
        return list(all_s[512:])
    raise ValueError(f"split must be 'calibration' or 'train', got {split!r}")


def tokenize_batches(tokenizer: Any, texts: list[str], max_length: int = 32, batch_size: int = 16) -> list[dict[str, Any]]:
    """Tokenize into batches of similar length (little padding), in a deterministic order."""
    lengths = [len(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[start:start + batch_size]]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batches.append(dict(enc))
    return batches
