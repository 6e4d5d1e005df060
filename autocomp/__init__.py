"""autocomp: automated model-compression search.

Point it at a trained PyTorch model and a size budget; it searches per-layer quantization bit-widths,
pruning and low-rank ranks with Optuna, scores each plan by exact packed size and by output drift from
the original model, and keeps the Pareto-optimal plans in a resumable study.

``import autocomp`` is light: torch, optuna and transformers load only when a function needs them.
"""

from __future__ import annotations

from typing import Any

from autocomp.budget import parse_budget
from autocomp.errors import AutocompError, PlanMismatchError
from autocomp.plan import LayerPlan, Plan, StructuredGroup

__version__ = "0.1.0"

__all__ = [
    "AutocompError", "PlanMismatchError", "LayerPlan", "Plan", "StructuredGroup", "parse_budget",
    "apply_plan", "calibrate", "plan_bytes", "prepare_for_training", "distillation_loss", "finalize", "export", "load",
    "__version__",
]


def plan_bytes(desc: Any, plan: Plan) -> int:
    """Exact packed bytes of ``plan`` for a :class:`~autocomp.desc.ModelDesc`."""
    from autocomp.cost.size import plan_bytes as _pb

    return _pb(desc, plan)


def apply_plan(model: Any, plan: Plan, desc: Any = None) -> Any:
    """A context manager: within it, ``model`` computes with the plan's compressed weights.

    ``desc`` is the model's :class:`~autocomp.desc.ModelDesc`; without it the model is introspected
    without a forward pass (FLOPs are then unknown, which the plan does not need).
    Raises :class:`PlanMismatchError` if the plan was made for another model.
    """
    from autocomp.compressors.apply import PlanApplier
    from autocomp.models.base import LoadedModel
    from autocomp.models.introspect import describe_static

    desc = desc or describe_static(LoadedModel(module=model, name=plan.model_name, spec=plan.model_spec, batches=[]))
    return PlanApplier(model, desc).applied(plan)


def calibrate(model: Any, batches: list[Any], desc: Any = None, cache_dir: Any = None) -> Any:
    """Gather (or load from ``cache_dir``) the calibration statistics that compensated options (GPTQ,
    SparseGPT, activation-aware low rank: ``4g128/gptq``, ``u50/sparsegpt``, ``r0.5/aa``) compute with, and
    attach them to ``model``: every plan applied to it afterwards (:func:`apply_plan`, training, export) uses
    them. ``batches``: calibration inputs as the model's forward takes them. -> the statistics."""
    from pathlib import Path

    from autocomp.compressors.calibration import attach, load_or_gather
    from autocomp.models.base import LoadedModel
    from autocomp.models.introspect import describe_static

    desc = desc or describe_static(LoadedModel(module=model, name="", spec="", batches=[]))
    stats = load_or_gather(model, desc, list(batches), None if cache_dir is None else Path(cache_dir))
    attach(model, stats)
    return stats


def prepare_for_training(model: Any, plan: Plan, desc: Any = None, schedule: str = "fixed",
                         clip: str = "minmax") -> Any:
    """A trainable copy of ``model`` computing with ``plan``'s compressed weights: fake quantization with a
    straight-through estimator, fixed (or ``schedule="progressive"``) pruning masks, trainable low-rank
    factors. ``clip``: ``"minmax"`` computes exactly what the search scored; ``"mse"`` starts from each
    quantization group's least-error clipping range; ``"learned"`` (what ``autocomp train`` uses) does too
    and adds one trainable clipping ratio per group. See :mod:`autocomp.compressors.student`."""
    from autocomp.compressors.quantize import CLIPS
    from autocomp.compressors.student import prepare_for_training as _p
    from autocomp.compressors.student import start_training
    from autocomp.errors import AutocompError

    if clip not in CLIPS:
        raise AutocompError(f"clip must be one of {', '.join(CLIPS)}, got {clip!r}")
    student = _p(model, plan, desc, schedule, clip=clip)
    start_training(student, clip)
    return student


def distillation_loss(student_out: Any, teacher_out: Any, kind: str = "response", temperature: float = 2.0,
                      metric: str = "cosine", mask: Any = None) -> Any:
    """Response (KL with temperature, cosine or MSE), feature or relation distillation loss."""
    from autocomp.training import distillation_loss as _d

    return _d(student_out, teacher_out, kind, temperature, metric, mask)


def finalize(student: Any) -> Any:
    """A plain model whose weights are exactly the plan's stored (compressed) weights."""
    from autocomp.compressors.student import finalize as _f

    return _f(student)


def export(model: Any, plan: Plan, path: Any, spec: str | None = None, data_spec: str | None = None) -> dict[str, Any]:
    """Write the packed safetensors file (docs/FORMAT.md); -> {"path", "predicted_bytes", "payload_bytes",
    "file_bytes"}."""
    from autocomp.artifact import export as _e

    return _e(model, plan, path, spec=spec, data_spec=data_spec)


def load(path: Any, model: Any = None, runtime: str = "torch", threads: int | None = None) -> Any:
    """A runnable model from an export file. ``runtime="torch"``: rebuilt from a packed export (checksum and
    layout checked; ``model``: an instance to fill). ``runtime="ort"``: an ONNX export (``autocomp export
    --format onnx``) behind an ONNX Runtime session (``threads``: its intra-op threads), called like the
    original model and returning torch tensors (:class:`autocomp.ort.OrtModel`)."""
    if runtime == "ort":
        from autocomp.ort import OrtModel

        return OrtModel(path, threads=threads)
    if runtime != "torch":
        raise AutocompError(f"runtime must be 'torch' or 'ort', got {runtime!r}")
    from pathlib import Path

    if Path(path).suffix == ".onnx":
        raise AutocompError(f"{str(path)!r} is an ONNX export: load it with autocomp.load(path, runtime='ort')")
    from autocomp.artifact import load as _l

    return _l(path, model)
