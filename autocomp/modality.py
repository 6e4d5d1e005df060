"""Modality groups (text / vision / audio / fusion): tags, per-modality bytes, and per-modality constraints.

Layers are tagged at introspection from their names (``MODALITY_PATTERNS``: transformers CLIP/SigLIP-style
``vision_model`` / ``text_model`` / projections, ...); a search space may override the tags with a
``modalities:`` mapping of modality -> list of regexes (first match wins, matched against the full module
name). Parameters outside the compressible layers (norms, position tables, ``logit_scale``) are tagged the
same way, so the bytes per modality add up to the plan's exact size.

Constraints (``autocomp search``): ``--min-bits vision=8`` (no weight below 8 bits in that modality),
``--max-sparsity text=0.5`` (no unstructured/2:4/structured pruning above that fraction), and
``--budget-split text=70%,vision=30%`` (each listed modality's bytes within that share of the byte budget).
No torch here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from autocomp.desc import ModelDesc
from autocomp.errors import AutocompError

__all__ = ["modality_of", "retag", "modalities", "bytes_by_modality", "other_bytes_by_modality", "Constraints", "parse_constraints"]


def modality_of(name: str, desc: ModelDesc) -> str:
    """The modality of a parameter or module name under this description's patterns."""
    from autocomp.models.introspect import MODALITY_PATTERNS

    low = name.lower()
    for tag, patterns in (desc.info.get("modality_patterns") or {}).items():
        if any(re.search(p, name) for p in patterns):
            return tag
    for tag, pattern in MODALITY_PATTERNS:
        if re.search(pattern, low):
            return tag
    return str(desc.info.get("default_modality", "default"))


def retag(desc: ModelDesc, patterns: Mapping[str, list[str]]) -> ModelDesc:
    """The description with layer modalities re-derived from user ``patterns`` (tried before the built-in ones)."""
    info = {**desc.info, "modality_patterns": {k: list(v) for k, v in patterns.items()}}
    d = replace(desc, info=info)
    return replace(d, layers=tuple(replace(layer, modality=modality_of(layer.name, d)) for layer in desc.layers))


def modalities(desc: ModelDesc) -> list[str]:
    """The model's modalities, in first-seen order."""
    return list(dict.fromkeys(layer.modality for layer in desc.layers))


def other_bytes_by_modality(desc: ModelDesc) -> dict[str, int]:
    """modality -> bytes of the parameters outside the compressible layers (norms, position tables, ...)."""
    out: dict[str, int] = {}
    params = desc.info.get("other_param_bytes")
    if params is None:  # a description from before tagging: the model's main modality takes them
        out[modalities(desc)[0] if desc.layers else "default"] = desc.other_bytes
        return out
    for name, nbytes in params.items():
        m = modality_of(name, desc)
        out[m] = out.get(m, 0) + int(nbytes)
    return out


def bytes_by_modality(desc: ModelDesc, plan: Any) -> dict[str, int]:
    """modality -> exact packed bytes (layers, structured-group masks by their first producer, other
    parameters); the values add up to :func:`autocomp.cost.size.plan_bytes`."""
    from autocomp.cost.size import layer_bytes, structured_shape

    out = dict(other_bytes_by_modality(desc))
    groups = {k: g for k, g in plan.structured.items() if g.keep < g.units}
    by_name = desc.by_name
    for layer in desc.layers:
        rows, cols = structured_shape(layer, groups)
        out[layer.modality] = out.get(layer.modality, 0) + layer_bytes(layer, plan.layer(layer.name), rows, cols)
    for g in groups.values():
        m = by_name[g.producers[0]].modality
        out[m] = out.get(m, 0) + (g.units + 7) // 8
    order = modalities(desc)
    return {m: out[m] for m in sorted(out, key=lambda m: (order.index(m) if m in order else len(order), m))}


@dataclass(frozen=True)
class Constraints:
    min_bits: Mapping[str, int] = field(default_factory=dict)
    max_sparsity: Mapping[str, float] = field(default_factory=dict)
    budget_split: Mapping[str, float] = field(default_factory=dict)  # modality -> fraction of the byte budget

    def __bool__(self) -> bool:
        return bool(self.min_bits or self.max_sparsity or self.budget_split)

    def to_dict(self) -> dict[str, Any]:
        return {"min_bits": dict(self.min_bits), "max_sparsity": dict(self.max_sparsity),
                "budget_split": dict(self.budget_split)}


def _pairs(text: str | None, flag: str, example: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise AutocompError(f"{flag} {part!r} is not MODALITY=VALUE; e.g. {flag} {example}")
        out[key.strip()] = value.strip()
    return out


def _fraction(v: str) -> float:
    """``0.7`` or ``70%`` -> 0.7; -1 for anything else (callers range-check)."""
    try:
        return float(v[:-1]) / 100 if v.endswith("%") else float(v)
    except ValueError:
        return -1.0


def parse_constraints(desc: ModelDesc, min_bits: str | None = None, max_sparsity: str | None = None,
                      budget_split: str | None = None) -> Constraints:
    """Parse and check the three flags against the model's modalities."""
    have = modalities(desc)

    def known(m: str, flag: str) -> str:
        if m not in have:
            raise AutocompError(f"{flag} names modality {m!r}, which model {desc.spec!r} does not have; "
                                f"its modalities: {', '.join(have)} (see `autocomp layers`)")
        return m

    bits: dict[str, int] = {}
    for m, v in _pairs(min_bits, "--min-bits", "vision=8").items():
        try:
            b = int(v)
        except ValueError:
            b = 0
        if not 1 <= b <= 32:
            raise AutocompError(f"--min-bits {m}={v}: bits must be an integer from 1 to 32")
        bits[known(m, "--min-bits")] = b
    sparsity: dict[str, float] = {}
    for m, v in _pairs(max_sparsity, "--max-sparsity", "text=0.5").items():
        s = _fraction(v)
        if not 0.0 <= s <= 1.0:
            raise AutocompError(f"--max-sparsity {m}={v}: use a fraction from 0 to 1 (or a percentage)")
        sparsity[known(m, "--max-sparsity")] = s
    split: dict[str, float] = {}
    for m, v in _pairs(budget_split, "--budget-split", "text=70%,vision=30%").items():
        f = _fraction(v)
        if not 0.0 < f <= 1.0:
            raise AutocompError(f"--budget-split {m}={v}: use a share of the budget such as 70% or 0.7")
        split[known(m, "--budget-split")] = f
    total = sum(split.values())
    if total > 1.0 + 1e-9:
        raise AutocompError(f"--budget-split shares add up to {total:.0%}, more than 100% of the budget; "
                            f"lower them")
    if split and set(split) == set(have) and abs(total - 1.0) > 1e-9:
        raise AutocompError(f"--budget-split covers every modality but adds up to {total:.0%}, not 100%; "
                            f"fix the shares or leave one modality out to give it the rest")
    return Constraints(bits, sparsity, split)
