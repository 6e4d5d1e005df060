"""Search spaces: per-layer choices declared in YAML (search_spaces/*.yaml), bound to a real model.

A space file has ``layers`` rules (first match wins) and optional ``structured`` coupling rules::

    version: 1
    layers:
      - types: [Embedding]                  # Linear, Conv1d, Conv2d, Embedding, Conv1D
        match: '.*word_embeddings'          # optional regex, full match on the module path
        quant: [keep, 8c, 4g128, 3g32a]     # bits + (c = per channel | gN = groups of N) + (a = asymmetric)
        prune: [none, u50, '2:4']           # uNN = NN% magnitude sparsity
        rank: [full, r0.5]                  # fraction of the full rank
        tie: '{block}.attn'                 # optional: layers with the same key share one choice

``quant``, ``prune`` and ``rank`` are the axes of the built-in techniques; every registered technique
(:mod:`autocomp.compressors.base`) adds its own axis key with its own option grammar, and an axis a rule
does not name stays at that technique's neutral option.
    structured:
      - kind: neurons                       # neurons | heads | channels
        producers: ['(?P<p>.+)\\.intermediate\\.dense']   # first: a regex; the rest: templates
        consumers: ['{p}.output.dense']
        keep: [1.0, 0.75, 0.5]
        heads: auto                         # heads only: a count, or auto (from the model config,
                                            #   per modality for dual encoders)
        importance: weight                  # rank units by weight norm, or fisher (gradients on data)
        refit: false                        # true: refit the consumers' kept columns by least squares on
                                            #   the calibration inputs (needs calibration statistics)
    modalities:                             # optional: tag layers whose names the built-in
      vision: ['img_enc\..*']              #   text/vision/audio/fusion patterns miss (regex search)

Rules may also select by ``modality: [vision]``.

Binding to a model drops options that would not save bytes on that layer (a rank whose factors are
larger than the matrix, 2:4 on an input size not divisible by 4, ...) and keeps one of several labels that
mean the same compressed layer. Each remaining choice with more than one option becomes one categorical
Optuna parameter named ``<layer or tie key>:<technique dim>``; :meth:`SearchSpace.decode` turns a full
assignment into a :class:`~autocomp.plan.Plan` that the packed format can hold.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from autocomp.compressors.base import Stored, Technique, axes, by_dim, option_of, registered
from autocomp.compressors.pipeline import stored_matrices
from autocomp.compressors.structured import structured_shape
from autocomp.cost.size import layer_bytes
from autocomp.desc import LayerDesc, ModelDesc
from autocomp.errors import AutocompError
from autocomp.plan import LayerPlan, Plan, StructuredGroup
from autocomp.space_rules import (SPACES_DIR, LAYER_TYPES, Rule, StructRule, load_yaml, parse_modalities,  # noqa: F401
                                  parse_rules, resolve_space_path)

__all__ = ["SearchSpace", "reference_assignments", "uniform_assignment", "resolve_space_path", "neutral_assignment", "peer_choices",
           "SPACES_DIR"]

ONNX_LOWERED = ("Linear", "Conv1D", "Embedding")  # layer kinds autocomp/ort.py puts on ORT's integer kernels


def _gathered(config: Any, layer: LayerDesc) -> bool:
    """A quantized embedding table reaches GatherBlockQuantized only when its blocks tile each row."""
    if layer.type != "Embedding" or not hasattr(config, "group_size"):
        return True
    from autocomp.compressors.quantize import nbits_block

    block = nbits_block(config.group_size, layer.cols)
    return bool(block) and layer.cols % block == 0


@dataclass(frozen=True)
class _Group:
    key: str
    kind: str
    units: int
    unit_size: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    keeps: dict[str, int]  # label -> kept units
    importance: str = "weight"  # how units are ranked: weight norms, or Fisher (gradient-based, from data)
    refit: bool = False  # consumers refit by least squares on the calibration inputs


class SearchSpace:
    """Per-layer categorical choices for one model. Build with :meth:`from_yaml`."""

    def __init__(self, desc: ModelDesc, rules: list[Rule], structs: list[StructRule], source: str = "") -> None:
        self.desc = desc
        self.source = source
        self.params: dict[str, tuple[str, ...]] = {}  # optuna parameter -> option labels
        self.fixed: dict[str, str] = {}  # choices with a single option
        self.layer_keys: dict[str, str] = {}  # layer -> tie key ("<key>:q" etc. are its choices)
        self.members: dict[str, list[str]] = {}  # tie key -> layers
        self.groups: dict[str, _Group] = {}
        self.unit_orders: dict[str, tuple[int, ...]] = {}  # group key -> units ranked from data (importance: fisher)
        self._by_name = by_name = desc.by_name
        rule_of: dict[str, Rule] = {}
        self._bind_structured(structs, by_name, source)
        for layer in desc.layers:
            rule = next((r for r in rules if self._matches(r, layer)), None)
            if rule is None:
                continue
            key = self._tie_key(rule, layer)
            self.layer_keys[layer.name] = key
            self.members.setdefault(key, []).append(layer.name)
            rule_of[key] = rule
        for key, names in self.members.items():
            rule = rule_of[key]
            layers = [by_name[n] for n in names]
            for t in axes():
                labels = rule.labels(t.dim)
                valid = [lab for lab in labels if all(self._saves(t, lab, lay) for lay in layers)]
                valid = self._dedupe(t, valid, layers) or [t.neutral]
                if len(valid) == 1:
                    self.fixed[f"{key}:{t.dim}"] = valid[0]
                else:
                    self.params[f"{key}:{t.dim}"] = tuple(valid)
        self._plan_memo: dict[tuple[Any, ...], tuple[LayerDesc, LayerPlan, int, int]] = {}
        self._choice_memo: dict[tuple[Any, ...], LayerPlan] = {}
        self._layer_groups: dict[str, tuple[str, ...]] = {}
        for gk, g in self.groups.items():
            for n in dict.fromkeys((*g.producers, *g.consumers)):
                self._layer_groups[n] = (*self._layer_groups.get(n, ()), gk)
        for g in self.groups.values():
            labels = tuple(g.keeps)
            if len(labels) == 1:
                self.fixed[f"{g.key}:keep"] = labels[0]
            else:
                self.params[f"{g.key}:keep"] = labels

    # -- construction helpers ---------------------------------------------------------------------------
    @staticmethod
    def _matches(rule: Rule, layer: LayerDesc) -> bool:
        if rule.types is not None and layer.type not in rule.types:
            return False
        if rule.modality is not None and layer.modality not in rule.modality:
            return False
        return rule.match is None or rule.match.fullmatch(layer.name) is not None

    @staticmethod
    def _tie_key(rule: Rule, layer: LayerDesc) -> str:
        if not rule.tie:
            return layer.name
        if "{block}" in rule.tie and layer.block is None:
            return layer.name
        try:
            return rule.tie.format(block=layer.block, modality=layer.modality, type=layer.type, name=layer.name)
        except (KeyError, IndexError) as e:
            raise AutocompError(f"tie template {rule.tie!r} uses unknown field {e}; use block, modality, type, name") from None

    @staticmethod
    def _saves(t: Technique, label: str, layer: LayerDesc) -> bool:
        """Whether an option alone applies to this layer and makes it smaller."""
        t, option = option_of(t, label)
        if option is None:
            return True
        config = t.bind(option, layer, [(layer.rows, layer.cols)])
        if config is None:
            return False
        dense = layer.rows * layer.cols * layer.weight_itemsize
        return sum(s.nbytes for s in stored_matrices(LayerPlan(config), layer.rows, layer.cols,
                                                      layer.weight_itemsize)) < dense

    @staticmethod
    def _dedupe(t: Technique, labels: list[str], layers: list[LayerDesc]) -> list[str]:
        """Of labels that mean the same config on every member (e.g. a group as wide as the row is
        per-channel), keep the first."""
        seen: dict[tuple[Any, ...], str] = {}
        for lab in labels:
            u, option = option_of(t, lab)
            bound = tuple(None if option is None else u.bind(option, lay, [(lay.rows, lay.cols)]) for lay in layers)
            seen.setdefault(bound, lab)
        return [lab for lab in labels if lab in seen.values()]

    def _bind_structured(self, structs: list[StructRule], by_name: dict[str, LayerDesc], src: str) -> None:
        claimed: set[str] = set()
        for rule in structs:
            pat = re.compile(rule.producers[0])
            for layer in self.desc.layers:
                m = pat.fullmatch(layer.name)
                if not m or layer.name in claimed:
                    continue
                fields = m.groupdict()
                try:
                    prods = (layer.name, *(p.format(**fields) for p in rule.producers[1:]))
                    cons = tuple(c.format(**fields) for c in rule.consumers)
                except (KeyError, IndexError) as e:
                    raise AutocompError(f"{src}: structured template uses {e}, which producers[0] does not capture") from None
                if any(n not in by_name for n in (*prods, *cons)):
                    continue
                if rule.kind == "heads":
                    heads = rule.heads
                    if heads == "auto":  # the attention module's own count, else the model config's
                        owner = layer.name.rpartition(".")[0]
                        heads = (self.desc.info.get("module_heads") or {}).get(owner) \
                            or (self.desc.info.get("attention_heads") or {}).get(layer.modality) \
                            or self.desc.info.get("num_attention_heads")
                    if not heads:
                        raise AutocompError(f"{src}: structured heads rule needs 'heads: N' for {layer.name} (neither "
                                            f"its module nor the model config gives a head count)")
                    units = int(heads)
                else:
                    units = layer.rows
                if any(by_name[p].rows != layer.rows for p in prods) or any(by_name[c].cols % units for c in cons) \
                        or layer.rows % units:
                    continue
                keeps: dict[str, int] = {}
                for f in sorted(set(rule.keep), reverse=True):
                    k = units if f >= 1 else max(1, round(units * f))
                    if f < 1 and rule.kind != "heads" and units >= 64:
                        k = max(8, k // 8 * 8)  # whole multiples of 8 channels: kernel-friendly
                    if k not in keeps.values():  # two fractions that round to one count: one option
                        keeps[f"k{f:g}"] = k
                key = f"{rule.kind}@{layer.name}"
                self.groups[key] = _Group(key, rule.kind, units, layer.rows // units, prods, cons, keeps,
                                          rule.importance, rule.refit)
                claimed.update(prods)

    # -- public ----------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, space: str | Path, desc: ModelDesc) -> "SearchSpace":
        path = resolve_space_path(str(space))
        data = load_yaml(path)
        rules, structs = parse_rules(data, str(path))
        patterns = parse_modalities(data.get("modalities"), str(path))
        if patterns:
            from autocomp.modality import retag

            desc = retag(desc, patterns)
        sp = cls(desc, rules, structs, source=str(path))
        if not sp.params:
            raise AutocompError(
                f"search space {str(path)!r} offers no choice for model {desc.spec!r}; "
                "check its match/types patterns against `autocomp layers`"
            )
        return sp

    def choice(self, name: str, assignment: Mapping[str, str]) -> str:
        return assignment[name] if name in assignment else self.fixed[name]

    def structured_of(self, assignment: Mapping[str, str]) -> dict[str, StructuredGroup]:
        out = {}
        for key, g in self.groups.items():
            keep = g.keeps[self.choice(f"{key}:keep", assignment)]
            out[key] = StructuredGroup(g.kind, g.units, g.unit_size, keep, g.producers, g.consumers,
                                       self.unit_orders.get(key, ()), g.refit and keep < g.units)
        return out

    def layer_choice(self, layer: LayerDesc, key: str, assignment: Mapping[str, str], rows: int, cols: int) -> LayerPlan:
        """The layer's plan: each technique's option bound to the shapes the earlier ones leave (a rank
        fraction becomes a rank of the cut matrix, a group as wide as a factor's row is per channel, 2:4
        needs inputs divisible by 4: an option that does not apply there is left out)."""
        techniques = registered()
        labels = tuple(self.choice(f"{key}:{t.dim}", assignment) for t in techniques)
        memo_key = (layer.name, labels, rows, cols)
        hit = self._choice_memo.get(memo_key)
        if hit is not None:
            return hit
        configs = []
        stored = [Stored(rows, cols, rows * cols, 32)]
        for t, label in zip(techniques, labels):
            t, option = option_of(t, label)
            if option is None:
                continue
            config = t.bind(option, layer, [(s.rows, s.cols) for s in stored])
            if config is not None:
                configs.append(config)
                stored = t.stored(config, stored)
        out = self._choice_memo[memo_key] = LayerPlan(*configs)
        return out

    def decode(self, assignment: Mapping[str, str]) -> Plan:
        """A full assignment (every parameter of :attr:`params`) -> the plan it means for this model."""
        missing = [p for p in self.params if p not in assignment]
        if missing:
            raise AutocompError(f"assignment lacks {len(missing)} parameter(s), e.g. {missing[0]!r}")
        groups = self.structured_of(assignment)
        active = {k: g for k, g in groups.items() if g.keep < g.units}
        layers = {}
        for layer in self.desc.layers:
            key = self.layer_keys.get(layer.name)
            if key is None:
                continue
            rows, cols = structured_shape(layer, active)
            choice = self.layer_choice(layer, key, assignment, rows, cols)
            if not choice.is_identity:
                layers[layer.name] = choice
        return Plan(layers=layers, structured=active, model_spec=self.desc.spec, model_name=self.desc.name,
                    fingerprint=self.desc.fingerprint)

    def layer_plan(self, name: str, assignment: Mapping[str, str]) -> tuple[LayerDesc, LayerPlan, int, int]:
        """(layer, its choice, rows, cols after structured pruning) under an assignment; memoized."""
        key = self.layer_keys.get(name)
        gkeys = self._layer_groups.get(name, ())
        labels = tuple(self.choice(f"{key}:{t.dim}", assignment) for t in axes()) if key else ()
        keeps = tuple(self.groups[g].keeps[self.choice(f"{g}:keep", assignment)] for g in gkeys)
        memo_key = (name, labels, keeps)
        hit = self._plan_memo.get(memo_key)
        if hit is not None:
            return hit
        layer = self._by_name[name]
        rows, cols = structured_shape(layer, {gk: self._unit_group(gk, keep) for gk, keep in zip(gkeys, keeps)})
        choice = self.layer_choice(layer, key, assignment, rows, cols) if key else LayerPlan()
        out = self._plan_memo[memo_key] = (layer, choice, rows, cols)
        return out

    def _unit_group(self, key: str, keep: int) -> StructuredGroup:
        g = self.groups[key]
        return StructuredGroup(g.kind, g.units, g.unit_size, keep, g.producers, g.consumers)

    def layer_bytes(self, name: str, assignment: Mapping[str, str]) -> int:
        """Bytes of one layer under an assignment (used by repair for incremental sizes)."""
        layer, choice, rows, cols = self.layer_plan(name, assignment)
        return layer_bytes(layer, choice, rows, cols)

    def group_mask_bytes(self, assignment: Mapping[str, str], modality: str | None = None) -> int:
        """Keep-bitmask bytes of the structured groups that prune (of one modality: by first producer)."""
        return sum((g.units + 7) // 8 for g in self.structured_of(assignment).values()
                   if g.keep < g.units and (modality is None or self._by_name[g.producers[0]].modality == modality))

    def restrict(self, min_bits: Mapping[str, int], max_sparsity: Mapping[str, float]) -> "SearchSpace":
        """Drop options that break per-modality limits: weights below ``min_bits[m]`` bits, pruning above
        ``max_sparsity[m]`` (unstructured fraction, 2:4 = 0.5, structured = 1 - kept fraction), for the
        choices of layers of modality ``m``. A choice left with one option becomes fixed. In place."""
        def mods_of(param: str) -> set[str]:
            return {self._by_name[n].modality for n in self.param_layers(param)}

        for param in list(self.params):
            key, _, dim = param.rpartition(":")
            mods = mods_of(param)
            floor = max((min_bits[m] for m in mods if m in min_bits), default=None)
            cap = min((max_sparsity[m] for m in mods if m in max_sparsity), default=None)
            keep = list(self.params[param])
            t = by_dim(dim)
            if dim == "keep" and cap is not None:
                g = self.groups[key]
                keep = [o for o in keep if 1 - g.keeps[o] / g.units <= cap + 1e-9]
            elif t is not None and floor is not None:
                keep = [o for o in keep if self._figure(t, o, param, "bits", 32.0) >= floor]
            if t is not None and cap is not None:
                keep = [o for o in keep if self._figure(t, o, param, "sparsity", 0.0) <= cap + 1e-9]
            if not keep:
                keep = [t.neutral if t is not None else max(self.groups[key].keeps, key=self.groups[key].keeps.get)]
            self._set_options(param, keep)
        self._plan_memo.clear()
        self._choice_memo.clear()
        return self

    def _set_options(self, param: str, keep: list[str]) -> None:
        """A choice's remaining options; one left becomes fixed."""
        if len(keep) == 1:
            del self.params[param]
            self.fixed[param] = keep[0]
        else:
            self.params[param] = tuple(keep)

    def restrict_to_stored_formats(self) -> "SearchSpace":
        """Keep only options an ONNX Runtime export stores and runs exactly as the plan's format says
        (:meth:`~autocomp.compressors.base.Technique.onnx_kernel`): e.g. 2/4/8-bit weights, W8A8, low rank,
        structured pruning -- not 3-bit codes (4-bit containers) or unstructured / 2:4 sparsity (dense
        zeros). Each option becomes the one whose simulation computes what ORT's kernel does
        (:meth:`~autocomp.compressors.base.Technique.ort_label`: W8A8 on ORT's full 8-bit activation grid). A
        choice left with one option becomes fixed. In place."""
        for param in list(self.params):
            t = by_dim(param.rpartition(":")[2])
            if t is None:
                continue
            keep = []
            for label in dict.fromkeys(option_of(t, x)[0].ort_label(x) for x in self.params[param]):
                u, option = option_of(t, label)
                layers = [self._by_name[n] for n in self.param_layers(param)]
                configs = [] if option is None else [u.bind(option, x, [(x.rows, x.cols)]) for x in layers]
                # the export lowers Linear / HF Conv1D / Embedding weights to ORT kernels; a Conv stays dense
                if all(c is None or (x.type in ONNX_LOWERED and u.onnx_kernel(c) is not None and _gathered(c, x))
                       for c, x in zip(configs, layers)):
                    keep.append(label)
            self._set_options(param, keep or [t.neutral])
        for param, label in list(self.fixed.items()):
            t = by_dim(param.rpartition(":")[2])
            if t is not None:
                self.fixed[param] = option_of(t, label)[0].ort_label(label)
        self._plan_memo.clear()
        self._choice_memo.clear()
        return self

    def _figure(self, t: Technique, label: str, param: str, figure: str, default: float) -> float:
        """A technique's summary figure (bits, sparsity) of an option, the extreme over the param's layers."""
        t, option = option_of(t, label)
        values = [default]
        for n in self.param_layers(param):
            layer = self._by_name[n]
            config = None if option is None else t.bind(option, layer, [(layer.rows, layer.cols)])
            if config is not None:
                values.append(t.summary(config).get(figure, default))
        return min(values) if figure == "bits" else max(values)

    def param_layers(self, param: str) -> list[str]:
        """The layers whose bytes depend on one parameter."""
        key, _, dim = param.rpartition(":")
        if dim == "keep":
            g = self.groups[key]
            return list(dict.fromkeys((*g.producers, *g.consumers)))
        return list(self.members[key])

    def smallest_assignment(self, layer_cost: Any = None) -> dict[str, str]:
        """The assignment of least total cost, exact for costs additive over layers and monotone in
        structured pruning: per tie key every option combination is tried. Default cost: bytes."""
        cost = layer_cost or self.layer_bytes
        out: dict[str, str] = {}
        for key, g in self.groups.items():
            if f"{key}:keep" in self.params:
                out[f"{key}:keep"] = min(g.keeps, key=lambda lab: g.keeps[lab])
        for key in self.members:
            dims = [f"{key}:{t.dim}" for t in axes() if f"{key}:{t.dim}" in self.params]
            best = None
            for combo in itertools.product(*(self.params[d] for d in dims)):
                trial = {**out, **dict(zip(dims, combo))}
                size = sum(cost(n, trial) for n in self.members[key])
                if best is None or size < best[0]:
                    best = (size, combo)
            if best is not None:
                out.update(zip(dims, best[1]))
        return out

    def largest_assignment(self) -> dict[str, str]:
        """Every parameter at its first option (by convention the least compressed)."""
        return {p: opts[0] for p, opts in self.params.items()}

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "params": {k: list(v) for k, v in self.params.items()},
                "fixed": dict(self.fixed), "structured_groups": len(self.groups),
                "layers_searched": len(self.layer_keys)}


