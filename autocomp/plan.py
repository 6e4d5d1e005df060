"""Plans: what to do to each layer. Frozen, versioned JSON, tied to a model by a fingerprint.

A :class:`Plan` maps module paths to :class:`LayerPlan` choices (layers not named are kept as they are),
plus the structured-pruning groups (:class:`StructuredGroup`) that remove whole neurons / heads / channels
from coupled layers. The JSON form is ``{"_type": "autocomp.Plan", "_version": 2, "techniques": {name:
config version}, "layers": {module path: {technique name: {config fields}}}, ...}``. Version-1 plans (fixed
``bits``/``group_size``/``symmetric``/``prune``/``sparsity``/``rank``/``act_bits`` fields per layer) are
read and converted by the built-in techniques. Loading checks type and version and refuses anything else;
unknown top-level keys are ignored (forward-compatible: a newer autocomp may add some). Nothing is ever
unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from autocomp.errors import AutocompError
from autocomp.files import atomic_write_text

__all__ = ["LayerPlan", "StructuredGroup", "Plan", "PLAN_VERSION", "V1_FIELDS", "atomic_write_text"]

PLAN_VERSION = 2
READABLE_VERSIONS = (1, 2)


V1_FIELDS = {"bits": None, "group_size": 0, "symmetric": True, "prune": "none", "sparsity": 0.0, "rank": None,
             "act_bits": None}  # a version-1 plan's fixed per-layer fields and their "no compression" values


class LayerPlan:
    """Compression of one layer's weight: the configs of its techniques (technique name -> frozen config),
    applied in the techniques' pipeline order (e.g. low rank, then prune, then quantize).

    ``LayerPlan(QuantConfig(4, 128), PruneConfig("unstructured", 0.5))`` or, for the built-in techniques,
    the version-1 keywords ``LayerPlan(bits=4, group_size=128, prune="unstructured", sparsity=0.5,
    rank=None, symmetric=True, act_bits=None)``. Immutable and hashable; ``LayerPlan()`` keeps the layer.
    """

    __slots__ = ("_configs", "_hash", "_steps")
    _configs: tuple[tuple[str, Any], ...]
    _hash: int
    _steps: tuple[tuple[Any, Any], ...]

    def __init__(self, *configs: Any, **v1: Any) -> None:
        from autocomp.compressors.base import TechniqueConfig, registered, technique

        found: dict[str, Any] = {}
        if not configs and not v1:
            object.__setattr__(self, "_configs", ())
            object.__setattr__(self, "_hash", hash(()))
            object.__setattr__(self, "_steps", ())
            return
        if len(configs) == 1 and isinstance(configs[0], Mapping):
            configs = tuple(configs[0].values())
        for c in configs:
            if not isinstance(c, TechniqueConfig):
                raise AutocompError(f"LayerPlan takes technique configs, got {type(c).__name__}")
            technique(c.technique)  # registered here
            if c.technique in found:
                raise AutocompError(f"a layer takes one {c.technique} config, got two")
            found[c.technique] = c
        if v1:
            bad = sorted(set(v1) - set(V1_FIELDS))
            if bad:
                raise AutocompError(f"unknown layer field {bad[0]!r}; allowed: {', '.join(V1_FIELDS)}")
            fields = {**V1_FIELDS, **v1}
            for t in registered():
                try:
                    c = t.from_v1(fields)
                except (TypeError, ValueError) as e:
                    raise AutocompError(f"{t.name}: {e}") from None
                if c is not None:
                    found[t.name] = c
        stages: dict[str, str] = {}
        steps = []
        for t in registered():
            if t.name in found:
                if t.stage in stages:
                    raise AutocompError(f"a layer takes one {t.stage} technique, got {stages[t.stage]} and {t.name}")
                stages[t.stage] = t.name
                steps.append((t, found[t.name]))
        object.__setattr__(self, "_steps", tuple(steps))
        object.__setattr__(self, "_configs", tuple((t.name, c) for t, c in steps))
        object.__setattr__(self, "_hash", hash(self._configs))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("LayerPlan is immutable")

    def __eq__(self, other: object) -> bool:
        return other is self or (isinstance(other, LayerPlan) and self._configs == other._configs)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"LayerPlan({', '.join(repr(c) for _, c in self._configs)})"

    def __reduce__(self) -> Any:  # pickling (Ray actors): rebuilt from the configs
        return (LayerPlan, tuple(c for _, c in self._configs))

    def get(self, name: str) -> Any:
        """The config of technique ``name``, or None when the layer does not use it."""
        for n, c in self._configs:
            if n == name:
                return c
        return None

    def items(self) -> tuple[tuple[str, Any], ...]:
        """(technique name, config) in pipeline order."""
        return self._configs

    def steps(self) -> tuple[tuple[Any, Any], ...]:
        """(technique, config) in pipeline order."""
        return self._steps

    @property
    def is_identity(self) -> bool:
        return not self._configs

    def without(self, stage: str) -> "LayerPlan":
        """The same plan without the technique of one stage (e.g. ``"factor"``)."""
        return LayerPlan(*(c for t, c in self.steps() if t.stage != stage))

    def label(self) -> str:
        """Short human label, e.g. ``r96+u50+4g128`` or ``8c`` or ``keep``."""
        return "+".join(t.label(c) for t, c in self.steps()) or "keep"

    def summary(self) -> dict[str, float]:
        """Plain figures merged from the techniques: bits, sparsity, rank (where they apply)."""
        out: dict[str, float] = {}
        for t, c in self.steps():
            out.update(t.summary(c))
        return out

    def input_hooks(self) -> list[Any]:
        """Forward-pre-hooks the techniques put on the layer's inputs (W8A8 activation quantization)."""
        return [h for t, c in self.steps() if (h := t.input_hook(c)) is not None]

    def v1(self) -> dict[str, Any] | None:
        """The version-1 fields of this layer, or None when a technique has no version-1 form."""
        out = dict(V1_FIELDS)
        for t, c in self.steps():
            f = t.to_v1(c)
            if f is None:
                return None
            out.update(f)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {n: c.to_dict() for n, c in self._configs}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "layer") -> "LayerPlan":
        from autocomp.compressors.base import technique

        if not isinstance(d, Mapping):
            raise AutocompError(f"{where} must map technique names to their configs")
        return cls(*(technique(str(n)).config.from_dict(v, where) for n, v in d.items()))


