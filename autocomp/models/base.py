"""What a loaded model is, and how a model spec becomes one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from autocomp.errors import AutocompError

__all__ = ["LoadedModel", "load_model", "run_batch", "extract_output", "BUILTIN_MODELS"]


@dataclass
class LoadedModel:
    """A model ready to search: the module (eval mode), calibration batches and how to score its output.

    metric: ``"cosine"`` (embeddings), ``"kl"`` (logits) or ``"mse"`` (anything else), or ``"auto"`` to
    decide from the first output (``logits`` -> kl, otherwise mse).
    """

    module: Any  # torch.nn.Module
    name: str
    spec: str
    batches: list[Any]
    metric: str = "auto"
    modality: str = "default"
    data_spec: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    train_batches: Callable[[], list[Any]] | None = None


# name -> "module:function" returning a LoadedModel; resolved lazily so importing is cheap
BUILTIN_MODELS: dict[str, str] = {
    "minilm": "autocomp.models.minilm:load_minilm",
}


def run_batch(module: Any, batch: Any) -> Any:
    """Call ``module`` on one calibration batch: a dict is keyword arguments, a tuple/list positional."""
    if isinstance(batch, dict):
        return module(**batch)
    if isinstance(batch, (tuple, list)):
        return module(*batch)
    return module(batch)


def extract_output(out: Any) -> tuple[Any, str]:
    """The tensor to compare and the metric ``auto`` resolves to for it."""
    import torch

    if isinstance(out, torch.Tensor):
        return out, "mse"
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits, "kl"
    for key in ("last_hidden_state", "embeddings", "sentence_embedding"):
        value = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value, "mse"
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], "mse"
    raise AutocompError(
        f"model output of type {type(out).__name__} has no tensor to compare; return a tensor, "
        "a dict/ModelOutput with 'logits' or 'last_hidden_state', or a tuple starting with a tensor"
    )


def load_model(spec: str, data: str | None = None, metric: str = "auto") -> LoadedModel:
    """Resolve a model spec (``minilm``, ``file.py:fn``, ``pkg.module:fn``, ``hf:DIR``) into a LoadedModel.

    ``data`` (``file.py:fn`` / ``pkg.module:fn``) replaces the built-in calibration batches.
    """
    from autocomp.models import intake

    spec = (spec or "").strip()
    if not spec:
        raise AutocompError("--model is empty; use minilm, file.py:fn, pkg.module:fn or hf:DIR")
    if spec in BUILTIN_MODELS:
        loader = intake.resolve_callable(BUILTIN_MODELS[spec], what="built-in model")
        loaded: LoadedModel = loader()
    elif spec.startswith("hf:"):
        loaded = intake.load_hf(spec[3:], spec)
    elif ":" in spec:
        loaded = intake.load_factory(spec)
    else:
        raise AutocompError(
            f"unknown model {spec!r}; use a built-in ({', '.join(sorted(BUILTIN_MODELS))}), "
            "file.py:fn, pkg.module:fn or hf:DIR"
        )
    if data:
        loaded.batches = intake.load_data(data)
        loaded.data_spec = data
    elif not loaded.batches:
        raise AutocompError(f"model {spec!r} brings no calibration data; pass --data file.py:fn or pkg.module:fn")
    if metric != "auto":
        loaded.metric = metric
    return loaded
