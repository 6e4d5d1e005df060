"""Hardware cost model: devices as data, the roofline arithmetic, real execution, calibrate/validate, search."""

from __future__ import annotations

import json

import pytest
import torch

from autocomp import AutocompError
from autocomp.compressors.apply import PlanApplier
from autocomp.cost.device import BUILTIN_DIR, list_devices, load_device, parse_device
from autocomp.cost.latency import CostModel, Workload, parse_workload
from autocomp.desc import LayerDesc, ModelDesc
from autocomp.models.introspect import introspect
from autocomp.plan import LayerPlan, Plan, StructuredGroup
from autocomp.runtime import build_runtime_model
from conftest import TINY, run_cli, tiny_loaded


def _device(**over):
    d = {"name": "toy", "peak_ops": {"fp32": {"value": 1e12, "source": "s"}, "int8": {"value": 4e12, "source": "s"}},
         "memory_bandwidth": {"value": 1e11, "source": "s"}, "layer_overhead_s": {"value": 1e-6, "source": "s"},
         "efficiency": {"compute": {"value": 1.0, "source": "s"}, "memory": {"value": 1.0, "source": "s"}},
         "default_dtype": "fp32", "accelerates": {"int8": True, "weight_only_bits": [], "sparse_2_4": False}}
    d.update(over)
    return parse_device(d, "toy.yaml")


def _one_layer(rows=1024, cols=1024, positions=512.0):
    layer = LayerDesc("fc", "Linear", rows, cols, positions=positions)
    return layer, ModelDesc("m", "m", rows * cols, rows * cols * 4, 0, (layer,), "f", {})


def test_builtin_devices_cite_every_figure():
    names = {d.name for d in list_devices()}
    assert {"x86-avx512-vnni", "cortex-a76", "a100-sxm", "h100-sxm", "jetson-agx-orin"} <= names
    for d in list_devices():
        assert d.sources and all(v.strip() for v in d.sources.values())
        assert "memory_bandwidth" in d.sources and all(k in d.sources for k in d.peak_ops)
    h100 = load_device("h100-sxm")
    assert h100.peak_ops["fp16"] == pytest.approx(989.4e12)  # dense, not the 2:4 figure


@pytest.mark.parametrize("over,fragment", [
    ({"memory_bandwidth": {"value": -1, "source": "s"}}, "must be positive"),
    ({"memory_bandwidth": {"value": 1e9}}, "has no source"),
    ({"peak_ops": {"fp64": {"value": 1, "source": "s"}}}, "unknown dtype 'fp64'"),
    ({"default_dtype": "fp16"}, "default_dtype 'fp16' has no peak_ops"),
    ({"layer_overhead_s": None}, "'layer_overhead_s' is missing"),
])
def test_bad_device_files(over, fragment):
    with pytest.raises(AutocompError, match=fragment):
        _device(**over)


def test_unknown_and_uncalibrated_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_HARDWARE", str(tmp_path))
    with pytest.raises(AutocompError, match="unknown device 'tpu9'.*h100-sxm"):
        load_device("tpu9")
    with pytest.raises(AutocompError, match="autocomp hardware calibrate"):
        load_device("cpu-local")


def test_roofline_by_hand():
    layer, desc = _one_layer()
    dev = _device()
    cm = CostModel(dev, desc, Workload(1, None))
    macs = 512 * 1024 * 1024
    compute = 2 * macs / 1e12
    memory = (1024 * 1024 * 4 + 512 * 2048 * 4) / 1e11
    assert cm.layer(layer, LayerPlan(), 1024, 1024)[0] == pytest.approx(max(compute, memory) + 1e-6)
    int8 = cm.layer(layer, LayerPlan(bits=8, act_bits=8), 1024, 1024)[0]
    assert int8 == pytest.approx(max(2 * macs / 4e12, (1024 * 1024 + 512 * 2048 * 4) / 1e11) + 1e-6)
    # dequantized sub-8-bit weights and unstructured zeros save bytes, not time, without kernels for them
    assert cm.layer(layer, LayerPlan(bits=4, group_size=128), 1024, 1024)[0] == cm.layer(layer, LayerPlan(), 1024, 1024)[0]
    assert cm.layer(layer, LayerPlan(prune="unstructured", sparsity=0.7), 1024, 1024)[0] == \
        cm.layer(layer, LayerPlan(), 1024, 1024)[0]
    # low-rank and structured pruning really shrink the matmul
    assert cm.layer(layer, LayerPlan(rank=128), 1024, 1024)[0] < cm.layer(layer, LayerPlan(), 1024, 1024)[0] / 3
    assert cm.layer(layer, LayerPlan(), 512, 1024)[0] < cm.layer(layer, LayerPlan(), 1024, 1024)[0]


