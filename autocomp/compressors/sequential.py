"""Sequential statistics for one plan: each layer's H gathered on the inputs it sees once every layer before it
is compressed as the plan says (GPTQ's own order of work: Frantar et al., 2022, quantize "sequentially", each
layer on the outputs of the already quantized ones).

The search cannot work this way: it scores thousands of plans from options computed once per (layer, option)
on the original model's statistics (:mod:`.calibration`), so that a trial costs one forward pass. Once a plan
is chosen, its compensated layers can be computed again on the inputs the compressed model really gives them:
an error upstream is then compensated downstream instead of compounding. :func:`sequential_statistics` makes
that a set of :class:`~.calibration.CalibrationStats` of its own (the original statistics where a layer needs
none or is an embedding table, whose statistics are output-side) under its own key; ``autocomp plan
--sequential`` saves it beside the search's and records its key in the plan, so ``evaluate``, ``train`` and
``export`` use it with no other change (the untrained student still equals what ``evaluate`` scores). The
weights of layer k depend on every choice before it, so the statistics belong to that plan alone.

Measured on MiniLM's best plans at 6 / 10 / 12% of fp32 (docs/BENCHMARKS.md): held-out drift 0.945-1.03x of
the search's statistics, MRR higher in five plans of six (+0.3 to +1.5 points; the 6% codebook plan 94.4% ->
97.3% of fp32, a gain inside the metric's paired noise at 500 pairs). Refitting each layer to the original
layer's outputs as well (``W C H'^-1``, with ``C`` the cross moment of the original and compressed inputs)
lowered the calibration drift but cost 3 MRR points (it fits the calibration text), so it is not done.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable

from autocomp.compressors.calibration import CalibrationStats, _rows_of, attach, attached, share_key
from autocomp.errors import AutocompError

__all__ = ["sequential_key", "sequential_statistics"]

VERSION = 1


def sequential_key(base_key: str, plan: Any) -> str:
    """20 hex digits naming (the statistics it starts from, the plan's layers and cuts, this method)."""
    d = plan.to_dict()
    body = {"base": base_key, "layers": d.get("layers"), "structured": d.get("structured"), "sequential": VERSION}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]


def forward_order(model: Any, names: list[str], batch: Any) -> list[str]:
    """``names`` in the order one forward pass first runs them (those it never runs last, as given)."""
    import torch

    from autocomp.models.base import run_batch
    from autocomp.models.introspect import compressible_modules

    mods = compressible_modules(model)
    seen: list[str] = []
    hooks = [mods[n][0].register_forward_pre_hook(lambda m, a, n=n: None if n in seen else seen.append(n))
             for n in names]
    try:
        with torch.inference_mode():
            run_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return seen + [n for n in names if n not in seen]


