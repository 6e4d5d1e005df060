"""Sensitivity database and additive seeds.

For every searched choice (each tie key's quantization, pruning and rank options, and each structured
group's keep options), the proxy increase it causes on its own, with everything else uncompressed.
Profiling costs one proxy evaluation per (choice, option), so it grows linearly in layers x options; it may
use a smaller calibration slice. Results are cached on disk under ``studies/sensitivity/`` keyed by a
content hash of the model weights, the calibration data, the space's options and the evaluator's metric,
so studies and resumes reuse them and a changed model or data invalidates them.

The additive model (total proxy ~ sum of sensitivities) then gives seeds: minimize summed sensitivity
subject to the size budget, solved exactly as a multiple-choice knapsack with scipy's MILP (HiGHS), one
binary variable per (tie key, option combination).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from autocomp.memory import LARGE_MODEL_BYTES, release
from autocomp.plan import atomic_write_text
from autocomp.space import SearchSpace, neutral_assignment

__all__ = ["Sensitivity", "profile", "fisher_profile", "ilp_assignment", "weights_hash"]


def weights_hash(model: Any) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Sensitivity:
    """``table[param][option]`` = proxy increase of that option alone (0 for the neutral option)."""

    def __init__(self, table: dict[str, dict[str, float]], base: float, seconds: float, evals: int) -> None:
        self.table = table
        self.base = base
        self.path: str | None = None  # the cache file it lives in
        self.seconds = seconds
        self.evals = evals
        self.others: dict[str, "Sensitivity"] = {}  # other estimates whose seeds the search also queues

    def of(self, assignment: dict[str, str]) -> float:
        return sum(self.table.get(p, {}).get(o, 0.0) for p, o in assignment.items())

    def to_dict(self) -> dict[str, Any]:
        return {"_type": "autocomp.Sensitivity", "_version": 1, "table": self.table, "base": self.base,
                "seconds": self.seconds, "evals": self.evals}


def _cached(cache_dir: Path, key_parts: dict[str, Any], what: str,
            log: Callable[[str], None]) -> tuple[Path, Sensitivity | None]:
    """(cache file for this content key, its table if already computed). A damaged file is a cache miss
    (it is recomputed and replaced), never an error."""
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir / f"{key}.json"
    if path.is_file():
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            d = {}
        if isinstance(d, dict) and d.get("_type") == "autocomp.Sensitivity" and d.get("_version") == 1 \
                and isinstance(d.get("table"), dict) and all(k in d for k in ("base", "seconds", "evals")):
            log(f"{what}: cached ({path})")
            hit = Sensitivity(d["table"], d["base"], d["seconds"], d["evals"])
            hit.path = str(path)
            return path, hit
    return path, None


def profile(space: SearchSpace, evaluate: Callable[[Any], float], cache_dir: Path, key_parts: dict[str, Any],
            log: Callable[[str], None] = lambda s: None) -> Sensitivity:
    """Measure (or load from the cache) the sensitivity of every option of every choice."""
    path, hit = _cached(cache_dir, {**key_parts, "params": space.params}, "sensitivity database", log)
    if hit is not None:
        return hit
    neutral = neutral_assignment(space)
    t0 = time.perf_counter()
    base = evaluate(space.decode(neutral))
    table: dict[str, dict[str, float]] = {}
    evals = 1
    total = sum(len(o) - 1 for o in space.params.values())
    for p, opts in space.params.items():
        row = {}
        for o in opts:
            if o == neutral[p]:
                row[o] = 0.0
                continue
            value = evaluate(space.decode({**neutral, p: o}))
            row[o] = max(0.0, value - base) if value == value else float("inf")
            evals += 1
        table[p] = row
        if evals % 50 == 0:
            log(f"sensitivity: {evals}/{total} options profiled")
    sens = Sensitivity(table, base, time.perf_counter() - t0, evals)
    atomic_write_text(path, json.dumps(sens.to_dict()))
    sens.path = str(path)
    log(f"sensitivity database: {evals} evaluations in {sens.seconds:.1f} s -> {path}")
    return sens


@contextlib.contextmanager
def _silent_stdout() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null for the duration (catches output of C libraries too)."""
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.close(null)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


