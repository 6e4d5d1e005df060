"""Sequential statistics for a chosen plan (autocomp/compressors/sequential.py, `autocomp plan --sequential`):
each compensated layer's H gathered on the inputs the compressed layers before it give, used by evaluate, train
and export through the plan's recorded key, and made again when the file is gone."""

from __future__ import annotations

import json

import torch
from conftest import TINY, run_cli, tiny_loaded
from test_compensated import SPACE

import autocomp
from autocomp.compressors.apply import PlanApplier
from autocomp.compressors.calibration import attach, attached, gather, plan_needs
from autocomp.compressors.quantize import QuantConfig
from autocomp.compressors.sequential import sequential_key, sequential_statistics
from autocomp.compressors.student import prepare_for_training
from autocomp.models.introspect import introspect
from autocomp.plan import LayerPlan, Plan


def _plan(desc):
    gptq = LayerPlan(QuantConfig(3, 16, method="gptq"))
    return Plan(layers={"emb": LayerPlan(bits=3), "fc1": gptq, "fc2": gptq, "head": gptq},
                fingerprint=desc.fingerprint)


def test_each_layers_statistics_are_its_inputs_with_every_earlier_layer_compressed():
    loaded = tiny_loaded()
    desc = introspect(loaded)
    base = autocomp.calibrate(loaded.module, loaded.batches, desc)
    plan = _plan(desc)
    before = {n: p.detach().clone() for n, p in loaded.module.named_parameters()}
    seq = sequential_statistics(loaded, desc, plan)
    # the model is as it was, with its own statistics attached again
    assert attached(loaded.module) is base
    assert all(torch.equal(p, before[n]) for n, p in loaded.module.named_parameters())
    assert seq.key == sequential_key(base.key, plan) != base.key and seq.weights == base.weights
    order = ["fc1", "fc2", "head"]
    for i, name in enumerate(order):
        # by hand: the plan's layers before this one applied with the sequential statistics, then one gather
        attach(loaded.module, seq)
        prefix = Plan(layers={n: plan.layers[n] for n in ["emb", *order[:i]]}, fingerprint=desc.fingerprint)
        with PlanApplier(loaded.module, desc).applied(prefix):
            by_hand = gather(loaded.module, desc, loaded.batches).hessians[name]
        assert torch.allclose(seq.hessians[name], by_hand, rtol=1e-5, atol=1e-6), name
        # the quantized table changes every input downstream
        assert not torch.allclose(seq.hessians[name], base.hessians[name], rtol=1e-3), name
    assert torch.equal(seq.hessians["emb"], base.hessians["emb"])  # a table keeps its output-side statistic
    # with them attached the untrained student is the plan as evaluated, bit for bit
    attach(loaded.module, seq)
    b = loaded.batches[0]
    with torch.no_grad():
        with PlanApplier(loaded.module, desc).applied(plan):
            proxy = loaded.module(b)
        assert torch.equal(prepare_for_training(loaded.module, plan, desc)(b), proxy)
    # another plan, another key
    other = Plan(layers={**plan.layers, "head": LayerPlan(QuantConfig(4, 16, method="gptq"))}, fingerprint=desc.fingerprint)
    assert sequential_key(base.key, other) != seq.key