@dataclass(frozen=True)
class StructuredGroup:
    """Whole units removed from coupled layers so that the matmuls really shrink.

    ``units`` units of ``unit_size`` rows each exist in every producer (rows of the output) and as many
    columns in every consumer (inputs); ``keep`` of them stay. Which ones stay is decided from the weights
    (largest joint L2 norm), so the plan names only the count, unless ``order`` ranks the units by an
    importance measured on data (gradient-based, see ``importance: fisher`` in search spaces). With
    ``refit`` the consumers' remaining columns are refit to the removed units' contribution (least squares
    on the calibration inputs: ``W_k' = W H[:, k] H[k, k]^-1``); same shapes and bytes.
    """

    kind: str  # "neurons" | "heads" | "channels"
    units: int
    unit_size: int
    keep: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    order: tuple[int, ...] = ()  # units from most to least important when scored from data; () = by weight norm
    refit: bool = False  # consumers' kept columns refit by least squares on the calibration inputs (issue #10)

    def __post_init__(self) -> None:
        if not 1 <= self.keep <= self.units:
            raise AutocompError(f"structured group keeps {self.keep} of {self.units} units; need 1..units")
        if self.order and sorted(self.order) != list(range(self.units)):
            raise AutocompError(f"structured group order must be a permutation of 0..{self.units - 1}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.order:
            del d["order"]
        if not self.refit:
            del d["refit"]  # plans without it are written as before
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
        """A canonical string of the choices only (no metrics): equal keys mean equal compressed models.
        Layers the version-1 fields can describe are written as in version 1, so keys (and the digests
        studies and training checkpoints store) did not change with the plan format."""
        def layer(v: LayerPlan) -> Any:
            return v.v1() or {"v2": v.to_dict()}

        body = {"layers": {k: layer(v) for k, v in sorted(self.layers.items()) if not v.is_identity},
                "structured": {k: v.to_dict() for k, v in sorted(self.structured.items()) if v.keep < v.units}}
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """16 hex digits of SHA-256 of :meth:`key`: the identity of the compressed model."""
        import hashlib

        return hashlib.sha256(self.key().encode()).hexdigest()[:16]

    def summary(self, n_layers: int | None = None) -> str:
        """One line for people: weight formats by layer count, pruning, ranks, structured cuts."""
        from collections import Counter

        from autocomp.compressors.base import axes

        kept = (n_layers - len(self.layers)) if n_layers else 0
        parts: list[str] = []
        for t in axes():
            used = [c for v in self.layers.values() if (c := v.get(t.name)) is not None]
            counts = Counter(t.brief(c) for c in used)
            text = ", ".join(f"{k}x{v}" for k, v in counts.most_common() if k)
            if t.reference_axis:  # the weight formats lead the line
                parts.insert(0, (text or "no quantization") + (f", fp x{kept}" if kept > 0 else ""))
            elif used:
                parts.append(f"{t.title or t.name} {text}" if text else f"{t.title or t.name} x{len(used)}")
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
            "techniques": self.techniques(),
            "layers": {k: v.to_dict() for k, v in sorted(self.layers.items())},
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
        if version not in READABLE_VERSIONS:
            raise AutocompError(
                f"{source} has plan version {version!r}; this autocomp reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade autocomp to read it"
            )
        if not isinstance(d.get("layers", {}), Mapping):
            raise AutocompError(f"{source} is malformed: 'layers' must map module paths to layer plans")
        try:
            if version == 1:
                layers = {str(k): _v1_layer(v, f"{source}: layer {k!r}") for k, v in d.get("layers", {}).items()}
            else:
                _check_versions(d.get("techniques", {}), source)
                layers = {str(k): LayerPlan.from_dict(v, f"{source}: layer {k!r}") for k, v in d.get("layers", {}).items()}
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

    def techniques(self) -> dict[str, int]:
        """The techniques this plan uses, with the lowest config version that holds its configs."""
        out: dict[str, int] = {}
        for v in self.layers.values():
            for n, c in v.items():
                out[n] = max(out.get(n, 1), c.version())
        return dict(sorted(out.items()))

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


def _v1_layer(v: Any, where: str) -> LayerPlan:
    if not isinstance(v, Mapping):
        raise AutocompError(f"{where} must be a mapping of {', '.join(V1_FIELDS)}")
    try:
        return LayerPlan(**{str(k): x for k, x in v.items()})
    except AutocompError as e:
        raise AutocompError(f"{where}: {e}") from None


def _check_versions(versions: Any, source: str) -> None:
    from autocomp.compressors.base import technique

    if not isinstance(versions, Mapping):
        raise AutocompError(f"{source} is malformed: 'techniques' must map technique names to config versions")
    for name, version in versions.items():
        have = technique(str(name)).config.VERSION
        if not isinstance(version, int) or not 1 <= version <= have:
            raise AutocompError(f"{source} stores {name} configs of version {version!r}; this autocomp reads version "
                                f"{have}")
