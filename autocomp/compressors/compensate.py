"""Error-compensating compressors: each layer's error is measured on its calibration inputs, not on the weights.

For a layer ``y = W x`` with inputs of second moment ``H = E[x x^T]`` (:mod:`~.calibration`), the output
error of a weight change ``D`` is ``tr(D H D^T)``: what matters is the error along the directions the
inputs excite. Written from the papers (no code copied):

* **GPTQ** (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
  Transformers"), after Optimal Brain Surgeon: columns are quantized left to right; the error of column
  ``j`` is spread over the columns not yet quantized by the OBS update ``W[:, j+1:] -= e_j U[j, j+1:] /
  U[j, j]``, where ``U`` is the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), so each row solves
  its own least-squares problem. ``H`` is dampened (``+ DAMP * mean(diag H) * I``, see :data:`DAMP`), updates are applied
  lazily per block of :data:`BLOCK` columns (one matrix product per block), and a group's scale (and zero
  point) is fixed from the updated weights when its first column is reached -- the stored format (codes,
  float16 scales, zero points) is exactly round-to-nearest's, so the size model does not change.
  *Act order* (the paper's "act order" heuristic; ``/gptq``, the default since quantize config version 3):
  columns are swept by decreasing ``H_jj``, so the columns with the largest inputs are quantized while the
  most columns are left to absorb their error. A permuted sweep with groups fixed as they are swept would
  need a stored group index per column; here each group stays its consecutive stored columns and its range
  is fixed from the original weights before the sweep ("static groups"), so the format is unchanged. On
  MiniLM it cuts held-out drift 11-17% at 2-4 bits (docs/BENCHMARKS.md).
* **SparseGPT** (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot"): the same sweep with "quantize" replaced by "drop": the mask of each block of columns is chosen
  by the OBS saliency ``w^2 / U[j, j]^2`` (adaptive mask selection), 2:4 picks two of every four columns
  when the first of them is reached, and the dropped weights' error is compensated as above. Unstructured
  pruning removes exactly ``n_pruned(numel, sparsity)`` entries (the count is spread over the blocks), so
  the bytes are those of magnitude pruning. With a mask given, the GPTQ sweep also drives the masked entries
  to zero: joint pruning and quantization in one pass, as SparseGPT describes.
* **Activation-aware low rank** (as in SVD-LLM, Wang et al., 2024, and ASVD): with ``H = L L^T``, the
  truncated SVD of ``W L`` gives the rank-``r`` ``W'`` minimizing ``||(W - W') X||``; the factors are
  ``B = U_r sqrt(S_r)`` and ``A = sqrt(S_r) V_r^T L^-1``.

Everything runs in float64 on the CPU and is deterministic; the results are cached per (layer, option) by
the callers. The act-order GPTQ and SparseGPT sweeps run several options of one layer at once
(:func:`gptq_many`, :func:`sparsegpt_many`): a sweep costs its number of small torch calls more than its
arithmetic, and a search's sensitivity profile asks for every option of every layer. Each option's result is
the same bits alone or beside others, so the proxy, ``train`` and ``export`` (which compute one option at a
time) agree with what the search scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["BLOCK", "DAMP", "act_order", "dampened", "gptq", "gptq_many", "inverse_cholesky", "output_error", "sparsegpt",
           "run_order", "sparsegpt_many", "vq_gptq", "whitened_svd"]

# Fraction of the mean diagonal added to H. The GPTQ paper uses 0.01. Measured on MiniLM, uniform options on
# every Linear layer, held-out drift: with statistics from the 548 token rows the proxy scores (fewer than the
# FFN's 1,536 inputs) 0.01 overfits them (4g128: 0.0303 at 0.01, 0.0244 at 0.1; round to nearest 0.0570); with
# the 8,620 rows the built-in model now uses, 0.01 / 0.03 / 0.1 are within 10% of each other (4g128: 0.0163 /
# 0.0168 / 0.0173; 3g128: 0.105 / 0.099 / 0.099). 0.1 is the safer choice for a user's smaller --data. Adding
# d*I to H is also what isotropic noise of variance d on the inputs adds to their second moment, i.e. some
# robustness to the upstream layers' compression error.
DAMP = 0.1
MSE_GRID = True  # GPTQ sets each group's range by the clipping ratio of least squared error (as ``/mse``)
BLOCK = 128  # columns per lazy update block
SUB = 16  # columns per inner block of the stacked sweep, a multiple of 4 (see _sweep_stack); on MiniLM's shapes 8-32 alike, 4 and 128 slower
STACK_BYTES = 256 << 20  # the most float64 weights one stacked sweep holds (a 4096x4096 layer: one job at a time)


def dampened(h: Any) -> Any:
    """``H + DAMP * mean(diag H) * I`` in float64 (a layer whose inputs were all zero gets the identity)."""
    import torch

    h = h.double()
    mean = float(torch.diagonal(h).mean())
    if not mean > 0:
        return torch.eye(h.shape[0], dtype=torch.float64)
    return h + DAMP * mean * torch.eye(h.shape[0], dtype=torch.float64)


def inverse_cholesky(h: Any) -> Any:
    """Upper ``U`` with ``U^T U = (dampened H)^-1``; more damping if H is numerically singular."""
    import torch

    hd = dampened(h)
    extra = 0.0
    for _ in range(6):
        try:
            m = hd if not extra else hd + extra * float(torch.diagonal(hd).mean()) * torch.eye(hd.shape[0], dtype=torch.float64)
            inv = torch.cholesky_inverse(torch.linalg.cholesky(m))
            return torch.linalg.cholesky(inv, upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            extra = 0.1 if not extra else extra * 10
    raise RuntimeError("input second moment is not positive definite even after damping")


def output_error(w: Any, w_new: Any, h: Any) -> float:
    """``tr((W' - W) H (W' - W)^T)``: the summed squared output error on the calibration inputs."""
    d = (w_new.double() - w.double())
    return float(((d @ h.double()) * d).sum())


def _sweep(w: Any, u: Any, target: Callable[[int, Any], Any], block_start: Callable[[int, int, Any, Any], None],
           block: int = BLOCK) -> Any:
    """The OBS column sweep: ``target(j, column)`` returns the new value of column ``j`` (float64);
    ``block_start(b0, b1, W, U)`` is called when a block begins (mask selection). -> the new W (float64).
    Columns are rows of the transposed copy here (contiguous), and the per-column work is a handful of
    vector operations: the sweep is sequential by nature, so its cost is the number of torch calls."""
    import torch

    wt = w.double().t().contiguous()  # [cols, rows]
    cols = wt.shape[0]
    inv_d = (1.0 / torch.diagonal(u)).tolist()
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        block_start(b0, b1, wt, u)
        err = torch.empty(b1 - b0, wt.shape[1], dtype=torch.float64)
        for j in range(b0, b1):
            col = wt[j]
            new = target(j, col)
            e = err[j - b0]
            torch.sub(col, new, out=e)
            e.mul_(inv_d[j])
            col.copy_(new)
            if j + 1 < b1:  # W[:, j+1:b1] -= e u[j, j+1:b1] (rank one, in place)
                wt[j + 1:b1].addr_(u[j, j + 1:b1], e, alpha=-1.0)
        if b1 < cols:
            wt[b1:].addmm_(u[b0:b1, b1:].t(), err, alpha=-1.0)
    return wt.t()


def act_order(h: Any) -> Any:
    """The columns by decreasing ``diag(H)`` (ties in column order): GPTQ's "act order"."""
    import torch

    return torch.sort(-torch.diagonal(h.double()), stable=True).indices


