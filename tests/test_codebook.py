"""Codebook (vector) quantization (autocomp/compressors/codebook.py): labels, the fit, the masked assignment and
the space that stores MiniLM's word table with it. The conformance suite (tests/test_techniques.py) covers its
bytes, packing, training and export like every technique's."""

from __future__ import annotations

import pytest
import torch

from autocomp.compressors.base import LayerContext, Part, technique
from autocomp.compressors.codebook import CodebookConfig, encode, encode_compensated, fit_codebook, nearest
from autocomp.compressors.compensate import output_error, vq_gptq
from autocomp.compressors.quantize import quantize_matrix
from autocomp.cost.size import layer_bytes
from autocomp.desc import LayerDesc
from autocomp.plan import LayerPlan


def test_labels_parse_and_refuse_with_the_grammar():
    t = technique("codebook")
    assert t.parse("none") is None
    assert t.parse("vq8x256") == CodebookConfig(8, 256) and t.label(CodebookConfig(8, 256)) == "vq8x256"
    for bad in ("vq8x100", "vq0x16", "vq8", "k16", "vq8x1"):
        with pytest.raises(ValueError, match="vq<d>x<k>|power of 2|1..64"):
            t.parse(bad)
    assert t.summary(CodebookConfig(8, 256)) == {"bits": 1.0}
    assert t.parse("vq4x256/gptq") == CodebookConfig(4, 256, "gptq") and t.label(CodebookConfig(4, 256, "gptq")) == "vq4x256/gptq"
    assert CodebookConfig(4, 256).to_dict() == {"dim": 4, "centroids": 256}  # readable by version 1
    assert CodebookConfig(4, 256, "gptq").version() == 2


def test_bind_needs_vectors_that_tile_the_rows_and_enough_of_them():
    t = technique("codebook")
    lay = LayerDesc(name="x", type="Linear", rows=16, cols=32)
    assert t.bind(CodebookConfig(8, 16), lay, [(16, 32)]) == CodebookConfig(8, 16)
    assert t.bind(CodebookConfig(6, 16), lay, [(16, 32)]) is None  # 32 inputs are not runs of 6
    assert t.bind(CodebookConfig(8, 128), lay, [(16, 32)]) is None  # 64 vectors for 128 centroids


def test_bytes_are_the_indices_plus_a_float16_codebook():
    lay = LayerDesc(name="x", type="Embedding", rows=1000, cols=64)
    # 8,000 vectors x 8 bits + 256 x 8 float16 centroids
    assert layer_bytes(lay, LayerPlan(CodebookConfig(8, 256))) == 8000 + 256 * 8 * 2


def test_the_fit_is_deterministic_and_beats_a_scalar_grid_at_the_same_bits():
    g = torch.Generator().manual_seed(0)
    # rows with structure (a few directions plus noise), as embedding rows have
    w = torch.randn(600, 6, generator=g) @ torch.randn(6, 64, generator=g) + 0.3 * torch.randn(600, 64, generator=g)
    deq, codes, book = encode(w, CodebookConfig(4, 16))  # 1 bit a weight
    again = encode(w, CodebookConfig(4, 16))
    assert torch.equal(deq, again[0]) and torch.equal(codes, again[1]) and torch.equal(book, again[2])
    assert codes.shape == (600, 16) and codes.dtype == torch.int32 and book.dtype == torch.float16
    assert torch.equal(deq, book.float()[codes.long()].reshape(600, 64))  # decoded from the stored codebook
    binary = quantize_matrix(w, 1, 0, False)[0]  # 1-bit per-row grid (asymmetric: two levels)
    assert (deq - w).norm() < 0.8 * (binary - w).norm()


def test_lloyd_steps_lower_the_error_of_the_seeding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 4, generator=g)
    seeded, fitted = fit_codebook(x, 32, iters=0), fit_codebook(x, 32)
    err = lambda c: float(((x - c[nearest(x, c)]) ** 2).sum())  # noqa: E731
    assert err(fitted) < 0.9 * err(seeded)


def test_pruned_entries_take_no_part_in_the_assignment():
    """With a mask the distance counts kept entries only: a decoded-and-masked vector is assigned back to a
    centroid that decodes it the same (what makes training start at the proxy's weights)."""
    book = torch.tensor([[1.0, 5.0], [1.0, -5.0], [0.0, 0.0]])
    x = torch.tensor([[1.0, 0.0]])  # second entry pruned
    assert int(nearest(x, book)) == 2  # plain distance: the zero vector
    assert int(nearest(x, book, torch.tensor([[1.0, 0.0]]))) == 0  # kept entry only: exact, lowest index
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 32, generator=g)
    mask = torch.rand(64, 32, generator=g) > 0.4
    c = CodebookConfig(4, 16)
    parts = technique("codebook").apply([Part(values=w, mask=mask)], c, LayerContext("x"))
    deq, codes, book = parts[0].values, parts[0].codes, parts[0].extra["codebook"]
    assert not deq[~mask].any()
    again = encode(deq, c, book, mask)
    assert torch.equal(again[0], deq)


