"""Model intake: built-in demos, ``file.py:fn``, ``pkg.module:fn`` and ``hf:DIR`` specs."""

from __future__ import annotations

from autocomp.models.base import LoadedModel, load_model, run_batch, BUILTIN_MODELS

__all__ = ["LoadedModel", "load_model", "run_batch", "BUILTIN_MODELS"]
