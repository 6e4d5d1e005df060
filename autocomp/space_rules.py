"""The search-space file grammar (the format is documented in :mod:`autocomp.space`): rules parsed and
checked, before they are bound to a model. The technique axes (``quant``, ``prune``, ``rank``, ...) come
from the technique registry."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from autocomp.compressors.base import axes, option_of
from autocomp.errors import AutocompError

__all__ = ["Rule", "StructRule", "parse_rules", "parse_modalities", "load_yaml", "as_list", "resolve_space_path",
           "SPACES_DIR", "LAYER_TYPES"]

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
LAYER_TYPES = ("Linear", "Conv1d", "Conv2d", "Embedding", "Conv1D")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def resolve_space_path(space: str) -> Path:
    """``default`` -> search_spaces/default.yaml; a path is used as is."""
    p = Path(space).expanduser()
    if p.is_file():
        return p
    if _NAME.match(space):
        cand = SPACES_DIR / f"{space}.yaml"
        if cand.is_file():
            return cand
    known = ", ".join(sorted(x.stem for x in SPACES_DIR.glob("*.yaml"))) if SPACES_DIR.is_dir() else ""
    raise AutocompError(f"search space {space!r} not found; use a YAML path or one of: {known}")


@dataclass(frozen=True)
class Rule:
    match: Any
    types: frozenset[str] | None
    modality: frozenset[str] | None
    options: tuple[tuple[str, tuple[str, ...]], ...]  # (technique dim, its option labels), axis order
    tie: str | None

    def labels(self, dim: str) -> tuple[str, ...]:
        return dict(self.options)[dim]


@dataclass(frozen=True)
class StructRule:
    kind: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    keep: tuple[float, ...]
    heads: Any
    importance: str = "weight"
    refit: bool = False


def as_list(value: Any, where: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (str, int, float)):
        return [value]
    raise AutocompError(f"{where} must be a list")


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise AutocompError(f"search space {str(path)!r} is not valid YAML{where}: {problem}; fix the file") from None
    except OSError as e:
        raise AutocompError(f"search space {str(path)!r} cannot be read: {e.strerror}") from None
    if not isinstance(data, dict):
        raise AutocompError(f"search space {str(path)!r} must be a mapping with a 'layers' list")
    return data


def parse_modalities(value: Any, src: str) -> dict[str, list[str]]:
    """``modalities: {vision: ['regex', ...], ...}`` -> checked patterns (tried before the built-in tags)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AutocompError(f"{src}: 'modalities' must map a modality name to a list of regexes")
    out: dict[str, list[str]] = {}
    for tag, pats in value.items():
        pats = [str(p) for p in as_list(pats, f"{src}: modalities.{tag}")]
        for p in pats:
            try:
                re.compile(p)
            except re.error as e:
                raise AutocompError(f"{src}: modalities.{tag}: invalid regex {p!r}: {e}") from None
        out[str(tag)] = pats
    return out


def parse_rules(data: Mapping[str, Any], src: str) -> tuple[list[Rule], list[StructRule]]:
    """A space file's ``layers`` and ``structured`` rules, checked (one line naming the rule and the fix)."""
    unknown = set(data) - {"version", "description", "layers", "structured", "modalities"}
    if unknown:
        raise AutocompError(f"{src}: unknown key {sorted(unknown)[0]!r}; allowed: version, description, layers, "
                            f"structured, modalities")
    if data.get("version", 1) != 1:
        raise AutocompError(f"{src}: version {data.get('version')!r} is not supported; use version: 1")
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        raise AutocompError(f"{src}: 'layers' must be a non-empty list of rules")
    rules = [_layer_rule(r, f"{src}: layers[{i}]") for i, r in enumerate(layers)]
    structs = [_struct_rule(s, f"{src}: structured[{i}]") for i, s in enumerate(data.get("structured") or [])]
    return rules, structs


