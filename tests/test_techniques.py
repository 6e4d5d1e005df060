"""One conformance suite over every registered technique, and a technique that lives only in this file.

``Cluster`` (weight clustering: per output row, a float16 codebook of ``k`` centroids fitted by Lloyd's
algorithm, each weight stored as a log2(k)-bit index) is defined and registered here and nowhere else. The
search, the size model, the packed export, ``load`` and training accept it with no other change: the
suite runs over it like over the built-in techniques, and an end-to-end test searches, exports, loads and
trains with it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np
import pytest
import torch

import autocomp
from autocomp.compressors.apply import PlanApplier
from autocomp.compressors.calibration import CalibrationStats, plan_needs
from autocomp.compressors.codebook import CodebookConfig
from autocomp.compressors.lowrank import LowRankConfig
from autocomp.compressors.prune import PruneConfig
from autocomp.compressors.quantize import QuantConfig
from autocomp.compressors.base import (LayerContext, Part, Stored, Technique, TechniqueConfig, register, registered,
                                       unregister)
from autocomp.compressors.pipeline import pack_layer, reconstruct, run_pipeline, unpack_layer
from autocomp.compressors.student import finalize, prepare_for_training
from autocomp.cost.size import layer_bytes, plan_bytes
from autocomp.desc import LayerDesc
from autocomp.errors import AutocompError
from autocomp.models.introspect import introspect
from autocomp.packing import pack_bits, unpack_bits
from autocomp.plan import LayerPlan, Plan
from conftest import TINY, tiny_loaded


# -- a technique defined entirely in this test file -----------------------------------------------------------
@dataclass(frozen=True)
class ClusterConfig(TechniqueConfig):
    technique = "cluster"
    centroids: int = 16

    def __post_init__(self) -> None:
        if not (isinstance(self.centroids, int) and 2 <= self.centroids <= 256 and self.centroids & (self.centroids - 1) == 0):
            raise ValueError(f"centroids must be a power of 2 in 2..256, got {self.centroids!r}")

    @property
    def bits(self) -> int:
        return int(math.log2(self.centroids))


def kmeans_rows(w: Any, mask: Any, k: int, iters: int = 6) -> tuple[Any, Any, Any]:
    """Per row: ``k`` centroids (quantile start, Lloyd steps over the kept entries), rounded to float16;
    -> (decoded values, codes, codebook float16 [rows, k])."""
    kept = torch.ones_like(w, dtype=torch.bool) if mask is None else mask
    cent = torch.nan_to_num(torch.nanquantile(torch.where(kept, w, torch.nan).double(),
                                              torch.linspace(0, 1, k, dtype=torch.float64), dim=1).T.float())
    for _ in range(iters):
        codes = (w[:, :, None] - cent[:, None, :]).abs().argmin(-1)
        onehot = torch.nn.functional.one_hot(codes, k).float() * kept[..., None]
        count = onehot.sum(1)
        cent = torch.where(count > 0, (onehot * w[..., None]).sum(1) / count.clamp_min(1), cent)
    book = cent.half()
    codes = (w[:, :, None] - book.float()[:, None, :]).abs().argmin(-1)
    return torch.gather(book.float(), 1, codes) * kept, codes.to(torch.int32), book


class Cluster(Technique):
    name = "cluster"
    order = 40
    stage = "encode"
    config = ClusterConfig
    axis, dim, neutral = "cluster", "c", "none"
    title = "clustered"
    row_local = True

    def parse(self, label: str) -> Any:
        m = re.fullmatch(r"none|k(\d+)", label)
        if not m:
            raise ValueError(f"cluster option {label!r} is not none or kN (N centroids per row)")
        return None if label == "none" else ClusterConfig(int(m.group(1)))

    def bind(self, option: ClusterConfig, layer: Any, shapes: list[tuple[int, int]]) -> ClusterConfig | None:
        return option

    def label(self, c: ClusterConfig) -> str:
        return f"k{c.centroids}"

    def summary(self, c: ClusterConfig) -> dict[str, float]:
        return {"bits": c.bits}

    def stored(self, c: ClusterConfig, stored: list[Stored]) -> list[Stored]:
        return [replace(s, value_bits=c.bits, meta_bytes=s.meta_bytes + s.rows * c.centroids * 2) for s in stored]

    def apply(self, parts: list[Part], c: ClusterConfig, ctx: LayerContext) -> list[Part]:
        out = []
        for p in parts:
            values, codes, book = kmeans_rows(p.values, p.mask, c.centroids)
            out.append(p.evolve(values=values, codes=codes, extra={"codebook": book}))
        return out

    def pack(self, c: ClusterConfig, part: Part, key: str, out: dict[str, Any], state: dict[str, Any]) -> None:
        sel = state.get("selection")
        codes = part.codes.numpy()
        out[f"{key}.codes"] = pack_bits(codes[sel] if sel is not None else codes.reshape(-1), c.bits)
        out[f"{key}.codebook"] = part.extra["codebook"].numpy().reshape(-1)
        state["encoded"] = True

    def unpack(self, c: ClusterConfig, arrays: Mapping[str, Any], key: str, rows: int, cols: int,
               state: dict[str, Any]) -> None:
        mask = state.get("mask")
        mask = np.ones((rows, cols), dtype=bool) if mask is None else mask
        codes = np.zeros((rows, cols), dtype=np.int64)
        codes[mask] = unpack_bits(arrays[f"{key}.codes"], c.bits, int(mask.sum()))
        book = arrays[f"{key}.codebook"].astype(np.float32).reshape(rows, c.centroids)
        values = np.take_along_axis(book, codes, 1)
        values[~mask] = 0.0
        state["values"] = values


@pytest.fixture(scope="module", autouse=True)
def cluster_registered():
    register(Cluster)
    yield
    unregister("cluster")


# -- examples of every technique, alone and composed ------------------------------------------------------------
EXAMPLES = {  # built when a test runs (the plug-in registers for this module only)
    "lowrank": [lambda: LayerPlan(rank=8), lambda: LayerPlan(rank=8, bits=4, group_size=16),
                lambda: LayerPlan(LowRankConfig(8, "aa")),
                lambda: LayerPlan(LowRankConfig(8, "aa"), QuantConfig(4, 16, method="gptq"))],
    "prune": [lambda: LayerPlan(prune="unstructured", sparsity=0.5), lambda: LayerPlan(prune="2:4", bits=5, symmetric=False),
              lambda: LayerPlan(PruneConfig("unstructured", 0.5, "sparsegpt")),
              lambda: LayerPlan(PruneConfig("2:4", method="sparsegpt"), QuantConfig(3, 16, False, method="gptq")),
              lambda: LayerPlan(PruneConfig("unstructured", 0.3, "sparsegpt"), LowRankConfig(8))],
    "quantize": [lambda: LayerPlan(bits=3, group_size=16, symmetric=False), lambda: LayerPlan(bits=8, act_bits=8),
                 lambda: LayerPlan(bits=2, rank=8, prune="unstructured", sparsity=0.3),
                 lambda: LayerPlan(QuantConfig(3, 0, method="gptq")),
                 lambda: LayerPlan(QuantConfig(4, 16, False, method="gptq"), PruneConfig("unstructured", 0.4)),
                 lambda: LayerPlan(QuantConfig(8, 0, True, 8, method="gptq")),
                 lambda: LayerPlan(QuantConfig(3, 16, False, method="mse"), PruneConfig("unstructured", 0.3)),
                 lambda: LayerPlan(QuantConfig(8, 0, True, 8, reduce_range=False), PruneConfig("2:4"))],  # int8f
    "codebook": [lambda: LayerPlan(CodebookConfig(4, 16)),
                 lambda: LayerPlan(CodebookConfig(4, 8), PruneConfig("unstructured", 0.4), LowRankConfig(8)),
                 lambda: LayerPlan(CodebookConfig(4, 16, "gptq")),
                 lambda: LayerPlan(CodebookConfig(4, 8, "gptq"), PruneConfig("unstructured", 0.4, "sparsegpt"),
                                   LowRankConfig(8, "aa"))],
    "cluster": [lambda: LayerPlan(ClusterConfig(16)),
                lambda: LayerPlan(ClusterConfig(4), PruneConfig("unstructured", 0.4), LowRankConfig(8))],
}


def example(case: tuple[str, int]) -> LayerPlan:
    return EXAMPLES[case[0]][case[1]]()


def test_every_registered_technique_has_a_conformance_case():
    assert {t.name for t in registered()} == set(EXAMPLES)


def _cases() -> list[tuple[str, int]]:
    return [(name, i) for name, plans in EXAMPLES.items() for i in range(len(plans))]


def _ids(case: tuple[str, int]) -> str:
    return f"{case[0]}-{case[1]}"


@pytest.mark.parametrize("case", _cases(), ids=_ids)
@pytest.mark.parametrize("shape", [(16, 32), (24, 52)])
def test_predicted_bytes_equal_packed_bytes_and_decode_exactly(case, shape):
    choice = example(case)
    rows, cols = shape
    if choice.get("prune") is not None and choice.get("prune").kind == "2:4" and cols % 4:
        pytest.skip("2:4 needs inputs divisible by 4")
    g = torch.Generator().manual_seed(rows * cols)
    w, bias = torch.randn(rows, cols, generator=g), torch.randn(rows, generator=g)
    x = torch.randn(200, cols, generator=g) @ torch.randn(cols, cols, generator=g)  # correlated inputs
    stats = CalibrationStats({"x": (x.T @ x / 200).float()}, "k", {"x": 200})
    parts = run_pipeline(w, choice, LayerContext("x", stats=stats))
    arrays = pack_layer("x", parts, choice, bias=bias)
    desc = LayerDesc(name="x", type="Linear", rows=rows, cols=cols, bias=rows)
    assert sum(a.nbytes for a in arrays.values()) == layer_bytes(desc, choice)
    assert np.array_equal(unpack_layer(arrays, "x", choice, rows, cols), reconstruct(parts).numpy())


def _calibrated(loaded, plan):
    """Compensated examples need the model's calibration statistics attached."""
    if plan_needs(plan):
        autocomp.calibrate(loaded.module, loaded.batches)
    return loaded


