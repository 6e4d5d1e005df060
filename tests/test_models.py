from __future__ import annotations

import json

import pytest
import torch

from autocomp import AutocompError
from autocomp.models import load_model
from autocomp.models.introspect import introspect
from conftest import TINY, tiny_loaded


def test_factory_file_and_module_forms(monkeypatch):
    a = tiny_loaded()
    b = load_model("tiny_models:tiny", data="tiny_models:calib")  # tests/ is on sys.path
    assert a.spec.endswith("tiny_models.py:tiny") and b.spec == "tiny_models:tiny"
    assert len(a.batches) == 4 and a.metric == "auto"


def test_introspection_shapes_flops_and_tags():
    desc = introspect(tiny_loaded())
    by = desc.by_name
    assert [layer.name for layer in desc.layers] == ["emb", "fc1", "fc2", "head"]
    assert (by["fc1"].rows, by["fc1"].cols, by["fc1"].bias) == (64, 32, 64)
    assert by["fc1"].flops_per_sample == 2 * 32 * 64 and by["emb"].flops_per_sample == 0
    conv = introspect(load_model(f"{TINY}:tiny_conv", data=f"{TINY}:conv_calib"))
    c2 = conv.by_name["conv2"]
    assert (c2.rows, c2.cols) == (32, 16 * 9)
    assert c2.flops_per_sample == 2 * (32 * 4 * 4) * (16 * 9)  # stride 2 on 8x8 -> 4x4 outputs
    assert desc.params == sum(p.numel() for p in tiny_loaded().module.parameters())


def test_block_and_modality_tags():
    from autocomp.models.base import LoadedModel

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(4, 4)])})
            self.text_model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(4, 4)] * 1)})
            self.visual_projection = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.visual_projection(self.vision_model["layers"][0](x) + self.text_model["layers"][0](x))

    desc = introspect(LoadedModel(module=M(), name="m", spec="m", batches=[torch.randn(2, 4)]))
    tags = {layer.name: (layer.block, layer.modality) for layer in desc.layers}
    assert tags == {"vision_model.layers.0": (0, "vision"), "text_model.layers.0": (0, "text"),
                    "visual_projection": (None, "fusion")}


@pytest.mark.parametrize("spec,data,fragment", [
    ("resnet9000", None, "unknown model 'resnet9000'"),
    ("missing_file.py:build", None, "does not exist"),
    (f"{TINY}:nope", None, "has no attribute 'nope'"),
    (f"{TINY}:not_a_module", None, "returned dict, not a torch.nn.Module"),
    ("no.such.module:fn", None, "module 'no.such.module' not found"),
    (f"{TINY}:tiny", None, "brings no calibration data"),
    (f"{TINY}:tiny", f"{TINY}:empty_data", "returned no batches"),
    ("hf:/nonexistent/dir", None, "not a transformers directory"),
])
def test_intake_errors(spec, data, fragment):
    with pytest.raises(AutocompError, match=fragment):
        load_model(spec, data=data)


def test_data_that_does_not_fit_and_no_layers():
    with pytest.raises(AutocompError, match="calibration batch 0 does not fit"):
        introspect(load_model(f"{TINY}:tiny", data=f"{TINY}:wrong_shape_data"))
    with pytest.raises(AutocompError, match="no compressible layers"):
        introspect(load_model(f"{TINY}:no_layers", data=f"{TINY}:calib"))


def test_stdlib_sentences_are_real_deterministic_and_disjoint():
    from autocomp.models.textdata import calibration_sentences, sentences

    s = sentences()
    assert len(s) > 1000 and s == sentences()
    cal, train = calibration_sentences(32), calibration_sentences(split="train")
    assert len(cal) == 32 and not set(cal) & set(train)
    assert all(x[0].isupper() and x[-1] in ".!?" and len(x.split()) >= 7 for x in cal)


def test_the_sentence_list_is_cached_on_disk_and_a_bad_cache_only_costs_the_parse(tmp_path, monkeypatch):
    from autocomp.models import textdata

    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path / "cache"))
    textdata.sentences.cache_clear()
    try:
        want = textdata._parse(textdata._sources())
        assert textdata.sentences() == want
        (path,) = (tmp_path / "cache").glob("sentences-*.json")
        assert tuple(json.loads(path.read_text())) == want
        path.write_text(json.dumps(["A sentence that only the cache holds, seven words long."]))
        textdata.sentences.cache_clear()
        assert textdata.sentences() == ("A sentence that only the cache holds, seven words long.",)  # read, not parsed
        path.write_text("{damaged")
        textdata.sentences.cache_clear()
        assert textdata.sentences() == want and tuple(json.loads(path.read_text())) == want  # parsed and rewritten
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path / "file"))  # not a folder: nothing is written
        textdata.sentences.cache_clear()
        assert textdata.sentences() == want
    finally:
        textdata.sentences.cache_clear()


@pytest.mark.slow
def test_hf_dir_with_tokenizer(tmp_path):
    """A tiny randomly initialised BERT saved to a local directory, with MiniLM's tokenizer."""
    transformers = pytest.importorskip("transformers")
    from autocomp.models.minilm import load_tokenizer

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    load_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(f"hf:{tmp_path}")
    desc = introspect(loaded)
    assert loaded.batches and loaded.modality == "text"
    assert any(layer.name.endswith("attention.self.query") for layer in desc.layers)
    assert desc.info["num_attention_heads"] == 4


@pytest.mark.slow
def test_minilm_is_the_real_pretrained_encoder(minilm, minilm_desc):
    from autocomp.models.base import run_batch

    assert minilm.metric == "cosine" and minilm_desc.params == 22_713_216
    with torch.inference_mode():
        emb = run_batch(minilm.module, minilm.batches[0])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(emb.shape[0]), atol=1e-5)
    sims = emb @ emb.T
    # a trained encoder puts different sentences apart; a random one maps all of them close together
    assert sims[~torch.eye(len(sims), dtype=torch.bool)].mean() < 0.5