def neutral_assignment(space: SearchSpace) -> dict[str, str]:
    """Every choice at its uncompressed option (each technique's neutral label, all structured units)."""
    out = {}
    for p, opts in space.params.items():
        key, _, dim = p.rpartition(":")
        if dim == "keep":
            out[p] = max(opts, key=lambda lab: space.groups[key].keeps[lab])
        else:
            t = by_dim(dim)
            out[p] = t.neutral if t is not None and t.neutral in opts else opts[0]
    return out


def peer_choices(space: SearchSpace, neutral: Mapping[str, str] | None = None) -> dict[str, tuple[Any, ...]]:
    """Per layer, its choices with one of its parameters off neutral and the rest neutral: what a sensitivity
    profile asks for one by one, so the applier may compute them together (``PlanApplier.peers``)."""
    neutral = neutral_assignment(space) if neutral is None else neutral
    out: dict[str, tuple[Any, ...]] = {}
    for name, key in space.layer_keys.items():
        seen: dict[Any, None] = {}
        for t in axes():
            param = f"{key}:{t.dim}"
            for option in space.params.get(param, ()):
                choice = space.layer_plan(name, {**neutral, param: option})[1]
                if not choice.is_identity:
                    seen[choice] = None
        if seen:
            out[name] = tuple(seen)
    return out


