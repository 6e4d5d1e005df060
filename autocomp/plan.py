"""Plans: what to do to each layer. Frozen, versioned JSON, tied to a model by a fingerprint.

A :class:`Plan` maps module paths to :class:`LayerPlan` choices (layers not named are kept as they are),
plus the structured-pruning groups (:class:`StructuredGroup`) that remove whole neurons / heads / channels
from coupled layers. The JSON form is ``{"_type": "autocomp.Plan", "_version": 1, ...}``; loading checks
both and refuses anything else. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from autocomp.errors import AutocompError

__all__ = ["LayerPlan", "StructuredGroup", "Plan", "PLAN_VERSION", "atomic_write_text"]

PLAN_VERSION = 1
PRUNE_KINDS = ("none", "unstructured", "2:4")


@dataclass(frozen=True)
class LayerPlan:
    """Compression of one layer's weight. Order of application: low-rank, then prune, then quantize.

    bits:        integer weight bits (2..8), or ``None`` to keep the stored dtype.
    group_size:  quantization group along the input dimension; ``0`` means one group per output row
                 (per-channel).
    symmetric:   symmetric (no zero-point) or asymmetric (a zero-point per group) quantization.
    prune:       ``"none"``, ``"unstructured"`` (magnitude, ``sparsity`` of the entries removed) or
                 ``"2:4"`` (two of every four consecutive inputs kept).
    rank:        truncated-SVD rank (``W ~ B @ A``), or ``None`` for no factorization. Absolute rank of the
                 (possibly structurally pruned) matrix.
    act_bits:    ``8`` for W8A8 execution (inputs quantized on the fly, per tensor, as int8 kernels do; only
                 with 8-bit per-channel symmetric weights on Linear layers), ``None`` for float activations.
    """

    bits: int | None = None
    group_size: int = 0
    symmetric: bool = True
    prune: str = "none"
    sparsity: float = 0.0
    rank: int | None = None
    act_bits: int | None = None

    def __post_init__(self) -> None:
        if self.act_bits is not None and (self.act_bits != 8 or self.bits != 8 or self.group_size or not self.symmetric):
            raise AutocompError("act_bits 8 (W8A8) needs bits 8, group_size 0 (per channel) and symmetric weights")
        if self.bits is not None and not 1 <= int(self.bits) <= 16:
            raise AutocompError(f"bits must be in 1..16 or null, got {self.bits}")
        if self.group_size < 0:
            raise AutocompError(f"group_size must be >= 0 (0 = per channel), got {self.group_size}")
        if self.prune not in PRUNE_KINDS:
            raise AutocompError(f"prune must be one of {PRUNE_KINDS}, got {self.prune!r}")
        if self.prune == "unstructured" and not 0.0 < self.sparsity < 1.0:
            raise AutocompError(f"unstructured sparsity must be in (0, 1), got {self.sparsity}")
        if self.rank is not None and self.rank < 1:
            raise AutocompError(f"rank must be >= 1 or null, got {self.rank}")

    @property
    def is_identity(self) -> bool:
        return self.bits is None and self.prune == "none" and self.rank is None

    def label(self) -> str:
        """Short human label, e.g. ``r96+u50+4g128`` or ``8c`` or ``keep``."""
        parts = []
        if self.rank is not None:
            parts.append(f"r{self.rank}")
        if self.prune == "unstructured":
            parts.append(f"u{round(self.sparsity * 100)}")
        elif self.prune == "2:4":
            parts.append("2:4")
        if self.act_bits == 8:
            parts.append("int8")
        elif self.bits is not None:
            g = "c" if self.group_size == 0 else f"g{self.group_size}"
            parts.append(f"{self.bits}{g}{'' if self.symmetric else 'a'}")
        return "+".join(parts) or "keep"


@dataclass(frozen=True)
class StructuredGroup:
    """Whole units removed from coupled layers so that the matmuls really shrink.

    ``units`` units of ``unit_size`` rows each exist in every producer (rows of the output) and as many
    columns in every consumer (inputs); ``keep`` of them stay. Which ones stay is decided from the weights
    (largest joint L2 norm), so the plan names only the count, unless ``order`` ranks the units by an
    importance measured on data (gradient-based, see ``importance: fisher`` in search spaces).
    """

    kind: str  # "neurons" | "heads" | "channels"
    units: int
    unit_size: int
    keep: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    order: tuple[int, ...] = ()  # units from most to least important when scored from data; () = by weight norm

    def __post_init__(self) -> None:
        if not 1 <= self.keep <= self.units:
            raise AutocompError(f"structured group keeps {self.keep} of {self.units} units; need 1..units")
        if self.order and sorted(self.order) != list(range(self.units)):
            raise AutocompError(f"structured group order must be a permutation of 0..{self.units - 1}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.order:
            del d["order"]
        return d


@dataclass(frozen=True)
class Plan:
    """A whole-model compression plan. Build with :meth:`from_dict`/:meth:`load`, save with :meth:`save`."""

    layers: Mapping[str, LayerPlan]
    structured: Mapping[str, StructuredGroup] = field(default_factory=dict)
    model_spec: str = ""
    model_name: str = ""
    fingerprint: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def layer(self, name: str) -> LayerPlan:
        return self.layers.get(name, _KEEP)

    def with_metrics(self, **metrics: Any) -> "Plan":
        return replace(self, metrics={**self.metrics, **metrics})

    def key(self) -> str:
        """A canonical string of the choices only (no metrics): equal keys mean equal compressed models."""
        body = {"layers": {k: asdict(v) for k, v in sorted(self.layers.items()) if not v.is_identity},
                "structured": {k: v.to_dict() for k, v in sorted(self.structured.items()) if v.keep < v.units}}
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    def summary(self, n_layers: int | None = None) -> str:
        """One line for people: weight formats by layer count, pruning, ranks, structured cuts."""
        from collections import Counter

        def fmt(c: LayerPlan) -> str:
            if c.bits is None:
                return "fp"
            return f"{'int8' if c.act_bits == 8 else f'{c.bits}b'}{'' if c.group_size == 0 else f'g{c.group_size}'}"

        q = Counter(fmt(c) for c in self.layers.values() if c.bits is not None)
        kept = (n_layers - len(self.layers)) if n_layers else 0
        parts = [", ".join(f"{k}x{v}" for k, v in q.most_common()) or "no quantization"]
        if kept > 0:
            parts[0] += f", fp x{kept}"
        pr = Counter(c.prune if c.prune != "unstructured" else f"u{round(c.sparsity * 100)}"
                     for c in self.layers.values() if c.prune != "none")
        if pr:
            parts.append("pruned " + ", ".join(f"{k}x{v}" for k, v in pr.most_common()))
        lr = sum(1 for c in self.layers.values() if c.rank is not None)
        if lr:
            parts.append(f"low-rank x{lr}")
        cut = [g for g in self.structured.values() if g.keep < g.units]
        if cut:
            parts.append(f"{len(cut)} structured groups cut ({sum(g.units - g.keep for g in cut)} units)")
        return "; ".join(parts)

    # -- JSON ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": "autocomp.Plan",
            "_version": PLAN_VERSION,
            "model": {"spec": self.model_spec, "name": self.model_name, "fingerprint": self.fingerprint},
            "layers": {k: asdict(v) for k, v in sorted(self.layers.items())},
            "structured": {
                k: {**v.to_dict(), "producers": list(v.producers), "consumers": list(v.consumers),
                    **({"order": list(v.order)} if v.order else {})}
                for k, v in sorted(self.structured.items())
            },
            "metrics": dict(self.metrics),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "plan") -> "Plan":
        if not isinstance(d, Mapping) or d.get("_type") != "autocomp.Plan":
            raise AutocompError(f"{source} is not an autocomp plan (missing _type 'autocomp.Plan')")
        version = d.get("_version")
        if version != PLAN_VERSION:
            raise AutocompError(
                f"{source} has plan version {version!r}; this autocomp reads version {PLAN_VERSION}"
            )
        try:
            layers = {str(k): LayerPlan(**v) for k, v in d.get("layers", {}).items()}
            structured = {
                str(k): StructuredGroup(**{**v, "producers": tuple(v["producers"]),
                                           "consumers": tuple(v["consumers"]),
                                           "order": tuple(int(i) for i in v.get("order", ()))})
                for k, v in d.get("structured", {}).items()
            }
            model = d.get("model", {})
            return cls(layers=layers, structured=structured, model_spec=model.get("spec", ""),
                       model_name=model.get("name", ""), fingerprint=model.get("fingerprint", ""),
                       metrics=dict(d.get("metrics", {})), meta=dict(d.get("meta", {})))
        except (TypeError, KeyError, AttributeError) as e:
            raise AutocompError(f"{source} is malformed: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Plan":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise AutocompError(f"plan file {str(path)!r} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AutocompError(f"plan file {str(path)!r} is not valid JSON: {e}") from None
        return cls.from_dict(data, source=f"plan file {str(path)!r}")


_KEEP = LayerPlan()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never half of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # like a plain open(): mkstemp's 0600 would hide plans and reports
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
