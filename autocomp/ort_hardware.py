"""``--hardware ort-cpu``: ONNX Runtime's own kernels timed on this machine, and plans validated as ORT runs them.

``calibrate_ort`` times, each in a one-node session, the kernels autocomp/ort.py lowers layers to -- fp32
``MatMul``, ``MatMulNBits`` at 2, 4 and 8 bits, the W8A8 path (``DynamicQuantizeLinear`` + ``MatMulInteger``)
and an embedding gather -- over representative shapes and token counts M, subtracts the cost of an empty
``session.run``, and fits per kernel class ``t = a MKN + b KN + c M(K+N) + d`` (non-negative least squares,
relative error). With a model it also times the model's fp32 ONNX export at several workloads and fits
what the graph spends outside its layers (``u + v T + w T^2/B``, T tokens), then times the model's own
exported plans and fits a scale per kernel group (:func:`fit_plans_ort`). The result is a device file with
``runtime: ort`` that :class:`~autocomp.cost.latency.CostModel` reads. Every timed session has its threads
sleeping between runs (``session.intra_op.allow_spinning`` 0): sessions timed side by side in one process
otherwise slow each other down by their idle spinning, so the device predicts that (slightly slower,
~10% on MiniLM here) configuration.
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path
from typing import Any, Callable


__all__ = ["calibrate_ort", "fit_plans_ort", "kernel_graph", "kernel_classes"]

BLOCKS = (16, 32, 64, 128, 256)
_SHAPES = [(384, 384), (384, 1536), (1536, 384), (768, 768), (768, 3072), (3072, 768), (384, 96), (96, 384),
           (1024, 1024), (1024, 4096)]
_ROWS = [1, 16, 64, 128, 512]
RIDGE = 0.1  # how strongly the whole-model fit keeps a kernel group's scale near 1 (see fit_plans_ort)


def kernel_classes(blocks: tuple[int, ...] = BLOCKS) -> list[str]:
    """fp32, int8 (W8A8) and MatMulNBits per bits x block: ``nbits<b>g<block>`` (the block matters: at 128
    tokens 4-bit blocks of 32 ran 1.2x fp32's speed, blocks of 128 1.7x; docs/BENCHMARKS.md)."""
    return ["fp32", "int8", *(f"nbits{b}g{k}" for b in (2, 4, 8) for k in blocks)]


def kernel_graph(cls: str, k: int, n: int, accuracy: int = 4, int8_kernel: str = "portable") -> bytes:
    """A serialized one-layer ONNX model ``Y = A @ W^T`` [M, K] -> [M, N] running kernel class ``cls``."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from autocomp.compressors.base import OnnxWeight
    from autocomp.ort import MS_DOMAIN, OPSET, _Graph, _lower_matmul

    rng = np.random.default_rng(0)
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])
    model = helper.make_model(helper.make_graph([], "kernel", [a], [y]),
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    if cls == "fp32":
        w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")
        model.graph.initializer.append(w)
        model.graph.node.append(helper.make_node("MatMul", ["A", "W"], ["Y"]))
        return model.SerializeToString()
    gr = _Graph(model, int8_kernel)
    if cls == "int8":
        w = OnnxWeight("MatMulInteger", 8, k, rng.integers(-127, 128, (n, k)).astype(np.int8),
                       np.full(n, 0.01, np.float32))
    else:
        bits, block = (int(x) for x in cls[5:].split("g"))
        nb = -(-k // block)
        w = OnnxWeight("MatMulNBits", bits, block, rng.integers(0, 2**bits, (n, k)),
                       np.full((n, nb), 0.01, np.float32), rng.integers(0, 2**bits, (n, nb)))
    model.graph.node.extend(_lower_matmul(gr, "A", "Y", w, "W", n, k, accuracy))
    model.graph.initializer.extend(gr.added.values())
    return model.SerializeToString()


def _session(data: bytes, threads: int | None) -> Any:
    """A session whose threads sleep between runs, as every session autocomp times (see OrtModel)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _time(fn: Callable[[], Any], min_runs: int = 7, budget_s: float = 0.1) -> float:
    """Lower quartile of ``fn``'s seconds (shared-machine noise only adds time)."""
    from autocomp.hardware import _time as timed

    return timed(fn, min_runs=min_runs, budget_s=budget_s, max_runs=60, quantile=0.25)


def _empty_run_s(threads: int | None) -> float:
    """What one ``session.run`` from Python costs with (almost) no work: subtracted from every kernel time."""
    import numpy as np
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["A"], ["Y"])], "id", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    sess = _session(model.SerializeToString(), threads)
    feed = {"A": np.ones((1, 4), np.float32)}
    return _time(lambda: sess.run(None, feed), min_runs=50, budget_s=0.2)