def _layer_rule(r: Any, where: str) -> Rule:
    if not isinstance(r, dict):
        raise AutocompError(f"{where} must be a mapping")
    techniques = axes()
    allowed = ["match", "types", "modality", *(t.axis for t in techniques), "tie"]
    bad = set(r) - set(allowed)
    if bad:
        raise AutocompError(f"{where}: unknown key {sorted(bad)[0]!r}; allowed: {', '.join(allowed)}")
    try:
        match = re.compile(str(r["match"])) if "match" in r else None
    except re.error as e:
        raise AutocompError(f"{where}.match: invalid regex: {e}") from None
    types = None
    if "types" in r:
        types = frozenset(str(t) for t in as_list(r["types"], f"{where}.types"))
        if types - set(LAYER_TYPES):
            raise AutocompError(f"{where}.types: unknown type {sorted(types - set(LAYER_TYPES))[0]!r}; use {', '.join(LAYER_TYPES)}")
    modality = frozenset(as_list(r["modality"], f"{where}.modality")) if "modality" in r else None
    opts: list[tuple[str, tuple[str, ...]]] = []
    stages: dict[str, str] = {}
    for t in techniques:
        labels = [str(x) for x in as_list(r.get(t.axis, [t.neutral]), f"{where}.{t.axis}")]
        if not labels:
            raise AutocompError(f"{where}.{t.axis}: needs at least one option")
        for lab in labels:
            try:
                option_of(t, lab)
            except ValueError as e:
                raise AutocompError(f"{where}.{t.axis}: {e}") from None
        if any(lab != t.neutral for lab in labels):
            if t.stage in stages:
                raise AutocompError(f"{where}: {stages[t.stage]} and {t.axis} both {t.stage} a layer's weights; "
                                    f"offer one of them per rule")
            stages[t.stage] = t.axis
        opts.append((t.dim, tuple(dict.fromkeys(labels))))
    tie = r.get("tie")
    if tie is not None and not isinstance(tie, str):
        raise AutocompError(f"{where}.tie must be a string template such as '{{block}}.attn'")
    return Rule(match, types, modality, tuple(opts), tie)


def _struct_rule(s: Any, where: str) -> StructRule:
    if not isinstance(s, dict):
        raise AutocompError(f"{where} must be a mapping")
    bad = set(s) - {"kind", "producers", "consumers", "keep", "heads", "importance", "refit"}
    if bad:
        raise AutocompError(f"{where}: unknown key {sorted(bad)[0]!r}; allowed: kind, producers, consumers, keep, "
                            f"heads, importance, refit")
    refit = s.get("refit", False)
    if not isinstance(refit, bool):
        raise AutocompError(f"{where}.refit: true or false, got {refit!r}")
    importance = s.get("importance", "weight")
    if importance not in ("weight", "fisher"):
        raise AutocompError(f"{where}.importance: {importance!r} is not weight or fisher")
    kind = s.get("kind")
    if kind not in ("neurons", "heads", "channels"):
        raise AutocompError(f"{where}.kind: {kind!r} is not neurons, heads or channels")
    prods = [str(x) for x in as_list(s.get("producers", []), f"{where}.producers")]
    cons = [str(x) for x in as_list(s.get("consumers", []), f"{where}.consumers")]
    if not prods or not cons:
        raise AutocompError(f"{where}: needs at least one producer and one consumer")
    try:
        re.compile(prods[0])
    except re.error as e:
        raise AutocompError(f"{where}.producers[0]: invalid regex: {e}") from None
    keep = as_list(s.get("keep", [1.0]), f"{where}.keep")
    try:
        keep_f = tuple(float(k) for k in keep)
    except (TypeError, ValueError):
        raise AutocompError(f"{where}.keep: fractions in (0, 1] expected, got {keep!r}") from None
    if any(not 0 < k <= 1 for k in keep_f):
        raise AutocompError(f"{where}.keep: fractions in (0, 1] expected, got {keep!r}")
    heads = s.get("heads", "auto" if kind == "heads" else None)
    if kind == "heads" and not (heads == "auto" or (isinstance(heads, int) and heads > 0)):
        raise AutocompError(f"{where}.heads: a positive count or 'auto', got {heads!r}")
    return StructRule(kind, tuple(prods), tuple(cons), keep_f, heads, importance, refit)
