"""W8A8 on ONNX Runtime's activation grid (``int8f``): ORT's DynamicQuantizeLinear quantizes a layer's inputs to
the full 8 bits per tensor where torch's x86 kernel (``int8``) uses 7. A search for ORT scores what ORT runs, the
export matches it to float rounding, old plans keep their meaning."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from autocomp.compressors.apply import PlanApplier
from autocomp.compressors.quantize import QuantConfig, Quantize, fake_quant_input, fake_quant_input_full
from autocomp.models.introspect import introspect
from autocomp.plan import LayerPlan, Plan
from conftest import tiny_loaded

FULL = QuantConfig(8, 0, True, 8, reduce_range=False)
REDUCED = QuantConfig(8, 0, True, 8)


def _plan(desc, config):
    return Plan(layers={l.name: LayerPlan(config) for l in desc.layers if l.type == "Linear"},
                fingerprint=desc.fingerprint)


def test_labels_versions_and_old_plans():
    q = Quantize()
    assert q.label(FULL) == "int8f" and q.label(REDUCED) == "int8"
    fc1 = next(l for l in introspect(tiny_loaded()).layers if l.type == "Linear")
    assert q.bind(q.parse("int8f"), fc1, [(fc1.rows, fc1.cols)]) == FULL
    assert q.label(QuantConfig(8, 0, True, 8, "gptq", "act", False, "act")) == "int8f/gptq"
    assert q.label(QuantConfig(8, 0, True, 8, "gptq", "act", False)) == "int8f/gptq-plain"
    assert q.parse("int8") == (8, 0, True, 8, "rtn", "columns", True, "none")  # what every plan written before computes
    # only int8f writes the new field and the new version: an older autocomp still reads int8 plans
    assert "reduce_range" not in REDUCED.to_dict() and REDUCED.version() == 1
    assert FULL.to_dict()["reduce_range"] is False and FULL.version() == 4
    assert QuantConfig.from_dict(FULL.to_dict()) == FULL
    with pytest.raises(ValueError, match="reduce_range"):
        QuantConfig(4, 0, True, None, reduce_range=False)  # weight-only layers have no activation grid
    assert q.ort_label("int8") == "int8f" and q.ort_label("int8/gptq") == "int8f/gptq"
    assert q.ort_label("int8f") == "int8f" and q.ort_label("4g128") == "4g128"
    p = Plan(layers={"fc1": LayerPlan(FULL)})
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))).layers["fc1"].get("quantize") == FULL


def test_the_full_grid_has_256_levels_and_a_quarter_of_the_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g) * 3 + 1
    full, reduced = fake_quant_input_full(None, (x,))[0], fake_quant_input(None, (x,))[0]
    assert 200 < full.unique().numel() <= 256 and reduced.unique().numel() <= 128
    ratio = float((full - x).pow(2).mean() / (reduced - x).pow(2).mean())
    assert 0.2 < ratio < 0.3  # step (max - min) / 255 against / 127: about (127 / 255)^2 = 0.25
    # ORT's formula: scale (max(0, max) - min(0, min)) / 255, zero point round(-min / scale), saturate
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = torch.tensor((hi - lo) / 255, dtype=torch.float32)
    z = torch.round(-torch.tensor(lo) / s)
    assert torch.equal(full, (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s)


def test_proxy_fisher_cost_and_torch_runtime(tmp_path):
    """The proxy hooks the full grid (less drift than int8 on the same weights), the Fisher estimate charges it
    the smaller rounding noise, the torch device prices it dense (torch has no exact kernel), ORT's prices it
    int8, and the torch runtime computes exactly the simulation."""
    from autocomp.cost.device import load_device
    from autocomp.cost.latency import CostModel
    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.runtime import build_runtime_model
    from autocomp.search.sensitivity import fisher_profile
    from autocomp.space import SearchSpace

    loaded = tiny_loaded()
    desc = introspect(loaded)
    ev = ProxyEvaluator(loaded, desc)
    full, reduced = ev(_plan(desc, FULL)), ev(_plan(desc, REDUCED))
    assert 0 < full < 0.6 * reduced

    space = SearchSpace.from_yaml("default", desc).restrict_to_stored_formats()
    sens = fisher_profile(space, ev, tmp_path, {"t": 1})
    rows = [row for row in sens.table.values() if "int8f" in row]
    assert rows and all("int8" not in row for row in rows)
    plain = SearchSpace.from_yaml("default", desc)
    sens_plain = fisher_profile(plain, ev, tmp_path, {"t": 2})
    for p, row in sens.table.items():
        if "int8f" in row and p in sens_plain.table:
            assert 0 < row["int8f"] < sens_plain.table[p]["int8"]

    torch_dev = load_device("x86-avx512-vnni")
    m = CostModel(torch_dev, desc)
    one = {"fc1": LayerPlan(FULL)}
    assert m.latency_ms(Plan(layers=one)) != m.latency_ms(Plan(layers={"fc1": LayerPlan(REDUCED)}))
    assert m.latency_ms(Plan(layers=one)) == pytest.approx(m.latency_ms(Plan(layers={"fc1": LayerPlan(bits=8)})))

    plan = _plan(desc, FULL)
    rt = build_runtime_model(loaded.module, desc, plan)
    b = loaded.batches[0]
    with torch.inference_mode():
        got = rt(b)
        with PlanApplier(loaded.module, desc).applied(plan):
            want = loaded.module(b)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_onnx_export_of_w8a8_equals_the_simulation_on_either_grid(tmp_path):
    """int8f lowers to DynamicQuantizeLinear + MatMulInteger on uint8 weights, int8 to a 7-bit quantization in the
    graph + MatMulInteger on int8 weights; each equals its simulation to float rounding on any x86 CPU (ORT's
    u8 x s8 path saturates on full-range activations without VNNI: the reason for both), and they differ."""
    from autocomp.ort import OrtModel, export_onnx

    loaded = tiny_loaded()
    desc = introspect(loaded)
    b = loaded.batches[0]
    sim, out = {}, {}
    for name, config in (("full", FULL), ("reduced", REDUCED)):
        plan = _plan(desc, config)
        r = export_onnx(loaded.module, desc, plan, tmp_path / f"{name}.onnx", b, accuracy_level=0)
        assert r["kernels"] == {"MatMulInteger": sum(1 for l in desc.layers if l.type == "Linear")}
        assert r["notes"] == {}
        ops = [n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node]
        assert ("DynamicQuantizeLinear" in ops) == (name == "full") and ("Round" in ops) == (name == "reduced")
        with torch.inference_mode(), PlanApplier(loaded.module, desc).applied(plan):
            sim[name] = loaded.module(b)
        out[name] = OrtModel(tmp_path / f"{name}.onnx")(b)
        assert (out[name] - sim[name]).abs().max() <= 1e-4 * sim[name].abs().max()
    assert (out["full"] - out["reduced"]).abs().max() > 1e-3 * sim["full"].abs().max()


def test_an_ort_space_holds_int8f_and_a_torch_one_int8():
    """(The CLI search on an ORT device: tests/test_ort.py.)"""
    from autocomp.space import SearchSpace

    desc = introspect(tiny_loaded())
    ort_space = SearchSpace.from_yaml("default", desc).restrict_to_stored_formats()
    labels = {o for opts in ort_space.params.values() for o in opts}
    assert "int8f" in labels and "int8" not in labels
    labels = {o for opts in SearchSpace.from_yaml("default", desc).params.values() for o in opts}
    assert "int8" in labels and "int8f" not in labels


def test_an_ort_space_starts_from_uniform_int8f_too():
    """The uniform W8A8 reference plan (the front's fast end on ORT) is seeded from int8f as it was from int8: a
    table without W8A8 kernels keeps 8-bit weights in it."""
    from autocomp.compressors.base import technique
    from autocomp.space import SearchSpace, reference_assignments

    loaded = tiny_loaded()
    desc = introspect(loaded)
    space = SearchSpace.from_yaml("default", desc).restrict_to_stored_formats()
    refs = reference_assignments(space)
    assert "uniform-int8f" in refs
    plan = space.decode(refs["uniform-int8f"])
    kinds = {l.name: l.type for l in desc.layers}
    for name, layer in plan.layers.items():
        q = layer.get("quantize")
        assert q == (FULL if kinds[name] == "Linear" else QuantConfig(8)), (name, q)
    assert technique("quantize").ort_label("int8") == "int8f"


def test_vnni_kernel_stores_int8_weights_and_equals_the_portable_file(tmp_path, monkeypatch):
    """--int8-kernel vnni: the same integers as int8 weights with no zero point (ORT's u8 x s8 path, faster on
    VNNI CPUs), the same outputs as the portable u8 x u8 file where the CPU has VNNI; a file made so is refused
    (one error naming the fix) on an x86 CPU without VNNI, where that path saturates."""
    import autocomp.ort as ort_mod
    from autocomp.errors import AutocompError
    from autocomp.ort import OrtModel, cpu_has_vnni, export_onnx

    loaded = tiny_loaded()
    desc = introspect(loaded)
    b = loaded.batches[0]
    plan = _plan(desc, FULL)
    n_linear = sum(1 for l in desc.layers if l.type == "Linear")
    files = {}
    for kernel in ("portable", "vnni"):
        files[kernel] = tmp_path / f"{kernel}.onnx"
        r = export_onnx(loaded.module, desc, plan, files[kernel], b, accuracy_level=0, int8_kernel=kernel)
        assert r["kernels"] == {"MatMulInteger": n_linear}
        assert bool(r["notes"]) == (kernel == "vnni")
    graphs = {k: onnx.load(str(f)) for k, f in files.items()}
    for kernel, g in graphs.items():
        mmi = [n for n in g.graph.node if n.op_type == "MatMulInteger"]
        assert len(mmi) == n_linear and all(len(n.input) == (3 if kernel == "vnni" else 4) for n in mmi)
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.graph.initializer}
        w = inits[mmi[0].input[1]]
        assert w.dtype == (np.int8 if kernel == "vnni" else np.uint8)
        meta = {p.key: p.value for p in g.metadata_props}
        assert meta["int8_kernel"] == kernel
    wv = {t.name: onnx.numpy_helper.to_array(t) for t in graphs["vnni"].graph.initializer}
    wp = {t.name: onnx.numpy_helper.to_array(t) for t in graphs["portable"].graph.initializer}
    for name in (n.input[1] for n in graphs["vnni"].graph.node if n.op_type == "MatMulInteger"):
        assert np.array_equal(wv[name].astype(np.int16) + 128, wp[name].astype(np.int16))  # the same integers
    if cpu_has_vnni() is not False:
        with torch.inference_mode(), PlanApplier(loaded.module, desc).applied(plan):
            sim = loaded.module(b)
        out = {k: OrtModel(f)(b) for k, f in files.items()}
        assert (out["vnni"] - out["portable"]).abs().max() <= 1e-5 * sim.abs().max()
        assert (out["vnni"] - sim).abs().max() <= 1e-4 * sim.abs().max()
    # the 7-bit grid (int8) already runs u8 x s8 without saturating: such a file is not marked
    r = export_onnx(loaded.module, desc, _plan(desc, REDUCED), tmp_path / "reduced.onnx", b, int8_kernel="vnni")
    assert r["notes"] == {} and r["kernels"] == {"MatMulInteger": n_linear} and r["int8_kernel"] == ""
    monkeypatch.setattr(ort_mod, "cpu_has_vnni", lambda: False)
    with pytest.raises(AutocompError, match="--int8-kernel portable"):
        OrtModel(files["vnni"])
    OrtModel(files["portable"])  # the portable file runs anywhere
    OrtModel(tmp_path / "reduced.onnx")
    with pytest.raises(AutocompError, match="int8 kernel"):
        export_onnx(loaded.module, desc, plan, tmp_path / "bad.onnx", b, int8_kernel="avx")
    assert not (tmp_path / "bad.onnx").exists()