def _fit(rows: list[tuple[float, float, float, float]], times: list[float]) -> list[float]:
    """Non-negative least squares on relative error: ``t = a MKN + b KN + c M(K+N) + d``."""
    import numpy as np
    from scipy.optimize import nnls

    x = np.array(rows, dtype=float)
    t = np.array(times, dtype=float)
    w = 1.0 / np.maximum(t, 1e-7)
    scale = x.max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls((x / scale) * w[:, None], t * w)
    return [float(c) for c in coef / scale]


def _time_kernels(classes: list[str], shapes: list[tuple[int, int]], ms: list[int], threads: int | None,
                  base: float, accuracy: int, log: Callable[[str], None],
                  int8_kernel: str = "portable") -> tuple[dict[str, list[float]], dict[str, Any]]:
    import numpy as np

    fits, samples = {}, {}
    for cls in classes:
        pts: list[tuple[int, tuple[float, float, float, float], float]] = []
        for k, n in shapes:
            sess = _session(kernel_graph(cls, k, n, accuracy, int8_kernel), threads)
            for m in ms:
                a = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
                t = max(_time(lambda: sess.run(None, {"A": a})) - base, 1e-7)
                pts.append((m, (m * k * n, k * n, m * (k + n), 1.0), t))
        # one token (batch-1 generation) runs other kernels than a block of tokens (GEMV vs GEMM): own fits
        for suffix, sel in (("", [p for p in pts if p[0] > 1]), ("@1", [p for p in pts if p[0] == 1])):
            if not sel:
                continue
            feats, times = [p[1] for p in sel], [p[2] for p in sel]
            fits[cls + suffix] = _fit(feats, times)
            pred = np.array(feats) @ np.array(fits[cls + suffix])
            err = float(np.mean(np.abs(pred - times) / np.array(times)))
            samples[cls + suffix] = {"points": len(times), "mape": round(err, 4)}
        log(f"  {cls}: {len(pts)} timings, fit error {samples[cls]['mape']:.1%} (1 token: "
            f"{samples.get(cls + '@1', {}).get('mape', float('nan')):.1%})")
    return fits, samples


def _time_gather(threads: int | None, base: float) -> list[float]:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    feats, times = [], []
    for d in (128, 384, 1024):
        table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4096, d)).astype(np.float32), "T")
        i = helper.make_tensor_value_info("I", TensorProto.INT64, [None])
        y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, d])
        model = helper.make_model(helper.make_graph([helper.make_node("Gather", ["T", "I"], ["Y"])], "g", [i], [y],
                                                    [table]), opset_imports=[helper.make_opsetid("", 18)])
        sess = _session(model.SerializeToString(), threads)
        for m in (1, 16, 128, 512):
            ids = np.random.default_rng(m).integers(0, 4096, m)
            times.append(max(_time(lambda: sess.run(None, {"I": ids})) - base, 1e-8))
            feats.append((m * d, 1.0))
    from scipy.optimize import nnls

    x, t = np.array(feats), np.array(times)
    coef, _ = nnls(x / t[:, None], np.ones_like(t))
    return [float(c) for c in coef]


