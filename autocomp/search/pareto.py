"""Pareto extraction for minimization: O(n log n) for two objectives, a plain scan otherwise."""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["pareto_front", "knee_index", "hypervolume", "feasible"]


def feasible(trial: Any) -> bool:
    """Whether an Optuna trial met every constraint the engine set on it (``size``, ``latency``, ...)."""
    return all(c <= 0 for c in trial.constraints.values())


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points (all objectives minimized), ordered by the first objective.

    Of identical points, the first one is kept. ``p`` dominates ``q`` when ``p <= q`` everywhere and
    ``p < q`` somewhere.
    """
    order = sorted(range(len(points)), key=lambda i: (tuple(points[i]), i))
    if points and len(points[0]) == 2:
        front, best = [], float("inf")
        for i in order:
            if points[i][1] < best:
                front.append(i)
                best = points[i][1]
        return front
    front = []
    for i in order:
        p = points[i]
        if not any(all(a <= b for a, b in zip(points[j], p)) for j in front):
            front.append(i)
    return front


def knee_index(points: Sequence[Sequence[float]]) -> int:
    """The front point farthest from the line through its two ends, both axes scaled to [0, 1].

    ``points`` is a 2-objective front sorted by the first objective.
    """
    if len(points) <= 2:
        return 0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    norm = [((x - min(xs)) / span_x, (y - min(ys)) / span_y) for x, y in zip(xs, ys)]
    (x0, y0), (x1, y1) = norm[0], norm[-1]
    dist = [abs((y1 - y0) * x - (x1 - x0) * y + x1 * y0 - y1 * x0) for x, y in norm]
    return max(range(len(points)), key=lambda i: dist[i])


def hypervolume(points: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Area dominated by 2-objective ``points`` (both minimized) and bounded by the reference point."""
    pts = sorted((p[0], p[1]) for p in points if p[0] < ref[0] and p[1] < ref[1])
    hv, best = 0.0, ref[1]
    for i, (x, y) in enumerate(pts):
        best = min(best, y)
        nxt = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
        hv += (nxt - x) * (ref[1] - best)
    return hv