def test_plan_sequential_through_the_cli(tmp_path, capsys, monkeypatch):
    space = tmp_path / "comp.yaml"
    space.write_text(SPACE)
    studies = tmp_path / "studies"
    common = ["--studies-dir", str(studies)]
    code, out, err = run_cli(["search", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib", "--budget", "45%",
                              "--space", str(space), "--trials", "16", "--study", "c", "--seed", "1", "--json",
                              *common], capsys)
    assert code == 0, err
    res = json.loads(out)
    searched = next(e for e in res["pareto"] if plan_needs(Plan.load(e["plan_path"])))
    trial = searched["trial"]
    # `score` re-checks a compensated plan with the statistics it records: the search's proxy, to float rounding
    code, out, err = run_cli(["score", "--plan", searched["plan_path"], "--data", f"{TINY}:calib", "--json", *common],
                             capsys)
    assert code == 0, err
    assert abs(json.loads(out)["proxy"] - searched["proxy"]) <= 1e-6 * max(searched["proxy"], 1e-6)
    dest = tmp_path / "seq.json"
    code, out, err = run_cli(["plan", "--study", "c", "--pick", f"trial:{trial}", "--out", str(dest), "--sequential",
                              *common], capsys)
    assert code == 0, err
    plan = Plan.load(dest)
    base_key = plan.meta["sequential"]["base"]
    seq_file = studies / "calibration" / f"{plan.meta['calibration']}.safetensors"
    assert seq_file.is_file() and (studies / "calibration" / f"{base_key}.safetensors").is_file()
    assert plan.meta["calibration"] == sequential_key(base_key, plan)
    task = ["--data", f"{TINY}:calib", "--task", f"{TINY}:agreement", "--json", *common]
    code, out, err = run_cli(["evaluate", "--plan", str(dest), *task], capsys)
    assert code == 0, err
    first = json.loads(out)["value"]
    # the export decodes to the plan computed with the sequential statistics (by hand, here)
    code, out, err = run_cli(["export", "--plan", str(dest), "--data", f"{TINY}:calib", "--out",
                              str(tmp_path / "m.acz.safetensors"), "--json", *common], capsys)
    assert code == 0, err
    assert json.loads(out)["payload_bytes"] == plan.metrics["size_bytes"]
    loaded = tiny_loaded()
    desc = introspect(loaded)
    autocomp.calibrate(loaded.module, loaded.batches, desc)
    attach(loaded.module, sequential_statistics(loaded, desc, plan))
    with torch.no_grad(), autocomp.apply_plan(loaded.module, plan, desc):
        sim = torch.cat([loaded.module(b) for b in loaded.batches])
    with torch.no_grad():
        back = torch.cat([autocomp.load(tmp_path / "m.acz.safetensors")(b) for b in loaded.batches])
    assert torch.equal(back, sim)
    # and `score` gives the sequential plan's own proxy
    from autocomp.evaluators.proxy import ProxyEvaluator

    code, out, err = run_cli(["score", "--plan", str(dest), "--data", f"{TINY}:calib", "--json", *common], capsys)
    assert code == 0, err
    assert abs(json.loads(out)["proxy"] - ProxyEvaluator(loaded, desc)(plan)) <= 1e-9
    # the statistics file is gone: made again from the search's statistics and the plan, the same score
    seq_file.unlink()
    code, out, err = run_cli(["evaluate", "--plan", str(dest), *task], capsys)
    assert code == 0, err
    assert json.loads(out)["value"] == first and seq_file.is_file()
    # a plan edited after --sequential (its layers no longer those of its statistics): one line, exit 2
    seq_file.unlink()
    d = json.loads(dest.read_text())
    d["layers"]["emb"] = {"quantize": {"bits": 8, "group_size": 0, "symmetric": True, "act_bits": None}}
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(d))
    code, out, err = run_cli(["evaluate", "--plan", str(edited), *task], capsys)
    errors = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "autocomp plan --sequential" in errors[0] and "Traceback" not in err


def test_layers_reading_one_tensor_are_gathered_in_one_pass():
    """Layers that read the very same tensor (query / key / value) have the same sequential statistics, so they
    are gathered in one pass (Fan: a and b read x; c reads relu(a(x)), d tanh(b(x))): three passes, not four,
    and every statistic still equals a gather on the model with every earlier layer compressed."""
    from test_compensated import Fan

    from autocomp.models.base import LoadedModel

    torch.manual_seed(0)
    m = Fan().eval()
    batches = [torch.randn(6, 8) for _ in range(3)]
    loaded = LoadedModel(module=m, name="fan", spec="x", batches=batches, metric="mse")
    desc = introspect(loaded, measure=False)
    base = autocomp.calibrate(m, batches, desc)
    gptq = LayerPlan(QuantConfig(3, 8, method="gptq"))
    plan = Plan(layers={n: gptq for n in "abcd"}, fingerprint=desc.fingerprint)
    calls = []
    h = m.register_forward_pre_hook(lambda mod, a: calls.append(1))
    seq = sequential_statistics(loaded, desc, plan)
    h.remove()
    assert attached(m) is base  # left as it was
    assert len(calls) == 3 * len(batches) + 1  # + the pass that finds the forward order
    assert seq.hessians["a"] is seq.hessians["b"]
    order = ["a", "c", "b", "d"]
    for i, name in enumerate(order):
        attach(m, seq)
        prefix = Plan(layers={n: plan.layers[n] for n in order[:i]}, fingerprint=desc.fingerprint)
        with PlanApplier(m, desc).applied(prefix):
            by_hand = gather(m, desc, batches).hessians[name]
        assert torch.allclose(seq.hessians[name], by_hand, rtol=1e-5, atol=1e-6), name
    assert not torch.allclose(seq.hessians["d"], base.hessians["d"], rtol=1e-3)  # b compressed changes d's input