def _fit_other(loaded: Any, desc: Any, device_doc: dict[str, Any], threads: int | None, seq: int,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Time the model's fp32 ONNX export at several token counts; what the layers' fits do not explain is
    the rest of the graph (attention, norms, activations, the session's own per-run cost)."""
    import numpy as np
    from scipy.optimize import nnls

    from autocomp.cost.device import parse_device
    from autocomp.cost.latency import CostModel, Workload
    from autocomp.hardware import workload_batch
    from autocomp.ort import OrtModel, export_onnx
    from autocomp.plan import Plan

    device = parse_device(device_doc, "calibration")
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(loaded.module, desc, None, Path(tmp) / "fp32.onnx", loaded.batches[0])
        model = OrtModel(Path(tmp) / "fp32.onnx", threads=threads, spinning=False)
        rows, others = [], []
        seqs = sorted({s for s in (8, 16, 32, 64, 128, seq) if s <= max(seq, 8)}) if seq else [0]
        for b in (1, 4):
            for s in seqs:
                wl = Workload(b, s or None)
                batch = workload_batch(loaded, desc, wl)
                feed = model.feed(**batch) if isinstance(batch, dict) else model.feed(batch)
                measured = _time(lambda: model.run_numpy(feed), min_runs=7, budget_s=0.3)
                layers = CostModel(device, desc, wl)
                layer_s = sum(layers.layer(l, Plan(layers={}).layer(l.name), l.rows, l.cols)[0] for l in desc.layers)
                tokens = b * (s or 1)
                rows.append((1.0, tokens, tokens * tokens / b))
                others.append(max(measured - layer_s, 1e-6))
                log(f"  fp32 graph at {b}x{s}: {measured * 1e3:.2f} ms, layers {layer_s * 1e3:.2f} ms")
    x, t = np.array(rows), np.array(others)
    coef, _ = nnls(x / t[:, None], np.ones_like(t))
    return {"model": desc.name, "fingerprint": desc.fingerprint, "other": [float(c) for c in coef],
            "workloads": len(rows)}


def fit_plans_ort(loaded: Any, desc: Any, wl: Any, device: Any, n_plans: int = 12,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Scales per kernel group, fitted on the model's own plans in ONNX Runtime: the uncompressed model and
    ``n_plans`` random plans of the default space as ``runtime: ort`` searches offer them (spread draw, seeds
    that ``hardware validate`` does not use) are exported, timed side by side
    (:func:`autocomp.hardware.time_models`) and ``t = s_fp32 fp32 + s_int8 int8 + s_nbits nbits + s_other
    other`` fitted on the kernel-level breakdown (relative error; scales within 1/4..4x, pulled weakly toward
    1). A kernel timed alone in a one-node session is not the same kernel inside a graph (on the Zen 4 VM the
    layers ran ~8-13% faster in the graph, and what the fp32 graph spends outside them was under-counted by as
    much: quantized plans were predicted ~20% fast). Applied only to this model (its weight fingerprint) at
    this workload."""
    import numpy as np
    from scipy.optimize import lsq_linear

    from autocomp.cost.latency import CostModel
    from autocomp.hardware import _random_plans, ort_models, time_models, workload_batch
    from autocomp.plan import Plan
    from autocomp.space import SearchSpace

    space = SearchSpace.from_yaml("default", desc)
    space.restrict_to_stored_formats()
    plans = [Plan(layers={}), *_random_plans(space, n_plans, seed=2_000_003, draw="spread")]
    log(f"  timing {len(plans)} exported plans of {desc.name} at {wl.label()} (round-robin)…")
    with tempfile.TemporaryDirectory() as tmp:
        models = ort_models(loaded, desc, plans, device, Path(tmp), log=lambda _: None)
        measured = np.array(time_models(models, workload_batch(loaded, desc, wl), runs=15)) / 1e3
        del models
    cost = CostModel(device, desc, wl)
    groups = ("fp32", "int8", "nbits", "other")
    parts = [cost.ort_breakdown(p) for p in plans]
    x = np.array([[b[g] for g in groups] for b in parts])
    used = x.max(axis=0) > 0  # a group no plan uses keeps scale 1
    # relative error, each scale pulled weakly toward 1 (the kernel as timed alone) and kept within 1/4..4x: a
    # group the plans hardly exercise (a tiny model's matmuls are microseconds of noise) is not fitted to 0
    a = np.vstack([x[:, used] / measured[:, None], RIDGE * np.eye(int(used.sum()))])
    b = np.concatenate([np.ones(len(plans)), RIDGE * np.ones(int(used.sum()))])
    coef = lsq_linear(a, b, bounds=(0.25, 4.0)).x
    scales = dict.fromkeys(groups, 1.0)
    scales.update({g: float(c) for g, c in zip(np.array(groups)[used], coef)})
    fitted = x @ np.array([scales[g] for g in groups])
    before = float(np.mean(np.abs(x.sum(1) - measured) / measured))
    after = float(np.mean(np.abs(fitted - measured) / measured))
    log("  whole model: t = " + " + ".join(f"{scales[g]:.3f} x {g}" for g in groups)
        + f" (error on the {len(plans)} timed plans {before:.1%} -> {after:.1%})")
    # the uncompressed model was timed twice: with the kernels (the rest of the graph is fitted to it) and now
    drift = float(measured[0] / x[0].sum())
    if abs(drift - 1) > 0.15:
        log(f"  warning: the uncompressed model ran {drift:.2f}x its time of a minute ago: the machine's speed "
            f"changed during calibration, and the device follows the later speed; calibrate again on an idle machine")
    return {"workload": wl.label(), "plans": len(plans), "scales": scales, "speed_change": round(drift, 4),
            "mape_kernel_level": round(before, 4), "mape_fitted": round(after, 4)}


def calibrate_ort(out: Path, name: str = "ort-cpu", quick: bool = False, log: Callable[[str], None] = print,
                  model: Any = None, workload: str | None = None, threads: int | None = None,
                  accuracy_level: int = 4, int8_kernel: str = "portable", fit_plans: int = 12) -> Any:
    """Write (atomically) and return the ``runtime: ort`` device file of this machine, for exports at
    ``accuracy_level`` (MatMulNBits' compute type; 4: int8, what `export --format onnx` uses by default) and
    ``int8_kernel`` (the W8A8 kernel, as `export --format onnx --int8-kernel`)."""
    import onnxruntime
    import yaml

    from autocomp.cost.device import parse_device
    from autocomp.plan import atomic_write_text

    fit_model = None
    if model is not None:
        from autocomp.cost.latency import parse_workload
        from autocomp.models.introspect import introspect

        desc = introspect(model)
        fit_model = (model, desc, parse_workload(workload, desc))
    base = _empty_run_s(threads)
    log(f"  an empty session.run: {base * 1e6:.1f} us (subtracted)")
    shapes = _SHAPES[:4] if quick else _SHAPES
    ms = [1, 16, 128] if quick else _ROWS
    classes = kernel_classes((32, 128) if quick else BLOCKS)
    kernels, samples = _time_kernels(classes, shapes, ms, threads, base, accuracy_level, log, int8_kernel)
    kernels["gather"] = _time_gather(threads, base)
    fp32_rate = 1.0 / max(kernels["fp32"][0], 1e-18)  # MACs/s at large shapes
    src = f"timed by autocomp hardware calibrate --runtime ort (onnxruntime {onnxruntime.__version__}) on {platform.node()}"
    doc: dict[str, Any] = {
        "name": name,
        "description": f"ONNX Runtime {onnxruntime.__version__} CPU kernels on {platform.processor() or platform.machine()}"
                       f" ({threads or 'all'} threads): the kernels autocomp export --format onnx uses",
        "kind": "cpu", "runtime": "ort", "default_dtype": "fp32",
        "peak_ops": {"fp32": {"value": 2 * fp32_rate, "source": src},
                     "int8": {"value": 2.0 / max(kernels["int8"][0], 1e-18), "source": src}},
        "memory_bandwidth": {"value": 1e10, "source": "unused by runtime ort (the kernel fits hold it)"},
        "efficiency": {"compute": {"value": 1.0, "source": "the fits are measured"},
                       "memory": {"value": 1.0, "source": "the fits are measured"}},
        "layer_overhead_s": {"value": max(kernels["fp32"][3], 1e-7), "source": src},
        "accelerates": {"int8": True, "weight_only_bits": [2, 4, 8]},
        "ort": {"version": onnxruntime.__version__, "threads": threads or 0, "accuracy_level": accuracy_level,
                "int8_kernel": int8_kernel,
                "empty_run_s": base, "kernels": kernels, "samples": samples},
    }
    if fit_model is not None:
        m, desc, wl = fit_model
        doc["ort"]["end_to_end"] = _fit_other(m, desc, doc, threads, wl.seq or 0, log)
        doc["ort"]["end_to_end"].update(fit_plans_ort(m, desc, wl, parse_device(doc, "calibration"), fit_plans, log))
    device = parse_device(doc, str(out))
    atomic_write_text(out, yaml.safe_dump(doc, sort_keys=False))
    return device

