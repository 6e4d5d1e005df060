"""Samplers, Pareto extraction and budget repair for the trial loop in :mod:`autocomp.engine`."""

from __future__ import annotations

from autocomp.search.pareto import pareto_front
from autocomp.search.samplers import SAMPLERS, make_sampler

__all__ = ["pareto_front", "make_sampler", "SAMPLERS"]
