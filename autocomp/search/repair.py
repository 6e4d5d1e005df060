"""Budget repair: move an over-budget assignment onto the budgets instead of discarding it.

Greedy: repeatedly take the single one-notch step (one parameter to its next cheaper option) that most
reduces the violated budgets (each counted relative to its limit), until every budget holds. Budgets are
additive over layers (bytes, latency, BitOps), so a step is scored from the layers it touches only.
Deterministic, so the objective the sampler sees is a function of its own proposal. (Sensitivity-guided
repair replaces this heuristic in a later issue.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from autocomp.space import SearchSpace

__all__ = ["Limit", "repair", "size_limit", "modality_size_limit"]


@dataclass(frozen=True)
class Limit:
    """A budget on a cost that is a constant plus a sum over layers (plus structured-mask bytes)."""

    name: str
    layer_cost: Callable[[str, Mapping[str, str]], float]
    constant: float
    budget: float
    counts_masks: bool = False
    modality: str | None = None  # masks of this modality's groups only

    def masks(self, space: SearchSpace, a: Mapping[str, str]) -> float:
        return space.group_mask_bytes(a, self.modality) if self.counts_masks else 0

    def total(self, space: SearchSpace, a: Mapping[str, str]) -> float:
        t = self.constant + sum(self.layer_cost(layer.name, a) for layer in space.desc.layers)
        return t + self.masks(space, a)


def size_limit(space: SearchSpace, budget: int) -> Limit:
    return Limit("size", space.layer_bytes, space.desc.other_bytes, budget, counts_masks=True)


def modality_size_limit(space: SearchSpace, modality: str, budget: int) -> Limit:
    """Bytes of one modality's layers, masks and other parameters within ``budget``."""
    from autocomp.modality import other_bytes_by_modality

    by_name = space.desc.by_name
    cost = lambda n, a: space.layer_bytes(n, a) if by_name[n].modality == modality else 0  # noqa: E731
    return Limit(f"size:{modality}", cost, other_bytes_by_modality(space.desc).get(modality, 0), budget,
                 counts_masks=True, modality=modality)


def repair(space: SearchSpace, assignment: Mapping[str, str], limits: list[Limit],
           sensitivity: Mapping[str, Mapping[str, float]] | None = None) -> tuple[dict[str, str], dict[str, float]]:
    """-> (assignment within every limit where reachable, its totals per limit).

    With a ``sensitivity`` table (param -> option -> proxy increase), each step is instead the move with
    the most budget regained per unit of added sensitivity (free moves first), not the next notch."""
    a = dict(assignment)
    totals = {lim.name: lim.total(space, a) for lim in limits}
    layers_of = {p: space.param_layers(p) for p in space.params}
    users: dict[str, list[str]] = {}  # layer -> the parameters whose cost reads it
    for p, layers in layers_of.items():
        for n in layers:
            users.setdefault(n, []).append(p)
    keeps = [p for p in space.params if p.endswith(":keep")]
    # per parameter: option -> how each limit's total moves if only that parameter took that option. A
    # parameter's entry depends on the parameters sharing one of its layers (and, for the keep masks, on every
    # keep parameter), so a step recomputes only those: the same steps as a full rescan, far fewer costs.
    deltas: dict[str, dict[str, dict[str, float]]] = {}

    def option_deltas(p: str) -> dict[str, dict[str, float]]:
        layers, masks, current = layers_of[p], p.endswith(":keep"), a[p]
        before = {lim.name: sum(lim.layer_cost(n, a) for n in layers) + (lim.masks(space, a) if masks else 0)
                  for lim in limits}
        out = {}
        try:
            for opt in space.params[p]:
                if opt == current:
                    continue
                a[p] = opt
                out[opt] = {lim.name: sum(lim.layer_cost(n, a) for n in layers) + (lim.masks(space, a) if masks else 0)
                            - before[lim.name] for lim in limits}
        finally:
            a[p] = current
        return out

    def excess(t: Mapping[str, float]) -> float:  # summed relative overshoot; 0 = every budget holds
        return sum(max(0.0, t[lim.name] - lim.budget) / lim.budget for lim in limits)

    # a step is scored on the budgets it violates, and it must also lower the summed overshoot of *all*
    # budgets (one that saves latency but spends more bytes over the size budget is refused), so the loop
    # cannot cycle between two budgets and ends. Every (parameter, option) is one row of arrays, scored in
    # one pass per step (a Python scan of ~600 rows per step was 50 ms a repair on MiniLM), with the same
    # arithmetic per row, in the same order, as the scan it replaced: the same steps, bit for bit.
    import numpy as np

    params = list(space.params)
    options = [list(space.params[p]) for p in params]
    start = np.cumsum([0] + [len(o) for o in options])
    rows = int(start[-1])
    names = [lim.name for lim in limits]
    budget = np.array([lim.budget for lim in limits], dtype=float)
    moves = np.zeros((rows, len(limits)))  # each row: how each limit's total moves (the current option: 0)
    current = np.zeros(rows, dtype=bool)
    sens = None
    if sensitivity is not None:
        sens = np.array([sensitivity[p][o] for p, opts in zip(params, options) for o in opts], dtype=float)
    owner = np.repeat(np.arange(len(params)), [len(o) for o in options])
    while (now := excess(totals)) > 0:
        for i, p in enumerate(params):
            if p not in deltas:  # new, or stale after the last step
                d = deltas[p] = option_deltas(p)
                moves[start[i]:start[i + 1]] = [[d[o][n] for n in names] if o in d else [0.0] * len(names)
                                                for o in options[i]]
                current[start[i]:start[i + 1]] = [o == a[p] for o in options[i]]
        t = np.array([totals[n] for n in names], dtype=float)
        moved = t + moves
        gain = 0  # as sum(): 0 + the first term is that term exactly
        for j, lim in enumerate(limits):
            if totals[lim.name] > lim.budget:
                gain = gain + (t[j] - moved[:, j]) / budget[j]
        over = 0
        for j in range(len(limits)):
            over = over + np.maximum(0.0, moved[:, j] - budget[j]) / budget[j]
        ok = (np.asarray(gain) > 0) & (over < now - 1e-12) & ~current
        if not ok.any():
            break
        if sens is not None:
            now_sens = np.array([sensitivity[p][a[p]] for p in params], dtype=float)[owner]
            score = np.where(ok, gain / (np.maximum(0.0, sens - now_sens) + 1e-9), -np.inf)
            row = int(np.argmax(score))  # the first of the best: as the scan, parameter by parameter
        else:  # per parameter the next notch (the smallest gain), then the parameter whose notch gains most
            g = np.where(ok, gain, np.inf)
            least = np.minimum.reduceat(g, start[:-1])
            least = np.where(np.isfinite(least), least, -np.inf)
            i = int(np.argmax(least))
            row = int(start[i] + np.argmax(g[start[i]:start[i + 1]] == least[i]))
        i = int(owner[row])
        p = params[i]
        a[p] = options[i][row - start[i]]
        stale = {q for n in layers_of[p] for q in users[n]}
        if p.endswith(":keep"):
            stale.update(keeps)
        for q in stale:
            deltas.pop(q, None)
        totals = {lim.name: lim.total(space, a) for lim in limits}
    return a, totals
