"""The compressor interface and its registry.

A layer's weight is viewed as a float32 matrix (outputs x inputs) and carried through the registered
compressors in ascending ``order`` as a list of :class:`Part` s. A plain weight is one part; low-rank turns
it into two factors ``B @ A``; pruning and quantization then act on every part. A new technique is one new
file with one :func:`register` call; the engine never changes.

Contract for ``Compressor.__call__(parts, choice, ctx)``:

* It is called only when ``active(choice)`` is true, after every compressor with a lower ``order``.
* It must not modify the input tensors in place (they may be the model's own weights or cached values);
  return new :class:`Part` objects instead.
* It must be deterministic: the same inputs give bit-identical outputs.
* Expensive work that depends only on the layer (an SVD, a magnitude sort) goes into ``ctx.cache`` under a
  key that includes everything it depends on, so later trials reuse it.
* What it produces must be exactly representable in the packed format (docs/FORMAT.md): whatever it
  stores is counted by :mod:`autocomp.cost.size`, and ``tests/test_compressors.py`` checks the two agree.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from autocomp.plan import LayerPlan

__all__ = ["Part", "LayerContext", "Compressor", "register", "registered", "run_pipeline", "reconstruct"]


@dataclass(frozen=True)
class Part:
    """One stored matrix. ``values`` is what the runtime multiplies with (already dequantized); the
    integer ``codes``/``scale``/``zero_point`` are kept for the packed export."""

    values: Any  # torch.Tensor [rows, cols] float32
    mask: Any = None  # torch.Tensor bool [rows, cols], True = kept; None = dense
    nm: bool = False  # mask follows the 2:4 pattern
    codes: Any = None  # torch.Tensor int32, unsigned codes in [0, 2**bits)
    scale: Any = None  # torch.Tensor float16 [rows, n_groups]
    zero_point: Any = None  # torch.Tensor int32 [rows, n_groups] or None (symmetric)

    def evolve(self, **changes: Any) -> "Part":
        return replace(self, **changes)


@dataclass
class LayerContext:
    """Where a compressor is working, and a cache shared across trials for this evaluator."""

    name: str
    structured_key: tuple[int, ...] = ()
    cache: dict[Any, Any] = field(default_factory=dict)


class Compressor(ABC):
    name: ClassVar[str]
    order: ClassVar[int]
    row_local: ClassVar[bool] = False  # True if output row i depends only on input row i (of part 0)

    @abstractmethod
    def active(self, choice: LayerPlan) -> bool:
        """Whether this technique has anything to do for ``choice``."""

    @abstractmethod
    def __call__(self, parts: list[Part], choice: LayerPlan, ctx: LayerContext) -> list[Part]:
        """Transform the parts; see the module docstring for the contract."""


_REGISTRY: dict[str, Compressor] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: make a technique part of every pipeline, in ``order``."""
    _REGISTRY[cls.name] = cls()
    return cls


def registered() -> list[Compressor]:
    # import the built-in techniques so that they register themselves
    from autocomp.compressors import lowrank, prune, quantize  # noqa: F401

    return sorted(_REGISTRY.values(), key=lambda c: c.order)


def run_pipeline(matrix: Any, choice: LayerPlan, ctx: LayerContext, row_subset: Any = None) -> list[Part]:
    """Run every active compressor in order.

    ``row_subset`` (indices) asks only for those output rows: techniques with ``row_local = False``
    (low-rank, global magnitude pruning) run on the whole matrix first, then the first part is cut to
    the subset and the row-local ones (quantization is per row / per group) finish the job. The rows
    returned equal the same rows of the full result.
    """
    parts = [Part(values=matrix)]
    cut = row_subset is None
    for comp in registered():
        if not comp.active(choice):
            continue
        if not cut and comp.row_local:
            parts = [_take_rows(parts[0], row_subset), *parts[1:]]
            cut = True
        parts = comp(parts, choice, ctx)
    if not cut:
        parts = [_take_rows(parts[0], row_subset), *parts[1:]]
    return parts


def _take_rows(part: Part, rows: Any) -> Part:
    def take(t: Any) -> Any:
        return None if t is None else t.index_select(0, rows)

    return part.evolve(values=take(part.values), mask=take(part.mask), codes=take(part.codes),
                       scale=take(part.scale), zero_point=take(part.zero_point))


def reconstruct(parts: list[Part]) -> Any:
    """The dense matrix the parts represent (the product of the factors)."""
    out = None
    for p in parts:
        v = p.values if p.mask is None else p.values * p.mask
        out = v if out is None else out @ v
    return out
