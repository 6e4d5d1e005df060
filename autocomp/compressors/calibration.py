"""Calibration statistics for the error-compensating compressors: per layer, the second moment of its inputs.

``H = (1/N) sum_x x x^T`` over every input row a layer sees on the calibration batches (tokens masked out by
an ``attention_mask`` are left out), in the column order of the layer's weight matrix: a Linear's or HF
Conv1D's input features; a Conv1d's / Conv2d's unfolded patches (``in_channels x kernel``, the order of
``weight.reshape(out, -1)``), so a convolution is the matmul it computes. Grouped convolutions get none and
keep round-to-nearest / magnitude / SVD options.

Embedding tables are a lookup: their "input" is one-hot, so an input second moment is diagonal and leaves
nothing to compensate. What matters for a table is the other side: a row's error ``e`` enters the network as
it is, and the proxy's distortion grows by about ``e^T G e`` with ``G = E[J^T J]``, the output-side Gauss-Newton
matrix of the table's output (``J``: the model's output with respect to it). That is the quantity GPTQ
minimizes per row with ``H`` (``||(W - Q) X||^2 = sum_rows (w - q)^T H (w - q)``), so a table's statistic is
``G``, over the same ``d`` columns, and every compensated method runs on it unchanged. ``G`` is estimated with
random output probes (as the Fisher sensitivity does: a Gaussian probe for ``mse``, one orthogonal to the
output for embedding metrics, a sample of the softmax for ``kl``), one backward pass per batch, over the
tokens the mask keeps. The same ``G`` serves every row: it is not weighted by how often the calibration text
looks a row up, so rows the text never uses are not left behind. A table whose weight another layer shares
(a tied output head) gets none: ``G`` would ignore the head; its compensated options are the clipped grid
(``H = I``), as are those of a table no gradient reaches (a model that detaches it). On MiniLM's word-embedding table, GPTQ with ``G`` drifts 18-22% less on held-out text than
the clipped grid at 2-4 bits, SparseGPT 27% less than magnitude pruning at 60% (docs/BENCHMARKS.md).

The data: a model's ``stats_batches`` where it brings them (the built-in MiniLM: the 480 sentences of its
512-sentence calibration pool that the proxy never scores, 9k token rows), else its calibration batches. With
statistics from the very rows the proxy scores, a compensated option fits them: MiniLM's 548 calibration
token rows are fewer than its FFN's 1,536 inputs, and the search then preferred options whose calibration
drift was several times their held-out drift (docs/BENCHMARKS.md). A user's ``--data`` serves both unless
the model provides more; give it several times more token rows than the widest layer has inputs.

One forward pass over the *original* model gathers every layer's statistics. We chose this over the
sequential variant (each layer's inputs taken from already-compressed earlier layers, as GPTQ runs on a
whole model with one fixed setting) because a search scores many combinations: with sequential statistics a
layer's compensated weights would depend on every earlier layer's option, and could not be computed once per
(layer, option) and reused across trials. Layers that read the same tensor (a transformer's q/k/v) share one
matrix. Accumulated in float64, stored as float32.

The statistics are cached on disk (``<studies>/calibration/<key>.safetensors``, written atomically) under a
key of the model's weights and the calibration data, and attached to the model object
(:func:`attach` / :func:`attached`) so that every path applying a plan -- the proxy, ``train``, ``export``,
``evaluate`` -- computes the same compensated weights. Plans scored with them record the key
(``meta.calibration``): ``train`` / ``export`` / ``evaluate`` read that file back by its key (and check the
weights); without it they recompute from their ``--data``, and refuse data that give another key instead of
silently computing other weights.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from autocomp.errors import AutocompError

__all__ = [
    "CalibrationStats",
    "attach",
    "attached",
    "calibration_key",
    "ensure",
    "gather",
    "load_or_gather",
    "plan_needs",
    "space_needs",
]

FORMAT = "autocomp.calibration/2"  # /2 adds the embedding tables' output-side statistics
READS = ("autocomp.calibration/1", FORMAT)  # /1 files (no table statistics) still serve the plans made with them
_ATTR = "_autocomp_calibration"


class CalibrationStats:
    """name -> H (float32 ``[cols, cols]``, shared between layers reading the same input)."""

    def __init__(self, hessians: Mapping[str, Any], key: str, rows: Mapping[str, int], seconds: float = 0.0,
                 weights: str = "", plain: Any = ()) -> None:
        self.hessians = dict(hessians)
        self.plain = set(plain)  # tables with no statistic of their own (tied): compensated options see H = I
        self.key = key
        self.weights = weights  # weights_hash of the model they were gathered on
        self.rows = dict(rows)  # input rows (tokens, patches) each statistic averages
        self.seconds = seconds
        self.path: str | None = None

    def __deepcopy__(self, memo: Any) -> CalibrationStats:  # read-only: a model copy (the student) shares it
        return self

    def has(self, name: str) -> bool:
        return name in self.hessians

    def hessian(self, name: str, cols: Any = None, width: int | None = None) -> Any:
        """H of layer ``name`` (float64), restricted to the kept input columns ``cols`` (structured cuts);
        an identity of ``width`` columns for a table without its own statistic."""
        import torch

        h = self.hessians.get(name)
        if h is None and name in self.plain and width is not None:
            h = torch.eye(width, dtype=torch.float64)
        if h is None:
            raise AutocompError(f"layer {name} has no calibration statistics (a grouped convolution, or statistics "
                                f"gathered before embedding tables had them: delete {self.path or 'the cached file'} "
                                f"to gather them again): use a round-to-nearest / magnitude / plain SVD option for it")
        h = h.double()
        if cols is not None:
            h = h.index_select(0, cols).index_select(1, cols)
        return h

    def nbytes(self) -> int:
        seen = {id(h): h.numel() * h.element_size() for h in self.hessians.values()}
        return sum(seen.values())

    # -- disk -----------------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        from autocomp.files import atomic_write

        unique: dict[int, str] = {}
        alias: dict[str, str] = {}
        tensors = {}
        for name, h in sorted(self.hessians.items()):
            first = unique.setdefault(id(h), name)
            alias[name] = first
            if first == name:
                tensors[name] = h.contiguous()
        meta = {"format": FORMAT, "key": self.key, "alias": json.dumps(alias), "rows": json.dumps(self.rows),
                "seconds": f"{self.seconds:.3f}", "weights": self.weights, "plain": json.dumps(sorted(self.plain))}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        self.path = str(path)

    @classmethod
    def load(cls, path: Path, key: str) -> CalibrationStats | None:
        """The cached statistics, or None if the file is missing, damaged or for another key."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") not in READS or meta.get("key") != key:
                    return None
                alias = json.loads(meta["alias"])
                tensors = {n: f.get_tensor(n) for n in set(alias.values())}
            out = cls({n: tensors[a] for n, a in alias.items()}, key, json.loads(meta["rows"]), float(meta["seconds"]),
                      meta.get("weights", ""), json.loads(meta.get("plain", "[]")))
        except Exception:  # noqa: BLE001 - a damaged cache file (safetensors raises its own error types) is a miss
            return None
        out.path = str(path)
        return out


