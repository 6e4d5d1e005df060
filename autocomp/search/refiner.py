"""An evolutionary refiner: mutate plans of the current Pareto front (EvoPress-style level switches).

Each proposal copies the parameters of a front plan (the lowest-proxy one half of the time, otherwise one
drawn uniformly from the front) and makes 1-3 level switches: one choice moves one option towards more
compression and another one option towards less, so the size stays near the parent's; the engine's
repair then moves it back under the budget if needed. Options are listed least- to most-compressed in
the search spaces, which is what "one option towards" relies on. Until two front plans exist, proposals
come from the fallback sampler (random).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial, TrialState

from autocomp.search.pareto import feasible, pareto_front

__all__ = ["FrontRefiner"]


class FrontRefiner(BaseSampler):
    def __init__(self, seed: int | None = None, max_switches: int = 3) -> None:
        self._rng = np.random.RandomState(seed)
        self._fallback = RandomSampler(seed=seed)
        self._max_switches = max_switches
        # the parameters every complete trial has, with the same distribution: folded in once per trial (over
        # every finished trial it cost 70 ms a trial at 100 MiniLM trials; Optuna's incremental version deep-
        # copies the 121 distributions on every call, 3-4 ms)
        self._common: dict[str, BaseDistribution] | None = None
        self._folded: set[int] = set()

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._fallback.reseed_rng()

    def infer_relative_search_space(self, study: Any, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number in self._folded:
                continue
            self._folded.add(t.number)
            if self._common is None:
                self._common = dict(t.distributions)
            else:
                self._common = {n: d for n, d in self._common.items() if t.distributions.get(n) == d}
        return dict(sorted((self._common or {}).items()))

    def sample_relative(self, study: Any, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        names = [n for n, d in search_space.items() if isinstance(d, CategoricalDistribution) and len(d.choices) > 1]
        if not names:
            return {}
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values and feasible(t)]
        front = [done[i] for i in pareto_front([tuple(t.values) for t in done])]
        if len(front) < 2:
            return {}
        parent = min(front, key=lambda t: t.values[0]) if self._rng.rand() < 0.5 else front[self._rng.randint(len(front))]
        params = {n: parent.params[n] for n in search_space if n in parent.params}
        for _ in range(1 + self._rng.randint(self._max_switches)):
            up, down = self._rng.choice(len(names), size=2, replace=False)
            for name, step in ((names[up], 1), (names[down], -1)):
                choices = search_space[name].choices
                i = choices.index(params[name]) + step
                if 0 <= i < len(choices):
                    params[name] = choices[i]
        return params

    def sample_independent(self, study: Any, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)