ILP_SECONDS = 5.0  # time limit per integer program


def ilp_assignment(space: SearchSpace, sens: Sensitivity, budget: int,
                   modality_budgets: Mapping[str, int] | None = None,
                   limits: Sequence[Any] = ()) -> dict[str, str] | None:
    """Minimize summed sensitivity subject to size <= budget (and each modality's bytes <= its budget in
    ``modality_budgets``, and every additive :class:`~autocomp.search.repair.Limit` in ``limits``, e.g.
    latency or BitOps, within its budget); structured groups kept whole.

    Exact for the additive model: per tie key every combination of its options is one binary variable
    (with a latency row, the best plan found within ``ILP_SECONDS`` if HiGHS has not proven it optimal by
    then). Returns None when no combination fits.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    base = neutral_assignment(space)
    fixed_bytes = space.desc.other_bytes + sum(
        space.layer_bytes(layer.name, base) for layer in space.desc.layers if layer.name not in space.layer_keys)
    columns: list[tuple[str, dict[str, str], float, float]] = []  # key, choice, bytes, sensitivity
    for key, members in space.members.items():
        dims = [f"{key}:{d}" for d in "qpr" if f"{key}:{d}" in space.params]
        for combo in itertools.product(*(space.params[d] for d in dims)):
            choice = dict(zip(dims, combo))
            a = {**base, **choice}
            nbytes = sum(space.layer_bytes(n, a) for n in members)
            cost = sum(sens.table[d][o] for d, o in choice.items())
            if np.isfinite(cost):
                columns.append((key, choice, float(nbytes), float(cost)))
    keys = list(space.members)
    if not columns:
        return None
    n = len(columns)
    c = np.array([col[3] for col in columns])
    one_per_key = np.zeros((len(keys), n))
    for j, col in enumerate(columns):
        one_per_key[keys.index(col[0]), j] = 1.0
    size_row = np.array([[col[2] for col in columns]])
    constraints = [LinearConstraint(one_per_key, 1, 1), LinearConstraint(size_row, -np.inf, budget - fixed_bytes)]
    if modality_budgets:
        from autocomp.modality import bytes_by_modality

        by_name = space.desc.by_name
        base_by_mod = bytes_by_modality(space.desc, space.decode(base))
        for mod, mb in modality_budgets.items():
            row = np.zeros((1, n))
            for j, (key, choice, _, _) in enumerate(columns):
                a = {**base, **choice}
                row[0, j] = sum(space.layer_bytes(m, a) for m in space.members[key] if by_name[m].modality == mod)
            fixed_mod = base_by_mod.get(mod, 0) - sum(
                space.layer_bytes(m, base) for key in keys for m in space.members[key] if by_name[m].modality == mod)
            constraints.append(LinearConstraint(row, -np.inf, mb - fixed_mod))
    for lim in limits:  # additive over layers: a constant, the layers outside the space, and one column each
        row = np.array([[sum(lim.layer_cost(m, {**base, **choice}) for m in space.members[key])
                         for key, choice, _, _ in columns]])
        outside = sum(lim.layer_cost(layer.name, base) for layer in space.desc.layers
                      if layer.name not in space.layer_keys)
        constraints.append(LinearConstraint(row, -np.inf, lim.budget - lim.constant - outside))
    # HiGHS prints debug lines from C even with disp off ("HighsMipSolverData::..."); stdout is reserved
    # for --json results and the lines mean nothing to a user
    with _silent_stdout():
        # one budget row is a multiple-choice knapsack HiGHS solves at once (MiniLM: 0.4 s); a second
        # (latency) row makes it harder (1.6 s), so a time limit returns the best plan found by then (still
        # feasible: every constraint holds)
        res = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints,
                   options={"disp": False, "time_limit": ILP_SECONDS})
    if res.status not in (0, 1) or res.x is None:
        return None
    out = dict(base)
    for j in np.flatnonzero(res.x > 0.5):
        out.update(columns[j][1])
    return out


# above this many bytes of layer weights (fp32) the Fisher diagonal accumulates in bfloat16: half the memory
# (a 1.3 GB model would otherwise hold a second full-size fp32 copy); a sensitivity estimate, not a weight
FISHER_BF16_ABOVE = LARGE_MODEL_BYTES


FISHER_CHUNK_ROWS = 4  # large models: backward passes over this many samples at a time


def _row_pieces(batch: Any, n: int) -> list[tuple[Any, int, int]]:
    """``batch`` cut along its first axis into pieces of FISHER_CHUNK_ROWS samples: (piece, first, end).
    Every tensor whose first axis is the batch's is cut; anything else is passed whole. The probes are
    independent per output row, so squared gradients summed per piece estimate the same Fisher diagonal,
    with the backward pass's activations held for a few samples instead of the whole batch."""
    import torch

    def cut(v: Any, lo: int, hi: int) -> Any:
        return v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v

    out = []
    for lo in range(0, n, FISHER_CHUNK_ROWS):
        hi = min(n, lo + FISHER_CHUNK_ROWS)
        if isinstance(batch, dict):
            piece: Any = {k: cut(v, lo, hi) for k, v in batch.items()}
        elif isinstance(batch, (tuple, list)):
            piece = type(batch)(cut(v, lo, hi) for v in batch)
        else:
            piece = cut(batch, lo, hi)
        out.append((piece, lo, hi))
    return out