def share_key(kind: str, mod: Any) -> tuple[Any, ...]:
    """What, besides reading the same tensor, two layers need in common to have the same statistics: the kind,
    and for a convolution how it unfolds its input (a ResNet block's 3x3 conv and its 1x1 downsample read
    the same tensor and have different H)."""
    if kind in ("Conv2d", "Conv1d"):
        return (kind, tuple(mod.kernel_size), tuple(mod.dilation), str(mod.padding), tuple(mod.stride), mod.groups,
                mod.padding_mode)
    return (kind,)


def _rows_of(kind: str, mod: Any, x: Any, token_mask: Any) -> Any:
    """The layer's input as ``[N, cols]`` rows of its weight matrix's column space, or None (no statistics)."""
    import torch

    if kind in ("Linear", "Conv1D"):
        if token_mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(token_mask.shape):
            x = x[token_mask.bool()]
        return x.reshape(-1, x.shape[-1])
    if kind in ("Conv2d", "Conv1d"):
        if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            return None
        if kind == "Conv1d":
            x = x.unsqueeze(2)
            k, d, p, s = (1, mod.kernel_size[0]), (1, mod.dilation[0]), (0, mod.padding[0]), (1, mod.stride[0])
        else:
            k, d, p, s = mod.kernel_size, mod.dilation, mod.padding, mod.stride
        if x.dim() == 3:  # unbatched
            x = x.unsqueeze(0)
        cols = torch.nn.functional.unfold(x, k, dilation=d, padding=p, stride=s)  # [B, C*k, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return None


