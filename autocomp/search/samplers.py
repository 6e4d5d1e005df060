"""Optuna samplers by name. All of them read the size constraint that the engine sets on every trial."""

from __future__ import annotations

from typing import Any

from autocomp.errors import AutocompError

__all__ = ["SAMPLERS", "make_sampler"]

SAMPLERS = ("tpe", "nsga2", "random", "refine")


def make_sampler(name: str, seed: int | None, n_startup: int = 10) -> Any:
    import optuna

    if name == "tpe":
        # multivariate + group: the per-layer choices interact (they share one size budget)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=n_startup, constant_liar=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, n_startup))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "refine":
        from autocomp.search.refiner import FrontRefiner

        return FrontRefiner(seed=seed)
    raise AutocompError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