def _fisher_diag(evaluator: Any, probes: int, seed: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, float], float]:
    """Squared gradients of random output probes (see :func:`fisher_profile`): per layer name, the weight
    and bias Fisher diagonals, the W8A8 activation-noise term, and the normalizer ``den``."""
    import torch

    from autocomp.compressors.calibration import output_probe
    from autocomp.models.base import extract_output, run_batch

    model, applier, metric = evaluator.model, evaluator.applier, evaluator.metric
    mods = {name: applier.modules[name][0] for name in applier.modules}
    weight_bytes = sum(m.weight.numel() * 4 for m in mods.values())
    acc = torch.bfloat16 if weight_bytes > FISHER_BF16_ABOVE else torch.float32
    # one allocation for every layer's accumulator (views into it): no heap fragmentation between gradients
    flat = torch.zeros(sum(m.weight.numel() for m in mods.values()), dtype=acc)
    fw, offset = {}, 0
    for n, m in mods.items():
        fw[n] = flat[offset:offset + m.weight.numel()].view(m.weight.shape)
        offset += m.weight.numel()
    fb = {n: torch.zeros_like(m.bias, dtype=torch.float32) for n, m in mods.items() if getattr(m, "bias", None) is not None}
    act = {n: 0.0 for n in mods}  # sum over probes of sum_x g_x^2 * step^2 / 12
    gen = torch.Generator().manual_seed(seed)
    den = 0.0
    params = {id(p) for m in mods.values() for p in m.parameters(recurse=False)}
    saved_grad = [(p, p.requires_grad) for p in model.parameters()]
    taps: dict[str, tuple[Any, float]] = {}

    def tap(name: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            if not torch.is_floating_point(x):
                return args
            xd = x.detach()
            step = float((torch.clamp(xd.max(), min=0.0) - torch.clamp(xd.min(), max=0.0)) / 127)
            z = torch.zeros_like(x, requires_grad=True)
            taps[name] = (z, step)
            return (x + z, *args[1:])
        return hook

    def fold(acc_into: Any) -> Any:
        def hook(p: Any) -> None:  # each gradient is squared into the accumulator as soon as it is complete
            acc_into.add_(p.grad.float().pow(2))
            p.grad = None
        return hook

    hooks = [m.register_forward_pre_hook(tap(n)) for n, m in mods.items() if m.__class__.__name__ != "Embedding"]
    hooks += [m.weight.register_post_accumulate_grad_hook(fold(fw[n])) for n, m in mods.items()]
    hooks += [mods[n].bias.register_post_accumulate_grad_hook(fold(fb[n])) for n in fb]
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in params)
        for bi, batch in enumerate(evaluator.batches):
            mask = evaluator.masks[bi]
            t = evaluator.teacher[bi]  # a tensor, or a TopKTeacher (kl over a large vocabulary)
            width = t.shape[-1]
            rows_all = None if metric == "kl" else t.float().reshape(-1, width)
            w_all = (mask.reshape(-1) if mask is not None else torch.ones(math.prod(t.shape[:-1]))).float()
            den += float((rows_all.pow(2).sum(-1) * w_all).sum()) if rows_all is not None and metric == "mse" \
                else float(w_all.sum())
            pieces = _row_pieces(batch, t.shape[0]) if acc == torch.bfloat16 and metric in ("kl", "mse", "cosine") \
                else [(batch, 0, t.shape[0])]
            per = w_all.numel() // max(1, t.shape[0])  # output rows per sample (tokens)
            for _ in range(probes):
                for piece, lo, hi in pieces:
                    rows = None if rows_all is None else rows_all[lo * per:hi * per]
                    w = w_all[lo * per:hi * per] if len(pieces) > 1 else w_all
                    model.zero_grad(set_to_none=True)
                    taps.clear()
                    with torch.enable_grad():
                        y = extract_output(run_batch(model, piece))[0].float().reshape(-1, width)
                        r = output_probe(metric, y, gen, rows)
                        loss = ((r * y).sum(-1) * w.sqrt()).sum()
                        loss.backward()
                    del y, r, loss
                    for n in mods:
                        if n in taps and taps[n][0].grad is not None:
                            act[n] += float(taps[n][0].grad.pow(2).sum()) * taps[n][1] ** 2 / 12
    finally:
        for h in hooks:
            h.remove()
        for p, flag in saved_grad:
            p.requires_grad_(flag)
            p.grad = None
    return fw, fb, act, den