def gptq(w: Any, h: Any, bits: int, group_size: int, symmetric: bool, mask: Any = None,
         u: Any = None, order: Any = None, weighted: bool = False) -> tuple[Any, Any, Any, Any]:
    """GPTQ quantization of ``w`` (float32 ``[rows, cols]``) with input second moment ``h`` ``[cols, cols]``;
    masked-out entries (``mask`` False) are driven to zero. -> (dequantized float32, codes int32, scale
    float16 ``[rows, groups]``, zero point int32 or None): the format of :func:`~.quantize.quantize_matrix`.
    ``u``: :func:`inverse_cholesky` of ``h`` when the caller has it (``h`` is then not read).

    ``order`` (a permutation of the columns, e.g. :func:`act_order`): the columns are quantized in that order,
    the ones with the largest inputs first, so that their errors are compensated by the many columns still
    free. The groups stay the stored ones (consecutive columns): each group's range is fixed from the
    original weights before the sweep ("static groups"), so the format and its bytes do not change. ``u``
    must then be the inverse Cholesky factor of ``h[order][:, order]``. ``weighted`` (with ``order``): the
    static groups' clipped ranges weigh each column's error by ``sqrt(h_jj)`` (:func:`clip_weights`)."""
    import torch

    if order is not None:
        return gptq_many([(w, mask, bits, group_size, symmetric, weighted)], h, u, order)[0]
    if weighted:
        raise ValueError("weighted clipping needs an act order")
    from autocomp.compressors.quantize import group_params, mse_clip, quantize_column

    rows, cols = w.shape
    g = group_size or cols
    n_groups = -(-cols // g)
    u = inverse_cholesky(h) if u is None else u
    maskt = None if mask is None else mask.t().contiguous()
    scales = torch.zeros(n_groups, rows, dtype=torch.float16)
    zps = torch.zeros(n_groups, rows, dtype=torch.int32) if not symmetric else None
    deq = torch.zeros(cols, rows, dtype=torch.float32)  # transposed while the sweep runs
    cur: dict[str, Any] = {}
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1

    def start_group(gi: int, x: Any) -> None:
        """``x``: the group's current weights ``[rows, n]`` (masked)."""
        sc, z = group_params(mse_clip(x, bits, 0, symmetric) if MSE_GRID else x, bits, symmetric)
        scales[gi] = sc
        if zps is not None:
            zps[gi] = z
        cur["s"], cur["z"] = sc.float(), (None if z is None else z.float())

    if group_size == 0:
        start_group(0, w.float() if mask is None else w.float() * mask)
    state: dict[str, Any] = {}

    def block_start(b0: int, b1: int, wt: Any, _u: Any) -> None:
        state["wt"] = wt

    def target(j: int, col: Any) -> Any:
        if group_size and j % g == 0:
            x = state["wt"][j:min(j + g, cols)].t().float()
            start_group(j // g, x if maskt is None else x * maskt[j:min(j + g, cols)].t())
        c = col.float() if maskt is None else col.float() * maskt[j]
        s = cur["s"]
        # quantize_column's arithmetic, inline (the codes are recovered from the values after the sweep)
        if symmetric:
            q = torch.round(c / s).clamp_(-qmax, qmax).mul_(s)
        else:
            z = cur["z"]
            q = torch.round(c / s).add_(z).clamp_(0, qmax).sub_(z).mul_(s)
        deq[j] = q
        return q

    # a group must lie inside one block, so that its columns have every earlier update when its scale is set
    block = g * max(1, BLOCK // g) if group_size else BLOCK
    _sweep(w, u, target, block_start, block)
    deq = deq.t().contiguous()
    scale = scales.t().contiguous()
    zp = None if zps is None else zps.t().contiguous()
    z_full = None if zp is None else zp.repeat_interleave(g, dim=1)[:, :cols]
    _, codes = quantize_column(deq, scale.repeat_interleave(g, dim=1)[:, :cols], z_full, bits, symmetric)
    return deq, codes.contiguous(), scale, zp


def clip_weights(h: Any) -> Any:
    """Per input column, ``sqrt(h_jj)`` (float32): the RMS of the input a weight multiplies, which weighs its
    error in a weighted clipped grid. A column whose inputs are large costs the output more per unit of
    error, and GPTQ cannot compensate a column's rounding error on the columns swept before it. Measured on
    MiniLM (docs/BENCHMARKS.md): weights ``h_jj`` (the diagonal of GPTQ's own objective) and ``sqrt(h_jj)``
    both beat the unweighted grid; ``sqrt`` more often."""
    return h.double().diagonal().clamp_min(0.0).sqrt().float()


def gptq_many(jobs: Sequence[tuple[Any, ...]], h: Any, u: Any = None,
              order: Any = None) -> list[tuple[Any, Any, Any, Any]]:
    """Act-order GPTQ (:func:`gptq` with ``order``) of several ``(w, mask, bits, group_size, symmetric[,
    weighted])`` jobs of one layer -- the same statistics ``h``, the same ``order`` and factor ``u`` -- in one
    column sweep. -> one ``(dequantized, codes, scale, zero point)`` per job, in order; an option alone
    and an option computed beside others are the same bits.

    The sweep is sequential in the columns and each step is a handful of small torch calls, so on
    MiniLM-sized layers its cost is the number of calls, not the arithmetic: sweeping a layer's ten options
    together costs 2-3x one of them, not 10x. Every step is elementwise per job or a matrix product of the
    job's own rows, so a job's result does not depend on which jobs share its sweep (tested bit for bit).
    Jobs are swept in chunks of at most :data:`STACK_BYTES`."""
    import torch

    order = act_order(h) if order is None else order.long()
    if u is None:
        u = inverse_cholesky(h.double()[order][:, order])
    cw = clip_weights(h) if any(len(j) > 5 and j[5] for j in jobs) else None
    out: list[tuple[Any, Any, Any, Any]] = []
    rows, cols = jobs[0][0].shape if jobs else (0, 0)
    per = max(1, STACK_BYTES // max(1, rows * cols * 8))
    for c0 in range(0, len(jobs), per):
        out += _gptq_stack(jobs[c0:c0 + per], u, order, cw)
    return out


def _gptq_stack(jobs: Sequence[tuple[Any, ...]], u: Any, order: Any, cw: Any = None) -> list[tuple[Any, Any, Any, Any]]:
    import torch

    from autocomp.compressors.quantize import group_params, mse_clip, quantize_column

    k = len(jobs)
    rows, cols = jobs[0][0].shape
    # each column's scale and zero point, from its group's original weights (static groups); symmetric jobs
    # take zero point 0 and the range [-qmax, qmax], so one formula serves both kinds
    s_cols = torch.empty(k, cols, rows)
    z_cols = torch.zeros(k, cols, rows)
    lo, hi = torch.empty(k, 1), torch.empty(k, 1)
    groups = []
    for i, (w, mask, bits, group_size, symmetric, *weighted) in enumerate(jobs):
        jw = cw if weighted and weighted[0] else None
        g = group_size or cols
        n_groups = -(-cols // g)
        wm = w.float() if mask is None else w.float() * mask
        scales = torch.zeros(n_groups, rows, dtype=torch.float16)
        zps = torch.zeros(n_groups, rows, dtype=torch.int32) if not symmetric else None
        # every group's clipped grid in one call where the groups tile the columns (3-48 calls on MiniLM
        # before; the same values, tests/test_compensated.py); a ragged last group is clipped on its own
        whole = mse_clip(wm, bits, g, symmetric, col_weight=jw) if MSE_GRID and cols % g == 0 else None
        for gi in range(n_groups):
            x = wm[:, gi * g:min((gi + 1) * g, cols)]
            if whole is not None:
                x = whole[:, gi * g:(gi + 1) * g]
            elif MSE_GRID:
                x = mse_clip(x, bits, 0, symmetric, col_weight=None if jw is None else jw[gi * g:gi * g + x.shape[1]])
            sc, z = group_params(x, bits, symmetric)
            scales[gi] = sc
            s_cols[i, gi * g:gi * g + x.shape[1]] = sc.float()
            if zps is not None:
                zps[gi] = z
                z_cols[i, gi * g:gi * g + x.shape[1]] = z.float()
        qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
        lo[i], hi[i] = (-qmax, qmax) if symmetric else (0, qmax)
        groups.append((scales, zps, g))
    s_ord, z_ord = s_cols[:, order].contiguous(), z_cols[:, order].contiguous()
    maskt = None
    if any(mask is not None for _, mask, *_ in jobs):  # x * 1 is x exactly: unmasked jobs take ones
        maskt = torch.stack([torch.ones(cols, rows) if mask is None else mask.t()[order].float()
                             for _, mask, *_ in jobs])

    def target(j: int, col: Any) -> Any:
        c = col.float() if maskt is None else col.float() * maskt[:, j]
        z = z_ord[:, j]
        return torch.round(c / s_ord[:, j]).add_(z).clamp_(lo, hi).sub_(z).mul_(s_ord[:, j])

    wt = torch.stack([w[:, order].double().t() for w, *_ in jobs])  # [k, cols, rows]
    # the sweep leaves each column at its float32 value (later updates only touch later columns): exact
    _sweep_stack(wt, u, target)
    back = torch.empty_like(order)
    back[order] = torch.arange(cols)
    out = []
    for i, (_, _, bits, _, symmetric, *_) in enumerate(jobs):
        scales, zps, g = groups[i]
        deq = wt[i].t().float()[:, back].contiguous()
        scale = scales.t().contiguous()
        zp = None if zps is None else zps.t().contiguous()
        z_full = None if zp is None else zp.repeat_interleave(g, dim=1)[:, :cols]
        _, codes = quantize_column(deq, scale.repeat_interleave(g, dim=1)[:, :cols], z_full, bits, symmetric)
        out.append((deq, codes.contiguous(), scale, zp))
    return out


def _sweep_stack(wt: Any, u: Any, target: Callable[[int, Any], Any], block: int = BLOCK, sub: int = SUB,
                 block_start: Callable[[int, int], None] | None = None) -> None:
    """The OBS column sweep of ``k`` matrices that share ``u``, in place: ``wt`` ``[k, cols, rows]`` float64
    (columns as rows, contiguous); ``target(j, columns)`` maps the ``[k, rows]`` column ``j`` of every job
    to its new value; ``block_start(b0, b1)`` runs when a block begins (its columns then hold every earlier
    block's update). Within a block of ``block`` columns the rank-one updates reach only the ``sub`` columns
    of the current inner block (they stay in cache); each inner block then updates the rest of its block,
    and each block the columns after it, by one matrix product per job. Inner blocks start at multiples of
    ``sub`` (a multiple of 4): a 2:4 group lies in one, so its four columns are up to date when the first is
    reached."""
    import torch

    k, cols, rows = wt.shape
    inv_d = (1.0 / torch.diagonal(u)).tolist()
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        if block_start is not None:
            block_start(b0, b1)
        err = torch.empty(k, b1 - b0, rows, dtype=torch.float64)
        for s0 in range(b0, b1, sub):
            s1 = min(s0 + sub, b1)
            for j in range(s0, s1):
                col = wt[:, j]
                new = target(j, col)
                e = err[:, j - b0]
                torch.sub(col, new, out=e)
                e.mul_(inv_d[j])
                col.copy_(new)
                if j + 1 < s1:  # W[:, j+1:s1] -= e u[j, j+1:s1], as a product then a difference (no fused
                    # multiply-add, whose use can depend on where an element sits in memory)
                    wt[:, j + 1:s1].sub_(u[j, j + 1:s1, None] * e[:, None, :])
            if s1 < b1:
                ut = u[s0:s1, s1:b1].t()
                for i in range(k):
                    wt[i, s1:b1].addmm_(ut, err[i, s0 - b0:s1 - b0], alpha=-1.0)
        if b1 < cols:
            ut = u[b0:b1, b1:].t()
            for i in range(k):
                wt[i, b1:].addmm_(ut, err[i], alpha=-1.0)


def sparsegpt(w: Any, h: Any, kind: str, sparsity: float, u: Any = None) -> tuple[Any, Any]:
    """SparseGPT pruning: -> (updated float32 weights, bool keep-mask); the pruned entries are zero. One job of
    :func:`sparsegpt_many`, so an option alone and beside others are the same bits."""
    return sparsegpt_many(w, h, [(kind, sparsity)], u)[0]


def sparsegpt_many(w: Any, h: Any, jobs: Sequence[tuple[str, float]], u: Any = None) -> list[tuple[Any, Any]]:
    """SparseGPT of one matrix for several ``(kind, sparsity)`` options in one column sweep (see
    :func:`gptq_many`: each job's result does not depend on the others). -> ``(weights, keep-mask)`` per job."""
    import torch

    from autocomp.compressors.prune import n_pruned

    rows, cols = w.shape
    u = inverse_cholesky(h) if u is None else u
    diag = torch.diagonal(u)
    out: list[tuple[Any, Any]] = []
    per = max(1, STACK_BYTES // max(1, rows * cols * 8))
    for c0 in range(0, len(jobs), per):
        chunk = jobs[c0:c0 + per]
        k = len(chunk)
        keep = torch.ones(k, cols, rows, dtype=torch.bool)  # transposed, as the sweep works
        pairs = [i for i, (kind, _) in enumerate(chunk) if kind == "2:4"]

        def block_start(b0: int, b1: int, wt: Any) -> None:
            for i, (kind, sparsity) in enumerate(chunk):
                if kind != "unstructured":
                    continue
                # this block's share of the exact total, so the blocks add up to n_pruned(numel, sparsity)
                n = n_pruned(rows * b1, sparsity) - n_pruned(rows * b0, sparsity)
                if n <= 0:
                    continue
                score = (wt[i, b0:b1] / diag[b0:b1, None]).pow(2).t().reshape(-1)  # row-major over [rows, block]
                drop = torch.sort(score, stable=True).indices[:n]
                m = torch.ones(score.numel(), dtype=torch.bool)
                m[drop] = False
                keep[i, b0:b1] = m.reshape(rows, b1 - b0).t()

        def target(j: int, col: Any, wt: Any) -> Any:
            if pairs and j % 4 == 0:  # 2:4: two of every four columns, chosen when the first is reached
                for i in pairs:
                    score = (wt[i, j:j + 4] / diag[j:j + 4, None]).pow(2).t()  # [rows, 4]
                    top = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :2]
                    keep[i, j:j + 4] = torch.zeros(rows, 4, dtype=torch.bool).scatter_(1, top, True).t()
            return col * keep[:, j]

        wt = w.double().t().contiguous().unsqueeze(0).repeat(k, 1, 1)  # [k, cols, rows]
        _sweep_stack(wt, u, lambda j, col: target(j, col, wt), block_start=lambda b0, b1: block_start(b0, b1, wt))
        for i in range(k):
            mask = keep[i].t().contiguous()
            out.append((wt[i].t().float() * mask, mask))
    return out


def whitened_svd(w: Any, h: Any) -> tuple[Any, Any, Any, Any]:
    """(U, S, V^T, L) with ``W L = U diag(S) V^T`` and ``L`` the Cholesky factor of the dampened H (float64)."""
    import torch

    lo = torch.linalg.cholesky(dampened(h))
    u, s, vh = torch.linalg.svd(w.double() @ lo, full_matrices=False)
    return u, s, vh, lo


def run_order(h: Any, dim: int) -> Any:
    """The columns, runs of ``dim`` kept together, by decreasing input second moment of the run (the sum of its
    ``H_jj``): GPTQ's act order for a codebook, whose vectors are runs of stored columns."""
    import torch

    runs = torch.diagonal(h.double()).reshape(-1, dim).sum(1)
    return (torch.sort(-runs, stable=True).indices[:, None] * dim + torch.arange(dim)).reshape(-1)


def vq_gptq(w: Any, h: Any, book: Any, dim: int, mask: Any = None) -> tuple[Any, Any]:
    """GPTQ's sweep for a codebook (after GPTVQ, van Baalen et al., 2024, "GPTVQ: The Blessing of
    Dimensionality for LLM Quantization"): each run of ``dim`` columns is assigned jointly, every row's
    ``dim``-vector to the centroid of ``book`` (``[k, dim]``) that costs the output least given the columns
    already fixed, and its error is compensated on the columns not yet swept, as GPTQ does a column's.

    That cost is ``||A (x - c)||^2`` with ``A = U_BB^-T``: with ``U`` the upper Cholesky factor of ``H^-1``,
    ``U_BB^T U_BB`` is the block of the inverse second moment of the columns not yet fixed, and its inverse
    is the OBS metric of a ``dim``-column change (for ``dim`` 1, GPTQ's ``e^2 / U_jj^2``). With a pruning
    ``mask`` a row's kept entries differ, so the metric is its diagonal ``1 / U_jj^2`` over the kept entries
    and the pruned ones are driven to zero. The runs are swept in act order (:func:`run_order`; on MiniLM's
    Linear layers at ``vq4x256`` it cuts held-out drift 13% against stored order). -> (decoded float32
    ``[rows, cols]``, indices int64 ``[rows, cols / dim]``)."""
    import torch

    from autocomp.compressors.codebook import nearest

    rows, cols = w.shape
    order = run_order(h, dim)
    hp = h.double()[order][:, order]
    u = inverse_cholesky(hp)
    bookd = book.double()
    codes = torch.empty(rows, cols // dim, dtype=torch.long)  # in swept order; put back in stored order below
    maskt = None if mask is None else mask[:, order].t().double().contiguous()
    state: dict[str, Any] = {}

    def block_start(b0: int, b1: int, wt: Any, _u: Any) -> None:
        state["wt"] = wt

    def target(j: int, col: Any) -> Any:
        r = j % dim
        if r == 0:
            x = state["wt"][j:j + dim].t()  # [rows, dim], with every earlier column's update
            ub = u[j:j + dim, j:j + dim]
            if maskt is None:
                a = torch.linalg.solve_triangular(ub, torch.eye(dim, dtype=torch.float64), upper=True).t()
                idx = nearest((x @ a.t()).float(), (bookd @ a.t()).float())
                q = bookd[idx]
            else:
                m = maskt[j:j + dim].t()
                wm = (m / torch.diagonal(ub) ** 2).float()  # sum wm (x - c)^2 = sum wm x^2 - 2 (wm x) c + wm c^2
                idx = nearest((x.float() * wm), bookd.float(), wm)
                q = bookd[idx] * m
            codes[:, j // dim] = idx
            state["q"] = q
        return state["q"][:, r]

    _sweep(w[:, order], u, target, block_start, dim * max(1, BLOCK // dim))
    codes = codes[:, torch.argsort(order[::dim] // dim)]
    deq = bookd[codes].reshape(rows, cols)
    if mask is not None:
        deq = deq * mask
    return deq.float(), codes
