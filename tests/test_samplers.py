"""One conformance suite over every registered sampler: Optuna's own sampler test cases (the ones that apply to
a multi-objective categorical search), then each sampler driving a real autocomp search."""

from __future__ import annotations

import pytest
from optuna.testing.pytest_samplers import BasicSamplerTestCase, MultiObjectiveSamplerTestCase

from autocomp.search.samplers import SAMPLERS, make_sampler
from conftest import TINY


class _EverySampler:
    @pytest.fixture(params=SAMPLERS)
    def sampler(self, request):
        return lambda: make_sampler(request.param, seed=0)


class TestOptunaBasicCases(_EverySampler, BasicSamplerTestCase):
    """Optuna's single-objective cases: every distribution in range, NaN objectives, fixed params."""


class TestOptunaMultiObjectiveCases(_EverySampler, MultiObjectiveSamplerTestCase):
    """Optuna's multi-objective cases (autocomp's studies have 2-3 objectives)."""


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_drives_a_search_that_resumes(name, tmp_path):
    import optuna

    from autocomp.search.config import SearchConfig
    from autocomp.search.engine import run_search

    cfg = SearchConfig(budget="40%", model=f"{TINY}:tiny", data=f"{TINY}:calib", study=name, trials=14,
                       sampler=name, seeds="uniform", studies_dir=tmp_path)
    first = run_search(cfg)
    assert first["pareto"] and all(e["size_bytes"] <= first["budget_bytes"] for e in first["pareto"])
    cfg.trials = 18
    second = run_search(cfg)  # resumed with the same sampler: only the missing trials run
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / f'{name}.db'}")
    space = {p for t in study.trials if t.params for p in t.params}
    assert second["trials_complete"] + second["trials_failed"] == 18
    assert all(set(t.params) == space for t in study.trials if t.params)  # every trial proposes a whole plan
    assert all("size" in t.constraints for t in study.trials if t.values)


def test_the_refiner_search_space_is_the_intersection_optuna_computes():
    """The refiner folds each complete trial's parameters in once; the result is Optuna's intersection search
    space (parameters every complete trial has with the same distribution), in its order, trial by trial; pruned,
    failed and running trials do not count."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    from autocomp.search.refiner import FrontRefiner

    refiner = FrontRefiner(seed=0)
    reference = optuna.search_space.IntersectionSearchSpace()
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(12):
        trial = study.ask()
        for j in range(6):
            if (i + j) % 5:  # some trials lack a parameter
                trial.suggest_categorical(f"p{j}", ["a", "b", "c"])
        state = [None, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL][i % 3] if i > 3 else None
        if i == 9:
            continue  # left running
        study.tell(trial, [0.1, 1.0] if state is None else None, state=state)
        got = refiner.infer_relative_search_space(study, trial)
        assert list(got.items()) == list(reference.calculate(study).items())
        assert all(isinstance(d, CategoricalDistribution) for d in got.values())