def test_sparse_and_weight_only_kernels_only_where_the_device_has_them():
    layer, desc = _one_layer(positions=4096.0)
    plain = CostModel(_device(), desc, Workload(1, None))
    sparse = CostModel(_device(accelerates={"int8": True, "sparse_2_4": {"speedup": 2.0, "source": "s"}}), desc,
                       Workload(1, None))
    ch = LayerPlan(prune="2:4")
    assert sparse.layer(layer, ch, 1024, 1024)[0] < plain.layer(layer, ch, 1024, 1024)[0]
    _, small = _one_layer(positions=1.0)  # batch-1 decode: memory-bound, weight-only kernels pay off
    wo = CostModel(_device(accelerates={"weight_only_bits": [4]}), small, Workload(1, None))
    lay = small.layers[0]
    assert wo.layer(lay, LayerPlan(bits=4, group_size=128), 1024, 1024)[0] < wo.layer(lay, LayerPlan(), 1024, 1024)[0]


def test_bitops_convention():
    layer, desc = _one_layer(rows=64, cols=32, positions=10.0)
    cm = CostModel(_device(), desc, Workload(2, None))
    macs = 2 * 10 * 64 * 32
    assert cm.layer(layer, LayerPlan(bits=4), 64, 32)[1] == macs * 4 * 32
    assert cm.layer(layer, LayerPlan(bits=8, act_bits=8), 64, 32)[1] == macs * 8 * 8
    assert cm.layer(layer, LayerPlan(), 64, 32)[1] == macs * 32 * 32
    e = cm.evaluate(Plan(layers={"fc": LayerPlan(bits=8, act_bits=8)}))
    assert 0 < e["energy"] < 1 and cm.evaluate(Plan(layers={}))["energy"] == pytest.approx(1.0)


def test_workload_parsing():
    _, desc = _one_layer()
    assert parse_workload("4", desc) == Workload(4, None)
    with pytest.raises(AutocompError, match="takes no sequence length"):
        parse_workload("1x128", desc)
    seq_desc = ModelDesc("m", "m", 0, 0, 0, (), "f", {"seq_len": 16, "max_positions": 512})
    assert parse_workload(None, seq_desc) == Workload(1, 128)
    with pytest.raises(AutocompError, match="at most 512 tokens"):
        parse_workload("1x1024", seq_desc)
    with pytest.raises(AutocompError, match="not BATCH"):
        parse_workload("big", seq_desc)