def _plan(desc, choice):
    return Plan(layers={n: choice for n in ("fc1", "fc2", "head")}, fingerprint=desc.fingerprint,
                model_spec=f"{TINY}:tiny", model_name="tiny")


@pytest.mark.parametrize("case", _cases(), ids=_ids)
def test_apply_then_undo_is_bit_exact(case):
    loaded = tiny_loaded()
    desc = introspect(loaded)
    _calibrated(loaded, _plan(desc, example(case)))
    before = {n: (p.detach().clone(), p.data_ptr()) for n, p in loaded.module.named_parameters()}
    b = loaded.batches[0]
    with torch.no_grad():
        ref = loaded.module(b)
        with PlanApplier(loaded.module, desc).applied(_plan(desc, example(case))):
            assert not torch.equal(loaded.module(b), ref)
        assert torch.equal(loaded.module(b), ref)
    for n, p in loaded.module.named_parameters():
        assert torch.equal(p, before[n][0]) and p.data_ptr() == before[n][1], n


@pytest.mark.parametrize("case", _cases(), ids=_ids)
def test_trainable_form_equals_proxy_at_step_0_and_export_round_trips(case, tmp_path):
    loaded = tiny_loaded()
    desc = introspect(loaded)
    plan = _plan(desc, example(case))
    _calibrated(loaded, plan)
    b = loaded.batches[0]
    student = prepare_for_training(loaded.module, plan, desc)
    with torch.no_grad():
        with PlanApplier(loaded.module, desc).applied(plan):
            proxy = loaded.module(b)
        trained_form = student(b)
        plain = finalize(student)(b)
    tol = 1e-5 * proxy.abs().max()
    assert (trained_form - proxy).abs().max() <= tol and (plain - proxy).abs().max() <= tol
    r = autocomp.export(student, plan, tmp_path / "m.acz.safetensors", spec=f"{TINY}:tiny", data_spec=f"{TINY}:calib")
    assert r["payload_bytes"] == r["predicted_bytes"] == plan_bytes(desc, plan)
    with torch.no_grad():
        back = autocomp.load(tmp_path / "m.acz.safetensors")(b)
    assert (back - proxy).abs().max() <= tol