def test_the_codebook_space_offers_codebooks_beside_the_tables_grids(minilm, minilm_desc):
    """In a rule's quant list, codebook labels are alternatives of the same choice: a table is encoded by a
    grid or by a codebook, never both."""
    from autocomp.space import SearchSpace, neutral_assignment

    space = SearchSpace.from_yaml("codebook", minilm_desc)
    word = "bert.embeddings.word_embeddings"
    opts = space.params[f"{word}:q"]
    assert opts[:2] == ("keep", "8c") and opts[-4:] == ("vq8x256/gptq", "vq6x256/gptq", "vq4x64/gptq", "vq4x256/gptq")
    assert f"{word}:v" not in space.params  # the codebook axis itself is not offered
    assert "vq8x256/gptq" not in space.params["bert.encoder.layer.0.output.dense:q"]
    assert space.params["bert.encoder.layer.0.output.dense:q"][-1] == "vq4x256/gptq"  # 2 bits: beats 2g64/gptq
    neutral = neutral_assignment(space)
    choice = space.decode({**neutral, f"{word}:q": "vq8x256/gptq", f"{word}:p": "u30"}).layer(word)
    assert choice.get("codebook") == CodebookConfig(8, 256, "gptq") and choice.get("quantize") is None
    assert choice.get("prune").sparsity == 0.3
    assert space.decode({**neutral, f"{word}:q": "4g64/gptq"}).layer(word).get("codebook") is None


def test_alternatives_on_an_axis_are_parsed_by_their_own_technique(tmp_path):
    from autocomp.compressors.base import option_of
    from autocomp.errors import AutocompError
    from autocomp.models.introspect import introspect
    from autocomp.space import SearchSpace
    from conftest import tiny_loaded

    q = technique("quantize")
    assert option_of(q, "vq4x16") == (technique("codebook"), CodebookConfig(4, 16))
    assert option_of(q, "4g16")[0] is q
    with pytest.raises(ValueError):
        option_of(q, "none")  # the codebook's neutral label is not an option of the quant axis
    desc = introspect(tiny_loaded())
    (tmp_path / "s.yaml").write_text("version: 1\nlayers:\n  - types: [Linear]\n    quant: [keep, 4g16, vq4x16, vq5x16]\n")
    space = SearchSpace.from_yaml(tmp_path / "s.yaml", desc)
    assert space.params["fc1:q"] == ("keep", "4g16", "vq4x16")  # 5 does not divide 32 inputs: dropped
    (tmp_path / "bad.yaml").write_text("version: 1\nlayers:\n  - types: [Linear]\n    quant: [keep, vq4]\n")
    with pytest.raises(AutocompError, match="quant"):
        SearchSpace.from_yaml(tmp_path / "bad.yaml", desc)
    # the message names the codebook's own mistake, not only the scalar grids' grammar
    with pytest.raises(ValueError, match=r"<bits>.*as a codebook option: codebook centroids must be a power of 2"):
        option_of(q, "vq4x100/gptq")


@pytest.mark.parametrize("dim,k", [(2, 16), (4, 64)])
def test_the_compensated_assignment_halves_the_output_error_of_the_nearest_one(dim, k):
    g = torch.Generator().manual_seed(dim)
    rows, cols = 96, 32
    x = (torch.randn(2000, cols, generator=g) * torch.linspace(0.2, 3.0, cols)) @ (
        torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))  # uneven, correlated inputs
    h = (x.T @ x / 2000).double()
    w = torch.randn(rows, cols, generator=g)
    deq, codes, book = encode(w, CodebookConfig(dim, k))
    comp, comp_codes = vq_gptq(w, h, book.float(), dim)
    assert torch.equal(comp, book.float()[comp_codes].reshape(rows, cols))  # decoded from the same codebook
    assert output_error(w, comp, h) < 0.75 * output_error(w, deq, h)
    same = encode_compensated(w, CodebookConfig(dim, k, "gptq"), h)
    assert torch.equal(same[2], book) and torch.equal(same[0], comp)  # the fit is encode's; the sweep assigns
    mask = torch.rand(rows, cols, generator=g) > 0.5  # with a pruning mask: pruned entries stay zero
    deq_m = encode(w * mask, CodebookConfig(dim, k), book, mask)[0]
    comp_m, _ = vq_gptq(w * mask, h, book.float(), dim, mask=mask)
    assert not comp_m[~mask].any()
    assert output_error(w * mask, comp_m, h) < output_error(w * mask, deq_m, h)
