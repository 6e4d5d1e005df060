from __future__ import annotations

import random

import pytest

from autocomp.search.pareto import hypervolume, knee_index, pareto_front


def brute_force(points):
    def dominates(p, q):
        return all(a <= b for a, b in zip(p, q)) and any(a < b for a, b in zip(p, q))

    out = []
    for i, p in enumerate(points):
        if any(dominates(q, p) for q in points):
            continue
        if any(points[j] == p for j in out):  # keep the first of identical points
            continue
        out.append(i)
    return sorted(out, key=lambda i: (tuple(points[i]), i))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force(dims, seed):
    rng = random.Random(seed)
    n = rng.randint(0, 60)
    pts = [tuple(rng.randint(0, 8) for _ in range(dims)) for _ in range(n)]  # many ties
    assert pareto_front(pts) == brute_force(pts)


def test_knee():
    # a sharp elbow at (1, 1)
    assert knee_index([(0, 10), (1, 1), (5, 0.5), (10, 0)]) == 1
    assert knee_index([(0, 1)]) == 0


@pytest.mark.parametrize("seed", range(10))
def test_hypervolume_matches_a_grid_count(seed):
    rng = random.Random(seed)
    pts = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(rng.randint(0, 12))]
    ref = (10, 10)
    cells = sum(1 for x in range(10) for y in range(10) if any(px <= x and py <= y for px, py in pts))
    assert hypervolume(pts, ref) == cells