@pytest.mark.parametrize("case", [c for c in _cases() if c[0] in ("lowrank", "quantize")], ids=_ids)
def test_runtime_lowering_matches_the_simulation(case):
    """Techniques with real kernels (low rank: two matmuls; W8A8: torch's int8 Linear) against the proxy."""
    from autocomp.runtime import build_runtime_model

    loaded = tiny_loaded()
    desc = introspect(loaded)
    plan = _plan(desc, example(case))
    _calibrated(loaded, plan)
    applier = PlanApplier(loaded.module, desc)
    rt = build_runtime_model(loaded.module, desc, plan, applier)
    b = loaded.batches[0]
    with torch.inference_mode():
        with applier.applied(plan):
            sim = loaded.module(b)
        ref = loaded.module(b)
        real = rt(b)
    q = example(case).get("quantize")
    int8 = q is not None and q.act_bits == 8 and q.reduce_range  # int8f runs as simulated, in float
    # W8A8: each layer matches its simulation, but one activation-code flip propagates (see runtime.py)
    assert (real - sim).abs().max() <= (0.05 * ref.abs().max() if int8 else 1e-4)


@pytest.mark.parametrize("case", _cases(), ids=_ids)
def test_onnx_runtime_matches_the_simulation(case, tmp_path):
    """Every technique exported to ONNX and run by ONNX Runtime (autocomp/ort.py): the simulated model's outputs
    to float rounding; a technique with an integer kernel runs on it (the test file's Cluster: dense)."""
    from autocomp.ort import OrtModel, export_onnx

    loaded = tiny_loaded()
    desc = introspect(loaded)
    plan = _plan(desc, example(case))
    _calibrated(loaded, plan)
    b = loaded.batches[0]
    r = export_onnx(loaded.module, desc, plan, tmp_path / "m.onnx", b, accuracy_level=0)  # float compute: exact
    assert r["predicted_bytes"] == plan_bytes(desc, plan) and r["file_bytes"] == (tmp_path / "m.onnx").stat().st_size
    with torch.inference_mode():
        with PlanApplier(loaded.module, desc).applied(plan):
            sim = loaded.module(b)
        ref = loaded.module(b)
    real = OrtModel(tmp_path / "m.onnx")(b)
    q, book = example(case).get("quantize"), example(case).get("codebook")
    assert (real - sim).abs().max() <= 1e-4 * sim.abs().max()
    if book is not None:  # decoded in the graph from the stored indices, codebook and (pruned) mask bitmap
        assert r["kernels"] == {"Codebook": 3 * len(example(case).get("lowrank") and [0, 1] or [0])}, r
        assert not r["notes"].get("sparsity stored as zeros (ORT has no sparse kernel)"), r
    elif q is not None and q.act_bits == 8:  # W8A8 on either activation grid, exactly (int8: 7 bits, int8f: 8)
        assert r["kernels"] == {"MatMulInteger": 3}
    elif q is not None and q.bits <= 8:
        n = 3 * len(example(case).get("lowrank") and [0, 1] or [0])
        assert r["kernels"] == {"MatMulNBits": n}, r
    else:
        assert r["kernels"] == {}


