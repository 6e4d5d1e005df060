"""Evaluators score a plan by running the compressed model; lower is better, 0 means unchanged."""

from __future__ import annotations

from autocomp.evaluators.proxy import ProxyEvaluator, distortion, METRICS

__all__ = ["ProxyEvaluator", "distortion", "METRICS"]
