"""Plain descriptions of a model's layers: what the cost models and search spaces read. No torch here.

Introspection (:mod:`autocomp.models.introspect`) builds a :class:`ModelDesc` from a real model and a real
forward pass; it is JSON-serializable and stored with each study, so ``autocomp pareto`` and the cost
models never need the model itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

__all__ = ["LayerDesc", "ModelDesc"]


@dataclass(frozen=True)
class LayerDesc:
    """One compressible layer, seen as a matrix ``rows x cols`` (outputs x inputs).

    For Conv layers ``cols = in_channels / groups * prod(kernel)``; for ``Embedding``, rows are tokens;
    for transformers' ``Conv1D`` the stored weight is transposed, the matrix view is not.
    """

    name: str
    type: str
    rows: int
    cols: int
    weight_itemsize: int = 4
    bias: int = 0
    bias_itemsize: int = 4
    flops_per_sample: int = 0
    block: int | None = None
    modality: str = "default"
    groups: int = 1
    positions: float = 0.0  # activation rows per sample at calibration (tokens, output pixels, lookups)

    @property
    def params(self) -> int:
        return self.rows * self.cols + self.bias

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * self.weight_itemsize + self.bias * self.bias_itemsize


@dataclass(frozen=True)
class ModelDesc:
    """The whole model: its compressible layers plus the bytes of every other parameter."""

    name: str
    spec: str
    params: int
    fp32_bytes: int  # real bytes of all parameters at their stored dtypes (the uncompressed baseline)
    other_bytes: int  # parameters outside the compressible layers' weights and biases (norms, ...)
    layers: tuple[LayerDesc, ...]
    fingerprint: str
    info: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"num_attention_heads": 12}

    def layer(self, name: str) -> LayerDesc:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def by_name(self) -> dict[str, LayerDesc]:
        return {layer.name: layer for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(layer) for layer in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelDesc":
        return cls(**{**d, "layers": tuple(LayerDesc(**x) for x in d["layers"]), "info": dict(d.get("info", {}))})