# -- the test-file technique through the whole tool ------------------------------------------------------------------
def test_a_plugin_technique_is_searched_exported_loaded_and_trained(tmp_path):
    from autocomp.engine import SearchConfig, open_study, plan_of, run_search
    from autocomp.training import train

    space = tmp_path / "cluster.yaml"
    space.write_text("version: 1\nlayers:\n  - types: [Linear]\n    cluster: [none, k16, k4]\n"
                     "    prune: [none, u50]\n  - types: [Embedding]\n    quant: [keep, 4g16]\n")
    studies = tmp_path / "studies"
    cfg = SearchConfig(budget="60%", model=f"{TINY}:tiny", data=f"{TINY}:calib", study="cl", space=str(space),
                       trials=14, seeds="uniform", studies_dir=studies)
    result = run_search(cfg)
    assert result["pareto"] and all(e["size_bytes"] <= result["budget_bytes"] for e in result["pareto"])
    handle = open_study("cl", None, studies)
    plans = [plan_of(t, handle) for t in handle.study.get_trials() if "plan" in t.user_attrs]
    used = [p for p in plans if any(c.get("cluster") for c in p.layers.values())]
    assert used, "no trial used the plug-in technique"
    plan = min(used, key=lambda p: p.metrics["proxy"])
    assert plan.to_dict()["techniques"]["cluster"] == 1 and "k" in plan.summary()
    loaded = tiny_loaded()
    desc = introspect(loaded)
    assert plan.metrics["size_bytes"] == plan_bytes(desc, plan)
    # export the untrained plan: exactly the predicted bytes, and load gives what the search scored
    out = tmp_path / "p.acz.safetensors"
    r = autocomp.export(loaded.module, plan, out, spec=f"{TINY}:tiny", data_spec=f"{TINY}:calib")
    assert r["payload_bytes"] == r["predicted_bytes"] == plan.metrics["size_bytes"]
    b = loaded.batches[0]
    with torch.no_grad():
        with PlanApplier(loaded.module, desc).applied(plan):
            sim = loaded.module(b)
        assert (autocomp.load(out)(b) - sim).abs().max() <= 1e-5 * sim.abs().max()
    # train two steps through the plug-in's straight-through form, then export the trained student
    res = train(loaded, plan, desc, 2, tmp_path / "t.safetensors", loaded.batches, clip="minmax")
    r2 = autocomp.export(res["student"], plan, tmp_path / "t.acz.safetensors", spec=f"{TINY}:tiny",
                         data_spec=f"{TINY}:calib")
    assert r2["payload_bytes"] == plan.metrics["size_bytes"]
    with torch.no_grad():
        want = finalize(res["student"])(b)
        assert (autocomp.load(tmp_path / "t.acz.safetensors")(b) - want).abs().max() <= 1e-5 * want.abs().max()
    # a plan that names a technique this installation lacks is one clear error
    d = plan.to_dict()
    unregister("cluster")
    try:
        with pytest.raises(AutocompError, match="technique 'cluster' is not registered"):
            Plan.from_dict(json.loads(json.dumps(d)))
    finally:
        register(Cluster)


def test_registration_is_checked():
    class Clash(Cluster):
        name = "clash"

        class config(ClusterConfig):  # noqa: N801
            technique = "clash"

    with pytest.raises(TypeError, match="axis 'cluster' / dim 'c' taken by cluster"):
        register(Clash)

    class NoStage(Cluster):
        name = "nostage"
        stage = "weird"

    with pytest.raises(TypeError, match="stage must be one of"):
        register(NoStage)


def test_two_encoders_on_one_layer_are_refused(tmp_path):
    with pytest.raises(AutocompError, match="one encode technique"):
        LayerPlan(ClusterConfig(4), QuantConfig(4))
    bad = tmp_path / "s.yaml"
    bad.write_text("version: 1\nlayers:\n  - quant: [keep, 8c]\n    cluster: [none, k4]\n")
    from autocomp.space import SearchSpace

    with pytest.raises(AutocompError, match="quant and cluster both encode"):
        SearchSpace.from_yaml(bad, introspect(tiny_loaded()))
