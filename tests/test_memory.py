"""glibc's malloc settings for a search: a small model's freed activations are reused, not faulted in again."""

import json
import subprocess
import sys

import pytest

from autocomp import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or memory._libc() is None,
                                reason="glibc only")

# In a fresh process: a heap that earlier tests left large (and free) would serve the blocks without mmap.
_PROBE = """
import json, resource, sys
import torch
from autocomp import memory

def faults_per_cycle(n=12):  # minor page faults per allocate-touch-free of 16 MiB (an FFN activation's size)
    torch.empty(4 << 20).fill_(1.0)  # first touch, outside the count
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.empty(4 << 20).fill_(1.0)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / n

out = {"large_set": memory.settle_for(memory.LARGE_MODEL_BYTES + 1)}
out["large"] = faults_per_cycle()
out["small_set"] = memory.settle_for(10 << 20)
out["small"] = faults_per_cycle()
print(json.dumps(out))
"""


def test_small_model_keeps_freed_activations_large_model_gives_them_back():
    run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["large_set"] and out["small_set"]
    assert out["large"] > 1000  # 4096 pages of 4 KiB each time (fewer if the kernel hands out huge pages)
    assert out["small"] < out["large"] / 10