def sequential_statistics(loaded: Any, desc: Any, plan: Any, log: Callable[[str], None] = lambda s: None
                          ) -> CalibrationStats:
    """The statistics of ``plan``'s compensated layers gathered in forward order on the model with every
    earlier layer compressed by the plan (computed with the statistics gathered so far). ``loaded``'s model
    must have the plan's original statistics attached (:func:`~.calibration.ensure`); it is left as it was."""
    import torch

    from autocomp.compressors.apply import PlanApplier
    from autocomp.models.base import run_batch
    from autocomp.models.introspect import compressible_modules

    base = attached(loaded.module)
    if base is None:
        raise AutocompError("sequential statistics start from the plan's calibration statistics; none are attached")
    model = loaded.module
    batches = loaded.stats_batches() if loaded.stats_batches is not None else loaded.batches
    mods = compressible_modules(model)
    names = [layer.name for layer in desc.layers]
    order = forward_order(model, names, batches[0])
    t0 = time.perf_counter()
    hess = dict(base.hessians)
    rows = dict(base.rows)
    saved: list[tuple[Any, str, Any]] = []
    redone, passes = 0, 0
    pending = [n for n in order if mods[n][1] != "Embedding" and n in base.hessians
               and any(t.calibrated(c) for t, c in plan.layer(n).steps())]
    early: dict[str, tuple[Any, int]] = {}  # gathered with an earlier layer that reads the very same tensor
    try:
        for name in order:
            mod, kind = mods[name]
            if name in early:
                hess[name], rows[name] = early.pop(name)
                redone += 1
            elif name in pending:
                later = {n: mods[n][0] for n in pending[pending.index(name) + 1:]
                         if share_key(*mods[n][::-1]) == share_key(kind, mod)}
                h, n, shared = _gather_one(model, mod, kind, batches, run_batch, later)
                passes += 1
                if n:
                    same = next((x for x in hess.values() if x.shape == h.shape and torch.equal(x, h)), None)
                    hess[name], rows[name] = (h if same is None else same), n
                    early.update({s: (hess[name], n) for s in shared})
                    redone += 1
            attach(model, CalibrationStats(hess, f"sequential-partial-{name}", rows, weights=base.weights,
                                           plain=base.plain))
            # the full plan (its structured cuts), one layer; a fresh applier: no cache keyed by the old statistics
            w, b = PlanApplier(model, desc, cache_bytes=0).compressed(plan, name)
            if w is None:
                continue
            saved.append((mod, "weight", mod.weight.data))
            mod.weight.data = w
            if b is not None:
                saved.append((mod, "bias", mod.bias.data))
                mod.bias.data = b
    finally:
        for mod, attr, data in reversed(saved):
            getattr(mod, attr).data = data
        attach(model, base)
    seconds = time.perf_counter() - t0
    log(f"sequential statistics: {redone} layers gathered again on the compressed model's inputs "
        f"({passes} passes over the batches), {seconds:.1f} s")
    return CalibrationStats(hess, sequential_key(base.key, plan), rows, seconds, weights=base.weights,
                            plain=base.plain)


def _gather_one(model: Any, mod: Any, kind: str, batches: list[Any], run_batch: Any,
                later: dict[str, Any] | None = None) -> tuple[Any, int, list[str]]:
    """H (float32, mean over the input rows) of one layer's inputs over ``batches``, the row count, and which
    of the ``later`` layers (name -> module, run after it) read the very same tensor object in the first
    batch (as :func:`~.calibration.gather` decides sharing): the query / key / value of one attention block.
    Their inputs come before this layer, so no layer compressed in between changes them: they have the
    same statistics, and the pass is not repeated for them."""
    import torch

    state: dict[str, Any] = {"sum": None, "n": 0, "mask": None, "first": True, "input": None}
    shared: list[str] = []

    def hook(m: Any, args: tuple[Any, ...]) -> None:
        if not args or not torch.is_tensor(args[0]) or not torch.is_floating_point(args[0]):
            return
        if state["first"] and state["input"] is None:
            state["input"] = args[0]  # held until the batch ends: its id cannot be another tensor's meanwhile
        r = _rows_of(kind, m, args[0].detach(), state["mask"])
        if r is None:
            return
        r = r.double()
        state["sum"] = r.T @ r if state["sum"] is None else state["sum"] + r.T @ r
        state["n"] += r.shape[0]

    def follower(name: str) -> Any:
        def check(m: Any, args: tuple[Any, ...]) -> None:
            if state["first"] and args and state["input"] is not None and args[0] is state["input"] and name not in shared:
                shared.append(name)
        return check

    handles = [mod.register_forward_pre_hook(hook)]
    handles += [m.register_forward_pre_hook(follower(n)) for n, m in (later or {}).items() if m is not mod]
    try:
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                state["first"], state["input"] = i == 0, None
                state["mask"] = batch.get("attention_mask") if isinstance(batch, dict) else None
                run_batch(model, batch)
                if i == 0:  # sharing is decided on the first batch, as gather() decides it
                    for h in handles[1:]:
                        h.remove()
                    del handles[1:]
    finally:
        for h in handles:
            h.remove()
        state["input"] = None
    if not state["n"]:
        return None, 0, []
    return (state["sum"] / state["n"]).float(), state["n"], shared
