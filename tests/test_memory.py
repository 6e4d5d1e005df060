"""glibc's malloc settings for a search: a small model's freed activations are reused, not faulted in again."""

import resource
import sys

import pytest
import torch

from autocomp import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or memory._libc() is None,
                                reason="glibc only")


def _faults_per_cycle(n: int = 12) -> float:
    """Minor page faults per allocate-touch-free of a 16 MiB tensor (an FFN activation's size)."""
    torch.empty(4 << 20).fill_(1.0)  # first touch of the heap, outside the count
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.empty(4 << 20).fill_(1.0)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / n


def test_small_model_keeps_freed_activations_large_model_gives_them_back():
    assert memory.settle_for(memory.LARGE_MODEL_BYTES)  # large: 16 MiB blocks are mapped, unmapped, faulted
    large = _faults_per_cycle()
    assert memory.settle_for(10 << 20)  # small: they stay in the heap
    small = _faults_per_cycle()
    memory.large_blocks_to_mmap()  # what a search process starts with
    assert large > 1000  # 4096 pages of 4 KiB each time (fewer if the kernel hands out huge pages)
    assert small < large / 10
