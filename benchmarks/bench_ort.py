"""ONNX Runtime deployment figures (issue #12): kernels, MiniLM sessions, latency-model validation, parity.

    .venv/bin/python benchmarks/bench_ort.py --part kernels        # MatMulNBits vs MatMul, decoder layer at M = 1
    .venv/bin/python benchmarks/bench_ort.py --part minilm --plans P1.json,P2.json  # MiniLM sessions
    .venv/bin/python benchmarks/bench_ort.py --part minilm --files M1.onnx  # + files `autocomp export` wrote
    .venv/bin/python benchmarks/bench_ort.py --part parity         # output differences per technique / end to end

Timings are interleaved (each round runs every candidate once, in a fresh random order; lower quartile), so
the shared machine's drift hits every candidate alike; ratios are what to compare. Session memory: each
model in a fresh process (resident set after two runs at 1x15 tokens minus the same process after it created
and ran a weightless session: the runtime's own baseline); ``session_load_s`` is the time that process took to
build the session (codebook layers are decoded then).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def interleaved(fns: dict[str, object], rounds: int = 30, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f(), f()  # type: ignore[operator]
    keys = list(fns)
    for _ in range(rounds):
        rng.shuffle(keys)
        for k in keys:
            t0 = time.perf_counter()
            fns[k]()  # type: ignore[operator]
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[(len(v) - 1) // 4] * 1e3 for k, v in times.items()}


def part_kernels() -> dict:
    """One decoder-style layer pair (GPT-2-medium FFN, 1024 -> 4096 -> 1024) at M = 1 (batch-1 generation) and
    M = 128: fp32 MatMul vs MatMulNBits at 2/4/8 bits (blocks 32 and 128, accuracy level 0 and 4) vs W8A8."""
    import numpy as np

    from autocomp.ort_hardware import _session, kernel_graph

    out = {}
    for k, n in ((1024, 4096), (4096, 1024), (384, 1536)):
        for m in (1, 128):
            a = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
            cands = {"fp32": ("fp32", 0), "int8 (W8A8)": ("int8", 0)}
            for bits in (2, 4, 8):
                for block in (32, 128):
                    for acc in (0, 4):
                        cands[f"{bits}-bit g{block} acc{acc}"] = (f"nbits{bits}g{block}", acc)
            sessions = {name: _session(kernel_graph(cls, k, n, acc), None) for name, (cls, acc) in cands.items()}
            ms = interleaved({name: (lambda s=s: s.run(None, {"A": a})) for name, s in sessions.items()}, rounds=40)
            base = ms["fp32"]
            out[f"{k}x{n} M={m}"] = {name: {"ms": round(v, 4), "speedup_vs_fp32": round(base / v, 2)} for name, v in ms.items()}
            print(f"{k}->{n} M={m}: " + ", ".join(f"{name} {v:.3f} ms ({base / v:.2f}x)" for name, v in ms.items()),
                  file=sys.stderr)
    return out


_RSS_CHILD = r"""
import json, sys, resource
def rss():  # -> (resident, of which anonymous: the heap, not the libraries' code pages)
    d = {}
    for line in open('/proc/self/status'):
        if line.startswith(('VmRSS', 'RssAnon')):
            d[line.split(':')[0]] = int(line.split()[1]) * 1024
    return d['VmRSS'], d['RssAnon']
