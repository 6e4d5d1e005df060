"""Reuse of block outputs across proxy evaluations: a trial recomputes only the blocks its plan changes.

A search's trials are mostly small moves from plans it has already scored (the refine sampler mutates a few
layers of a front plan; TPE's proposals share most choices with good trials), and the proxy is a forward pass,
which before this recomputed every block of the model whatever changed. :class:`BlockCache` keeps the outputs
of the model's repeated blocks (the children of every ``ModuleList`` / ``Sequential``) per calibration batch,
keyed by exactly what determines them:

* the batch;
* the options of every compressible layer that has run before the block in this batch, in order (everything
  the block's inputs can depend on: a forward pass is a sequence, and only those layers' weights differ
  between plans): blocks stand for all the layers registered under them, and the layers outside blocks
  count from their forward hooks, or from the start where their hooks never fire (a weight its owner's
  parent multiplies with directly, as ``nn.MultiheadAttention`` does with ``out_proj``);
* the options of every compressible layer registered inside the block.

A layer's "option" is what the applier's compressed-weight cache keys it by (its choice and its cut by
structured groups), and it counts wherever its weight is computed with: a head tied to an embedding table
runs with the table's option even where the model description lists the table alone. So a
hit returns the very tensors the block computed before under the same weights and inputs, and the proxy is
bit for bit what it is without the cache (tested). Outputs are cloned on the way in and out, so nothing a
caller does in place reaches them. Least recently used entries go first beyond ``limit`` bytes.

Assumptions, true of torch and Hugging Face models: a block reads other layers' weights only through modules
registered under it, its own weights are read only by it, it does not write its inputs in place, and it
runs the same way on the same inputs (eval mode, no sampling). A reused block's side effects are not
replayed: a Hugging Face KV cache misses its layer, which the proxy's single pass never reads back (tested on
GPT-2). A block that ran a compressible layer registered outside it is never reused.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from autocomp.compressors.apply import _nbytes
from autocomp.desc import ModelDesc
from autocomp.plan import Plan

__all__ = ["BlockCache", "default_block_cache_bytes", "repeated_blocks"]


def default_block_cache_bytes(desc: ModelDesc) -> int:
    """256 MiB up to LARGE_MODEL_BYTES of fp32 weights (MiniLM: ~50 trials' changed blocks), none above it: a
    large model's search is held within 3x its weights (see default_cache_bytes), and what would fit there
    (a few of a 1024-wide model's 10 MB block outputs) is less than one trial's history."""
    from autocomp.memory import LARGE_MODEL_BYTES

    return 256 << 20 if desc.fp32_bytes <= LARGE_MODEL_BYTES else 0


def repeated_blocks(model: Any, layer_modules: dict[int, str]) -> list[tuple[str, Any]]:
    """(name, module) of the outermost children of ``ModuleList`` / ``Sequential`` containers that hold a
    compressible layer (``layer_modules``: id(module) -> layer name)."""
    import torch

    out: list[tuple[str, Any]] = []
    taken: set[int] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)) or id(mod) in taken:
            continue
        for child_name, child in mod.named_children():
            subtree = list(child.modules())
            if any(id(m) in taken for m in subtree):
                continue
            if any(id(m) in layer_modules for m in subtree):
                out.append((f"{name}.{child_name}" if name else child_name, child))
                taken.update(id(m) for m in subtree)
    return out


def _clone(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def _cacheable(value: Any) -> bool:
    """Tensors, None and plain tuples / lists of them (what blocks return); anything else is not reused."""
    import torch

    if value is None or isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return all(_cacheable(v) for v in value)
    return False


class BlockCache:
    """Block outputs of one model reused across plans (see the module docstring). Use::

        with cache.observe():                      # once, on the original model: which layers' hooks fire
            for batch in batches:
                model(**batch)
        with cache.active(plan, layer_key):
            for i, batch in enumerate(batches):
                with cache.batch(i):
                    out = model(**batch)

    ``layer_key(plan, name)`` is a hashable that determines layer ``name``'s weights under ``plan``."""

    def __init__(self, model: Any, desc: ModelDesc, limit: int | None = None) -> None:
        from autocomp.models.introspect import compressible_modules

        mods = compressible_modules(model)
        owners: dict[int, list[str]] = {}  # weight tensor -> the layers of ``desc`` holding it
        for layer in desc.layers:
            if layer.name in mods:
                owners.setdefault(id(mods[layer.name][0].weight), []).append(layer.name)
        # every module computing with a layer's weight (a tied head the description leaves out, too) -> those layers
        self.uses = {n: tuple(owners[id(m.weight)]) for n, (m, _) in mods.items() if id(m.weight) in owners}
        self.modules = {n: mods[n][0] for n in self.uses}
        by_id = {id(m): n for n, m in self.modules.items()}
        self.blocks = [(name, mod, tuple(sorted({x for m in mod.modules() if id(m) in by_id for x in self.uses[by_id[id(m)]]})),
                        {by_id[id(m)] for m in mod.modules() if id(m) in by_id})
                       for name, mod in repeated_blocks(model, by_id)]
        self._outside()
        self.silent = list(self.outside)  # outside modules whose hooks never fire (until observe() says)
        self.limit = default_block_cache_bytes(desc) if limit is None else limit
        self.entries: OrderedDict[Any, Any] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0
        self.uncacheable: set[str] = set()
        self._keys: dict[str, Any] = {}
        self._start: Any = None
        self._state: Any = None
        self._log: list[str] = []

    def _outside(self) -> None:
        inside = {m for *_, ms in self.blocks for m in ms}
        self.outside = [n for n in self.modules if n not in inside]

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0

    @contextlib.contextmanager
    def observe(self) -> Iterator[None]:
        """Watch the passes run within: blocks that never run as modules (a ``ModuleDict``'s children called one
        by one) are not blocks, and layers outside blocks whose hooks never fire count from the start."""
        fired: set[str] = set()
        called: set[str] = set()
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: fired.add(n)) for n, m in self.modules.items()]
        hooks += [m.register_forward_hook(lambda mod, i, o, n=n: called.add(n)) for n, m, *_ in self.blocks]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
        self.blocks = [b for b in self.blocks if b[0] in called]
        self._outside()
        self.silent = [n for n in self.outside if n not in fired]

    @contextlib.contextmanager
    def active(self, plan: Plan, layer_key: Any) -> Iterator[None]:
        """Within the block, the model's repeated blocks reuse stored outputs for ``plan``."""
        if not self.blocks or self.limit <= 0:
            yield
            return
        self._keys = {n: layer_key(plan, n) for n in {x for u in self.uses.values() for x in u}}
        self._start = tuple(self._keys[x] for n in self.silent for x in self.uses[n])
        hooks = [m.register_forward_hook(self._ran(self.uses[n])) for n, m in self.modules.items()]
        patched = []
        try:
            for name, mod, inside, _ in self.blocks:
                previous = mod.__dict__.get("forward")
                mod.forward = self._wrap(name, mod.forward, tuple(self._keys[n] for n in inside), frozenset(inside))
                patched.append((mod, previous))
            yield
        finally:
            for h in hooks:
                h.remove()
            for mod, previous in patched:
                if previous is None:
                    del mod.forward
                else:
                    mod.forward = previous
            self._keys, self._state = {}, None

    @contextlib.contextmanager
    def batch(self, index: int) -> Iterator[None]:
        """One calibration batch's forward pass (the state every key starts from)."""
        self._state, self._log = ("batch", index, self._start), []
        try:
            yield
        finally:
            self._state = None

    def _ran(self, layers: tuple[str, ...]) -> Any:
        def hook(module: Any, inputs: Any, output: Any) -> None:
            if self._state is not None:
                for name in layers:
                    self._state = (self._state, self._keys[name])
                    self._log.append(name)
        return hook

    def _wrap(self, name: str, forward: Any, inside_keys: tuple[Any, ...], inside: frozenset[str]) -> Any:
        def cached(*args: Any, **kwargs: Any) -> Any:
            if self._state is None:
                return forward(*args, **kwargs)
            key = (self._state, name, inside_keys)  # a second call of a block has another state: the first
            if name not in self.uncacheable:
                hit = self.entries.get(key)
                if hit is not None:
                    self.entries.move_to_end(key)
                    self.hits += 1
                    self._state = key  # the block stands for every layer under it
                    return _clone(hit)
                self.misses += 1
            start = len(self._log)
            out = forward(*args, **kwargs)
            if name in self.uncacheable or not inside.issuperset(self._log[start:]) or not _cacheable(out):
                self.uncacheable.add(name)
                self._state = (self._state, key)  # what ran as modules, and every layer under the block
                return out
            size = _nbytes(out)
            if size <= self.limit // 4:
                self.entries[key] = _clone(out)
                self.nbytes += size
                while self.nbytes > self.limit and self.entries:
                    _, old = self.entries.popitem(last=False)
                    self.nbytes -= _nbytes(old)
            self._state = key
            return out
        return cached
