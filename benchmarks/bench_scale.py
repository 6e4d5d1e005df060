"""A 200 MB-class model on this machine (issue #11): `autocomp search --model hf:DIR --budget 200MB` on
GPT-2-medium-shaped causal LMs (d=1024, 16 heads, FFN 4096, MiniLM's tokenizer and its 30,522-token
vocabulary, seeded random weights, saved as local transformers directories; nothing downloaded), at
6, 12 and 24 layers: peak RSS / fp32 bytes, every phase's time, seconds per trial, and how they grow.

    .venv/bin/python benchmarks/bench_scale.py                      # 6, 12, 24 layers, 12 trials
    .venv/bin/python benchmarks/bench_scale.py --layers 24 --trials 12 --json

Each search runs as a user would run it (a fresh process, a fresh study under a temp dir); peak RSS is the
search's maximum resident set (getrusage in a wrapper process of its own). The model directories are cached under --cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(layers: int, cache: Path) -> Path:
    """A GPT-2-medium-shaped model with ``layers`` blocks, built once and reused."""
    path = cache / f"gpt2-medium-shape-{layers}L"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    import torch
    import transformers

    from autocomp.models.minilm import load_tokenizer

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=30522, n_embd=1024, n_layer=layers, n_head=16, n_positions=1024,
                                  bos_token_id=101, eos_token_id=102)
    model = transformers.GPT2LMHeadModel(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path


def run(path: Path, budget: str, trials: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(ROOT / ".venv/bin/autocomp"), "search", "--model", f"hf:{path}", "--budget", budget,
               "--trials", str(trials), "--studies-dir", str(Path(tmp) / "studies"), "--json"]
        # a fresh wrapper process per run: RUSAGE_CHILDREN's maximum is then this search's alone
        wrap = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
                "sys.exit(r.returncode)")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", wrap, *cmd], capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"search failed ({proc.returncode}): {proc.stderr[-2000:]}")
        peak_kb = int(next(ln for ln in reversed(proc.stderr.splitlines()) if ln.startswith("peak_kb")).split()[1])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result.update(json.loads(next((Path(tmp) / "studies").glob("*/phases.json")).read_text()))
    return {"wall_s": wall, "peak_rss_bytes": peak_kb * 1024, "result": result}


def topk_error(path: Path, plans: int = 12, seed: int = 0) -> dict:
    """The top-k teacher's cost: the proxy with the full teacher vs with TopKTeacher (k=128 of 30,522) on
    random plans of the default space, in one process: their ratio and rank agreement."""
    import random

    from scipy.stats import spearmanr

    from autocomp.evaluators import proxy
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.search.repair import repair, size_limit
    from autocomp.space import SearchSpace

    loaded = load_model(f"hf:{path}")
    desc = introspect(loaded)
    full = proxy.ProxyEvaluator(loaded, desc)
    saved = proxy.TEACHER_BYTES
    proxy.TEACHER_BYTES = 0
    try:
        top = proxy.ProxyEvaluator(loaded, desc, applier=full.applier)
    finally:
        proxy.TEACHER_BYTES = saved
    space = SearchSpace.from_yaml("default", desc)
    rng = random.Random(seed)
    rows = []
    for _ in range(plans):
        a = {p: rng.choice(o) for p, o in space.params.items()}
        a, _ = repair(space, a, [size_limit(space, int(0.3 * desc.fp32_bytes))])
        plan = space.decode(a)
        rows.append((full(plan), top(plan)))
    mass = float(sum(t.logp.exp().sum(-1).mean() for t in top.teacher) / len(top.teacher))
    return {"plans": plans, "teacher_topk_mass": mass, "ratio_median": sorted(b / a for a, b in rows)[len(rows) // 2],
            "spearman": float(spearmanr([a for a, _ in rows], [b for _, b in rows]).statistic), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="6,12,24")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--budget", default="200MB")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "autocomp-scale")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--topk", action="store_true", help="Only the top-k teacher's error on the smallest model.")
    args = ap.parse_args()
    if args.topk:
        n = min(int(x) for x in args.layers.split(","))
        print(json.dumps(topk_error(build(n, args.cache))))
        return
    rows = []
    for n in [int(x) for x in args.layers.split(",")]:
        path = build(n, args.cache)
        fp32 = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        r = run(path, args.budget, args.trials)
        res = r["result"]
        phases = res.get("phases", {})
        row = {"layers": n, "fp32_bytes": res.get("fp32_bytes", fp32), "wall_s": round(r["wall_s"], 1),
               "peak_rss_gb": round(r["peak_rss_bytes"] / 1e9, 2),
               "peak_over_fp32": round(r["peak_rss_bytes"] / res.get("fp32_bytes", fp32), 2),
               "phases_s": {k: round(v, 1) for k, v in phases.items()},
               "seconds_per_trial": round(res.get("seconds_per_trial", float("nan")), 2),
               "best": min((e["proxy"] for e in res.get("pareto", [])), default=None),
               "best_size_mb": min((e["size_bytes"] for e in res.get("pareto", [])), default=0) / 1e6}
        rows.append(row)
        print(json.dumps(row) if args.json else
              f"{n:>2} layers: fp32 {row['fp32_bytes'] / 1e9:.2f} GB, peak RSS {row['peak_rss_gb']} GB "
              f"({row['peak_over_fp32']}x fp32), wall {row['wall_s']} s, phases {row['phases_s']}, "
              f"{row['seconds_per_trial']} s/trial", flush=True)
    if not args.json:
        print(f"# {platform.node()} {platform.processor() or platform.machine()}, python {sys.version.split()[0]}, "
              f"{time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