import numpy as np, onnxruntime as ort, torch
from autocomp.ort import OrtModel
from autocomp.models import load_model
batch = {k: v[:1] for k, v in load_model('minilm').batches[0].items()}
from onnx import TensorProto, helper  # the runtime's own baseline: a session (thread pool, allocator) with no weights
x = helper.make_tensor_value_info('A', TensorProto.FLOAT, [None])
g = helper.make_graph([helper.make_node('Identity', ['A'], ['Y'])], 'id', [x], [helper.make_tensor_value_info('Y', TensorProto.FLOAT, [None])])
empty = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid('', 18)]).SerializeToString())
empty.run(None, {'A': np.ones(4, np.float32)})
from autocomp.memory import release
release()  # OrtModel gives the heap it freed back (malloc_trim): so does the baseline
before = rss()
import time
t0 = time.perf_counter()
m = OrtModel(sys.argv[1])
load = time.perf_counter() - t0
m(**batch); m(**batch)
after = rss()
print(json.dumps({"rss_over_baseline": after[0] - before[0], "anon_over_baseline": after[1] - before[1], "load_s": load}))
"""


def session_rss(path: Path) -> dict:
    """-> {"rss_over_baseline": bytes, "anon_over_baseline": the anonymous part of it (VmRSS less the file-backed
    pages: the runtime's code that the model's kernels touched, shared between processes), "load_s": seconds to
    build the session}, in a fresh process."""
    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def part_minilm(plan_paths: list[str], files: list[str] = (), int8_kernel: str = "portable") -> dict:
    """MiniLM at 1x128 and 1x16 tokens in ORT: fp32, uniform W8A8, uniform 4g128, the given plans (exported
    here with ``int8_kernel``: plans without calibration statistics) and the given ONNX files (exported by
    `autocomp export`). On a CPU with VNNI, uniform int8f also with the u8 x s8 kernel (``--int8-kernel vnni``)."""
    import torch

    from autocomp.cost.size import plan_bytes
    from autocomp.hardware import workload_batch
    from autocomp.cost.latency import Workload
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.ort import OrtModel, cpu_has_vnni, export_onnx
    from autocomp.compressors.quantize import QuantConfig
    from autocomp.plan import LayerPlan, Plan

    loaded = load_model("minilm")
    desc = introspect(loaded)
    lin = [l.name for l in desc.layers if l.type == "Linear"]
    plans = {"fp32": None,
             "uniform W8A8": Plan(layers={n: LayerPlan(bits=8, act_bits=8) for n in lin}, fingerprint=desc.fingerprint),
             "uniform W8A8 int8f": Plan(layers={n: LayerPlan(QuantConfig(8, 0, True, 8, reduce_range=False)) for n in lin},
                                        fingerprint=desc.fingerprint),
             "uniform 4g128 (+ 4g128 table)": Plan(layers={**{n: LayerPlan(bits=4, group_size=128) for n in lin},
                                                          "bert.embeddings.word_embeddings": LayerPlan(bits=4, group_size=128)},
                                                   fingerprint=desc.fingerprint)}
    kernel = {name: "portable" for name in plans}
    if cpu_has_vnni():
        plans["uniform W8A8 int8f, vnni kernel"] = plans["uniform W8A8 int8f"]
        kernel["uniform W8A8 int8f, vnni kernel"] = "vnni"
    for p in plan_paths:
        plans[Path(p).stem] = Plan.load(p)
        kernel[Path(p).stem] = int8_kernel
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for name, plan in plans.items():
            path = Path(tmp) / f"{len(models)}.onnx"
            r = export_onnx(loaded.module, desc, plan, path, loaded.batches[0], output_name="embeddings",
                            int8_kernel=kernel[name])
            models[name] = OrtModel(path, spinning=False)  # sessions timed side by side must not spin
            mem = session_rss(path)
            rows[name] = {"predicted_bytes": r["predicted_bytes"], "file_bytes": r["file_bytes"],
                          "kernels": r["kernels"], "session_rss_over_baseline": mem["rss_over_baseline"],
                          "session_anon_over_baseline": mem["anon_over_baseline"], "session_load_s": round(mem["load_s"], 3)}
        for f in files:
            name = Path(f).stem
            models[name] = OrtModel(f, spinning=False)
            mem = session_rss(Path(f))
            rows[name] = {"predicted_bytes": int(models[name].meta["predicted_bytes"]), "file_bytes": Path(f).stat().st_size,
                          "session_rss_over_baseline": mem["rss_over_baseline"],
                          "session_anon_over_baseline": mem["anon_over_baseline"], "session_load_s": round(mem["load_s"], 3)}
        for seq in (128, 16):
            batch = workload_batch(loaded, desc, Workload(1, seq))
            feeds = {name: m.feed(**batch) for name, m in models.items()}
            ms = interleaved({name: (lambda m=m, f=feeds[name]: m.run_numpy(f)) for name, m in models.items()}, rounds=40)
            for name, v in ms.items():
                rows[name][f"ms_1x{seq}"] = round(v, 3)
                rows[name][f"speedup_1x{seq}"] = round(ms["fp32"] / v, 2)
        with torch.inference_mode():  # the same plans in torch eager, for comparison (1x128)
            from autocomp.compressors.apply import PlanApplier
            from autocomp.runtime import build_runtime_model

            applier = PlanApplier(loaded.module, desc)
            batch = workload_batch(loaded, desc, Workload(1, 128))
            eager = {name: (build_runtime_model(loaded.module, desc, plan, applier) if plan is not None else loaded.module)
                     for name, plan in plans.items()}  # (not the files': their plans may need calibration)
            ms = interleaved({name: (lambda m=m: m(**batch)) for name, m in eager.items()}, rounds=20)
            for name, v in ms.items():
                rows[name]["torch_eager_ms_1x128"] = round(v, 3)
    base_rss = rows["fp32"]["session_rss_over_baseline"]
    for name, r in rows.items():
        r["rss_over_predicted"] = round(r["session_rss_over_baseline"] / r["predicted_bytes"], 3)
        r["anon_over_predicted"] = round(r["session_anon_over_baseline"] / r["predicted_bytes"], 3)
        r["rss_vs_fp32_session"] = round(r["session_rss_over_baseline"] / base_rss, 3)
        print(f"{name}: {json.dumps(r)}", file=sys.stderr)
    return rows


def part_parity() -> dict:
    """Max / mean |ORT - simulated| relative to max |simulated|, per technique on MiniLM (uniform plans)."""
    import torch

    from autocomp.compressors.apply import PlanApplier
    from autocomp.compressors.lowrank import LowRankConfig
    from autocomp.compressors.prune import PruneConfig
    from autocomp.compressors.quantize import QuantConfig
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.ort import OrtModel, export_onnx
    from autocomp.plan import LayerPlan, Plan

    loaded = load_model("minilm")
    desc = introspect(loaded)
    lin = [l.name for l in desc.layers if l.type == "Linear"]
    emb = "bert.embeddings.word_embeddings"
    cases = {"4g128": LayerPlan(bits=4, group_size=128), "2g32a": LayerPlan(bits=2, group_size=32, symmetric=False),
             "3c (4-bit containers)": LayerPlan(bits=3), "8c": LayerPlan(bits=8), "W8A8": LayerPlan(bits=8, act_bits=8),
             "W8A8 int8f (ORT's grid)": LayerPlan(QuantConfig(8, 0, True, 8, reduce_range=False)),
             "u50 (dense zeros)": LayerPlan(PruneConfig("unstructured", 0.5)), "2:4 + 4g64": LayerPlan(prune="2:4", bits=4, group_size=64),
             "rank 1/2 + 4g32": LayerPlan(LowRankConfig(192), QuantConfig(4, 32)),
             "4g128/gptq": LayerPlan(QuantConfig(4, 128, method="gptq"))}
    applier = PlanApplier(loaded.module, desc)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, choice in cases.items():
            if choice.get("quantize") is not None and choice.get("quantize").method == "gptq":
                from autocomp.compressors.calibration import ensure

                ensure(loaded, desc, Path(tmp) / "calibration", Plan(layers={lin[0]: choice}))
            layers = {n: choice for n in lin}
            if name == "4g128":
                layers[emb] = LayerPlan(bits=4, group_size=128)
            plan = Plan(layers=layers, fingerprint=desc.fingerprint)
            out[name] = {}
            for acc in (4, 0):
                export_onnx(loaded.module, desc, plan, Path(tmp) / "m.onnx", loaded.batches[0], accuracy_level=acc)
                m = OrtModel(Path(tmp) / "m.onnx")
                maxd, meand, drift_sim, drift_ort = [], [], [], []
                for b in loaded.batches:
                    with torch.inference_mode():
                        ref = loaded.module(**b)
                        with applier.applied(plan):
                            sim = loaded.module(**b)
                    real = m(**b)
                    maxd.append(float((real - sim).abs().max() / sim.abs().max()))
                    meand.append(float((real - sim).abs().mean() / sim.abs().max()))
                    cos = torch.nn.functional.cosine_similarity
                    drift_sim.append(float((1 - cos(sim, ref, dim=-1)).mean()))
                    drift_ort.append(float((1 - cos(real, ref, dim=-1)).mean()))
                n = len(maxd)
                out[name][f"accuracy_level_{acc}"] = {"max_rel": max(maxd), "mean_rel": sum(meand) / n,
                                                      "drift_simulated": sum(drift_sim) / n, "drift_ort": sum(drift_ort) / n}
            print(f"{name}: {out[name]}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["kernels", "minilm", "parity"], required=True)
    ap.add_argument("--plans", default="", help="--part minilm: comma-separated plan files to add")
    ap.add_argument("--files", default="", help="--part minilm: comma-separated ONNX files (autocomp export) to add")
    ap.add_argument("--int8-kernel", default="portable", choices=["portable", "vnni"],
                    help="--part minilm: the W8A8 kernel the --plans are exported for (as autocomp export)")
    args = ap.parse_args()
    fn = {"kernels": part_kernels, "minilm": lambda: part_minilm([p for p in args.plans.split(",") if p],
                                                                       [f for f in args.files.split(",") if f],
                                                                       args.int8_kernel),
          "parity": part_parity}[args.part]
    import onnxruntime

    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.node()}",
              "onnxruntime": onnxruntime.__version__, "part": args.part, "result": fn()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
