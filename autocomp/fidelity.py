"""Fidelity records kept with a study: how far the study's predictions can be trusted.

Three commands measure a prediction against reality and, when told which study they belong to, store the
result in that study (Optuna study user attributes, so every storage keeps them and optuna-dashboard shows
them); ``autocomp report`` draws them:

- ``latency`` -- ``autocomp hardware validate --study S``: predicted vs measured latency of built plans (#3);
- ``export`` -- ``autocomp export`` of a plan written by ``autocomp plan``: predicted vs payload vs file bytes (#5);
- ``metric`` -- ``autocomp evaluate --study S``: the proxy vs the true task metric over plans (#5).

``latency`` and ``metric`` keep the latest run (a rerun replaces it); ``export`` keeps one row per output
file, the latest write winning, at most :data:`MAX_EXPORTS` rows.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["KINDS", "MAX_EXPORTS", "attr_name", "read", "record"]

KINDS = ("latency", "latency_ort", "export", "metric")  # latency_ort: validate --runtime ort
MAX_EXPORTS = 200


def attr_name(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown fidelity record {kind!r}; one of {KINDS}")
    return f"autocomp_fidelity_{kind}"


def record(study: Any, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Store ``payload`` (JSON-serialisable) in the Optuna ``study`` as its ``kind`` record; returns what
    was stored."""
    key = attr_name(kind)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    if kind == "export":
        rows = [r for r in study.user_attrs.get(key, []) if r.get("path") != payload.get("path")]
        rows.append({**payload, "at": stamp})
        value: Any = rows[-MAX_EXPORTS:]
    else:
        value = {**payload, "at": stamp}
    study.set_user_attr(key, value)
    return value


def read(study: Any) -> dict[str, Any]:
    """The study's fidelity records: kind -> record, only the kinds that exist."""
    attrs = study.user_attrs
    return {kind: attrs[attr_name(kind)] for kind in KINDS if attrs.get(attr_name(kind))}