def _reference() -> Technique:
    return next(t for t in axes() if t.reference_axis)


def uniform_assignment(space: SearchSpace, quant: str) -> dict[str, str] | None:
    """Every reference-axis choice (quantization) at ``quant``, everything else neutral; None if some
    choice does not offer ``quant``."""
    ref = _reference()
    out = neutral_assignment(space)
    for p, opts in space.params.items():
        if p.rpartition(":")[2] != ref.dim:
            continue
        if quant in opts:
            out[p] = quant
        elif quant.split("/")[0] in ("int8", "int8f") and "8c" in opts:  # layers without W8A8 kernels
            # (embeddings) keep 8-bit weights
            out[p] = "8c"
        else:
            return None
    return out


def reference_assignments(space: SearchSpace) -> dict[str, dict[str, str]]:
    """The uniform plans every study starts from: one per quantization option all layers share
    (e.g. ``uniform-8c``, ``uniform-4g128``), least compressed first."""
    ref = _reference()
    labels: list[str] = []
    for p, opts in space.params.items():
        if p.endswith(f":{ref.dim}"):
            labels += [o for o in opts if o != ref.neutral and o not in labels]
    out = {}
    for lab in labels:
        a = uniform_assignment(space, lab)
        if a is not None:
            out[f"uniform-{lab}"] = a
    return out