MEASURE_SHARE = 0.05  # fisher_profile measures the options of choices holding at least this share of the bytes,
MEASURE_MAX = 4  # the biggest few of them at most (a model of 20 equal layers must not pay a full measured profile)


def fisher_profile(space: SearchSpace, evaluator: Any, cache_dir: Path, key_parts: dict[str, Any], probes: int = 8,
                   seed: int = 0, log: Callable[[str], None] = lambda s: None,
                   measure_share: float = MEASURE_SHARE, measure_max: int = MEASURE_MAX) -> Sensitivity:
    """The gradient-based estimate of the sensitivity database: no forward pass per option.

    Around the original weights the proxy is ~0 with zero gradient, so its second-order term decides:
    ``proxy(W + d) ~ k * sum_i F_i d_i^2 / den`` with ``F`` the diagonal of the output metric's
    Gauss-Newton / Fisher matrix, estimated from squared gradients of random output probes (``probes``
    backward passes per calibration batch): for ``cosine`` a Gaussian probe orthogonal to each output
    row scaled by 1/|y| (k = 1/2), for ``kl`` a one-hot class sampled from the teacher's softmax minus
    the softmax (the true Fisher, k = 1/2), for ``mse`` a Gaussian probe (k = 1, den = sum of t^2).
    ``d`` is each option's real weight error (the compressor's own output); W8A8 options add the
    activation-rounding noise (step^2 / 12 per input element) weighted by the squared input gradients.
    Diagonal and additive: it ignores interactions the measured database also ignores, plus those within
    a layer. When the model carries calibration statistics (a space with compensated options), layers that
    have them use the Kronecker-factored form ``sum_i g_i (D H D^T)_ii`` instead (:func:`_kfac_term`), for
    every option of the space alike, so that GPTQ's and SparseGPT's correlated errors are not overcharged.

    The biggest choices (at most ``measure_max`` tie keys, each holding at least ``measure_share`` of the
    model's bytes: an embedding table, an LM head) are measured instead, one proxy evaluation per option: a
    misestimate there moves the most bytes, and the second-order term underestimates large perturbations
    (MiniLM's word embeddings at 70% sparsity: 0.019 estimated, 0.039 measured). The cost stays a few dozen
    evaluations whatever the model."""
    import torch

    from autocomp.compressors.calibration import attached

    path, hit = _cached(cache_dir, {**key_parts, "params": space.params, "probes": probes, "seed": seed,
                                    "kind": "fisher-v2", "measure_share": measure_share, "measure_max": measure_max},
                          "fisher sensitivity", log)
    if hit is not None:
        return hit
    t0 = time.perf_counter()
    applier, metric = evaluator.applier, evaluator.metric
    mods = {name: applier.modules[name][0] for name in applier.modules}
    fw, fb, act, den = _fisher_diag(evaluator, probes, seed)
    release()  # the backward passes' freed gradients
    stats = attached(evaluator.model)
    rowf = _row_fisher(fw, stats, applier) if stats is not None else {}
    k = 1.0 if metric == "mse" else 0.5
    scale = k / (probes * max(den, 1e-30))
    neutral = neutral_assignment(space)
    table: dict[str, dict[str, float]] = {}
    measured_keys = _biggest(space, measure_share, measure_max)
    with torch.no_grad():
        for p, opts in space.params.items():
            if p.rpartition(":")[0] in measured_keys:  # measured below instead: no estimate (a word table's
                table[p] = {o: 0.0 for o in opts}  # Kronecker term is a 30k-row product per option)
                continue
            row = {}
            for o in opts:
                if o == neutral[p]:
                    row[o] = 0.0
                    continue
                plan = space.decode({**neutral, p: o})
                total = 0.0
                for name in decided_layers(space, p):  # not a fixed choice elsewhere: its error is in every option
                    if name not in mods:
                        continue
                    wq, bq = applier.compressed(plan, name)
                    if wq is not None and name in rowf:
                        g_row, h_in = rowf[name]
                        total += _kfac_term(g_row, h_in, applier.modules[name][1], wq, mods[name].weight)
                    elif wq is not None:
                        f, w = fw[name], mods[name].weight
                        rows = applier.row_subsets.get(name)
                        if rows is not None:  # an embedding table: rows never looked up have zero Fisher
                            f, w, wq = f.index_select(0, rows), w.index_select(0, rows), wq.index_select(0, rows)
                        total += float((f * (wq.float() - w.float()).pow(2)).sum())
                    if bq is not None and name in fb:
                        total += float((fb[name] * (bq.float() - mods[name].bias.float()).pow(2)).sum())
                    if plan.layer(name).input_hooks():  # W8A8: the activation-rounding term
                        q = plan.layer(name).get("quantize")  # measured at a 7-bit step; int8f's is ~half
                        total += act[name] * (1.0 if q is None or q.reduce_range else (127 / 255) ** 2)
                row[o] = total * scale
            table[p] = row
    del fw, fb, rowf
    release()
    measured = _measure_biggest(space, evaluator, table, neutral, measured_keys)
    backward = probes * len(evaluator.batches)
    sens = Sensitivity(table, 0.0, time.perf_counter() - t0, backward + measured)
    atomic_write_text(path, json.dumps(sens.to_dict()))
    sens.path = str(path)
    log(f"fisher sensitivity: {backward} backward passes + {measured} proxy evaluations (the {len(measured_keys)} "
        f"biggest choices, >= {measure_share:.0%} of the bytes each), {sens.seconds:.1f} s -> {path}")
    return sens