def output_probe(metric: str, y: Any, gen: Any, rows: Any = None) -> Any:
    """A random probe ``r`` of the output rows ``y`` ``[N, width]`` whose ``E[r r^T]`` is the metric's
    Gauss-Newton matrix at the original model (up to a constant): a sample of the softmax minus its mean for
    ``kl``; a Gaussian orthogonal to each row, over its norm, for embedding metrics (cosine, tower,
    alignment); a Gaussian for ``mse``. ``rows``: the original outputs (default: ``y`` itself)."""
    import torch

    if metric == "kl":  # the model holds its original weights here: its softmax is the teacher's
        pr = torch.softmax(y.detach(), -1)
        c = torch.multinomial(pr, 1, generator=gen).squeeze(-1)
        return torch.nn.functional.one_hot(c, pr.shape[-1]).float() - pr
    r = torch.randn(y.shape, generator=gen)
    if metric in ("cosine", "tower") or metric.startswith("alignment"):
        rows = y.detach() if rows is None else rows
        norm = rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        u = rows / norm
        r = (r - (r * u).sum(-1, keepdim=True) * u) / norm
    return r


def _table_statistics(model: Any, tables: list[str], mods: Mapping[str, Any], batches: list[Any], metric: str,
                      seed: int = 0, each: Any = None) -> tuple[dict[str, Any], dict[str, int]]:
    """``G = E[g g^T]`` of each table's output rows, ``g`` the gradient of a random output probe (see the
    module docstring): one forward and backward pass per batch, gradients only for the tables' outputs.
    ``each(i, batch)``, if given, is called before batch ``i``'s forward pass, and then every batch runs
    forward even once no gradient reaches the tables (the input statistics' hooks ride on this pass)."""
    import torch

    from autocomp.models.base import extract_output, output_metric, run_batch

    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    outs: dict[str, Any] = {}

    def hook_for(name: str) -> Any:
        def hook(mod: Any, args: tuple[Any, ...], out: Any) -> Any:
            leaf = out.detach().requires_grad_(True)  # the gradient stops here: nothing upstream is needed
            outs[name] = leaf
            return leaf.clone()  # not the leaf itself: the model may add to its embeddings in place
        return hook

    hooks = [mods[n][0].register_forward_hook(hook_for(n)) for n in tables]
    saved = [(p, p.requires_grad) for p in model.parameters()]
    gen = torch.Generator().manual_seed(seed)
    reached = True
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for i, batch in enumerate(batches):
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            outs.clear()
            if each is not None:
                each(i, batch)
            with torch.enable_grad() if reached else torch.inference_mode():
                out = run_batch(model, batch)
                if not reached:
                    continue
                y, auto = extract_output(out)
                if metric == "auto":
                    metric = output_metric(auto, y, model, batch)
                y = y.float().reshape(-1, y.shape[-1])
                if not y.requires_grad:  # the output does not depend on the tables differentiably
                    reached = False
                    if each is None:
                        break
                    continue
                (output_probe(metric, y, gen) * y).sum().backward()
            for name, leaf in outs.items():
                g = leaf.grad
                if g is None:
                    continue
                if mask is not None and g.dim() >= 3 and tuple(g.shape[:2]) == tuple(mask.shape):
                    g = g[mask.bool()]
                g = g.reshape(-1, g.shape[-1]).double()
                sums[name] = sums[name] + g.T @ g if name in sums else g.T @ g
                counts[name] = counts.get(name, 0) + g.shape[0]
    finally:
        for h in hooks:
            h.remove()
        for p, flag in saved:
            p.requires_grad_(flag)
    return {n: (s / max(counts[n], 1)).float() for n, s in sums.items()}, counts


