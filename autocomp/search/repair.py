"""Budget repair: move an over-budget assignment onto the budget instead of discarding it.

Greedy and size-only: repeatedly take the single one-notch step (one parameter to its next smaller
option) that saves the most bytes, until the plan fits. Deterministic, so the objective the sampler
sees is a function of its own proposal. (Sensitivity-guided repair replaces this in a later issue.)
"""

from __future__ import annotations

from typing import Mapping

from autocomp.space import SearchSpace

__all__ = ["repair"]


def repair(space: SearchSpace, assignment: Mapping[str, str], budget: int, current: int) -> tuple[dict[str, str], int]:
    """-> (assignment that fits, its bytes). Assumes the smallest assignment fits (checked up front)."""
    a = dict(assignment)
    size = current
    layer_bytes = {n: space.layer_bytes(n, a) for n in space.layer_keys}
    groups_bytes = _group_mask_bytes(space, a)
    while size > budget:
        best = None
        for p, opts in space.params.items():
            layers = space.param_layers(p)
            before = sum(layer_bytes.get(n) or space.layer_bytes(n, a) for n in layers)
            step = None
            for opt in opts:
                if opt == a[p]:
                    continue
                trial = {**a, p: opt}
                after = sum(space.layer_bytes(n, trial) for n in layers)
                if p.endswith(":keep"):
                    after += _group_mask_bytes(space, trial) - groups_bytes
                saved = before - after
                if saved > 0 and (step is None or saved < step[0]):
                    step = (saved, opt)  # the next notch: the smallest saving available
            if step is not None and (best is None or step[0] > best[0]):
                best = (step[0], p, step[1])
        if best is None:
            break
        saved, p, opt = best
        a[p] = opt
        size -= saved
        for n in space.param_layers(p):
            layer_bytes[n] = space.layer_bytes(n, a)
        groups_bytes = _group_mask_bytes(space, a)
    return a, size


def _group_mask_bytes(space: SearchSpace, a: Mapping[str, str]) -> int:
    return sum((g.units + 7) // 8 for g in space.structured_of(a).values() if g.keep < g.units)
