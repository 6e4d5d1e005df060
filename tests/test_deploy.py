"""From plan to deployed model: the trainable student, distillation losses, training, packed export, load,
and the true-metric evaluation (issue #5)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import autocomp
from autocomp import AutocompError
from autocomp.compressors.apply import PlanApplier
from autocomp.cost.size import plan_bytes
from autocomp.models.base import run_batch
from autocomp.models.introspect import introspect
from autocomp.plan import LayerPlan, Plan
from autocomp.space import SearchSpace
from autocomp.training import distillation_loss, finalize, prepare_for_training, set_progress
from conftest import TINY, run_cli, tiny_loaded

SPACE = ("version: 1\nlayers:\n  - quant: [keep, int8, 8c, 4g16, 3g16a, 2c]\n    prune: [none, u30, u70, '2:4']\n"
         "    rank: [full, r0.5]\nstructured:\n  - kind: neurons\n    producers: ['fc1']\n    consumers: ['fc2']\n"
         "    keep: [1.0, 0.5, 0.25]\n")


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    loaded = tiny_loaded()
    desc = introspect(loaded)
    return loaded, desc, SearchSpace.from_yaml(tmp_path / "s.yaml", desc)


def _plans(space, n, seed=0):
    rng = random.Random(seed)
    return [space.decode({p: rng.choice(o) for p, o in space.params.items()}) for _ in range(n)]


def test_student_computes_exactly_what_the_proxy_evaluated(tiny):
    loaded, desc, space = tiny
    b = loaded.batches[0]
    for plan in _plans(space, 8):
        with torch.no_grad(), PlanApplier(loaded.module, desc).applied(plan):
            ref = run_batch(loaded.module, b)
        student = prepare_for_training(loaded.module, plan, desc)
        with torch.no_grad():
            assert torch.equal(run_batch(student, b), ref)
            assert torch.equal(run_batch(finalize(student), b), ref)
    # the original model is untouched and gradients reach the trainable weights through the STE
    out = run_batch(student, b).pow(2).sum()
    out.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in loaded.module.parameters())


def test_export_payload_is_the_prediction_and_load_matches(tiny, tmp_path):
    loaded, desc, space = tiny
    b = loaded.batches[0]
    for i, plan in enumerate(_plans(space, 6, seed=1)):
        student = prepare_for_training(loaded.module, plan, desc)
        with torch.no_grad():  # perturb as training would, so the export must follow the trained weights
            for p in student.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        r = autocomp.export(student, plan, tmp_path / f"m{i}.safetensors", spec=f"{TINY}:tiny", data_spec=f"{TINY}:calib")
        assert r["payload_bytes"] == r["predicted_bytes"] == plan_bytes(desc, plan)
        header = int.from_bytes((tmp_path / f"m{i}.safetensors").read_bytes()[:8], "little")
        assert r["file_bytes"] == r["payload_bytes"] + 8 + header  # nothing else in the file
        model = autocomp.load(tmp_path / f"m{i}.safetensors")
        with torch.no_grad():
            want = run_batch(finalize(student), b)
            got = run_batch(model, b)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_damaged_exports_are_refused(tiny, tmp_path):
    loaded, desc, space = tiny
    plan = _plans(space, 1, seed=2)[0]
    path = tmp_path / "m.safetensors"
    autocomp.export(loaded.module, Plan(layers=plan.layers, structured=plan.structured, model_spec=f"{TINY}:tiny"),
                    path, data_spec=f"{TINY}:calib")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    for name, fragment in (("trunc", "damaged or truncated"), ("flip", "checksum"), ("junk", "not a safetensors")):
        with pytest.raises(AutocompError, match=fragment):
            autocomp.load(tmp_path / f"{name}.safetensors")


def test_distillation_losses():
    t = torch.randn(8, 10)
    assert distillation_loss(t.clone(), t, "response", metric="kl") == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(t.clone(), t, "relation") == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss([t.clone()], [t], "feature") == pytest.approx(0.0, abs=1e-6)
    s = t + 0.5 * torch.randn(8, 10)
    kl1 = distillation_loss(s, t, "response", temperature=1.0, metric="kl")
    manual = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                        reduction="batchmean")
    assert kl1 == pytest.approx(float(manual), rel=1e-5)
    # a higher temperature softens: T^2-scaled KL of softened distributions differs from T=1
    assert distillation_loss(s, t, "response", temperature=4.0, metric="kl") != pytest.approx(float(kl1))
    assert distillation_loss(s, t, "response", metric="cosine") > 0
    # relation ignores a common rotation of all embeddings (only the geometry within the batch counts)
    q, _ = torch.linalg.qr(torch.randn(10, 10))
    assert distillation_loss(t @ q, t, "relation") == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(AutocompError, match="unknown distillation kind"):
        distillation_loss(s, t, "attention")


def test_progressive_masks_ramp_up(tiny):
    loaded, desc, _ = tiny
    plan = Plan(layers={"fc1": LayerPlan(prune="unstructured", sparsity=0.6)})
    student = prepare_for_training(loaded.module, plan, desc, schedule="progressive")
    w = lambda: student.fc1.weight.detach()  # noqa: E731
    assert float((w() == 0).float().mean()) < 0.01
    set_progress(student, 0.5)
    assert float((w() == 0).float().mean()) == pytest.approx(0.3, abs=0.01)
    set_progress(student, 1.0)
    assert float((w() == 0).float().mean()) == pytest.approx(0.6, abs=0.01)


def _plan_file(tmp_path, loaded, desc, space, seed=3):
    plan = _plans(space, 1, seed=seed)[0]
    plan = Plan(layers=plan.layers, structured=plan.structured, model_spec=f"{TINY}:tiny", fingerprint=desc.fingerprint)
    return plan.save(tmp_path / "plan.json")


def _distortion(model, loaded):
    from autocomp.training import distillation_loss as dl

    with torch.no_grad():
        return sum(float(dl(run_batch(model, b), run_batch(loaded.module, b), metric="mse")) for b in loaded.batches)


def test_train_reduces_drift_checkpoints_and_resumes(tiny, tmp_path, capsys):
    loaded, desc, space = tiny
    plan_path = _plan_file(tmp_path, loaded, desc, space)
    plan = Plan.load(plan_path)
    out = tmp_path / "tr.safetensors"
    args = ["train", "--plan", str(plan_path), "--data", f"{TINY}:train_data", "--out", str(out), "--lr", "3e-3",
            "--distill", "response,relation", "--json"]
    code, stdout, err = run_cli([*args, "--steps", "60"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["start_step"] == 0
    from autocomp.training import load_student

    before = _distortion(finalize(prepare_for_training(loaded.module, plan, desc)), loaded)
    student, meta = load_student(loaded.module, plan, desc, out)
    assert meta["step"] == "60"
    after = _distortion(finalize(student), loaded)
    assert after < 0.8 * before  # distillation on training data lowers drift on the calibration data
    code, stdout, err = run_cli([*args, "--steps", "70"], capsys)  # resumes the checkpoint
    assert code == 0, err
    assert json.loads(stdout)["start_step"] == 60
    # the trained weights export to a file whose model computes what the trained student does
    exp = tmp_path / "m.safetensors"
    code, stdout, err = run_cli(["export", "--plan", str(plan_path), "--data", f"{TINY}:calib", "--weights", str(out),
                                 "--out", str(exp), "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert set(r) == {"path", "predicted_bytes", "payload_bytes", "file_bytes"}
    assert r["payload_bytes"] == r["predicted_bytes"]
    scores = []
    for weights in (out, exp):
        code, stdout, err = run_cli(["evaluate", "--plan", str(plan_path), "--data", f"{TINY}:calib", "--weights",
                                     str(weights), "--task", f"{TINY}:agreement", "--json"], capsys)
        assert code == 0, err
        r = json.loads(stdout)
        assert set(r) == {"metric", "value", "fp32_value"} and r["metric"] == "agreement" and r["fp32_value"] == 1.0
        scores.append(r["value"])
    assert scores[0] == scores[1]  # the export scores exactly what the trained checkpoint does


def test_bf16_autocast_trains(tiny, tmp_path):
    from autocomp.training import train

    loaded, desc, space = tiny
    plan = Plan.load(_plan_file(tmp_path, loaded, desc, space))
    r = train(loaded, plan, desc, 5, tmp_path / "bf16.safetensors", loaded.batches, amp="bf16",
              distill=("response", "relation", "feature"))
    assert r["final_loss"]["loss"] == r["final_loss"]["loss"] and r["items_per_second"] > 0


def test_evaluate_proxy_fidelity_contract(capsys):
    code, out, err = run_cli(["evaluate", "--model", f"{TINY}:tiny", "--data", f"{TINY}:calib", "--task",
                              f"{TINY}:agreement", "--random-plans", "6", "--budget", "20%", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert set(r) == {"metric", "spearman_proxy_vs_metric", "rows"} and len(r["rows"]) == 6
    assert all(set(x) == {"proxy", "value"} for x in r["rows"]) and -1 <= r["spearman_proxy_vs_metric"] <= 1


@pytest.mark.parametrize("extra,fragment", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--data", f"{TINY}:empty_data"], "returned no batches"),
])
def test_bad_training_input(tiny, tmp_path, capsys, extra, fragment):
    loaded, desc, space = tiny
    plan_path = _plan_file(tmp_path, loaded, desc, space)
    code, out, err = run_cli(["train", "--plan", str(plan_path), "--out", str(tmp_path / "x.safetensors"),
                              "--data", f"{TINY}:train_data", *extra], capsys)
    assert code == 2 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()


def test_weights_of_another_plan_and_plan_of_another_model(tiny, tmp_path, capsys):
    loaded, desc, space = tiny
    plan_path = _plan_file(tmp_path, loaded, desc, space, seed=3)
    out = tmp_path / "tr.safetensors"
    assert run_cli(["train", "--plan", str(plan_path), "--data", f"{TINY}:train_data", "--out", str(out),
                    "--steps", "2"], capsys)[0] == 0
    other = _plan_file(tmp_path / "..", loaded, desc, space, seed=11)
    code, _, err = run_cli(["export", "--plan", str(other), "--data", f"{TINY}:calib", "--weights", str(out),
                            "--out", str(tmp_path / "e.safetensors")], capsys)
    assert code == 2 and "trained for another plan" in err
    code, _, err = run_cli(["export", "--plan", str(plan_path), "--model", f"{TINY}:tiny_conv", "--data",
                            f"{TINY}:conv_calib", "--out", str(tmp_path / "e.safetensors")], capsys)
    assert code == 2 and "Traceback" not in err and not (tmp_path / "e.safetensors").exists()


def test_ctrl_c_keeps_the_last_checkpoint(tiny, tmp_path):
    loaded, desc, space = tiny
    plan_path = _plan_file(tmp_path, loaded, desc, space)
    out = tmp_path / "tr.safetensors"
    env = {**os.environ, "TINY_SLEEP": "0.05"}
    proc = subprocess.Popen([sys.executable, "-m", "autocomp.cli", "train", "--plan", str(plan_path), "--data",
                             f"{TINY}:train_data", "--out", str(out), "--steps", "1000", "--checkpoint-every", "3"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while not out.exists() and time.time() - t0 < 120:
        time.sleep(0.2)
    assert out.exists()
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    from autocomp.training import load_student

    _, meta = load_student(loaded.module, Plan.load(plan_path), desc, out)
    assert 3 <= int(meta["step"]) < 1000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_hf_dir_model_exports_and_loads(tmp_path):
    """A tiny randomly initialised transformers BERT in a local directory (`hf:DIR`): export under a random
    plan of the transformer space (structured heads and neurons included), load back, same outputs."""
    transformers = pytest.importorskip("transformers")
    from autocomp.models import load_model
    from autocomp.models.minilm import load_tokenizer

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    load_tokenizer().save_pretrained(tmp_path / "bert")
    spec = f"hf:{tmp_path / 'bert'}"
    loaded = load_model(spec)
    desc = introspect(loaded)
    space = SearchSpace.from_yaml("transformer", desc)
    b = loaded.batches[0]
    for i, plan in enumerate(_plans(space, 3, seed=5)):
        student = prepare_for_training(loaded.module, plan, desc)
        r = autocomp.export(student, plan, tmp_path / f"m{i}.safetensors", spec=spec)
        assert r["payload_bytes"] == r["predicted_bytes"]
        model = autocomp.load(tmp_path / f"m{i}.safetensors")
        with torch.no_grad():
            want = run_batch(finalize(student), b).last_hidden_state
            got = run_batch(model, b).last_hidden_state
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_trained_compressed_embedding_evaluates(tiny, tmp_path, capsys):
    """Regression: a frozen compressed embedding (cached compressed value) inside `evaluate --weights`,
    which scores under inference mode."""
    loaded, desc, _ = tiny
    plan = Plan(layers={"emb": LayerPlan(bits=4, group_size=16), "fc1": LayerPlan(bits=4, group_size=16)},
                model_spec=f"{TINY}:tiny", fingerprint=desc.fingerprint)
    plan_path = plan.save(tmp_path / "plan.json")
    out = tmp_path / "tr.safetensors"
    assert run_cli(["train", "--plan", str(plan_path), "--data", f"{TINY}:train_data", "--out", str(out),
                    "--steps", "3"], capsys)[0] == 0
    code, stdout, err = run_cli(["evaluate", "--plan", str(plan_path), "--data", f"{TINY}:calib", "--weights",
                                 str(out), "--task", f"{TINY}:agreement", "--json"], capsys)
    assert code == 0, err
    assert 0 < json.loads(stdout)["value"] <= 1


def test_train_embeddings_moves_the_table_and_resumes_with_it(tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    from autocomp.training import load_student

    loaded, desc, _ = tiny
    plan = Plan(layers={"emb": LayerPlan(bits=2, group_size=16), "fc1": LayerPlan(bits=4, group_size=16)},
                model_spec=f"{TINY}:tiny", fingerprint=desc.fingerprint)
    plan_path = plan.save(tmp_path / "plan.json")
    key = "emb.parametrizations.weight.original"
    outs = {}
    for flag in ((), ("--train-embeddings",)):
        out = tmp_path / f"tr{len(flag)}.safetensors"
        code, _, err = run_cli(["train", "--plan", str(plan_path), "--data", f"{TINY}:train_data", "--out", str(out),
                                "--steps", "5", "--lr", "1e-2", "--clip", "minmax", *flag], capsys)
        assert code == 0, err
        outs[bool(flag)] = out
    original = loaded.module.emb.weight.detach()
    assert torch.equal(load_file(str(outs[False]))[key], original)  # frozen by default
    assert not torch.equal(load_file(str(outs[True]))[key], original)  # trained through its fake quantization
    student, meta = load_student(loaded.module, plan, desc, outs[True])
    assert meta["train_embeddings"] == "1" and student.emb.parametrizations.weight.original.requires_grad
    code, stdout, err = run_cli(["train", "--plan", str(plan_path), "--data", f"{TINY}:train_data", "--out",
                                 str(outs[True]), "--steps", "7", "--json"], capsys)  # resumes as it was trained
    assert code == 0 and json.loads(stdout)["start_step"] == 5, err
    assert load_student(loaded.module, plan, desc, outs[True])[1]["train_embeddings"] == "1"


def test_pruned_embedding_table_trains_and_exports_exactly(tiny, tmp_path, capsys):
    """The default space prunes embedding tables: a trained u60 3-bit table keeps its mask (60% zeros),
    its export is exactly the predicted size and loads back to the checkpoint's outputs."""
    from autocomp.training import load_student

    loaded, desc, _ = tiny
    plan = Plan(layers={"emb": LayerPlan(bits=3, group_size=16, prune="unstructured", sparsity=0.6),
                        "fc1": LayerPlan(bits=4, group_size=16)}, model_spec=f"{TINY}:tiny", fingerprint=desc.fingerprint)
    plan_path = plan.save(tmp_path / "plan.json")
    ckpt, packed = tmp_path / "tr.safetensors", tmp_path / "m.acz.safetensors"
    code, _, err = run_cli(["train", "--plan", str(plan_path), "--data", f"{TINY}:train_data", "--out", str(ckpt),
                            "--steps", "5", "--lr", "1e-2", "--train-embeddings"], capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["export", "--plan", str(plan_path), "--data", f"{TINY}:calib", "--weights", str(ckpt),
                                 "--out", str(packed), "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["payload_bytes"] == r["predicted_bytes"] == plan_bytes(desc, plan)
    student = finalize(load_student(loaded.module, plan, desc, ckpt)[0])
    table = student.emb.weight.detach()
    assert (table == 0).float().mean() >= 0.6
    assert not torch.equal(table, loaded.module.emb.weight.detach())
    model = autocomp.load(packed)
    b = loaded.batches[0]
    with torch.no_grad():
        want, got = run_batch(student, b), run_batch(model, b)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_feature_distillation_runs_on_a_student(tmp_path):
    """Regression: the student's parametrization lists must not count as blocks (feature loss was dropped)."""
    from autocomp.models import load_model
    from autocomp.training import _block_modules, train

    loaded = load_model(f"{TINY}:deep", data=f"{TINY}:deep_calib")
    desc = introspect(loaded)
    plan = Plan(layers={layer.name: LayerPlan(bits=4, group_size=16) for layer in desc.layers})
    student = prepare_for_training(loaded.module, plan, desc)
    assert len(_block_modules(student)) == len(_block_modules(loaded.module)) == 70
    # DeepNet indexes its blocks' layers directly (the ModuleDicts never run forward): no feature loss, no crash
    r = train(loaded, plan, desc, 2, tmp_path / "f.safetensors", loaded.batches, distill=("response", "feature"))
    assert "feature" not in r["final_loss"] and r["final_loss"]["response"] > 0


@pytest.mark.parametrize("bits,group,symmetric", [(2, 16, False), (3, 0, False), (4, 16, True), (2, 0, True)])
def test_mse_clip_never_quantizes_worse_than_min_max(bits, group, symmetric):
    from autocomp.compressors.quantize import quantize_matrix
    from autocomp.compressors.quantize import mse_clip

    torch.manual_seed(bits + group)
    w = torch.distributions.StudentT(3.0).sample((24, 40))  # heavy tails: min/max wastes the grid on outliers
    mask = torch.rand_like(w) > 0.3

    def group_err(v):
        err = (quantize_matrix(v * mask, bits, group, symmetric)[0] - w * mask) ** 2
        g = group or w.shape[1]
        return torch.nn.functional.pad(err, (0, -w.shape[1] % g)).reshape(w.shape[0], -1, g).sum(-1)

    clipped = mse_clip(w, bits, group, symmetric, mask)
    assert (group_err(clipped) <= group_err(w) + 1e-6).all()  # ratio 1.0 is on the grid: never worse per group
    assert group_err(clipped).sum() < (0.9 if bits == 2 else 1.0) * group_err(w).sum()
    assert (clipped.abs() <= w.abs()).all()  # a clamp, nothing else


def test_clip_init_lowers_every_layers_weight_error_and_exports_exactly(tiny, tmp_path):
    from autocomp.compressors.student import start_training

    loaded, desc, space = tiny
    lowered = 0
    for i, plan in enumerate(_plans(space, 4, seed=11)):
        student = prepare_for_training(loaded.module, plan, desc)
        before = {n: p.detach().clone() for n, p in finalize(student).named_parameters()}
        start_training(student, "mse")
        model = finalize(student)
        after = dict(model.named_parameters())
        ref = dict(loaded.module.named_parameters())
        for n in before:
            if n.endswith("weight"):
                new, old = ((after[n] - ref[n]) ** 2).sum(), ((before[n] - ref[n]) ** 2).sum()
                assert new <= old + 1e-6, n
                lowered += bool(new < 0.99 * old)
        r = autocomp.export(student, plan, tmp_path / f"c{i}.safetensors", spec=f"{TINY}:tiny", data_spec=f"{TINY}:calib")
        assert r["payload_bytes"] == r["predicted_bytes"] == plan_bytes(desc, plan)
        b = loaded.batches[0]
        with torch.no_grad():
            want, got = run_batch(model, b), run_batch(autocomp.load(tmp_path / f"c{i}.safetensors"), b)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert lowered >= 3


def test_train_records_its_start_point_and_minmax_keeps_the_weights(tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    from autocomp.training import load_student

    loaded, desc, _ = tiny
    plan = Plan(layers={"emb": LayerPlan(bits=2, group_size=16)}, model_spec=f"{TINY}:tiny", fingerprint=desc.fingerprint)
    plan_path = plan.save(tmp_path / "plan.json")
    key = "emb.parametrizations.weight.original"
    for clip in ("minmax", "mse"):
        out = tmp_path / f"{clip}.safetensors"
        code, _, err = run_cli(["train", "--plan", str(plan_path), "--data", f"{TINY}:train_data", "--out", str(out),
                                "--steps", "2", "--clip", clip], capsys)
        assert code == 0, err
        assert load_student(loaded.module, plan, desc, out)[1]["clip"] == clip
        same = torch.equal(load_file(str(out))[key], loaded.module.emb.weight.detach())  # the table is frozen
        assert same == (clip == "minmax")


def test_export_clip_mse_is_the_same_size_and_a_closer_model(tiny, tmp_path, capsys):
    loaded, desc, _ = tiny
    plan = Plan(layers={"emb": LayerPlan(bits=2, group_size=16), "fc1": LayerPlan(bits=2, group_size=16),
                        "fc2": LayerPlan(bits=3, group_size=0)}, model_spec=f"{TINY}:tiny", fingerprint=desc.fingerprint)
    plan_path = plan.save(tmp_path / "plan.json")
    sizes, err_of = {}, {}
    ref = dict(loaded.module.named_parameters())
    for clip in ("minmax", "mse"):
        out = tmp_path / f"{clip}.acz.safetensors"
        code, stdout, err = run_cli(["export", "--plan", str(plan_path), "--data", f"{TINY}:calib", "--out", str(out),
                                     "--clip", clip, "--json"], capsys)
        assert code == 0, err
        sizes[clip] = json.loads(stdout)
        got = dict(autocomp.load(out).named_parameters())
        err_of[clip] = sum(float(((got[n] - ref[n]).detach() ** 2).sum()) for n in ("emb.weight", "fc1.weight", "fc2.weight"))
    assert sizes["mse"]["payload_bytes"] == sizes["minmax"]["payload_bytes"] == sizes["mse"]["predicted_bytes"]
    assert err_of["mse"] < 0.9 * err_of["minmax"]
    code, _, err = run_cli(["export", "--plan", str(plan_path), "--data", f"{TINY}:calib", "--weights",
                            str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "y"), "--clip", "mse"], capsys)
    assert code == 2 and "--clip applies to plans exported without --weights" in err.strip().splitlines()[-1]


def test_learned_clip_trains_the_ratios_and_exports_what_it_trained(tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    from autocomp.training import load_student

    loaded, desc, _ = tiny
    plan = Plan(layers={"fc1": LayerPlan(bits=2, group_size=16), "fc2": LayerPlan(bits=3, group_size=0, rank=8)},
                model_spec=f"{TINY}:tiny", fingerprint=desc.fingerprint)
    plan_path = plan.save(tmp_path / "plan.json")
    out = tmp_path / "tr.safetensors"
    code, _, err = run_cli(["train", "--plan", str(plan_path), "--data", f"{TINY}:train_data", "--out", str(out),
                            "--steps", "6", "--lr", "1e-2", "--clip", "learned"], capsys)
    assert code == 0, err
    ratios = {k: v for k, v in load_file(str(out)).items() if k.rsplit(".", 1)[-1].startswith("clip")}
    assert len(ratios) == 3  # fc1's matrix, fc2's two factors
    assert any((v != 1.0).any() for v in ratios.values()) and all(((v >= 0.5) & (v <= 1.0)).all() for v in ratios.values())
    student, meta = load_student(loaded.module, plan, desc, out)
    assert meta["clip"] == "learned"
    code, stdout, err = run_cli(["export", "--plan", str(plan_path), "--data", f"{TINY}:calib", "--weights", str(out),
                                 "--out", str(tmp_path / "m.acz.safetensors"), "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["payload_bytes"] == r["predicted_bytes"]
    b = loaded.batches[0]
    with torch.no_grad():
        want = run_batch(finalize(student), b)
        got = run_batch(autocomp.load(tmp_path / "m.acz.safetensors"), b)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_public_prepare_for_training_takes_the_clip_modes(tiny):
    loaded, desc, _ = tiny
    plan = Plan(layers={"fc1": LayerPlan(bits=2, group_size=16)}, model_spec=f"{TINY}:tiny", fingerprint=desc.fingerprint)
    ref = loaded.module.fc1.weight
    err = {}
    for clip in ("minmax", "mse", "learned"):
        student = autocomp.prepare_for_training(loaded.module, plan, desc, clip=clip)
        err[clip] = float(((finalize(student).fc1.weight - ref).detach() ** 2).sum())
        ratios = [n for n, _ in student.named_parameters() if n.endswith("clip0")]
        assert bool(ratios) == (clip == "learned")
    assert err["mse"] == pytest.approx(err["learned"]) and err["mse"] < 0.9 * err["minmax"]
    with pytest.raises(AutocompError, match="clip must be one of"):
        autocomp.prepare_for_training(loaded.module, plan, desc, clip="lsq")