def gather(model: Any, desc: Any, batches: list[Any], key: str = "", metric: str = "auto") -> CalibrationStats:
    """One pass over ``batches`` with hooks: H for every compressible layer that has one and, if the model
    has embedding tables, their output-side statistics from a backward pass per batch on the same forward
    pass (``metric``: the proxy's, or ``auto`` to decide from the output as the proxy does)."""
    import torch

    from autocomp.models.base import run_batch
    from autocomp.models.introspect import compressible_modules

    t0 = time.perf_counter()
    mods = compressible_modules(model)
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    alias: dict[str, str] = {}
    state: dict[str, Any] = {"mask": None, "seen": {}, "first": True}
    hooks = []

    def hook_for(name: str, kind: str) -> Any:
        def hook(mod: Any, args: tuple[Any, ...]) -> None:
            if not args or not torch.is_tensor(args[0]) or not torch.is_floating_point(args[0]):
                return
            x = args[0].detach()
            if state["first"]:  # layers reading the very same tensor object share one statistic; the tensor is
                # held until the batch ends, so its id cannot be reused by another tensor in the meantime
                owner, _ = state["seen"].setdefault((id(args[0]), share_key(kind, mod)), (name, args[0]))
                if owner != name:
                    alias[name] = owner
                    return
            elif name in alias:
                return
            rows = _rows_of(kind, mod, x, state["mask"])
            if rows is None:
                return
            r = rows.double()
            sums[name] = sums[name] + r.T @ r if name in sums else r.T @ r
            counts[name] = counts.get(name, 0) + r.shape[0]
        return hook

    def each(i: int, batch: Any) -> None:
        state["first"] = i == 0
        state["mask"] = batch.get("attention_mask") if isinstance(batch, dict) else None
        state["seen"] = {}

    users: dict[int, int] = {}
    for mod, _ in mods.values():
        users[id(mod.weight)] = users.get(id(mod.weight), 0) + 1
    tables = [layer.name for layer in desc.layers if mods[layer.name][1] == "Embedding"]
    tied = [n for n in tables if users[id(mods[n][0].weight)] > 1]
    g: dict[str, Any] = {}
    rows: dict[str, int] = {}
    for layer in desc.layers:
        mod, kind = mods[layer.name]
        if kind != "Embedding":
            hooks.append(mod.register_forward_pre_hook(hook_for(layer.name, kind)))
    try:
        if len(tied) < len(tables):  # one pass for both: the tables' backward rides on the inputs' forward
            g, rows = _table_statistics(model, [n for n in tables if n not in tied], mods, batches, metric,
                                        each=each)
        else:
            with torch.inference_mode():
                for i, batch in enumerate(batches):
                    each(i, batch)
                    run_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
        state["seen"] = {}
    hess = {n: (s / max(counts[n], 1)).float() for n, s in sums.items()}
    for n, owner in alias.items():
        if owner in hess:
            hess[n] = hess[owner]
            counts[n] = counts[owner]
    hess.update(g)
    counts.update(rows)
    # a tied table, or one no gradient reached (a model that detaches it): the clipped grid, H = I
    plain = [n for n in tables if n not in hess]
    return CalibrationStats(hess, key, counts, time.perf_counter() - t0, plain=plain)


def _resolved(model: Any, batches: list[Any], metric: str) -> str:
    """``metric``, or what ``auto`` means for this model's output (one forward pass), so that every path
    naming the metric its own way (``auto``, or the proxy's resolved name) finds the same statistics."""
    if metric != "auto" or not batches:
        return metric
    import torch

    from autocomp.models.base import extract_output, output_metric, run_batch

    with torch.inference_mode():
        y, auto = extract_output(run_batch(model, batches[0]))
    return output_metric(auto, y, model, batches[0])


def calibration_key(model: Any, batches: list[Any], weights: str | None = None, metric: str = "auto") -> str:
    """20 hex digits naming (weights, calibration data, the metric the table statistics probe, format)."""
    from autocomp.evaluators.proxy import data_fingerprint
    from autocomp.search.sensitivity import weights_hash

    body = {"weights": weights or weights_hash(model), "data": data_fingerprint(batches), "format": FORMAT,
            "metric": metric}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]


def load_or_gather(model: Any, desc: Any, batches: list[Any], cache_dir: Path | None,
                   log: Any = lambda s: None, metric: str = "auto") -> CalibrationStats:
    from autocomp.search.sensitivity import weights_hash

    wh = weights_hash(model)
    metric = _resolved(model, batches, metric)
    key = calibration_key(model, batches, wh, metric)
    path = Path(cache_dir) / f"{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        hit = CalibrationStats.load(path, key)
        cols = {layer.name: layer.cols for layer in desc.layers if layer.type != "Embedding"}
        if hit is not None and any(n in cols and h.shape[0] != cols[n] for n, h in hit.hessians.items()):
            # written before convolutions with another geometry stopped sharing statistics: gather them again
            log(f"calibration statistics: {path} holds a convolution's statistics of the wrong shape; gathering again")
            hit = None
        if hit is not None:
            log(f"calibration statistics: cached ({path})")
            return hit
    stats = gather(model, desc, batches, key, metric)
    stats.weights = wh
    if path is not None:
        stats.save(path)
    log(f"calibration statistics: {len(stats.hessians)} layers, {stats.nbytes() / 2**20:.1f} MiB, "
        f"{stats.seconds:.1f} s" + (f" -> {path}" if path is not None else ""))
    return stats


