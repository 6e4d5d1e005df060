"""Real dual encoders: a transformers CLIPModel through hf:DIR, and the built-in clip-digits demo
(MiniLM text tower + a vision tower trained at first use; the first run trains it, ~1 minute)."""

from __future__ import annotations

import json

import pytest
import torch

from test_multimodal import cli


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A small randomly initialised transformers CLIPModel with a real tokenizer, saved to a directory."""
    transformers = pytest.importorskip("transformers")
    from autocomp.models.minilm import load_tokenizer

    path = tmp_path_factory.mktemp("clip")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=101, eos_token_id=102),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).eval().save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path


def test_hf_clip_is_tagged_and_searchable_by_modality(hf_clip, capsys, studies):
    from autocomp.models import load_model
    from autocomp.models.introspect import introspect
    from autocomp.space import SearchSpace

    loaded = load_model(f"hf:{hf_clip}")
    desc = introspect(loaded)
    tags = {layer.name: layer.modality for layer in desc.layers}
    assert {m for n, m in tags.items() if n.startswith("text_model.")} == {"text"}
    assert {m for n, m in tags.items() if n.startswith("vision_model.")} == {"vision"}
    assert tags["visual_projection"] == tags["text_projection"] == "fusion"
    space = SearchSpace.from_yaml("multimodal", desc)
    heads = {g.producers[0]: g.units for g in space.groups.values() if g.kind == "heads"}
    assert heads["text_model.encoder.layers.0.self_attn.q_proj"] == 4  # per module, from the config
    assert heads["vision_model.encoder.layers.1.self_attn.q_proj"] == 2
    code, out, err = cli(capsys, "search", "--model", f"hf:{hf_clip}", "--budget", "50%", "--trials", "6",
                         "--space", "multimodal", "--min-bits", "vision=8", "--study", "hfclip",
                         "--studies-dir", studies, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["trials_complete"] == 6
    for e in result["pareto"]:
        assert set(e["by_modality"]) == {"text", "vision", "fusion"}
        assert sum(v["size_bytes"] for v in e["by_modality"].values()) == e["size_bytes"]


@pytest.fixture(scope="module")
def clip_digits(tmp_path_factory):
    import os

    old = os.environ.get("AUTOCOMP_CACHE")
    os.environ["AUTOCOMP_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # trains once for this module
    from autocomp.models import load_model

    yield load_model("clip-digits")
    if old is None:
        os.environ.pop("AUTOCOMP_CACHE", None)
    else:
        os.environ["AUTOCOMP_CACHE"] = old


def test_clip_digits_zero_shot_and_evaluate_contract(clip_digits, capsys, tmp_path):
    from autocomp.models.clip_digits import ZeroShotTask, build_clip_digits, cache_dir, digit_splits
    from autocomp.models.introspect import introspect
    from autocomp.models.minilm import load_tokenizer
    from autocomp.space import SearchSpace, reference_assignments

    splits = digit_splits()
    assert [len(splits[k][1]) for k in ("test", "calibration", "train")] == [497, 128, 1172]
    acc = ZeroShotTask(load_tokenizer())(clip_digits.module)
    assert acc > 0.8  # fp32 zero-shot accuracy of the demo (chance: 0.1)
    cached = list(cache_dir().glob("clip-digits-*.safetensors"))
    assert len(cached) == 1
    again, _ = build_clip_digits()  # loads the cache: identical weights, no retraining
    for (n, p), (_, q) in zip(clip_digits.module.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n
    desc = introspect(clip_digits)
    space = SearchSpace.from_yaml("default", desc)
    plan = space.decode(reference_assignments(space)["uniform-8c"])
    path = tmp_path / "plan.json"
    plan.save(path)
    code, out, err = cli(capsys, "evaluate", "--plan", path, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"metric", "value", "fp32_value"} and result["metric"] == "zero_shot_accuracy"
    assert result["fp32_value"] == pytest.approx(acc) and abs(result["value"] - acc) < 0.03
    code, out, err = cli(capsys, "evaluate", "--plan", path, "--by-modality", "--json")
    assert code == 0, err
    rows = json.loads(out)["by_modality"]
    assert set(rows) == {"text", "vision", "fusion"}
    from autocomp.cost.size import plan_bytes

    assert sum(v["size_bytes"] for v in rows.values()) == plan_bytes(desc, plan)
    assert rows["text"]["proxy"] > rows["fusion"]["proxy"] >= 0  # 8-bit text tower drifts more than the projections
