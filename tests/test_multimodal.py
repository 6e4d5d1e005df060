"""Multimodal models: modality tags, per-modality bytes and constraints, the alignment proxy, cross-modal
head pruning by Fisher importance, contrastive distillation (tiny dual encoder; clip-digits and a
transformers CLIPModel in the slow tests)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import TINY

DUAL = f"{TINY}:tiny_dual"
DATA = f"{TINY}:dual_calib"


@pytest.fixture
def dual():
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect

    loaded = load_model(DUAL, data=DATA)
    return loaded, introspect(loaded)


def cli(capsys, *args):
    """Run the CLI like a user: -> (exit code, stdout, stderr)."""
    from autocomp.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def random_assignment(space, seed):
    rng = random.Random(seed)
    return {p: rng.choice(o) for p, o in space.params.items()}


def test_layers_are_tagged_by_modality_and_bytes_add_up(dual):
    from autocomp.cost.size import plan_bytes
    from autocomp.modality import bytes_by_modality, modalities
    from autocomp.space import SearchSpace

    loaded, desc = dual
    tags = {layer.name: layer.modality for layer in desc.layers}
    assert tags["text_model.token_embedding"] == "text"
    assert tags["vision_model.encoder.self_attn.q_proj"] == "vision"
    assert tags["fusion.cross_attn.k_proj"] == "fusion"
    assert tags["visual_projection"] == "fusion" and tags["text_projection"] == "fusion"
    assert modalities(desc) == ["text", "vision", "fusion"]
    space = SearchSpace.from_yaml("multimodal", desc)
    assert any(g.producers[0].startswith("fusion.cross_attn") for g in space.groups.values())
    fp32 = space.decode({p: o[0] for p, o in space.params.items()})
    assert sum(bytes_by_modality(desc, fp32).values()) == desc.fp32_bytes
    for seed in range(20):  # random plans, structured pruning included
        plan = space.decode(random_assignment(space, seed))
        assert sum(bytes_by_modality(desc, plan).values()) == plan_bytes(desc, plan)


def test_space_modality_patterns_retag_layers(dual, tmp_path):
    from autocomp.space import SearchSpace

    _, desc = dual
    yaml = tmp_path / "s.yaml"
    yaml.write_text("version: 1\nmodalities:\n  audio: ['^vision_model[.]']\nlayers:\n"
                    "  - types: [Linear]\n    modality: [audio]\n    quant: [keep, 8c, 4g32]\n")
    space = SearchSpace.from_yaml(yaml, desc)
    assert {space.desc.layer(n).modality for n in space.layer_keys} == {"audio"}
    assert space.desc.layer("vision_model.patch_embedding").modality == "audio"
    assert space.desc.layer("text_model.encoder.mlp.fc1").modality == "text"


def test_restrict_applies_min_bits_and_max_sparsity_per_modality(dual):
    from autocomp.compressors.base import technique
    from autocomp.space import SearchSpace

    _, desc = dual
    space = SearchSpace.from_yaml("multimodal", desc).restrict({"vision": 8}, {"text": 0.3})
    for seed in range(30):
        plan = space.decode(random_assignment(space, seed))
        for name, choice in plan.layers.items():
            m = desc.layer(name).modality
            if m == "vision":
                assert choice.summary().get("bits", 32) >= 8, (name, choice)
            if m == "text":
                assert choice.summary().get("sparsity", 0.0) <= 0.3, (name, choice)
        for g in plan.structured.values():
            if desc.layer(g.producers[0]).modality == "text":
                assert 1 - g.keep / g.units <= 0.3
    quant = technique("quantize")
    assert all((quant.parse(o) or (32,))[0] >= 8 for p, opts in space.params.items() if p.endswith(":q")
               and desc.layer(space.param_layers(p)[0]).modality == "vision" for o in opts)
    assert technique("prune").summary(technique("prune").parse("2:4")) == {"sparsity": 0.5}


@pytest.mark.parametrize("flags, needle", [
    (("--min-bits", "audio=8"), "modality 'audio', which model"),
    (("--budget-split", "text=80%,vision=40%"), "more than 100%"),
    (("--budget-split", "text=50%,vision=20%,fusion=20%"), "adds up to 90%, not 100%"),
    (("--max-sparsity", "text"), "is not MODALITY=VALUE"),
    (("--min-bits", "vision=x"), "bits must be an integer"),
])
def test_bad_modality_constraints_one_line_exit_2(capsys, flags, needle, studies):
    code, out, err = cli(capsys, "search", "--model", DUAL, "--data", DATA, "--budget", "50%", "--trials", "2",
                         "--studies-dir", studies, *flags)
    last = err.strip().splitlines()[-1]
    assert code == 2 and needle in last and last.startswith("error: "), err
    assert "Traceback" not in err and out == ""
    import optuna

    for db in studies.glob("*.db"):  # nothing half-made: no study was created
        assert not optuna.get_all_study_names(storage=f"sqlite:///{db}")


def test_image_text_batch_mismatch_is_one_line(capsys, studies):
    code, _, err = cli(capsys, "search", "--model", DUAL, "--data", f"{TINY}:dual_mismatch", "--budget", "50%",
                       "--trials", "2", "--studies-dir", studies)
    assert code == 2 and "8 images but 6 captions" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_search_respects_split_and_floors_and_reports_by_modality(capsys, studies):
    import optuna

    code, out, err = cli(capsys, "search", "--model", DUAL, "--data", DATA, "--budget", "40%", "--trials", "14",
                         "--space", "multimodal", "--study", "mm", "--min-bits", "vision=8",
                         "--budget-split", "text=60%", "--studies-dir", studies, "--json")
    assert code == 0, err
    result = json.loads(out)
    budget = result["budget_bytes"]
    assert result["pareto"]
    for e in result["pareto"]:
        assert set(e["by_modality"]) == {"text", "vision", "fusion"}
        assert sum(v["size_bytes"] for v in e["by_modality"].values()) == e["size_bytes"]
        assert e["by_modality"]["text"]["size_bytes"] <= 0.6 * budget
    study = optuna.load_study(study_name="mm", storage=f"sqlite:///{studies}/mm.db")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 14
    for t in done:
        assert t.user_attrs["by_modality"]["text"] <= 0.6 * budget
        assert t.user_attrs["plan"]["_version"] == 2  # new trials store version-2 plans
        for name, choice in t.user_attrs["plan"]["layers"].items():
            if name.startswith("vision_model"):
                assert choice.get("quantize", {}).get("bits", 32) >= 8
    # a resume with other constraints is refused, naming the flags
    code, _, err = cli(capsys, "search", "--model", DUAL, "--data", DATA, "--budget", "40%", "--trials", "15",
                       "--space", "multimodal", "--study", "mm", "--studies-dir", studies)
    assert code == 2 and "--budget-split" in err
    # pareto --by-modality: bytes, share and each modality's proxy contribution
    code, out, err = cli(capsys, "pareto", "--study", "mm", "--by-modality", "--studies-dir", studies, "--json")
    assert code == 0, err
    for e in json.loads(out)["pareto"]:
        rows = e["by_modality"]
        assert abs(sum(v["share"] for v in rows.values()) - 1) < 1e-9
        assert all(v["proxy"] >= 0 for v in rows.values())


def test_alignment_proxy_ignores_a_shared_rotation_that_tower_drift_punishes():
    from autocomp.evaluators.proxy import distortion

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.3 * torch.randn(16, 8, generator=g), dim=-1)
    teacher = torch.cat([img, txt])
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    rotated = teacher @ q  # both towers drift, together: every image-text match is unchanged
    a, n = distortion("alignment", teacher, rotated)
    t, m = distortion("tower", teacher, rotated)
    assert a / n < 1e-9 and t / m > 0.1
    swapped = torch.cat([img, txt.flip(0)])  # captions matched to the wrong images: towers barely move
    a2, n2 = distortion("alignment", teacher, swapped)
    assert a2 / n2 > 1.0


def test_alignment_is_blind_to_what_matching_cannot_see_and_i2t_to_the_other_direction():
    from autocomp.evaluators.proxy import distortion

    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    txt = torch.zeros(16, 8)  # captions live in the first 6 dimensions
    txt[:, :6] = torch.nn.functional.normalize(img[:, :6] + 0.3 * torch.randn(16, 6, generator=g), dim=-1)
    teacher = torch.cat([img, txt])
    shifted = txt.clone()
    shifted[:, 7] = 0.8  # a common shift of every caption, orthogonal to all of them: equal norms afterwards
    student = torch.cat([img, shifted])
    # image -> text: each image's similarities move by one constant and shrink by one factor: its ranking
    # and its standardized match distribution stay; text -> image matches do change
    i2t, n = distortion("alignment-i2t", teacher, student)
    t2i, m = distortion("alignment-t2i", teacher, student)
    both, k = distortion("alignment", teacher, student)
    assert i2t / n < 1e-6 and t2i / m > 1e-2 and both == pytest.approx(i2t + t2i) and k == n + m
    assert distortion("tower", teacher, student)[0] / 32 > 0.05
    squeezed = torch.cat([img, torch.nn.functional.normalize(txt + 3.0 * torch.nn.functional.normalize(
        txt.mean(0, keepdim=True), dim=-1), dim=-1)])  # captions collapse together: rankings may change
    assert distortion("alignment-i2t", teacher, squeezed)[0] > 0


def test_contrastive_distillation_loss():
    from autocomp.training import distillation_loss

    g = torch.Generator().manual_seed(0)
    t = torch.randn(16, 8, generator=g)
    assert float(distillation_loss(t, t, "contrastive")) < 1e-9
    s = (t + 0.5 * torch.randn(16, 8, generator=g)).requires_grad_(True)
    loss = distillation_loss(s, t, "contrastive")
    loss.backward()
    assert float(loss.detach()) > 0 and s.grad.abs().sum() > 0


def test_fisher_importance_ranks_heads_by_use_not_weight_norm(dual, tmp_path):
    """A cross-modal head whose output the model never reads (its out_proj columns are zero) has the largest
    q/k/v weights: weight norms keep it, Fisher importance ranks it last."""
    from autocomp.compressors.apply import PlanApplier
    from autocomp.compressors.structured import unit_order
    from autocomp.evaluators.proxy import ProxyEvaluator
    from autocomp.search.sensitivity import unit_importance
    from autocomp.space import SearchSpace

    loaded, desc = dual
    attn = loaded.module.fusion.cross_attn
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight[:8] *= 20  # head 0 (8 of 32 rows)
        attn.out_proj.weight[:, :8] = 0
    space = SearchSpace.from_yaml("multimodal", desc)
    key = next(k for k, g in space.groups.items() if g.producers[0] == "fusion.cross_attn.q_proj")
    g = space.groups[key]
    ev = ProxyEvaluator(loaded, desc)
    orders = unit_importance(space, ev, tmp_path, {"t": 1})
    assert orders[key][-1] == 0
    mats = {n: dict(loaded.module.named_modules())[n].weight for n in (*g.producers, *g.consumers)}
    from autocomp.plan import StructuredGroup

    sg = StructuredGroup(g.kind, g.units, g.unit_size, 3, g.producers, g.consumers)
    assert int(unit_order(sg, mats)[0]) == 0  # weight norm: head 0 first
    # in a plan, the order travels with the group: pruning one head costs ~nothing only with Fisher
    space.unit_orders = orders
    neutral = {p: o[0] for p, o in space.params.items()}
    cut = space.decode({**neutral, f"{key}:keep": "k0.75"})
    assert cut.structured[key].order == orders[key]
    space.unit_orders = {}
    cut_norm = space.decode({**neutral, f"{key}:keep": "k0.75"})
    assert ev(cut) < 1e-6 < ev(cut_norm)
    assert orders == unit_importance(space, ev, tmp_path, {"t": 1})  # cached
    PlanApplier(loaded.module, desc)  # weights untouched by the applier


def test_plan_with_unit_order_round_trips_and_exports(dual, tmp_path):
    from autocomp.artifact import export, load
    from autocomp.compressors.apply import PlanApplier
    from autocomp.cost.size import plan_bytes
    from autocomp.plan import Plan
    from autocomp.space import SearchSpace

    loaded, desc = dual
    space = SearchSpace.from_yaml("multimodal", desc)
    key = next(k for k, g in space.groups.items() if g.producers[0] == "fusion.cross_attn.q_proj")
    space.unit_orders = {key: (2, 0, 3, 1)}
    neutral = {p: o[0] for p, o in space.params.items()}
    plan = space.decode({**neutral, f"{key}:keep": "k0.5"})
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.structured[key].order == (2, 0, 3, 1) and again.key() == plan.key()
    path = tmp_path / "m.acz.safetensors"
    info = export(loaded.module, again, path, desc=desc)
    assert info["payload_bytes"] == plan_bytes(desc, plan)
    model2 = load(path, model=TINY_model())
    batch = loaded.batches[0]
    with torch.inference_mode(), PlanApplier(loaded.module, desc).applied(plan):
        want = loaded.module(**batch)["image_embeds"]
    got = model2(**batch)["image_embeds"]
    assert torch.allclose(got, want, atol=1e-5)
    w = model2.fusion.cross_attn.q_proj.weight.reshape(4, 8, -1)  # heads 2 and 0 kept, 1 and 3 removed
    assert w[[1, 3]].abs().sum() == 0 and bool((w[[0, 2]].abs().sum((1, 2)) > 0).all())


def TINY_model():
    import tiny_models

    return tiny_models.tiny_dual()