def attach(model: Any, stats: CalibrationStats | None) -> None:
    """Make ``stats`` the statistics every plan applied to ``model`` uses (None: detach)."""
    object.__setattr__(model, _ATTR, stats)


def attached(model: Any) -> CalibrationStats | None:
    return getattr(model, _ATTR, None)


def plan_needs(plan: Any) -> bool:
    """Whether any layer of ``plan`` uses an option (or a structured refit) that needs calibration statistics."""
    return any(t.calibrated(c) for choice in plan.layers.values() for t, c in choice.steps()) or \
        any(g.refit and g.keep < g.units for g in plan.structured.values())


def space_needs(space: Any) -> bool:
    """Whether any option of a bound search space needs calibration statistics."""
    from autocomp.compressors.base import by_dim, option_of

    if any(g.refit for g in space.groups.values()):
        return True
    for param, opts in space.params.items():
        t = by_dim(param.rpartition(":")[2])
        if t is None:
            continue
        for label in opts:
            u, option = option_of(t, label)
            if option is not None and u.calibrated_option(option):
                return True
    return False


def ensure(loaded: Any, desc: Any, cache_dir: Path | None, plan: Any = None, log: Any = lambda s: None) -> Any:
    """Attach the statistics of ``loaded``'s calibration data to its model (computed or from the cache) when
    ``plan`` (or, with ``plan`` None, any plan) needs them; refuse a plan recorded on other data."""
    if plan is not None and not plan_needs(plan):
        return None
    recorded = (plan.meta or {}).get("calibration") if plan is not None else None
    if recorded and attached(loaded.module) is None and cache_dir is not None:
        # the statistics the search used, whatever data this command was given (train's --data is training data)
        from autocomp.search.sensitivity import weights_hash

        hit = CalibrationStats.load(Path(cache_dir) / f"{recorded}.safetensors", str(recorded))
        if hit is not None and hit.weights == weights_hash(loaded.module):
            log(f"calibration statistics: the search's ({hit.path})")
            attach(loaded.module, hit)
            return hit
    data = loaded.stats_batches() if loaded.stats_batches is not None else loaded.batches
    if not data:
        raise AutocompError("this plan uses compensated options (GPTQ / SparseGPT / activation-aware low rank), "
                            "which need calibration data; pass --data")
    stats = attached(loaded.module)
    if stats is None:
        stats = load_or_gather(loaded.module, desc, data, cache_dir, log, loaded.metric)
        attach(loaded.module, stats)
    sequential = (plan.meta or {}).get("sequential") if plan is not None else None
    if recorded and isinstance(sequential, dict) and recorded != stats.key:
        # `autocomp plan --sequential` recorded statistics of its own that are not here (another studies folder,
        # deleted): they follow from the original ones and the plan, so make them again
        if sequential.get("base") != stats.key:
            raise AutocompError(f"this plan's sequential statistics start from calibration statistics "
                                f"{sequential.get('base')}, these data give {stats.key}; pass the --data the "
                                f"search used")
        from autocomp.compressors.sequential import sequential_key, sequential_statistics

        if sequential_key(stats.key, plan) != recorded:
            raise AutocompError(f"this plan's layers are not those its sequential statistics {recorded} were made "
                                f"for (edited?); run `autocomp plan --sequential` again")
        log("sequential statistics: not in the calibration folder, gathering them again")
        seq = sequential_statistics(loaded, desc, plan, log)
        if cache_dir is not None:
            seq.save(Path(cache_dir) / f"{seq.key}.safetensors")
        attach(loaded.module, seq)
        return seq
    if recorded and recorded != stats.key:
        raise AutocompError(f"this plan's compensated weights were computed on other calibration data (statistics "
                            f"{recorded}, these data give {stats.key}); pass the --data the search used")
    return stats
