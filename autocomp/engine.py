"""The search engine's public names, where scripts written for earlier versions import them from. The rooms
themselves live in :mod:`autocomp.search`: ``config`` (the request and its settings table), ``study``
(storages, resume, the front), ``trial`` (one trial), ``seeds`` and ``engine`` (the loop)."""

from __future__ import annotations

from autocomp.search.config import SearchConfig
from autocomp.search.engine import ENGINE_VERSION, run_search
from autocomp.search.study import (ATTR, StudyHandle, check_study_model, check_study_name, default_study_name,
                                   front_trials, open_storage, open_study, plan_of, study_result, trial_metric)

__all__ = ["SearchConfig", "run_search", "StudyHandle", "open_study", "open_storage", "study_result",
           "default_study_name", "check_study_name", "check_study_model", "front_trials", "plan_of", "trial_metric",
           "ATTR", "ENGINE_VERSION"]