def decided_layers(space: SearchSpace, param: str) -> list[str]:
    """The layers a parameter of ``space`` decides, in a fixed order: a tie key's members, or a structured
    group's producers and consumers."""
    key, _, dim = param.rpartition(":")
    if dim == "keep":
        g = space.groups[key]
        return list(dict.fromkeys((*g.producers, *g.consumers)))
    return list(space.members.get(key, ()))


def _row_fisher(fw: dict[str, Any], stats: Any, applier: Any) -> dict[str, Any]:
    """Per layer with calibration statistics, (the Fisher's output-row factor ``g`` of a Kronecker
    approximation ``F_ij ~ g_i H_jj`` (``g_i = sum_j F_ij / sum_j H_jj``), H)."""
    from autocomp.models.introspect import weight_matrix_view

    out = {}
    for name, f in fw.items():
        h = stats.hessians.get(name)
        if h is None:
            continue
        m = weight_matrix_view(applier.modules[name][1], f).float()
        if m.shape[1] != h.shape[0]:
            continue
        out[name] = (m.sum(1) / max(float(h.diagonal().sum()), 1e-30), h)
    return out


def _kfac_term(g: Any, h: Any, kind: str, wq: Any, w: Any) -> float:
    """``sum_i g_i (D H D^T)_ii`` for the weight change ``D``: the Kronecker-factored second-order term. Unlike
    the diagonal ``sum F D^2`` it sees correlated errors cancel on the inputs, which is what error-compensating
    methods (GPTQ, SparseGPT) trade on: their per-weight errors are larger, their output errors smaller."""
    from autocomp.models.introspect import weight_matrix_view

    d = weight_matrix_view(kind, wq.float() - w.float())
    return float((g * ((d @ h.float()) * d).sum(1)).sum())


