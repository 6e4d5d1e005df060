"""ONNX Runtime deployment (autocomp/ort.py): `autocomp export --format onnx`, parity with the simulated model,
the integer kernels a plan lowers to, loading for serving, and bad input. The per-technique parity runs in
tests/test_techniques.py's conformance suite."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import autocomp
from autocomp.compressors.apply import PlanApplier
from autocomp.cost.size import plan_bytes
from autocomp.models import load_model
from autocomp.models.introspect import introspect
from autocomp.ort import OrtModel, export_onnx
from autocomp.plan import LayerPlan, Plan, StructuredGroup
from conftest import TINY, run_cli, tiny_loaded


def _uniform(desc, choice, emb=None, **kw):
    layers = {l.name: (emb if l.type == "Embedding" else choice) for l in desc.layers}
    return Plan(layers={k: v for k, v in layers.items() if v is not None}, fingerprint=desc.fingerprint, **kw)


def _simulated(loaded, desc, plan, batch):
    with torch.inference_mode():
        if plan is None:
            return loaded.module(**batch) if isinstance(batch, dict) else loaded.module(batch)
        with PlanApplier(loaded.module, desc).applied(plan):
            return loaded.module(**batch) if isinstance(batch, dict) else loaded.module(batch)


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_kernels_and_exact_codes_on_a_tiny_model(tmp_path):
    """Each width lands in the kernel and container it should, and dequantizing the file's codes gives the plan's
    values exactly: 3-bit in 4-bit containers, 6-bit in 8, per channel as repeated blocks, asymmetric zero points."""
    loaded = tiny_loaded()
    desc = introspect(loaded)
    plan = Plan(layers={"fc1": LayerPlan(bits=3, group_size=16, symmetric=False), "fc2": LayerPlan(bits=6),
                        "head": LayerPlan(bits=2, group_size=32)}, fingerprint=desc.fingerprint)
    r = export_onnx(loaded.module, desc, plan, tmp_path / "m.onnx", loaded.batches[0], accuracy_level=0)
    assert r["kernels"] == {"MatMulNBits": 3}
    assert r["notes"] == {"3-bit codes in 4-bit containers": ["fc1"], "6-bit codes in 8-bit containers": ["fc2"]}
    nodes = {n.input[1].split(".")[0]: n for n in onnx.load(str(tmp_path / "m.onnx")).graph.node
             if n.op_type == "MatMulNBits"}
    attrs = {k: {a.name: a.i for a in n.attribute} for k, n in nodes.items()}
    assert attrs["fc1"]["bits"] == 4 and attrs["fc1"]["block_size"] == 16
    assert attrs["fc2"]["bits"] == 8 and attrs["head"]["bits"] == 2 and attrs["head"]["block_size"] == 32
    sim = _simulated(loaded, desc, plan, loaded.batches[0])
    real = OrtModel(tmp_path / "m.onnx")(loaded.batches[0])
    assert (real - sim).abs().max() <= 1e-5 * sim.abs().max()


def test_default_accuracy_level_is_the_int8_compute_path(tmp_path):
    """MatMulNBits at accuracy level 4 (int8 activations per block: the fast CPU path) unless asked for 0; the
    difference from the simulated model is the activation rounding, far below the weights' own."""
    loaded = tiny_loaded()
    desc = introspect(loaded)
    plan = _uniform(desc, LayerPlan(bits=4, group_size=16))
    b = loaded.batches[0]
    r = export_onnx(loaded.module, desc, plan, tmp_path / "m.onnx", b)
    (note, layers), = r["notes"].items()  # the file says what it computes otherwise than the search scored
    assert "accuracy level 4" in note and layers == ["fc1", "fc2", "head"]
    levels = {a.i for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    sim, ref = _simulated(loaded, desc, plan, b), _simulated(loaded, desc, None, b)
    real = OrtModel(tmp_path / "m.onnx")(b)
    assert 0 < (real - sim).norm() <= 0.25 * (sim - ref).norm()


def test_structured_heads_are_physically_smaller(tmp_path):
    """nn.TransformerEncoderLayer (split into q/k/v/out Linears): half its heads cut, every matmul shrinks."""
    from autocomp.space import SearchSpace

    loaded = load_model(f"{TINY}:char_lm", data=f"{TINY}:char_calib")
    desc = introspect(loaded)
    space = SearchSpace.from_yaml("transformer", desc)
    heads = sorted((k, g) for k, g in space.groups.items() if g.kind == "heads")
    assert heads, "the encoder has head groups"
    name, g = heads[0]
    plan = Plan(layers={l.name: LayerPlan(bits=4, group_size=32) for l in desc.layers if l.type == "Linear"},
                structured={name: StructuredGroup(g.kind, g.units, g.unit_size, g.units // 2, g.producers, g.consumers)},
                fingerprint=desc.fingerprint)
    b = loaded.batches[0]
    r = export_onnx(loaded.module, desc, plan, tmp_path / "m.onnx", b, accuracy_level=0)
    shape = {n.input[1].rsplit(".qweight", 1)[0]: {a.name: a.i for a in n.attribute}
             for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "MatMulNBits"}
    cut = g.units // 2 * g.unit_size
    assert all(shape[p]["N"] == cut for p in g.producers) and all(shape[c]["K"] == cut for c in g.consumers)
    sim = _simulated(loaded, desc, plan, b)
    real = OrtModel(tmp_path / "m.onnx")(b)
    assert (real - sim).abs().max() <= 1e-4 * sim.abs().max()
    assert r["predicted_bytes"] == plan_bytes(desc, plan)


def _tiny_gpt2(tmp_path, layers: int):
    """A random-weight HF GPT-2 with MiniLM's 30,522-token vocabulary, saved and loaded as a user's `hf:DIR`."""
    transformers = pytest.importorskip("transformers")
    from autocomp.models.minilm import load_tokenizer

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=30522, n_embd=32, n_layer=layers, n_head=4,
                                                                 n_positions=64))
    model.save_pretrained(tmp_path / "gpt2")
    load_tokenizer().save_pretrained(tmp_path / "gpt2")
    return load_model(f"hf:{tmp_path / 'gpt2'}")


def test_causal_lm_with_tied_head_exports_its_logits(tmp_path):
    """HF GPT-2 (Conv1D layers, a head tied to the token table): logits out, Conv1D as MatMulNBits, the table
    gathered from its codes."""
    loaded = _tiny_gpt2(tmp_path, layers=2)
    desc = introspect(loaded)
    plan = _uniform(desc, LayerPlan(bits=4, group_size=32), emb=LayerPlan(bits=8, group_size=32))
    b = loaded.batches[0]
    r = export_onnx(loaded.module, desc, plan, tmp_path / "m.onnx", b, output_name="logits", accuracy_level=0)
    assert r["kernels"].get("MatMulNBits", 0) >= 4 * 2 and r["kernels"].get("GatherBlockQuantized", 0) >= 1, r
    sim = _simulated(loaded, desc, plan, b)
    out = OrtModel(tmp_path / "m.onnx")(**b)
    assert (out.logits - sim.logits).abs().max() <= 1e-4 * sim.logits.abs().max()


@pytest.mark.parametrize("bits", range(1, 17))
def test_codebook_indices_decode_in_the_graph_for_every_width(bits):
    """The graph's own decoding of row-packed indices (autocomp/ort.py, _lower_codebook) gives exactly the
    codebook's vectors at every index width, a matrix (in either orientation) and a table looked up at
    indices of any shape, with ONNX Runtime folding the matrix into a constant and without optimizations."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from autocomp.compressors.base import OnnxWeight
    from autocomp.ort import _Graph, _lower_codebook

    rng = np.random.default_rng(bits)
    rows, m, d = 7, 13, 3  # 13 indices a row: every width but 8 and 16 pads its rows
    codes = rng.integers(0, 1 << bits, (rows, m))
    codes[0, :] = (1 << bits) - 1  # the largest index, every bit set, beside smaller ones
    book = rng.standard_normal((1 << bits, d)).astype(np.float16)
    dense = book.astype(np.float32)[codes].reshape(rows, m * d)
    w = OnnxWeight("Codebook", bits, d, codes, book)
    gr = _Graph(helper.make_model(helper.make_graph([], "g", [], [])))
    nodes = (_lower_codebook(gr, w, "t", None, "matrix") + _lower_codebook(gr, w, "t", None, "matrix_t", True)
             + _lower_codebook(gr, w, "t", "ids", "rows"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["a", "b"] if n != "rows" else [2, 3, m * d])
                               for n in ("matrix", "matrix_t", "rows")], list(gr.added.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    packed = next(t for t in graph.initializer if t.name == "t.vqcodes")
    assert packed.data_type == TensorProto.UINT8 and tuple(packed.dims) == (rows, -(-m * bits // 8))
    ids = np.array([[6, 0, 2], [0, 5, 5]])
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        matrix, matrix_t, looked_up = sess.run(None, {"ids": ids})
        assert np.array_equal(matrix, dense) and np.array_equal(matrix_t, dense.T)
        assert np.array_equal(looked_up, dense[ids])


@pytest.mark.parametrize("pruned", [False, True])
def test_codebook_table_tied_to_the_head_stays_packed(tmp_path, pruned):
    """A codebook on a GPT-2 token table its head also reads: the file holds the packed indices and the float16
    codebook (and, pruned, the mask as a bitmap; no float copy of the table), the lookup decodes gathered rows,
    the head a decoded matrix, and the logits are the simulation's."""
    from autocomp.compressors.codebook import CodebookConfig
    from autocomp.compressors.prune import PruneConfig

    loaded = _tiny_gpt2(tmp_path, layers=1)
    desc = introspect(loaded)
    table = next(l for l in desc.layers if l.type == "Embedding" and l.rows == 30522)
    choice = LayerPlan(CodebookConfig(8, 64), *([PruneConfig("unstructured", 0.4)] if pruned else []))
    plan = Plan(layers={table.name: choice}, fingerprint=desc.fingerprint)
    b = loaded.batches[0]
    r = export_onnx(loaded.module, desc, plan, tmp_path / "m.onnx", b, output_name="logits", accuracy_level=0)
    assert r["kernels"] == {"Codebook": 3}, r  # two lookups (GPT-2 embeds token_type_ids with wte too), the head
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert not [t for t in graph.initializer if 30522 in t.dims and t.data_type == onnx.TensorProto.FLOAT]
    inits = {t.name: t for t in graph.initializer}
    assert tuple(inits[f"{table.name}.vqcodes"].dims) == (30522, 3)  # 4 indices of 6 bits: 3 bytes a row
    assert tuple(inits[f"{table.name}.codebook"].dims) == (64, 8)
    # the table's share of the file is what the plan predicts for it, to the byte
    stored = inits[f"{table.name}.vqcodes"].raw_data + inits[f"{table.name}.codebook"].raw_data
    if pruned:
        assert tuple(inits[f"{table.name}.mask"].dims) == (30522, 4)  # 32 positions a row, one bit each
        stored += inits[f"{table.name}.mask"].raw_data
    assert r["notes"] == {}, r
    from autocomp.cost.size import layer_bytes

    assert len(stored) == layer_bytes(table, plan.layer(table.name))
    sim = _simulated(loaded, desc, plan, b)
    out = OrtModel(tmp_path / "m.onnx")(**b)
    assert (out.logits - sim.logits).abs().max() <= 1e-4 * sim.logits.abs().max()


@pytest.mark.slow
def test_minilm_end_to_end_through_the_cli(capsys, tmp_path, monkeypatch):
    """MiniLM: the fp32 reference and a mixed plan (4-bit groups, W8A8, low rank, 2:4, 3-bit) exported by the CLI,
    served by autocomp.load(runtime="ort") with MiniLM's own inputs and dynamic batch / sequence axes."""
    monkeypatch.chdir(tmp_path)
    loaded = load_model("minilm")
    desc = introspect(loaded)
    lin = [l.name for l in desc.layers if l.type == "Linear"]
    choices = [LayerPlan(bits=4, group_size=128), LayerPlan(bits=8, act_bits=8), LayerPlan(bits=4, group_size=32, rank=96),
               LayerPlan(prune="2:4", bits=4, group_size=64, symmetric=False), LayerPlan(bits=3)]
    plan = Plan(layers={**{n: choices[i % len(choices)] for i, n in enumerate(lin)},
                        "bert.embeddings.word_embeddings": LayerPlan(bits=4, group_size=64)},
                fingerprint=desc.fingerprint, model_spec="minilm", model_name="minilm")
    plan.save(tmp_path / "p.json")
    code, out, err = run_cli(["export", "--plan", "p.json", "--format", "onnx", "--out", "m.onnx", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert set(res) >= {"path", "format", "predicted_bytes", "file_bytes"} and res["format"] == "onnx"
    assert res["predicted_bytes"] == plan_bytes(desc, plan) and res["file_bytes"] == (tmp_path / "m.onnx").stat().st_size
    assert res["kernels"] == {"MatMulNBits": 36 - 7 + 7, "MatMulInteger": 7, "GatherBlockQuantized": 1}
    pruned = sorted(n for i, n in enumerate(lin) if i % len(choices) == 3)
    assert res["notes"]["sparsity stored as zeros (ORT has no sparse kernel)"] == pruned
    model = autocomp.load(tmp_path / "m.onnx", runtime="ort")
    assert model.input_names == list(loaded.batches[0].keys())
    b = loaded.batches[1]
    sim = _simulated(loaded, desc, plan, b)
    ref = _simulated(loaded, desc, None, b)
    real = model(**b)
    assert real.shape == sim.shape
    drift = lambda x: float((1 - torch.nn.functional.cosine_similarity(x, ref, dim=-1)).mean())  # noqa: E731
    # W8A8 layers: ORT's 8-bit activations (simulated: 7-bit); MatMulNBits at accuracy level 4 (the default)
    # quantizes its activations to int8 per block: +0.0006-0.001 cosine drift on MiniLM (docs/BENCHMARKS.md)
    assert drift(real) <= 1.25 * drift(sim) + 0.002
    short = {k: v[:1, :5] for k, v in b.items()}  # another batch size and length
    assert model(**short).shape == (1, ref.shape[-1])
    code, out, err = run_cli(["export", "--model", "minilm", "--format", "onnx", "--out", "fp32.onnx", "--json"], capsys)
    assert code == 0, err
    fp32 = json.loads(out)
    assert fp32["predicted_bytes"] == desc.fp32_bytes and fp32["kernels"] == {}
    assert abs(fp32["file_bytes"] - desc.fp32_bytes) < 0.01 * desc.fp32_bytes
    assert (autocomp.load(tmp_path / "fp32.onnx", runtime="ort")(**b) - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.slow
def test_clip_digits_dual_encoder_exports_both_towers(tmp_path):
    loaded = load_model("clip-digits")
    desc = introspect(loaded)
    plan = _uniform(desc, LayerPlan(bits=4, group_size=32), model_spec="clip-digits")
    b = loaded.batches[0]
    r = export_onnx(loaded.module, desc, plan, tmp_path / "m.onnx", b, accuracy_level=0)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    inits = {t.name for t in graph.initializer}
    # every Linear the graph computes is lowered (BERT's pooler is not: the towers never read it)
    assert not [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    assert r["kernels"]["MatMulNBits"] == sum(l.type == "Linear" for l in desc.layers) - 1
    out = OrtModel(tmp_path / "m.onnx")(**b)
    sim = _simulated(loaded, desc, plan, b)
    assert set(out) == set(sim) == {"image_embeds", "text_embeds"}
    for k in sim:
        assert (out[k] - sim[k]).abs().max() <= 1e-4 * sim[k].abs().max(), k


# -- bad input ------------------------------------------------------------------------------------------------------
def test_bad_export_input_is_one_line_exit_2_and_no_file(capsys, tmp_path):
    loaded = tiny_loaded()
    desc = introspect(loaded)
    tiny_args = ["--model", f"{TINY}:tiny", "--data", f"{TINY}:calib"]
    plan = Plan(layers={"fc1": LayerPlan(bits=4, group_size=16)}, fingerprint=desc.fingerprint,
                model_spec=f"{TINY}:tiny")
    plan.save(tmp_path / "p.json")
    other = Plan(layers={"encoder.nope": LayerPlan(bits=4)}, fingerprint="0" * 16, model_spec=f"{TINY}:tiny")
    other.save(tmp_path / "other.json")
    (tmp_path / "afile").write_text("x")
    cases = [
        (["--plan", str(tmp_path / "other.json"), *tiny_args, "--out", str(tmp_path / "a.onnx")], tmp_path / "a.onnx"),
        (["--plan", str(tmp_path / "p.json"), *tiny_args, "--out", str(tmp_path / "afile" / "a.onnx")], tmp_path / "afile" / "a.onnx"),
        ([*tiny_args, "--out", str(tmp_path / "b.acz")], tmp_path / "b.acz"),  # packed needs a plan
        ([*tiny_args, "--weights", str(tmp_path / "p.json"), "--out", str(tmp_path / "c.onnx")], tmp_path / "c.onnx"),
    ]
    for args, path in cases:
        fmt = [] if path.suffix == ".acz" else ["--format", "onnx"]
        code, out, err = run_cli(["export", *args, *fmt], capsys)
        assert code == 2, (args, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not path.exists()
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*tmp*"))


def test_int8_kernel_through_the_cli(capsys, tmp_path, monkeypatch):
    """`export --int8-kernel vnni` stores W8A8 layers for the u8 x s8 kernel (int8 weights); calibrating that
    kernel is refused on an x86 CPU without VNNI and with the torch runtime (one line, exit 2)."""
    import autocomp.ort as ort_mod

    loaded = tiny_loaded()
    desc = introspect(loaded)
    tiny = ["--model", f"{TINY}:tiny", "--data", f"{TINY}:calib"]
    from autocomp.compressors.quantize import QuantConfig

    int8f = LayerPlan(QuantConfig(8, 0, True, 8, reduce_range=False))  # W8A8 on ORT's full 8-bit grid
    Plan(layers={"fc1": int8f, "fc2": LayerPlan(bits=4, group_size=16)},
         fingerprint=desc.fingerprint, model_spec=f"{TINY}:tiny").save(tmp_path / "p.json")
    code, out, err = run_cli(["export", "--plan", str(tmp_path / "p.json"), *tiny, "--format", "onnx", "--int8-kernel",
                              "vnni", "--out", str(tmp_path / "v.onnx"), "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["kernels"] == {"MatMulInteger": 1, "MatMulNBits": 1} and r["int8_kernel"] == "vnni"
    assert any("u8 x s8" in k and v == ["fc1"] for k, v in r["notes"].items()), r["notes"]
    g = onnx.load(str(tmp_path / "v.onnx"))
    inits = {t.name: t for t in g.graph.initializer}
    node = next(n for n in g.graph.node if n.op_type == "MatMulInteger")
    assert len(node.input) == 3 and inits[node.input[1]].data_type == onnx.TensorProto.INT8
    for vnni in (True, False):  # a portable export says when the CPU it runs on could take the faster kernel
        monkeypatch.setattr(ort_mod, "cpu_has_vnni", lambda vnni=vnni: vnni)
        code, out, err = run_cli(["export", "--plan", str(tmp_path / "p.json"), *tiny, "--format", "onnx",
                                  "--out", str(tmp_path / f"p{vnni}.onnx")], capsys)
        assert code == 0, err
        assert ("--int8-kernel vnni runs the W8A8 layers faster" in out) == vnni, out
    code, _, err = run_cli(["hardware", "calibrate", "--int8-kernel", "vnni", "--out", str(tmp_path / "d.yaml"), *tiny],
                           capsys)
    assert code == 2 and "--runtime ort" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(ort_mod, "cpu_has_vnni", lambda: False)
    code, _, err = run_cli(["hardware", "calibrate", "--runtime", "ort", "--int8-kernel", "vnni", "--quick",
                            "--out", str(tmp_path / "d.yaml"), *tiny], capsys)
    assert code == 2 and "VNNI" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d.yaml").exists()


def test_load_refuses_the_wrong_runtime_or_file(tmp_path):
    loaded = tiny_loaded()
    desc = introspect(loaded)
    export_onnx(loaded.module, desc, None, tmp_path / "m.onnx", loaded.batches[0])
    with pytest.raises(autocomp.AutocompError, match="runtime='ort'"):
        autocomp.load(tmp_path / "m.onnx")
    (tmp_path / "x.onnx").write_bytes(b"not a model")
    with pytest.raises(autocomp.AutocompError, match="not a loadable ONNX model"):
        autocomp.load(tmp_path / "x.onnx", runtime="ort")
    with pytest.raises(autocomp.AutocompError, match="runtime must be"):
        autocomp.load(tmp_path / "m.onnx", runtime="tensorrt")
    m = autocomp.load(tmp_path / "m.onnx", runtime="ort")
    with pytest.raises(autocomp.AutocompError, match="missing model inputs"):
        m()
    b = loaded.batches[0]
    assert torch.allclose(m(b), loaded.module(b), atol=1e-5)
    assert np.isfinite(m(b).numpy()).all()


# -- the ort-cpu device ---------------------------------------------------------------------------------------------
def test_ort_device_calibrate_validate_and_search(capsys, tmp_path, studies):
    """`hardware calibrate --runtime ort` writes a runtime-ort device of timed kernel fits; validate times real ONNX
    exports (same JSON contract as torch); a search on it proposes only formats ORT runs as stored."""
    from autocomp.cost.device import load_device
    from autocomp.cost.latency import CostModel, Workload

    out = tmp_path / "ort.yaml"
    tiny = ["--model", f"{TINY}:tiny", "--data", f"{TINY}:calib"]
    code, _, err = run_cli(["hardware", "calibrate", "--runtime", "ort", "--quick", "--out", str(out), *tiny], capsys)
    assert code == 0, err
    dev = load_device(str(out))
    assert dev.runtime == "ort" and dev.ort["accuracy_level"] == 4 and dev.ort["int8_kernel"] == "portable"
    assert {"fp32", "int8", "nbits4g32", "nbits4g128", "nbits2g32", "nbits8g128", "fp32@1"} <= set(dev.ort["kernels"])
    assert all(min(v) >= 0 for v in dev.ort["kernels"].values())
    desc = introspect(tiny_loaded())
    assert dev.ort["end_to_end"]["fingerprint"] == desc.fingerprint
    cost = CostModel(dev, desc)  # a W8A8 layer and a 4-bit layer are priced by their own kernels' fits
    fp32 = cost.latency_ms(Plan(layers={}))
    int8 = cost.latency_ms(Plan(layers={"fc1": LayerPlan(bits=8, act_bits=8)}))
    four = cost.latency_ms(Plan(layers={"fc1": LayerPlan(bits=4, group_size=32)}))
    assert len({fp32, int8, four}) == 3
    # the whole-model fit on the model's own exported plans: a scale per kernel group, at the fitted workload only
    e2e = dev.ort["end_to_end"]
    assert e2e["workload"] == cost.workload.label() and e2e["plans"] == 13
    assert set(e2e["scales"]) == {"fp32", "int8", "nbits", "other"} and all(v >= 0 for v in e2e["scales"].values())
    parts = cost.ort_breakdown(Plan(layers={}))
    assert fp32 == pytest.approx(1e3 * sum(e2e["scales"][g] * t for g, t in parts.items()), rel=1e-9)
    other = CostModel(dev, desc, Workload(4, cost.workload.seq))  # not fitted there: kernel-level prediction
    assert other.latency_ms(Plan(layers={})) == pytest.approx(1e3 * sum(other.ort_breakdown(Plan(layers={})).values()),
                                                              rel=1e-9)
    code, out_json, err = run_cli(["hardware", "validate", "--runtime", "ort", "--hardware", str(out), *tiny,
                                   "--plans", "4", "--runs", "3", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out_json)
    assert set(r) == {"hardware", "plans", "spearman", "within_10pct", "within_25pct", "mape", "rows", "reference"}
    assert r["plans"] == 4 and all(x["measured_ms"] > 0 for x in r["rows"])
    assert r["reference"]["predicted_ms"] == pytest.approx(fp32, abs=6e-5) and r["reference"]["measured_ms"] > 0  # ms, 4 decimals
    code, _, err = run_cli(["hardware", "validate", "--runtime", "torch", "--hardware", str(out), *tiny, "--plans", "4"],
                           capsys)
    assert code == 2 and "times runtime 'ort'" in err
    code, out_json, err = run_cli(["search", *tiny, "--budget", "40%", "--trials", "12", "--hardware", str(out),
                                   "--objectives", "proxy,latency", "--studies-dir", str(studies), "--json"], capsys)
    assert code == 0, err
    front = json.loads(out_json)["pareto"]
    assert front and all("latency_ms" in e for e in front)
    for e in front:
        for layer in Plan.load(e["plan_path"]).layers.values():
            q, p = layer.get("quantize"), layer.get("prune")
            assert p is None and (q is None or q.act_bits == 8 or q.bits in (2, 4, 8)), layer
            assert q is None or q.reduce_range is False or q.act_bits != 8, layer  # W8A8 on ORT's 8-bit grid


def test_ort_cpu_not_calibrated_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_HARDWARE", str(tmp_path / "none"))
    code, _, err = run_cli(["search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib", "--budget", "40%",
                            "--hardware", "ort-cpu", "--studies-dir", str(tmp_path)], capsys)
    assert code == 2 and "calibrate --runtime ort" in err and len(err.strip().splitlines()) == 1


def test_trained_student_exports_its_own_weights(tmp_path):
    """`export --format onnx --weights`: the trained student's compressed parts (moved weights, trained factors and
    biases) are what the ONNX file computes, not the plan applied to the original weights."""
    from autocomp.compressors.student import compressed_parts, finalize

    loaded = tiny_loaded()
    desc = introspect(loaded)
    plan = Plan(layers={"fc1": LayerPlan(bits=4, group_size=16, rank=8), "fc2": LayerPlan(bits=8, act_bits=8),
                        "head": LayerPlan(bits=3, group_size=16, symmetric=False)}, fingerprint=desc.fingerprint)
    student = autocomp.prepare_for_training(loaded.module, plan, desc)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.05)
    b = loaded.batches[0]
    for _ in range(3):
        opt.zero_grad()
        student(b).pow(2).mean().backward()
        opt.step()
    plain = finalize(student)
    export_onnx(plain, desc, plan, tmp_path / "m.onnx", b, parts=compressed_parts(student).get, accuracy_level=0)
    with torch.inference_mode():
        want, untrained = plain(b), _simulated(loaded, desc, plan, b)
    got = OrtModel(tmp_path / "m.onnx")(b)
    assert not torch.allclose(want, untrained, atol=1e-3)  # training moved it
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()  # fc2 (W8A8) included: its 7-bit grid in the graph


def test_ort_space_keeps_only_stored_formats():
    """`--hardware ort-cpu`: every kept option of a Linear is 2/4/8-bit, W8A8, low rank or neutral; Conv layers (dense
    in the ONNX file) keep only the neutral option; removed options are exactly those."""
    from autocomp.space import SearchSpace

    loaded = load_model(f"{TINY}:tiny_conv", data=f"{TINY}:conv_calib")
    desc = introspect(loaded)
    full = SearchSpace.from_yaml("default", desc)
    ort_space = SearchSpace.from_yaml("default", desc).restrict_to_stored_formats()
    kinds = {l.name: l.type for l in desc.layers}
    kept_any = False
    for param, options in full.params.items():
        layer_kinds = {kinds[n] for n in full.param_layers(param)}
        now = ort_space.params.get(param, (ort_space.fixed.get(param),))
        dim = param.rpartition(":")[2]
        if layer_kinds & {"Conv2d", "Conv1d"} and dim != "keep":
            assert len(now) == 1 and now[0] in ("keep", "none", "full"), (param, now)
            continue
        for o in now:
            assert o in options or o == "int8f" and "int8" in options  # W8A8 on ORT's activation grid
            if dim == "q":
                assert o in ("keep", "int8f") or o.split("/")[0][0] in "248" and not o.startswith(("3", "5", "6")), o
                kept_any = True
            if dim == "p":
                assert o == "none", o
    assert kept_any


def test_an_option_with_no_lowering_is_one_error_and_no_file(tmp_path, monkeypatch):
    """A factor technique that cannot compose its parts at run time (here: low rank with its lowering removed)."""
    from autocomp.compressors.lowrank import LowRank

    monkeypatch.setattr(LowRank, "runtime_graph", lambda self, c, parts, bias, linear: None)
    loaded = tiny_loaded()
    desc = introspect(loaded)
    plan = Plan(layers={"fc1": LayerPlan(rank=8)}, fingerprint=desc.fingerprint)
    with pytest.raises(autocomp.AutocompError, match="no ONNX lowering"):
        export_onnx(loaded.module, desc, plan, tmp_path / "m.onnx", loaded.batches[0])
    assert list(tmp_path.iterdir()) == []


def test_evaluate_scores_an_onnx_file_in_onnx_runtime(capsys, tmp_path):
    """`evaluate --weights model.onnx`: the task metric of the file as ORT runs it (its model named by the file)."""
    loaded = tiny_loaded()
    desc = introspect(loaded)
    plan = Plan(layers={"fc1": LayerPlan(bits=4, group_size=16), "fc2": LayerPlan(bits=8, act_bits=8)},
                fingerprint=desc.fingerprint, model_spec=f"{TINY}:tiny", model_name="tiny")
    plan.save(tmp_path / "p.json")
    data = ["--data", f"{TINY}:calib"]
    code, _, err = run_cli(["export", "--plan", str(tmp_path / "p.json"), *data, "--format", "onnx",
                            "--accuracy-level", "0", "--out", str(tmp_path / "m.onnx")], capsys)
    assert code == 0, err
    task = ["--task", f"{TINY}:agreement", "--json"]
    code, out, err = run_cli(["evaluate", "--weights", str(tmp_path / "m.onnx"), *data, *task], capsys)
    assert code == 0, err
    onnx_score = json.loads(out)
    code, out, err = run_cli(["evaluate", "--plan", str(tmp_path / "p.json"), *data, *task], capsys)
    simulated = json.loads(out)
    assert onnx_score["fp32_value"] == simulated["fp32_value"]
    assert abs(onnx_score["value"] - simulated["value"]) <= 0.05  # W8A8: ORT's 8-bit activations
    other = Plan(layers={"fc1": LayerPlan(bits=2, group_size=16)}, fingerprint=desc.fingerprint,
                 model_spec=f"{TINY}:tiny")
    other.save(tmp_path / "o.json")
    code, _, err = run_cli(["evaluate", "--plan", str(tmp_path / "o.json"), "--weights", str(tmp_path / "m.onnx"),
                            *data, *task], capsys)
    errors = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "another plan" in errors[0] and "Traceback" not in err


def test_the_first_run_gives_its_freed_heap_back_once(tmp_path, monkeypatch):
    """OrtModel trims the heap once after building the session and once after its first run (whose one-time
    buffers glibc would keep), never on later runs: serving pays nothing per call."""
    import autocomp.memory

    loaded = tiny_loaded()
    desc = introspect(loaded)
    export_onnx(loaded.module, desc, _uniform(desc, LayerPlan(bits=4, group_size=16)), tmp_path / "m.onnx",
                loaded.batches[0])
    calls = []
    monkeypatch.setattr(autocomp.memory, "release", lambda: calls.append(1))
    model = OrtModel(tmp_path / "m.onnx")
    assert len(calls) == 1  # the session built
    first = model(loaded.batches[0])
    assert len(calls) == 2
    for _ in range(3):
        assert torch.equal(model(loaded.batches[0]), first)
    model.run_numpy(model.feed(loaded.batches[0]))
    assert len(calls) == 2
