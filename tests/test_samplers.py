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
