"""The size model against arrays really packed with numpy (not against its own formula)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from autocomp.compressors.apply import PlanApplier
from autocomp.compressors.base import LayerContext
from autocomp.compressors.pipeline import pack_layer, reconstruct, run_pipeline, unpack_layer
from autocomp.cost.size import layer_bytes, plan_bytes
from autocomp.desc import LayerDesc
from autocomp.models.introspect import introspect
from autocomp.packing import pack_bits, unpack_bits
from autocomp.plan import LayerPlan, Plan
from autocomp.space import SearchSpace
from conftest import tiny_loaded


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_bits_round_trip(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 8, 9, 1001):
        codes = rng.integers(0, 1 << bits, n)
        packed = pack_bits(codes, bits)
        assert packed.dtype == np.uint8 and packed.nbytes == (n * bits + 7) // 8
        assert np.array_equal(unpack_bits(packed, bits, n), codes)


def test_pack_bits_layout_is_little_endian():
    assert pack_bits(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_bits(np.array([5, 3]), 3).tolist() == [0b00011101]


CHOICES = [
    LayerPlan(),
    *[LayerPlan(bits=b, group_size=g, symmetric=s) for b, g, s in itertools.product([2, 3, 4, 5, 6, 8], [0, 16, 20], [True, False])],
    LayerPlan(prune="unstructured", sparsity=0.3), LayerPlan(prune="2:4"),
    LayerPlan(bits=3, group_size=16, prune="unstructured", sparsity=0.7),
    LayerPlan(bits=4, group_size=0, symmetric=False, prune="2:4"),
    LayerPlan(rank=8), LayerPlan(rank=8, bits=4, group_size=16), LayerPlan(rank=8, bits=5, prune="2:4", symmetric=False),
    LayerPlan(rank=4, bits=2, group_size=0, prune="unstructured", sparsity=0.5),
]


@pytest.mark.parametrize("shape", [(16, 32), (24, 52), (40, 64)])
@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: c.label())
def test_predicted_bytes_equal_packed_bytes(shape, choice):
    rows, cols = shape
    g = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=g)
    bias = torch.randn(rows, generator=g)
    parts = run_pipeline(w, choice, LayerContext("x"))
    arrays = pack_layer("x", parts, choice, bias=bias)
    desc = LayerDesc(name="x", type="Linear", rows=rows, cols=cols, bias=rows)
    assert sum(a.nbytes for a in arrays.values()) == layer_bytes(desc, choice)
    # and the packed arrays decode to exactly the weights the proxy evaluates
    dense = unpack_layer(arrays, "x", choice, rows, cols)
    assert np.array_equal(dense, reconstruct(parts).numpy())


def _other_param_bytes(model, desc) -> int:
    names = {n for layer in desc.layers for n in (f"{layer.name}.weight", f"{layer.name}.bias")}
    return sum(p.detach().numpy().nbytes for n, p in model.named_parameters() if n not in names)


@pytest.mark.parametrize("seed", range(12))
def test_whole_plan_bytes_equal_packed_model(seed, tmp_path):
    """Random plans (with structured neuron pruning) on a real model: pack every tensor, count bytes."""
    space_file = tmp_path / "s.yaml"
    space_file.write_text(
        "version: 1\nlayers:\n"
        "  - quant: [keep, 8c, 4g16, 3g16a, 2c]\n    prune: [none, u30, u70, '2:4']\n    rank: [full, r0.5]\n"
        "structured:\n  - kind: neurons\n    producers: ['fc1']\n    consumers: ['fc2']\n    keep: [1.0, 0.5, 0.25]\n"
    )
    loaded = tiny_loaded()
    desc = introspect(loaded)
    space = SearchSpace.from_yaml(space_file, desc)
    rng = random.Random(seed)
    plan = space.decode({p: rng.choice(opts) for p, opts in space.params.items()})
    applier = PlanApplier(loaded.module, desc)
    total = _other_param_bytes(loaded.module, desc)
    for layer in desc.layers:
        parts, rows, _ = applier.layer_parts(plan, layer.name)
        mod = dict(loaded.module.named_modules())[layer.name]
        bias = getattr(mod, "bias", None)
        if bias is not None:
            bias = bias.detach()[rows] if rows is not None else bias.detach()
        arrays = pack_layer(layer.name, parts, plan.layer(layer.name), bias=bias)
        total += sum(a.nbytes for a in arrays.values())
    for g in plan.structured.values():
        keep_mask = np.zeros(g.units, dtype=bool)
        keep_mask[: g.keep] = True
        total += np.packbits(keep_mask, bitorder="little").nbytes
    assert total == plan_bytes(desc, plan)


def test_uncompressed_plan_is_real_parameter_bytes():
    loaded = tiny_loaded()
    desc = introspect(loaded)
    real = sum(p.numel() * p.element_size() for p in loaded.module.parameters())
    assert desc.fp32_bytes == real == plan_bytes(desc, Plan(layers={}))


@pytest.mark.slow
def test_minilm_baseline_is_its_safetensors_payload(minilm_desc):
    from safetensors import safe_open

    from autocomp.models.minilm import minilm_dir

    total = 0
    with safe_open(str(minilm_dir() / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            if "position_ids" not in k:  # a buffer, not a parameter
                t = f.get_slice(k)
                total += int(np.prod(t.get_shape())) * 4
    assert minilm_desc.fp32_bytes == total == plan_bytes(minilm_desc, Plan(layers={}))
    assert minilm_desc.params == 22_713_216
