"""``autocomp hardware``: calibrate this machine into a device file, and validate predictions against
real runs of compressed models."""

from __future__ import annotations

import platform
import random
import time
from pathlib import Path
from typing import Any, Callable

from autocomp.cost.device import Device, parse_device
from autocomp.errors import AutocompError
from autocomp.plan import atomic_write_text

__all__ = ["calibrate", "validate", "workload_batch"]

# Representative Linear shapes (in, out): MiniLM/BERT-base FFN and attention, low-rank factors.
_SHAPES = [(384, 384), (384, 1536), (1536, 384), (768, 768), (768, 3072), (3072, 768), (384, 96), (96, 384),
           (384, 192), (192, 1536), (1024, 1024)]
_ROWS = [1, 16, 64, 128, 256, 512]
_COLD_BYTES = 48 * 2**20  # more than the last-level cache of the machines seen here


def _time(fn: Callable[[], Any], min_runs: int = 5, budget_s: float = 0.15, max_runs: int = 50,
          quantile: float = 0.5) -> float:
    """Seconds of ``fn`` after a warm-up: the median (or another ``quantile``; 0.25, the lower quartile, when
    shared-machine noise only ever adds time) of at least ``min_runs`` runs within ``budget_s``."""
    fn()
    fn()
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_runs or (time.perf_counter() < t_end and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[int((len(times) - 1) * quantile) if quantile != 0.5 else len(times) // 2]


def _int8_linear(k: int, n: int) -> Any:
    import torch
    import torch.ao.nn.quantized.dynamic as nnqd

    import warnings

    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = torch._make_per_channel_quantized_tensor(q, torch.full((n,), 0.01, dtype=torch.double),
                                                     torch.zeros(n, dtype=torch.long), 0)
    layer = nnqd.Linear(k, n, dtype=torch.qint8)
    layer.set_weight_bias(w, torch.zeros(n))
    return layer


def _elementwise_costs(op_s: float) -> dict[str, float]:
    """Seconds per output element of the tensor operations transformer/CNN blocks run between layers,
    timed on activation-sized tensors (fixed per-call cost removed)."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(1, 128, 1536)
    y = torch.randn(1, 128, 1536)
    s = torch.randn(1, 12, 128, 128)
    ln_w, ln_b = torch.ones(1536), torch.zeros(1536)
    xt = torch.randn(1, 12, 128, 128).transpose(-1, -2)
    kernels = {
        "add": (lambda: x + y, x.numel()), "mul": (lambda: x * y, x.numel()), "div": (lambda: x / y, x.numel()),
        "gelu": (lambda: F.gelu(x), x.numel()), "tanh": (lambda: torch.tanh(x), x.numel()),
        "layer_norm": (lambda: F.layer_norm(x, (1536,), ln_w, ln_b), x.numel()),
        "softmax": (lambda: torch.softmax(s, -1), s.numel()), "dropout": (lambda: F.dropout(x, 0.1, False), x.numel()),
        "contiguous": (lambda: xt.contiguous(), xt.numel()), "where": (lambda: torch.where(x > 0, x, y), x.numel()),
        "relu": (lambda: torch.relu(x), x.numel()), "silu": (lambda: F.silu(x), x.numel()),
    }
    return {name: max((_time(fn) - op_s) / n, 0.0) for name, (fn, n) in kernels.items()}


def _time_matmuls(shapes: list[tuple[int, int]], rows: list[int], samples: dict[str, list[Any]]) -> None:
    """Dense fp32 and dynamic int8 Linear layers of each shape at each row count -> (flops, bytes, s)."""
    import torch

    for k, n in shapes:
        # Rotate through enough copies that weights and inputs come from DRAM, not cache, as they do
        # inside a real network (timing one layer again and again was 28% optimistic on MiniLM here).
        copies = max(2, min(16, -(-_COLD_BYTES // (4 * k * n))))
        dense = [torch.nn.Linear(k, n) for _ in range(copies)]
        int8 = [_int8_linear(k, n) for _ in range(copies)]
        for m in rows:
            xs = [torch.randn(m, k) for _ in range(copies)]
            flops, nbytes = 2.0 * m * k * n, 4.0 * (k * n + m * (k + n))

            def run(layers: list[Any]) -> None:
                for layer, x in zip(layers, xs):
                    layer(x)

            samples["dense"].append((flops, nbytes, _time(lambda: run(dense)) / copies))
            samples["int8"].append((flops, nbytes - 3.0 * k * n, _time(lambda: run(int8)) / copies))


def _time_other(samples: dict[str, list[Any]]) -> tuple[float, float]:
    """Attention scores + softmax + context with a norm and an activation (the work between layers), and the
    fixed cost of one eager module call and of one small tensor operation."""
    import torch

    for t, d, h in ([16, 384, 12], [64, 384, 12], [128, 384, 12], [256, 384, 12], [128, 768, 12], [512, 384, 12]):
        q = torch.randn(1, h, t, d // h)
        x = torch.randn(1, t, d)
        ln = torch.nn.LayerNorm(d)
        gelu = torch.nn.GELU()

        def block() -> None:
            torch.matmul(torch.softmax(torch.matmul(q, q.transpose(-1, -2)), -1), q)
            gelu(ln(x))

        flops = 2.0 * 2 * t * t * d
        nbytes = 2 * (4 * t * d) * 2 + 4 * h * t * t * 2  # norm + activation read/write, scores
        samples["other"].append((flops, nbytes, _time(block)))
    ident = torch.nn.Sequential(*[torch.nn.Identity() for _ in range(50)])
    tiny = torch.randn(4)
    module_call_s = max(_time(lambda: ident(tiny)) / 51, 1e-8)  # 50 children + the container

    def ops50() -> None:
        y = tiny
        for _ in range(50):
            y = y + 1.0

    return module_call_s, max(_time(ops50) / 50, 1e-8)


def _fit(samples: dict[str, list[Any]], peak: dict[str, float], bandwidth: float,
         log: Callable[[str], None]) -> dict[str, Any]:
    """Per kernel class, ``t = a * compute + b * memory + c`` (scikit-learn, non-negative, relative error)."""
    import numpy as np
    from sklearn.linear_model import LinearRegression

    correction: dict[str, Any] = {"method": "sklearn LinearRegression(positive=True, no intercept) on "
                                            "[compute_s, memory_s, 1], sample weights 1/measured^2 (relative error)"}
    for cls, v in samples.items():
        f = np.array([x[0] for x in v]) / peak[cls]
        b = np.array([x[1] for x in v]) / bandwidth
        y = np.array([x[2] for x in v])
        X = np.stack([f, b, np.ones_like(f)], axis=1)
        reg = LinearRegression(positive=True, fit_intercept=False).fit(X, y, sample_weight=1.0 / y**2)
        mape = float(np.mean(np.abs(reg.predict(X) - y) / y))
        a, bb, c = (float(z) for z in reg.coef_)
        correction[cls] = {"compute": a, "memory": bb, "overhead_s": c, "kernels": len(v), "mape": round(mape, 4)}
        log(f"  {cls:6s} {len(v):3d} kernels: t = {a:.3f} x compute + {bb:.3f} x memory + {c * 1e6:.1f} us"
            f"   (fit error {mape:.1%})")
    return correction


def _device_doc(name: str, peak: dict[str, float], bandwidth: float, correction: dict[str, Any],
                samples: dict[str, list[Any]]) -> dict[str, Any]:
    import torch

    src = f"measured here with `autocomp hardware calibrate` on {time.strftime('%Y-%m-%d')}"
    return {
        "name": name,
        "description": f"this machine: {platform.machine()} {platform.processor() or ''}, "
                       f"{torch.get_num_threads()} torch threads, torch {torch.__version__}".strip(),
        "kind": "cpu",
        "peak_ops": {"fp32": {"value": peak["dense"], "source": f"{src}: best fp32 Linear rate over {len(samples['dense'])} shapes"},
                     "int8": {"value": peak["int8"], "source": f"{src}: best dynamic int8 Linear rate (torch x86/fbgemm)"}},
        "memory_bandwidth": {"value": bandwidth, "source": f"{src}: 64 MB tensor copy into a preallocated buffer, read + write"},
        "efficiency": {"compute": {"value": 1.0, "source": "peaks above are achieved rates"},
                       "memory": {"value": 1.0, "source": "bandwidth above is an achieved rate"}},
        "layer_overhead_s": {"value": max(correction["dense"]["overhead_s"], 1e-7), "source": f"{src}: fitted per-call cost"},
        "default_dtype": "fp32",
        "accelerates": {"int8": True, "weight_only_bits": [], "sparse_2_4": False, "unstructured_sparse": False},
        "correction": correction,
    }


def calibrate(out: Path, name: str = "cpu-local", quick: bool = False, log: Callable[[str], None] = print,
              model: Any = None, workload: str | None = None, fit_plans: int = 12) -> Device:
    """Micro-benchmark matmuls (fp32 dense, int8, low-rank factor shapes), attention-like and elementwise
    kernels on this machine; take the best achieved rates as peaks, then fit a per-class correction
    ``t = a * compute + b * memory + c`` with scikit-learn (non-negative least squares, relative error).

    With ``model`` (a :class:`~autocomp.models.base.LoadedModel`), also time ``fit_plans`` real compressed
    versions of it (plus fp32 and uniform int8) and fit a whole-model correction on top of the kernel-level
    prediction: what isolated kernels miss inside a real network (cache misses, per-forward overhead)."""
    import torch
    import yaml

    fit = None
    if model is not None:  # check the model and workload before minutes of timing
        from autocomp.cost.latency import parse_workload
        from autocomp.models.introspect import introspect

        desc = introspect(model)
        fit = (model, desc, parse_workload(workload, desc))
    samples: dict[str, list[tuple[float, float, float]]] = {"dense": [], "int8": [], "other": []}  # (flops, bytes, s)
    with torch.inference_mode():
        big = torch.ones(64 * 2**20 // 4)
        dst = torch.empty_like(big)
        bandwidth = 2 * big.numel() * 4 / _time(lambda: dst.copy_(big))  # read + write
        _time_matmuls(_SHAPES[:6] if quick else _SHAPES, _ROWS[::2] if quick else _ROWS, samples)
        module_call_s, op_s = _time_other(samples)
        op_element_s = _elementwise_costs(op_s)
    peak = {cls: max(f / s for f, _, s in v) for cls, v in samples.items() if cls != "other"}
    peak["other"] = peak["dense"]
    correction = _fit(samples, peak, bandwidth, log)
    correction.update(module_call_s=module_call_s, op_s=op_s, op_element_s=op_element_s)
    log(f"  one eager module call: {module_call_s * 1e6:.2f} us; one small tensor operation: {op_s * 1e6:.2f} us")
    doc = _device_doc(name, peak, bandwidth, correction, samples)
    device = parse_device(doc, str(out))
    if fit is not None:
        correction["end_to_end"] = fit_end_to_end(*fit, device, fit_plans, log=log)
        device = parse_device(doc, str(out))
    atomic_write_text(out, yaml.safe_dump(doc, sort_keys=False))
    log(f"peaks: fp32 {peak['dense'] / 1e9:.1f} GFLOP/s, int8 {peak['int8'] / 1e9:.1f} GOP/s; "
        f"memory {bandwidth / 1e9:.1f} GB/s")
    return device


def workload_batch(loaded: Any, desc: Any, workload: Any) -> Any:
    """An input of the workload's shape: token ids for sequence models, else calibration batch 0 resized."""
    import torch

    first = loaded.batches[0]
    if isinstance(first, dict) and "input_ids" in first and workload.seq:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 29000, (workload.batch, workload.seq), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "token_type_ids" in first:
            batch["token_type_ids"] = torch.zeros_like(ids)
        return batch
    if isinstance(first, torch.Tensor):
        reps = -(-workload.batch // first.shape[0])
        return first.repeat(reps, *([1] * (first.dim() - 1)))[: workload.batch]
    return first


def time_models(models: list[Any], batch: Any, runs: int = 10, seed: int = 0) -> list[float]:
    """Milliseconds per forward of each model. After two warm-up forwards each, ``runs`` rounds time every
    model once, in a fresh random order per round, so the machine's speed drift (tens of percent within
    minutes here) hits all models alike instead of lining up with their order. A model's figure is the
    lower quartile of its rounds: shared-machine noise only ever adds time."""
    import time

    import torch

    from autocomp.models.base import run_batch

    rng = random.Random(seed)
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            run_batch(model, batch)
            run_batch(model, batch)
        order = list(range(len(models)))
        for _ in range(max(1, runs)):
            rng.shuffle(order)
            for i in order:
                t0 = time.perf_counter()
                run_batch(models[i], batch)
                times[i].append((time.perf_counter() - t0) * 1e3)
    return [sorted(t)[(len(t) - 1) // 4] for t in times]


def ort_models(loaded: Any, desc: Any, plans: list[Any], device: Device, folder: Path,
               log: Callable[[str], None] = print) -> list[Any]:
    """Each plan exported to ONNX under ``folder`` as the ``runtime: ort`` device's exports are made (its
    accuracy level and W8A8 kernel) and opened as ORT sessions with the device's threads, sleeping between
    runs as every timed session here (see OrtModel)."""
    from autocomp.ort import OrtModel, export_onnx

    ort = device.ort or {}
    threads = int(ort.get("threads") or 0) or None
    models = []
    for i, plan in enumerate(plans):
        path = folder / f"plan{i}.onnx"
        export_onnx(loaded.module, desc, plan, path, loaded.batches[0], accuracy_level=int(ort.get("accuracy_level", 4)),
                    int8_kernel=str(ort.get("int8_kernel", "portable")))
        models.append(OrtModel(path, threads=threads, spinning=False))
        log(f"  exported plan {i + 1}/{len(plans)} to ONNX")
    return models


DRAWS = ("spread", "uniform")


def _random_plans(space: Any, n: int, seed: int, draw: str = "uniform") -> list[Any]:
    return [space.decode(a) for a in _random_assignments(space, n, seed, draw)]


def _random_assignments(space: Any, n: int, seed: int, draw: str = "uniform") -> list[dict[str, str]]:
    """``n`` random assignments of ``space``. ``uniform``: every layer's option drawn alone. Over ~40 layers
    such plans all land near the average plan (MiniLM in ONNX Runtime: 30 of them within 10.0-12.5 ms), so a
    ranking over them mostly ranks timing noise. ``spread``: plan ``i`` takes a uniform plan of the space
    (every layer on one option, or none compressed) as its theme and each layer keeps the theme's option
    with probability ``(i + 0.5) / n``, else a random one: from fully random plans to nearly uniform ones,
    the range a search's front covers (fp32-like to all-int8)."""
    from autocomp.space import neutral_assignment, reference_assignments

    rng = random.Random(seed)
    if draw == "uniform":
        return [{p: rng.choice(o) for p, o in space.params.items()} for _ in range(n)]
    if draw != "spread":
        raise AutocompError(f"--draw {draw!r}: choose one of {', '.join(DRAWS)}")
    themes = [neutral_assignment(space), *reference_assignments(space).values()]
    out = []
    for i in range(n):
        share = (i + 0.5) / n
        theme = rng.choice(themes)
        out.append({p: theme[p] if theme.get(p) in o and rng.random() < share else rng.choice(o)
                    for p, o in space.params.items()})
    return out


def fit_end_to_end(loaded: Any, desc: Any, wl: Any, device: Device, n_plans: int = 12,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time fp32, uniform int8 and ``n_plans`` random plans of ``loaded`` (drawn with seeds that
    ``validate`` does not use) and fit ``t = a*dense + b*int8 + c*other + d`` on the kernel-level
    breakdown with scikit-learn (non-negative, relative error). Applied only to this model (its weight
    fingerprint)."""
    import numpy as np
    from sklearn.linear_model import LinearRegression

    from autocomp.compressors.apply import PlanApplier
    from autocomp.cost.latency import CostModel
    from autocomp.plan import Plan
    from autocomp.runtime import build_runtime_model
    from autocomp.space import SearchSpace, reference_assignments

    default = SearchSpace.from_yaml("default", desc)
    plans = [Plan(layers={})]
    refs = reference_assignments(default)
    if "uniform-int8" in refs:
        plans.append(default.decode(refs["uniform-int8"]))
    spaces = [default]
    if desc.info.get("num_attention_heads"):
        try:
            spaces.append(SearchSpace.from_yaml("transformer", desc))
        except AutocompError:
            pass
    for j, sp in enumerate(spaces):
        k = n_plans // len(spaces) + (1 if j < n_plans % len(spaces) else 0)
        plans += _random_plans(sp, k, seed=1_000_003 + j)
    log(f"  timing {len(plans)} real plans of {desc.name} at {wl.label()} (round-robin)…")
    applier = PlanApplier(loaded.module, desc)
    models = [build_runtime_model(loaded.module, desc, p, applier) for p in plans]
    measured = np.array(time_models(models, workload_batch(loaded, desc, wl), runs=15)) / 1e3
    cost = CostModel(device, desc, wl)
    parts = [cost.breakdown(p) for p in plans]
    X = np.array([[b["dense"], b["int8"], b["other"], 1.0] for b in parts])
    reg = LinearRegression(positive=True, fit_intercept=False).fit(X, measured, sample_weight=1.0 / measured**2)
    a, b, c, d = (float(z) for z in reg.coef_)
    before = float(np.mean(np.abs(X[:, :3].sum(1) - measured) / measured))
    after = float(np.mean(np.abs(reg.predict(X) - measured) / measured))
    log(f"  whole model: t = {a:.3f} x dense + {b:.3f} x int8 + {c:.3f} x other + {d * 1e3:.2f} ms "
        f"(error on the {len(plans)} fitted plans {before:.1%} -> {after:.1%})")
    return {"model": desc.name, "fingerprint": desc.fingerprint, "workload": wl.label(), "plans": len(plans),
            "dense": a, "int8": b, "other": c, "intercept_s": d,
            "mape_kernel_level": round(before, 4), "mape_fitted": round(after, 4)}


def within(predicted: Any, measured: Any, tol: float, factor: float = 1.0) -> float:
    """Share of plans whose prediction, scaled by ``factor`` (the machine's speed of the moment against the
    device file), is within ``tol`` of the measured time, relative to the measured time."""
    import numpy as np

    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    return float(np.mean(np.abs(p * factor - m) / m <= tol))


def validate(loaded: Any, desc: Any, space: Any, device: Device, workload: Any, n_plans: int, seed: int = 0,
             runs: int = 15, log: Callable[[str], None] = print,
             extra: dict[str, Any] | None = None, runtime: str = "torch", draw: str = "spread") -> dict[str, Any]:
    """Predicted vs measured latency for ``n_plans`` random plans of ``space`` (drawn as ``draw`` says, see
    :func:`_random_plans`) and the ``extra`` plans
    (label -> plan, e.g. a study's front; their rows carry ``source``). ``runtime="ort"``: each plan is
    exported to ONNX (autocomp/ort.py) and timed in an ONNX Runtime session.

    The uncompressed model is timed in the same rounds as a reference (not one of the rows): ``reference``
    says how fast the machine runs now against the device file (``speed_factor``: measured / predicted; a
    shared VM drifts by tens of percent within minutes), and ``within_10pct_at_speed`` is the share within
    ±10% once the predictions are scaled by that factor: what the cost model gets right apart from the
    machine's speed of the moment."""
    import numpy as np
    from scipy.stats import spearmanr

    from autocomp.compressors.apply import PlanApplier
    from autocomp.cost.latency import CostModel
    from autocomp.plan import Plan
    from autocomp.runtime import build_runtime_model

    if n_plans < 3:
        raise AutocompError(f"--plans must be >= 3 to measure agreement, got {n_plans}")
    cost = CostModel(device, desc, workload)
    batch = workload_batch(loaded, desc, workload)
    applier = PlanApplier(loaded.module, desc)
    plans = _random_plans(space, n_plans, seed, draw) + list((extra or {}).values())
    sources = ["random"] * n_plans + list(extra or {})
    predicted = [cost.latency_ms(plan) for plan in plans]
    plans.append(Plan(layers={}))  # the reference, timed last in order but in the same shuffled rounds
    ref_predicted = cost.latency_ms(plans[-1])
    if runtime == "ort":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            models = ort_models(loaded, desc, plans, device, Path(tmp), log)
            measured = time_models(models, batch, runs=runs)
            del models
    else:
        models = [build_runtime_model(loaded.module, desc, plan, applier) for plan in plans]
        measured = time_models(models, batch, runs=runs)
    plans.pop()
    ref_predicted, ref_measured = round(ref_predicted, 4), round(measured.pop(), 4)  # as the rows are rounded
    factor = ref_measured / ref_predicted
    rows = []
    for i in range(len(plans)):
        m_ms = measured[i]
        rows.append({"predicted_ms": round(predicted[i], 4), "measured_ms": round(m_ms, 4)})
        if extra:
            rows[-1]["source"] = sources[i]
        log(f"  plan {i + 1}/{len(plans)} ({sources[i]}): predicted {predicted[i]:.2f} ms, measured {m_ms:.2f} ms")
    p = np.array([r["predicted_ms"] for r in rows])
    m = np.array([r["measured_ms"] for r in rows])
    err = np.abs(p - m) / m
    rho = float(spearmanr(p, m).statistic) if len(set(p)) > 1 and len(set(m)) > 1 else 0.0
    at_speed = within(p, m, 0.10, factor)
    log(f"  reference (uncompressed): predicted {ref_predicted:.2f} ms, measured {ref_measured:.2f} ms: the machine "
        f"runs {'slower' if factor > 1 else 'faster'} than the device file says by {abs(factor - 1):.0%}; within "
        f"±10% at this speed: {at_speed:.0%}"
        + (f" (recalibrate: autocomp hardware calibrate{' --runtime ort' if runtime == 'ort' else ''})"
           if abs(factor - 1) > 0.1 else ""))
    return {"hardware": device.name, "plans": len(rows), "spearman": round(rho, 4),
            "within_10pct": within(p, m, 0.10), "within_25pct": within(p, m, 0.25),
            "mape": round(float(np.mean(err)), 4), "rows": rows,
            "reference": {"predicted_ms": round(ref_predicted, 4), "measured_ms": round(ref_measured, 4),
                          "speed_factor": round(factor, 4), "within_10pct_at_speed": at_speed}}