def _biggest(space: SearchSpace, share_min: float, most: int) -> list[str]:
    """The tie keys of at most ``most`` choices holding ``share_min`` of the model's bytes each, biggest first."""
    by_name = space.desc.by_name
    share = {key: sum(by_name[n].nbytes for n in names) / space.desc.fp32_bytes for key, names in space.members.items()}
    return sorted((k for k in share if share[k] >= share_min), key=lambda k: -share[k])[:most]


def _measure_biggest(space: SearchSpace, evaluator: Any, table: dict[str, dict[str, float]], neutral: dict[str, str],
                     keys: list[str]) -> int:
    """Measure (one proxy evaluation per option) the choices of the tie keys ``keys`` (:func:`_biggest`) into
    ``table``; -> the evaluations."""
    big = [p for p in space.params if p.rpartition(":")[0] in keys]
    measured = 0
    if big:
        base = evaluator(space.decode(neutral))
        for p in big:
            for o in space.params[p]:
                if o != neutral[p]:
                    value = evaluator(space.decode({**neutral, p: o}))
                    table[p][o] = max(0.0, value - base) if value == value else float("inf")
                    measured += 1
    return measured


def unit_importance(space: SearchSpace, evaluator: Any, cache_dir: Path, key_parts: dict[str, Any], probes: int = 8,
                    seed: int = 0, log: Callable[[str], None] = lambda s: None) -> dict[str, tuple[int, ...]]:
    """Rank the units of every structured group whose rule says ``importance: fisher``: unit importance is
    the second-order estimate of the output change from removing it, ``sum F * w^2`` over its producer
    rows (and biases) and consumer columns (``F``: the Fisher diagonal of :func:`_fisher_diag`). Unlike
    weight norms this sees what the data routes through a head, e.g. the cross-modal attention heads that
    image tokens actually use. -> group key -> units from most to least important (cached on disk)."""
    import torch

    groups = {k: g for k, g in space.groups.items() if g.importance == "fisher"}
    if not groups:
        return {}
    spec = {k: [g.units, list(g.producers), list(g.consumers)] for k, g in sorted(groups.items())}
    digest = hashlib.sha256(json.dumps({**key_parts, "groups": spec, "probes": probes, "seed": seed},
                                       sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"units-{digest}.json"
    if path.is_file():
        try:
            return {k: tuple(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError):
            pass
    t0 = time.perf_counter()
    fw, fb, _, _ = _fisher_diag(evaluator, probes, seed)
    mods = {name: evaluator.applier.modules[name] for name in evaluator.applier.modules}
    out: dict[str, tuple[int, ...]] = {}
    from autocomp.models.introspect import weight_matrix_view

    with torch.no_grad():
        for key, g in groups.items():
            score = torch.zeros(g.units, dtype=torch.float64)
            for n in g.producers:
                mod, kind = mods[n]
                w = weight_matrix_view(kind, mod.weight).double()
                f = weight_matrix_view(kind, fw[n]).double()
                score += (f * w.pow(2)).reshape(g.units, -1).sum(1)
                if n in fb and fb[n].numel() == w.shape[0]:
                    score += (fb[n].double() * mod.bias.double().pow(2)).reshape(g.units, -1).sum(1)
            for n in g.consumers:
                mod, kind = mods[n]
                w = weight_matrix_view(kind, mod.weight).double()
                f = weight_matrix_view(kind, fw[n]).double()
                score += (f * w.pow(2)).reshape(w.shape[0], g.units, -1).sum((0, 2))
            out[key] = tuple(int(i) for i in torch.sort(score, descending=True, stable=True).indices)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out))
    log(f"unit importance (fisher) for {len(out)} structured groups: {time.perf_counter() - t0:.1f} s -> {path}")
    return out