def test_runtime_model_uses_real_kernels_and_matches_the_simulation():
    import torch.ao.nn.quantized.dynamic as nnqd

    loaded = tiny_loaded()
    desc = introspect(loaded)
    applier = PlanApplier(loaded.module, desc)
    float_plan = Plan(layers={"fc1": LayerPlan(bits=4, group_size=16, rank=8), "head": LayerPlan(prune="2:4", bits=6)},
                      structured={"g": StructuredGroup("neurons", 64, 1, 40, ("fc1",), ("fc2",))},
                      fingerprint=desc.fingerprint)
    rt = build_runtime_model(loaded.module, desc, float_plan, applier)
    assert isinstance(rt.fc1, torch.nn.Sequential) and rt.fc1[1].out_features == 40  # factors, pruned
    assert rt.fc2.in_features == 40 and loaded.module.fc1.out_features == 64  # original untouched
    b = loaded.batches[0]
    with torch.inference_mode():
        with applier.applied(float_plan):
            sim = loaded.module(b)
        assert (rt(b) - sim).abs().max() <= 1e-4
    int8_plan = Plan(layers={n: LayerPlan(bits=8, act_bits=8) for n in ("fc1", "fc2", "head")},
                     fingerprint=desc.fingerprint)
    rt8 = build_runtime_model(loaded.module, desc, int8_plan, applier)
    assert isinstance(rt8.fc1, nnqd.Linear)
    with torch.inference_mode():
        with applier.applied(int8_plan):
            sim8 = loaded.module(b)
        ref = loaded.module(b)
        real = rt8(b)
    # per-layer exact; through the network within about one activation step of each other
    assert (real - sim8).abs().max() <= 0.05 * ref.abs().max()
    assert not torch.equal(sim8, ref)  # the proxy does simulate activation quantization


