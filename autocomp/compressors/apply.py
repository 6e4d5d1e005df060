"""Apply a plan to a live model by swapping weights in, and undo it by swapping the originals back.

The model is never reloaded or deep-copied per trial: :meth:`PlanApplier.applied` replaces each affected
parameter's ``.data`` with a compressed tensor and restores the original tensor object afterwards, so the
weights come back bit for bit. Compressed weights are cached (LRU, bounded in bytes) by (layer, choice,
structured shape), and per-layer expensive work (SVD, magnitude sorts, unit orders) is computed once. With a
:class:`~autocomp.compressors.store.WeightStore` (the search sets one) the dear ones are also kept on disk
for other processes and later runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import OrderedDict
from typing import Any, Iterator

from autocomp.compressors.base import LayerContext, Part
from autocomp.compressors.pipeline import check_layer, reconstruct, run_pipeline
from autocomp.compressors.structured import kept_index, kept_units, scatter, structured_shape, unit_order
from autocomp.desc import ModelDesc
from autocomp.errors import AutocompError, PlanMismatchError
from autocomp.models.introspect import compressible_modules, fingerprint, matrix_to_weight, weight_matrix_view
from autocomp.plan import Plan

__all__ = ["PlanApplier", "LayerCache", "check_plan", "default_cache_bytes"]


def check_plan(plan: Plan, desc: ModelDesc) -> None:
    """Refuse a plan made for another model, or one the packed format cannot hold."""
    if plan.fingerprint and plan.fingerprint != desc.fingerprint:
        raise PlanMismatchError(
            f"plan was made for model {plan.model_spec or '?'} (fingerprint {plan.fingerprint}), "
            f"not for {desc.spec} (fingerprint {desc.fingerprint}); search again for this model"
        )
    names = desc.by_name
    unknown = [n for n in plan.layers if n not in names]
    for g in plan.structured.values():
        unknown += [n for n in (*g.producers, *g.consumers) if n not in names]
    if unknown:
        raise PlanMismatchError(
            f"plan names {len(unknown)} layer(s) this model does not have (first: {unknown[0]!r}); "
            "it was made for another model"
        )
    for key, g in plan.structured.items():
        for n in g.producers:
            if names[n].rows % g.units:
                raise AutocompError(f"structured group {key!r}: {n} has {names[n].rows} rows, not divisible by {g.units} units")
        for n in g.consumers:
            if names[n].cols % g.units:
                raise AutocompError(f"structured group {key!r}: {n} has {names[n].cols} inputs, not divisible by {g.units} units")
    for name, choice in plan.layers.items():
        check_layer(choice, names[name], *structured_shape(names[name], plan.structured))


def _refit(w: Any, h: Any, cols: Any) -> Any:
    """Least-squares refit of ``w``'s kept columns: ``argmin_V E||W x - V x_k||^2 = W H[:, k] H[k, k]^-1``."""
    import torch

    from autocomp.compressors.compensate import dampened

    hk = dampened(h.index_select(0, cols).index_select(1, cols))
    rhs = (w.double() @ h.index_select(1, cols)).T  # [k, rows]
    return torch.linalg.solve(hk, rhs).T.float().contiguous()


