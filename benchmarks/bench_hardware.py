"""Figures for issue #3 (docs/BENCHMARKS.md). Prints; asserts nothing. Run on a quiet machine:

    .venv/bin/python benchmarks/bench_hardware.py

1. cost-model speed (plans scored per second);
2. calibrate this machine, then validate 30 random MiniLM plans (default and transformer spaces) against
   real runs, calibrated (cpu-local) and uncalibrated (the generic x86 device file);
3. measured latency of the uniform W8A8 plan vs the fp32 model, side by side in one run (ratio).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path


def main() -> None:
    import torch

    os.environ.setdefault("AUTOCOMP_HARDWARE", tempfile.mkdtemp(prefix="autocomp-hw-"))
    from autocomp.compressors.apply import PlanApplier
    from autocomp.cost.device import load_device
    from autocomp.cost.latency import CostModel, parse_workload
    from autocomp.hardware import calibrate, validate, workload_batch
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.runtime import build_runtime_model, measure_latency_ms
    from autocomp.space import SearchSpace, reference_assignments

    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    loaded = load_model("minilm")
    desc = introspect(loaded)
    wl = parse_workload(None, desc)
    space = SearchSpace.from_yaml("default", desc)
    rng = random.Random(0)
    plans = [space.decode({p: rng.choice(o) for p, o in space.params.items()}) for _ in range(3000)]
    cm = CostModel(load_device("x86-avx512-vnni"), desc, wl)
    t0 = time.perf_counter()
    for p in plans:
        cm.evaluate(p)
    print(f"cost model: {len(plans) / (time.perf_counter() - t0):.0f} plans/s (latency + BitOps + energy)")

    dev = calibrate(Path(os.environ["AUTOCOMP_HARDWARE"]) / "cpu-local.yaml", log=lambda s: print(" ", s))
    for space_name in ("default", "transformer"):
        sp = SearchSpace.from_yaml(space_name, desc)
        for device in (dev, load_device("x86-avx512-vnni")):
            r = validate(loaded, desc, sp, device, wl, 30, log=lambda s: None)
            print(f"validate {space_name:11s} {device.name:16s} spearman {r['spearman']:.3f}  within10 "
                  f"{r['within_10pct']:.0%}  within25 {r['within_25pct']:.0%}  MAPE {r['mape']:.1%}")

    batch = workload_batch(loaded, desc, wl)
    applier = PlanApplier(loaded.module, desc)
    int8 = build_runtime_model(loaded.module, desc, space.decode(reference_assignments(space)["uniform-int8"]), applier)
    fp32, q8 = [], []
    for _ in range(5):  # interleaved, so both see the same machine state
        fp32.append(measure_latency_ms(loaded.module, batch, runs=10))
        q8.append(measure_latency_ms(int8, batch, runs=10))
    f, q = sorted(fp32)[2], sorted(q8)[2]
    pred = CostModel(dev, desc, wl)
    print(f"uniform W8A8 vs fp32, measured at {wl.label()}: {q:.1f} ms vs {f:.1f} ms ({f / q:.2f}x); "
          f"cpu-local predicts {pred.latency_ms(space.decode(reference_assignments(space)['uniform-int8'])):.1f} "
          f"vs {pred.latency_ms(space.decode(space.largest_assignment())):.1f} ms")


if __name__ == "__main__":
    main()