def test_calibrate_and_validate_contract(capsys, tmp_path):
    out = tmp_path / "cpu.yaml"
    code, _, err = run_cli(["hardware", "calibrate", "--quick", "--out", str(out), "--model", f"{TINY}:tiny",
                            "--data", f"{TINY}:calib", "--fit-plans", "4"], capsys)
    assert code == 0, err
    dev = load_device(str(out))
    assert dev.correction and {"dense", "int8", "other", "module_call_s", "end_to_end"} <= set(dev.correction)
    e2e = dev.correction["end_to_end"]
    assert e2e["plans"] == 6 and min(e2e["dense"], e2e["int8"], e2e["other"], e2e["intercept_s"]) >= 0
    # the whole-model correction applies to the model it was fitted on, and only to it
    loaded = tiny_loaded()
    desc = introspect(loaded)
    fitted = CostModel(dev, desc).latency_ms(Plan(layers={}))
    kernel = sum(CostModel(dev, desc).breakdown(Plan(layers={})).values()) * 1e3
    assert e2e["fingerprint"] == desc.fingerprint and fitted != pytest.approx(kernel, rel=1e-9)
    other = ModelDesc(**{**desc.__dict__, "fingerprint": "another"})
    assert CostModel(dev, other).latency_ms(Plan(layers={})) == pytest.approx(kernel)
    assert all("measured here" in s for k, s in dev.sources.items() if k in ("fp32", "int8", "memory_bandwidth"))
    code, out_json, err = run_cli(["hardware", "validate", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib",
                                   "--hardware", str(out), "--plans", "4", "--runs", "3", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out_json)
    assert set(r) == {"hardware", "plans", "spearman", "within_10pct", "within_25pct", "mape", "rows", "reference"}
    assert r["plans"] == 4 and len(r["rows"]) == 4 and 0 <= r["within_10pct"] <= r["within_25pct"] <= 1
    assert all(set(x) == {"predicted_ms", "measured_ms"} and x["measured_ms"] > 0 for x in r["rows"])
    # the uncompressed model, timed in the same rounds: the machine's speed now against the device file
    ref = r["reference"]
    assert ref["predicted_ms"] == pytest.approx(CostModel(load_device(str(out)), desc).latency_ms(Plan(layers={})), abs=6e-5)
    assert ref["speed_factor"] == pytest.approx(ref["measured_ms"] / ref["predicted_ms"], rel=1e-3)
    f = ref["measured_ms"] / ref["predicted_ms"]
    at_speed = sum(abs(x["predicted_ms"] * f - x["measured_ms"]) / x["measured_ms"] <= 0.10 for x in r["rows"]) / 4
    assert ref["within_10pct_at_speed"] == at_speed


def test_search_with_latency_objective_and_budget(capsys, studies):
    args = ["search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib", "--budget", "60%", "--trials", "10",
            "--studies-dir", str(studies), "--hardware", "x86-avx512-vnni", "--objectives", "proxy,latency",
            "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["hardware"] == "x86-avx512-vnni" and r["pareto"]
    for e in r["pareto"]:
        assert {"latency_ms", "bitops", "energy"} <= set(e) and e["size_bytes"] <= r["budget_bytes"]
    fastest = min(e["latency_ms"] for e in r["pareto"])
    code, out, err = run_cli(args[:-1] + ["--study", "lat", "--latency-budget", f"{fastest * 1.05:.6f}ms", "--json"], capsys)
    assert code == 0, err
    r2 = json.loads(out)
    assert r2["pareto"] and all(e["latency_ms"] <= fastest * 1.05 + 1e-9 for e in r2["pareto"])


@pytest.mark.parametrize("extra,fragment", [
    (["--hardware", "tpu9"], "unknown device 'tpu9'"),
    (["--hardware", "x86-avx512-vnni", "--latency-budget", "1us"], "below the fastest plan"),
    (["--hardware", "x86-avx512-vnni", "--latency-budget", "soon"], "not a positive time"),
    (["--objectives", "proxy,speed"], "unknown 'speed'"),
    (["--objectives", "size,latency", "--hardware", "x86-avx512-vnni"], "must include proxy"),
    (["--objectives", "proxy,latency"], "need --hardware"),
    (["--hardware", "x86-avx512-vnni", "--workload", "1x64"], "takes no sequence length"),
])
def test_bad_hardware_input(capsys, studies, extra, fragment):
    code, out, err = run_cli(["search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib", "--budget", "60%",
                              "--trials", "2", "--studies-dir", str(studies), *extra], capsys)
    assert code == 2 and fragment in err and "Traceback" not in err


def test_builtin_dir_is_packaged():
    assert sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml")) == [
        "a100-sxm", "cortex-a76", "h100-sxm", "jetson-agx-orin", "x86-avx512-vnni"]


def test_spread_draw_covers_the_range_a_front_does(minilm_desc):
    """Uniformly drawn plans cluster near the average plan; the spread draw goes from random plans to nearly
    uniform ones, so its predicted latencies cover a wider range, and it is reproducible."""
    from autocomp.hardware import _random_assignments, _random_plans
    from autocomp.space import SearchSpace, neutral_assignment, reference_assignments

    space = SearchSpace.from_yaml("default", minilm_desc)
    cost = CostModel(load_device("x86-avx512-vnni"), minilm_desc)
    spans = {}
    for draw in ("uniform", "spread"):
        ms = [cost.latency_ms(p) for p in _random_plans(space, 30, 0, draw)]
        spans[draw] = max(ms) / min(ms)
    assert spans["spread"] - 1 > 2 * (spans["uniform"] - 1), spans  # MiniLM here: 31% against 8%
    assert _random_assignments(space, 5, 3, "spread") == _random_assignments(space, 5, 3, "spread")
    themes = [neutral_assignment(space), *reference_assignments(space).values()]

    def agreement(a: dict) -> float:  # the largest share of parameters on one theme's option
        return max(sum(a[p] == t.get(p) for p in a) / len(a) for t in themes)

    drawn = [agreement(a) for a in _random_assignments(space, 30, 0, "spread")]
    assert sum(drawn[-5:]) / 5 > 0.8 and sum(drawn[:5]) / 5 < 0.5, drawn
    assert max(agreement(a) for a in _random_assignments(space, 30, 0, "uniform")) < 0.5
    with pytest.raises(AutocompError, match="--draw"):
        _random_plans(space, 3, 0, "sorted")


def test_agreement_at_the_machines_speed():
    from autocomp.hardware import within

    p, m = [10.0, 10.0, 10.0, 20.0], [12.0, 12.0, 13.0, 30.0]
    assert within(p, m, 0.10) == 0.0  # the machine runs 1.2x slower than the device file says
    assert within(p, m, 0.10, factor=1.2) == 0.75  # at that speed three of four agree (13: 7.7%; 30: 20%)
    assert within(p, m, 0.25) == 0.75 and within(p, m, 0.25, factor=1.2) == 1.0