def _nbytes(value: Any) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class LayerCache(OrderedDict):
    """Layer-only intermediate results shared across trials (magnitude orders, SVDs, 2:4 masks, unit orders,
    inverse Cholesky factors): least recently used first out once they hold more than ``limit`` bytes.
    Every entry is a deterministic function of the original weights, so an evicted one is recomputed
    identically. (An SVD of a 1024x4096 matrix is 1.25x the matrix; unbounded, they made a 1.3 GB model's
    caches larger than the model.)"""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.nbytes = 0
        self.small: dict[Any, Any] = {}  # entries of a few bytes (magnitude thresholds): never evicted
        self._sizes: dict[Any, int] = {}

    def get(self, key: Any, default: Any = None) -> Any:
        if key in self:
            self.move_to_end(key)
            return super().__getitem__(key)
        return default

    def take(self, key: Any) -> Any:
        """Remove and return the entry (None if absent): what is used once and then kept elsewhere."""
        if key not in self:
            return None
        self.nbytes -= self._sizes.pop(key)
        return super().pop(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if key in self:
            self.nbytes -= self._sizes.pop(key)
        super().__setitem__(key, value)
        self.move_to_end(key)
        size = self._sizes[key] = _nbytes(value)
        self.nbytes += size
        while self.nbytes > self.limit and len(self) > 1:
            old, _ = self.popitem(last=False)
            self.nbytes -= self._sizes.pop(old)


def default_cache_bytes(desc: ModelDesc) -> int:
    """The bound of each of the applier's two caches (compressed weights, layer intermediates): 1 GiB up to
    LARGE_MODEL_BYTES of fp32 weights (a MiniLM-sized model keeps all its work, its 94 MB embedding sort
    order included: with 256 MiB, cold random plans ran at half the speed), above it an eighth of the fp32
    bytes (at most 1 GiB), so a 1.3 GB model's search stays within 3x its weights (at a fifth: 3.00x)."""
    from autocomp.memory import LARGE_MODEL_BYTES

    if desc.fp32_bytes <= LARGE_MODEL_BYTES:
        return 1 << 30
    return int(min(1 << 30, desc.fp32_bytes // 8))


class PlanApplier:
    """Swaps compressed weights into ``model`` for the duration of a ``with applied(plan):`` block."""

    def __init__(self, model: Any, desc: ModelDesc, cache_bytes: int | None = None,
                 row_subsets: dict[str, Any] | None = None) -> None:
        """``row_subsets``: for Embedding layers, the only rows the caller will ever look up (e.g. the
        calibration tokens). Only those rows are compressed; the others keep their original values,
        which cannot change any output the caller computes. Exact for the proxy, and ~50x less work
        for a 30k-token vocabulary. ``cache_bytes``: the bound of each cache (default
        :func:`default_cache_bytes`)."""
        mods = compressible_modules(model)
        self.row_subsets = dict(row_subsets or {})
        self.model = model
        self.desc = desc
        self.modules = {layer.name: mods[layer.name] for layer in desc.layers}
        self.cache_bytes = default_cache_bytes(desc) if cache_bytes is None else cache_bytes
        self.cache: LayerCache = LayerCache(self.cache_bytes)  # SVDs, sort orders, unit orders
        self._weights: OrderedDict[Any, tuple[Any, Any]] = OrderedDict()
        self._weights_bytes = 0
        self._tables: dict[str, Any] = {}  # a row-subset layer's one full-size working copy (see compressed)
        self._store: Any = None
        # per layer, the choices a search will ask for one by one (its space's options): techniques may compute
        # them together (:attr:`LayerContext.peers`); empty (the default) computes each choice alone
        self.peers: dict[str, tuple[Any, ...]] = {}
        self._store_parts: dict[Any, Any] = {}
        if fingerprint(model) != desc.fingerprint:
            raise PlanMismatchError("model does not match its description (fingerprint differs)")

    @property
    def store(self) -> Any:
        """A :class:`~autocomp.compressors.store.WeightStore` the compressed weights are also read from and
        written to (shared between processes and runs), or None (the default: memory only)."""
        return self._store

    @store.setter
    def store(self, store: Any) -> None:
        from autocomp.search.sensitivity import weights_hash

        if store is not None and not self._store_parts:  # hashed now, while the model holds its own weights
            self._store_parts = {"weights": weights_hash(self.model), "layout": self.desc.fingerprint}
        self._store = store

    # -- per-layer compressed tensors ------------------------------------------------------------------
    def _matrix(self, name: str) -> Any:
        mod, kind = self.modules[name]
        return weight_matrix_view(kind, mod.weight.data)

    def kept_indices(self, plan: Plan, name: str) -> tuple[Any, Any, tuple[int, ...]]:
        """(kept rows or None, kept columns or None, a cache key of the cut) of one layer under ``plan``'s
        structured groups; which units stay is decided once per group (from the weights, or the order the
        plan stores)."""
        import torch

        rows = cols = None
        key: list[int] = []
        for gname, g in sorted(plan.structured.items()):
            if g.keep >= g.units or (name not in g.producers and name not in g.consumers):
                continue
            okey = ("unit_order", gname, g.units, g.producers, g.consumers)
            order = self.cache.get(okey) if not g.order else torch.tensor(g.order, dtype=torch.long)
            if order is None:
                order = self.cache[okey] = unit_order(g, {n: self._matrix(n) for n in (*g.producers, *g.consumers)})
            units = kept_units(order, g.keep)
            m = self._matrix(name)
            tag = [g.keep, int(g.refit), *g.order]  # the same count of other units is another matrix
            if name in g.producers:
                rows = kept_index(units, m.shape[0], g.units)
                key += [0, *tag]
            if name in g.consumers:
                cols = kept_index(units, m.shape[1], g.units)
                key += [1, *tag]
        return rows, cols, tuple(key)

    def cut_matrix(self, plan: Plan, name: str) -> tuple[Any, Any, Any, tuple[int, ...]]:
        """(the layer's float32 matrix cut by the plan's structured groups, kept rows, kept columns, cut key).
        A consumer of a ``refit`` group gets its kept columns refit to what the removed units contributed:
        ``W H[:, k] H[k, k]^-1`` (least squares on the calibration inputs, dampened as GPTQ's)."""
        import torch

        rows, cols, skey = self.kept_indices(plan, name)
        with torch.no_grad():
            m = self._matrix(name).float()
            if rows is not None:
                m = m.index_select(0, rows)
            if cols is not None:
                if any(g.refit and g.keep < g.units and name in g.consumers for g in plan.structured.values()):
                    key = ("refit", name, skey)
                    fit = self.cache.get(key)
                    if fit is None:
                        fit = self.cache[key] = _refit(m, self.context(name, (), None).hessian(), cols)
                    m = fit
                else:
                    m = m.index_select(1, cols)
        return m, rows, cols, skey

    def layer_parts(self, plan: Plan, name: str) -> tuple[list[Part], Any, Any]:
        """The stored parts of one layer under ``plan`` plus the kept row / column indices (or None)."""
        import torch

        m, rows, cols, skey = self.cut_matrix(plan, name)
        with torch.no_grad():
            choice = plan.layer(name)
            if choice.is_identity:
                return [Part(values=m)], rows, cols
            subset = self.row_subsets.get(name) if rows is None and cols is None else None
            return run_pipeline(m, choice, self.context(name, skey, cols), row_subset=subset), rows, cols

    def context(self, name: str, skey: tuple[int, ...], cols: Any) -> LayerContext:
        """Where a layer's techniques run: this applier's cache and the model's calibration statistics."""
        from autocomp.compressors.calibration import attached

        width = int(self._matrix(name).shape[1]) if cols is None else len(cols)
        return LayerContext(name, skey, self.cache, stats=attached(self.model), cols=cols, width=width,
                            peers=() if skey else self.peers.get(name, ()))

    def compressed(self, plan: Plan, name: str) -> tuple[Any, Any]:
        """(weight, bias) in the module's own shapes and dtypes, or (None, None) if unchanged.

        A layer with a row subset (an embedding table the caller looks up only there) is cached as those
        rows alone and returned in one full-size working copy per layer, the subset rows written into it:
        that weight is valid until the next call for the same layer. (A dense copy of MiniLM's word table
        per option was 47 MB: twenty of them filled the cache and evicted every Linear layer's work.)"""
        import torch

        choice = plan.layer(name)
        rows, cols, skey = self.kept_indices(plan, name)
        if choice.is_identity and rows is None and cols is None:
            return None, None
        ckey = (name, choice, skey)
        mod, kind = self.modules[name]
        subset = self.row_subsets.get(name) if rows is None and cols is None else None
        hit = self._weights.get(ckey)
        if hit is not None:
            self._weights.move_to_end(ckey)
            return self._table(name, subset, hit[0]) if subset is not None else hit
        dkey = self._store_key(name, choice, skey) if self.store is not None else None
        got = self.store.get(dkey) if dkey is not None else None
        if got is not None:
            w, bias = got
            sub = w
        else:
            t0 = time.perf_counter()
            with torch.no_grad():
                parts, rows, cols = self.layer_parts(plan, name)
                sub = reconstruct(parts)
                full_m = weight_matrix_view(kind, mod.weight.data)
                bias = None
                if subset is not None:
                    w = sub = sub.contiguous()
                else:
                    w = matrix_to_weight(kind, scatter(sub, rows, cols, tuple(full_m.shape)), mod.weight).contiguous()
                    if rows is not None and getattr(mod, "bias", None) is not None and \
                            mod.bias.numel() == full_m.shape[0]:
                        bias = torch.zeros_like(mod.bias.data)
                        bias[rows] = mod.bias.data[rows]
            if dkey is not None:
                self.store.put(dkey, w, bias, seconds=time.perf_counter() - t0)
        self._weights[ckey] = (w, bias)
        self._weights_bytes += w.numel() * w.element_size()
        while self._weights_bytes > self.cache_bytes and len(self._weights) > 1:
            _, (old, _) = self._weights.popitem(last=False)
            self._weights_bytes -= old.numel() * old.element_size()
        return self._table(name, subset, sub) if subset is not None else (w, bias)

    def _store_key(self, name: str, choice: Any, skey: tuple[int, ...]) -> str:
        """The :class:`~autocomp.compressors.store.WeightStore` key of one compressed weight: the model's
        weights, the statistics where the option or the cut uses them, the looked-up rows of a table."""
        from autocomp.compressors.calibration import attached
        from autocomp.compressors.store import WeightStore

        subset = self.row_subsets.get(name) if not skey else None
        sdigest = None
        if subset is not None:
            sdigest = self._store_parts.get(("rows", name))
            if sdigest is None:
                sdigest = self._store_parts[("rows", name)] = hashlib.sha256(
                    subset.contiguous().numpy().tobytes()).hexdigest()[:16]
        stats = attached(self.model)
        uses = skey or any(t.calibrated(c) for t, c in choice.steps())
        return WeightStore.key(weights=self._store_parts["weights"], layout=self._store_parts["layout"],
                               stats=stats.key if stats is not None and uses else None, rows=sdigest, layer=name,
                               plan=choice.to_dict(), cut=list(skey))

    def _table(self, name: str, subset: Any, sub: Any) -> tuple[Any, None]:
        """The full-size weight of a row-subset layer with ``sub`` in its subset rows (the other rows: the
        original values, which the caller never reads)."""
        import torch

        mod, kind = self.modules[name]
        # a normal tensor, written in place whether the caller runs under inference mode or not (an inference
        # tensor could not be written outside it)
        with torch.inference_mode(False), torch.no_grad():
            buf = self._tables.get(name)
            if buf is None:
                buf = self._tables[name] = weight_matrix_view(kind, mod.weight.data).detach().clone().float()
            buf[subset] = sub
        return matrix_to_weight(kind, buf, mod.weight).contiguous(), None

    @contextlib.contextmanager
    def applied(self, plan: Plan) -> Iterator[None]:
        """Within the block the model computes with the plan's weights; afterwards it is restored.

        Techniques that act on a layer's inputs (W8A8: activations quantized on the fly exactly as torch's
        dynamic int8 Linear does on x86) hook them for the block, so the proxy sees what real kernels do."""
        check_plan(plan, self.desc)
        saved: list[tuple[Any, str, Any]] = []
        hooks = [self.modules[n][0].register_forward_pre_hook(h)
                 for n, c in plan.layers.items() if n in self.modules for h in c.input_hooks()]
        try:
            for name in self.modules:
                w, b = self.compressed(plan, name)
                if w is None:
                    continue
                mod, _ = self.modules[name]
                saved.append((mod, "weight", mod.weight.data))
                mod.weight.data = w
                if b is not None:
                    saved.append((mod, "bias", mod.bias.data))
                    mod.bias.data = b
            yield
        finally:
            for h in hooks:
                h.remove()
            for mod, attr, data in reversed(saved):
                getattr(mod, attr).data = data

