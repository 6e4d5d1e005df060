"""Sensitivity database and additive seeds.

For every searched choice (each tie key's quantization, pruning and rank options, and each structured
group's keep options), the proxy increase it causes on its own, with everything else uncompressed.
Profiling costs one proxy evaluation per (choice, option), so it grows linearly in layers x options; it may
use a smaller calibration slice. Results are cached on disk under ``studies/sensitivity/`` keyed by a
content hash of the model weights, the calibration data, the space's options and the evaluator's metric,
so studies and resumes reuse them and a changed model or data invalidates them.

The additive model (total proxy ~ sum of sensitivities) then gives seeds: minimize summed sensitivity
subject to the size budget, solved exactly as a multiple-choice knapsack with scipy's MILP (HiGHS), one
binary variable per (tie key, option combination).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from autocomp.plan import atomic_write_text
from autocomp.space import SearchSpace

__all__ = ["Sensitivity", "profile", "ilp_assignment", "weights_hash"]


def weights_hash(model: Any) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _neutral(space: SearchSpace) -> dict[str, str]:
    """Every choice at its uncompressed option (keep, none, full rank, all units)."""
    out = {}
    for p, opts in space.params.items():
        dim = p.rpartition(":")[2]
        if dim == "keep":
            g = space.groups[p.rpartition(":")[0]]
            out[p] = max(opts, key=lambda lab: g.keeps[lab])
        else:
            want = {"q": "keep", "p": "none", "r": "full"}[dim]
            out[p] = want if want in opts else opts[0]
    return out


class Sensitivity:
    """``table[param][option]`` = proxy increase of that option alone (0 for the neutral option)."""

    def __init__(self, table: dict[str, dict[str, float]], base: float, seconds: float, evals: int) -> None:
        self.table = table
        self.base = base
        self.seconds = seconds
        self.evals = evals

    def of(self, assignment: dict[str, str]) -> float:
        return sum(self.table.get(p, {}).get(o, 0.0) for p, o in assignment.items())

    def to_dict(self) -> dict[str, Any]:
        return {"_type": "autocomp.Sensitivity", "_version": 1, "table": self.table, "base": self.base,
                "seconds": self.seconds, "evals": self.evals}


def profile(space: SearchSpace, evaluate: Callable[[Any], float], cache_dir: Path, key_parts: dict[str, Any],
            log: Callable[[str], None] = lambda s: None) -> Sensitivity:
    """Measure (or load from the cache) the sensitivity of every option of every choice."""
    key = hashlib.sha256(json.dumps({**key_parts, "params": space.params}, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir / f"{key}.json"
    if path.is_file():
        d = json.loads(path.read_text())
        if d.get("_type") == "autocomp.Sensitivity" and d.get("_version") == 1:
            log(f"sensitivity database: cached ({path})")
            return Sensitivity(d["table"], d["base"], d["seconds"], d["evals"])
    neutral = _neutral(space)
    t0 = time.perf_counter()
    base = evaluate(space.decode(neutral))
    table: dict[str, dict[str, float]] = {}
    evals = 1
    total = sum(len(o) - 1 for o in space.params.values())
    for p, opts in space.params.items():
        row = {}
        for o in opts:
            if o == neutral[p]:
                row[o] = 0.0
                continue
            value = evaluate(space.decode({**neutral, p: o}))
            row[o] = max(0.0, value - base) if value == value else float("inf")
            evals += 1
        table[p] = row
        if evals % 50 == 0:
            log(f"sensitivity: {evals}/{total} options profiled")
    sens = Sensitivity(table, base, time.perf_counter() - t0, evals)
    atomic_write_text(path, json.dumps(sens.to_dict()))
    log(f"sensitivity database: {evals} evaluations in {sens.seconds:.1f} s -> {path}")
    return sens


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr for the duration (catches output of C libraries too)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def ilp_assignment(space: SearchSpace, sens: Sensitivity, budget: int) -> dict[str, str] | None:
    """Minimize summed sensitivity subject to size <= budget (structured groups kept whole).

    Exact for the additive model: per tie key every combination of its options is one binary variable.
    Returns None when no combination fits.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    base = _neutral(space)
    fixed_bytes = space.desc.other_bytes + sum(
        space.layer_bytes(layer.name, base) for layer in space.desc.layers if layer.name not in space.layer_keys)
    columns: list[tuple[str, dict[str, str], float, float]] = []  # key, choice, bytes, sensitivity
    for key, members in space.members.items():
        dims = [f"{key}:{d}" for d in "qpr" if f"{key}:{d}" in space.params]
        for combo in itertools.product(*(space.params[d] for d in dims)):
            choice = dict(zip(dims, combo))
            a = {**base, **choice}
            nbytes = sum(space.layer_bytes(n, a) for n in members)
            cost = sum(sens.table[d][o] for d, o in choice.items())
            if np.isfinite(cost):
                columns.append((key, choice, float(nbytes), float(cost)))
    keys = list(space.members)
    if not columns:
        return None
    n = len(columns)
    c = np.array([col[3] for col in columns])
    one_per_key = np.zeros((len(keys), n))
    for j, col in enumerate(columns):
        one_per_key[keys.index(col[0]), j] = 1.0
    size_row = np.array([[col[2] for col in columns]])
    with _stdout_to_stderr():  # HiGHS prints progress from C; stdout is reserved for --json results
        res = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1), options={"disp": False},
                   constraints=[LinearConstraint(one_per_key, 1, 1),
                                LinearConstraint(size_row, -np.inf, budget - fixed_bytes)])
    if res.status != 0 or res.x is None:
        return None
    out = dict(base)
    for j in np.flatnonzero(res.x > 0.5):
        out.update(columns[j][1])
    return out
