"""What the weight store (``--weights-cache``, ``studies/weights/``) costs a first search and saves the next one.

Each round, in a random order:

- ``first``: a fresh studies folder, ``search --budget FIRST`` with the store (what it writes, and its cost:
  against ``first_off``, the same search in another fresh folder with ``--weights-cache 0``);
- ``second``: the same folder, ``search --budget SECOND`` (a new study of the same model: its options are
  read back);
- ``second_off``: a folder with ``first``'s sensitivity database and calibration statistics but no stored
  weights, the same ``SECOND`` search with ``--weights-cache 0`` (everything else equally warm).

Wall seconds are the command's (model load to written front); trials/s is the study's span from its first
trial's start to its last trial's end. Values must be equal with and without the store (checked).

    .venv/bin/python benchmarks/bench_store.py --space compensated --first 10% --second 12%
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def search(folder: Path, budget: str, args: argparse.Namespace, *extra: str) -> dict:
    name = f"s{budget.rstrip('%')}"
    cmd = [sys.executable, "-m", "autocomp.cli", "search", "--model", args.model, "--budget", budget,
           "--trials", str(args.trials), "--space", args.space, "--studies-dir", str(folder), "--study", name,
           "--json", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(p.stderr[-2000:])
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/{name}.db")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    store = folder / "weights"
    files = list(store.glob("*.safetensors")) if store.is_dir() else []
    return {"wall_seconds": round(wall, 1), "trials_per_second": round(len(done) / span, 2),
            "store_files": len(files), "store_mb": round(sum(f.stat().st_size for f in files) / 1e6, 1),
            "values": [t.values for t in done]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--space", default="default")
    ap.add_argument("--first", default="10%")
    ap.add_argument("--second", default="15%")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    rows = []
    for _ in range(args.rounds):
        tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
        x, y, z = tmp / "x", tmp / "y", tmp / "z"
        r: dict = {}
        for part in random.sample(["first", "first_off"], 2):
            r[part] = search(x, args.first, args) if part == "first" else \
                search(y, args.first, args, "--weights-cache", "0")
        z.mkdir()
        for sub in ("sensitivity", "calibration"):
            if (x / sub).is_dir():
                shutil.copytree(x / sub, z / sub)
        for part in random.sample(["second", "second_off"], 2):
            r[part] = search(x, args.second, args) if part == "second" else \
                search(z, args.second, args, "--weights-cache", "0")
        assert r["first"]["values"] == r["first_off"]["values"], "the store changed a first search's values"
        assert r["second"]["values"] == r["second_off"]["values"], "the store changed a second search's values"
        for v in r.values():
            v.pop("values")
        r["first_cost"] = round(r["first"]["wall_seconds"] / r["first_off"]["wall_seconds"], 3)
        r["second_speedup"] = round(r["second_off"]["wall_seconds"] / r["second"]["wall_seconds"], 3)
        rows.append(r)
        print(json.dumps(r), flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"space": args.space, "first": args.first, "second": args.second, "trials": args.trials,
                      "rounds": rows}))


if __name__ == "__main__":
    main()
