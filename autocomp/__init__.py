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
    "apply_plan", "plan_bytes", "__version__",
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
