"""Plans lowered to ONNX Runtime: ``autocomp export --format onnx`` and ``autocomp.load(path, runtime="ort")``.

The export first builds the plan's runtime model (:func:`autocomp.runtime.build_runtime_model`, every leaf a
dense Linear): structured pruning as physically smaller matrices, low rank as two matmuls, every other
weight as its decoded values (unstructured and 2:4 zeros stored as zeros). torch's exporter traces it
(dynamic batch and sequence axes, the original model's input names). Then each weight the plan quantized is
found in the graph by its content -- the initializer a ``MatMul`` / ``Gemm`` / ``Gather`` reads is exactly
the decoded matrix (or its transpose) -- and the node is replaced by the kernel its technique names
(:meth:`~autocomp.compressors.base.Technique.onnx_weight`):

* weight-only 2..8-bit layers -> ``com.microsoft::MatMulNBits`` on the plan's own codes, scales and zero
  points (3-bit codes in 4-bit containers, 5..7-bit in 8-bit: the same values, more bytes);
* W8A8 layers -> ``MatMulInteger`` on activations quantized per tensor at run time, per-row scales:
  ``int8f`` with ``DynamicQuantizeLinear`` and uint8 weights, ``int8`` on a 7-bit grid the graph computes,
  so that no CPU's u8 x s8 path saturates (:func:`_lower_w8a8`); ``int8f`` with int8 weights for the faster
  u8 x s8 kernel of CPUs with VNNI where the export is asked for it (``int8_kernel="vnni"``);
* quantized embedding tables -> ``com.microsoft::GatherBlockQuantized``: rows gathered from the packed
  codes and dequantized per lookup (the table stays packed in memory);
* codebook layers (no ONNX Runtime kernel reads a codebook) -> their packed indices and float16 codebook,
  decoded by ordinary ONNX ops (:func:`_lower_codebook`): a matrix feeds its ``MatMul`` / ``Gemm`` from a
  decoding subgraph of constants only, which ONNX Runtime folds into the dense float32 matrix when it builds
  the session (small file; dense speed and memory), a table gathers the packed index rows of the looked-up
  tokens and decodes only them (the table stays packed in memory);
  a pruned codebook layer's mask is a bitmap the decoding multiplies by;
* everything else dense float32: Conv layers, weights above 8 bits, groups no kernel block divides.

Scales are float32 in ORT's kernels (float16 in autocomp's packed format) and a per-channel scale repeats
per block, so the file is somewhat larger than the plan's predicted bytes; the JSON reports both.
Parity (tests/test_ort.py): the ORT model's outputs equal the simulated model's (``apply_plan``) to float
rounding (max |difference| <= 1e-4 x max |output|) for every technique, W8A8 included: ``int8f`` on ORT's
8-bit ``DynamicQuantizeLinear`` grid (what a ``--hardware ort-cpu`` search proposes), ``int8`` on the 7-bit
grid of torch's x86 kernel, quantized by the graph itself (:func:`_lower_w8a8`).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

from autocomp.errors import AutocompError

__all__ = ["export_onnx", "OrtModel", "ONNX_FORMAT", "INT8_KERNELS", "cpu_has_vnni"]

ONNX_FORMAT = "autocomp-onnx-1"
INT8_KERNELS = ("portable", "vnni")  # how W8A8 weights are stored: u8 x u8 (exact everywhere) / u8 x s8 (VNNI)
OPSET = 18
MS_DOMAIN = "com.microsoft"


def _require() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise AutocompError("ONNX export needs onnx and onnxruntime: pip install 'autocomp[deploy]' "
                            "(make setup installs them)") from None
    return onnx, onnxruntime


# -- tracing ----------------------------------------------------------------------------------------------
def cpu_has_vnni() -> bool | None:
    """Whether this CPU has x86's VNNI instructions (``avx512_vnni`` / ``avx_vnni``), on which ONNX Runtime's
    u8 x s8 ``MatMulInteger`` sums in 32 bits; False on an x86 CPU without them (its u8 x s8 path sums pairs
    in 16 bits and saturates); None where this cannot be read (not Linux) or the CPU is not x86."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _flatten_output(out: Any, default: str) -> tuple[list[str], list[Any]]:
    """(names, tensors) of a model output: a tensor, a dict / ModelOutput of tensors, or a tuple."""
    import torch

    if isinstance(out, torch.Tensor):
        return [default], [out]
    if isinstance(out, dict) or hasattr(out, "keys"):
        items = [(str(k), v) for k, v in out.items() if isinstance(v, torch.Tensor)]
        return [k for k, _ in items], [v for _, v in items]
    if isinstance(out, (tuple, list)):
        items = [(f"output_{i}", v) for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
        return [k for k, _ in items], [v for _, v in items]
    raise AutocompError(f"the model returns {type(out).__name__}; ONNX export needs a tensor, a dict of "
                        f"tensors or a tuple of tensors")


def _inputs(batch: Any) -> tuple[list[str], list[Any], str]:
    import torch

    if isinstance(batch, dict):
        names = [k for k, v in batch.items() if isinstance(v, torch.Tensor)]
        if len(names) != len(batch):
            raise AutocompError("ONNX export needs every input of a calibration batch to be a tensor")
        return names, [batch[k] for k in names], "dict"
    if isinstance(batch, (tuple, list)):
        return [f"input_{i}" for i in range(len(batch))], list(batch), "tuple"
    return ["input"], [batch], "tensor"


def _trace(module: Any, batch: Any, output_name: str) -> tuple[Any, list[str], list[str], str, str]:
    """-> (ModelProto, input names, output names, input kind, output kind) for ``module`` on ``batch``."""
    import onnx
    import torch

    from autocomp.models.base import run_batch

    in_names, tensors, in_kind = _inputs(batch)
    with torch.inference_mode():
        out = run_batch(module, batch)
    out_names, _ = _flatten_output(out, output_name)
    out_kind = "tensor" if isinstance(out, torch.Tensor) else "dict" if hasattr(out, "keys") else "tuple"

    class Flat(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, *xs: Any) -> Any:
            b = dict(zip(in_names, xs)) if in_kind == "dict" else list(xs) if in_kind == "tuple" else xs[0]
            return tuple(_flatten_output(run_batch(self.m, b), output_name)[1])

    axes: dict[str, dict[int, str]] = {}
    for name, t in zip(in_names, tensors):
        dims = {0: "batch"} if t.dim() >= 1 else {}
        if t.dim() >= 2 and not t.is_floating_point():  # token ids, masks: batch x sequence
            dims[1] = "sequence"
        axes[name] = dims
    for name in out_names:
        axes[name] = {0: "batch"}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:  # torch's TorchScript-based exporter: seconds for MiniLM (the dynamo exporter: ~6x slower)
            torch.onnx.export(Flat(module), tuple(tensors), buf, input_names=in_names, output_names=out_names,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
        except Exception as first:  # noqa: BLE001 - any exporter failure: try the other exporter once
            try:
                buf = io.BytesIO()
                prog = torch.onnx.export(Flat(module), tuple(tensors), input_names=in_names, output_names=out_names,
                                         dynamic_axes=axes, opset_version=OPSET, dynamo=True, verbose=False)
                return prog.model_proto, in_names, out_names, in_kind, out_kind
            except Exception as second:  # noqa: BLE001
                raise AutocompError(f"torch could not export this model to ONNX ({type(first).__name__}: "
                                    f"{str(first).splitlines()[0][:200]}; dynamo exporter: {type(second).__name__}: "
                                    f"{str(second).splitlines()[0][:200]})") from None
    return onnx.load_from_string(buf.getvalue()), in_names, out_names, in_kind, out_kind


# -- lowering ---------------------------------------------------------------------------------------------
def _digest(a: Any) -> str:
    import numpy as np

    a = np.ascontiguousarray(a, dtype=np.float32)
    return f"{a.shape}:" + hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


def _pack(codes: Any, bits: int) -> Any:
    """Codes along the last axis, low bits first (the ONNX Runtime kernels' layout)."""
    import numpy as np

    per = 8 // bits
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per)
    out = np.zeros(c.shape[:-1], np.uint8)
    for i in range(per):
        out |= (c[..., i] << (i * bits)).astype(np.uint8)
    return out


def _padded(a: Any, width: int, fill: Any) -> Any:
    import numpy as np

    if a.shape[-1] == width:
        return a
    pad = np.broadcast_to(np.asarray(fill)[..., None] if np.ndim(fill) else fill, (*a.shape[:-1], width - a.shape[-1]))
    return np.concatenate([a, pad.astype(a.dtype)], axis=-1)


def _zero_points(zp: Any, bits: int) -> Any:
    """Per-row packed zero points, each row padded to whole bytes."""
    import numpy as np

    per = 8 // bits
    width = -(-zp.shape[1] // per) * per
    return _pack(_padded(zp.astype(np.int64), width, 0), bits)


class _Graph:
    """The exported graph being lowered: new nodes and initializers, dead ones swept at the end.
    ``int8_kernel``: how W8A8 layers are stored (:data:`INT8_KERNELS`, :func:`_lower_w8a8`)."""

    def __init__(self, model: Any, int8_kernel: str = "portable") -> None:
        if int8_kernel not in INT8_KERNELS:
            raise AutocompError(f"int8 kernel must be one of {', '.join(INT8_KERNELS)}, got {int8_kernel!r}")
        self.int8_kernel = int8_kernel
        self.model = model
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.added: dict[str, Any] = {}
        self.counter = 0

    def init(self, name: str, array: Any) -> str:
        from onnx import numpy_helper

        if name not in self.added:
            self.added[name] = numpy_helper.from_array(array, name)
        return name

    def tmp(self, stem: str) -> str:
        self.counter += 1
        return f"autocomp/{stem}_{self.counter}"


def _lower_matmul(gr: _Graph, a: str, out: str, w: Any, key: str, n: int, k: int, accuracy: int = 0) -> list[Any]:
    import numpy as np
    from onnx import TensorProto, helper

    if w.op == "MatMulInteger":
        return _lower_w8a8(gr, a, out, w, key)
    bits, block = w.bits, w.block
    n_blocks = -(-k // block)
    zp_fill = w.zero_points[:, -1] if w.zero_points is not None else (1 << (bits - 1))
    codes = _padded(w.codes, n_blocks * block, zp_fill).reshape(n, n_blocks, block)
    inputs = [a, gr.init(f"{key}.qweight", _pack(codes, bits)),
              gr.init(f"{key}.scales", np.ascontiguousarray(w.scales.astype(np.float32).reshape(-1)))]
    if w.zero_points is not None:
        inputs.append(gr.init(f"{key}.zero_points", _zero_points(w.zero_points, bits).reshape(-1)))
    return [helper.make_node("MatMulNBits", inputs, [out], domain=MS_DOMAIN, K=k, N=n, bits=bits,
                             block_size=block, accuracy_level=accuracy)]


def _lower_w8a8(gr: _Graph, a: str, out: str, w: Any, key: str) -> list[Any]:
    """W8A8 as ``MatMulInteger`` on activations quantized per tensor at run time, computing exactly what the
    simulation does on every x86 CPU. ORT's u8 x s8 path on AVX2 / AVX-512 without VNNI sums pairs of products
    in 16 bits (``vpmaddubsw``) and saturates on full-range activations: measured on an AVX2 EPYC, 12-75% of
    the output's range off. So:

    * ``act_grid`` 255 (``int8f``): ``DynamicQuantizeLinear`` and the weights stored as uint8 codes ``q + 128``
      against a zero point of 128 (u8 x u8: ORT's exact path everywhere; 1.2x the time of u8 x s8 there, 1.3x
      faster than fp32 at 128 x 384 -> 1536);
      with ``gr.int8_kernel == "vnni"`` the weights are stored as int8 codes with no zero point (u8 x s8):
      the same integers, exact on CPUs with VNNI (``vpdpbusd`` sums in 32 bits), and there 1.4-2.7x faster
      than u8 x u8 on MiniLM's shapes (Zen 4, docs/BENCHMARKS.md); a file made so is refused by
      :class:`OrtModel` on an x86 CPU without VNNI;
    * ``act_grid`` 127 (``int8``): the graph quantizes the activations to 7 bits itself (``ReduceMin`` /
      ``ReduceMax``, ``Round``, ``Clip``: the simulation's formula), and int8 weights: two 7-bit x 7-bit
      products cannot saturate 16 bits."""
    import numpy as np
    from onnx import TensorProto, helper

    ws = gr.init(f"{key}.scale", w.scales.astype(np.float32))
    xq, xs, xz, acc, acc_f, sc = (gr.tmp(s) for s in ("xq", "xs", "xz", "acc", "accf", "scale"))
    if w.act_grid == 255 and gr.int8_kernel == "vnni":
        wq = gr.init(f"{key}.qweight", np.ascontiguousarray(w.codes.T.astype(np.int8)))
        nodes = [helper.make_node("DynamicQuantizeLinear", [a], [xq, xs, xz]),
                 helper.make_node("MatMulInteger", [xq, wq, xz], [acc])]
    elif w.act_grid == 255:
        wq = gr.init(f"{key}.qweight", np.ascontiguousarray((w.codes.T.astype(np.int16) + 128).astype(np.uint8)))
        wz = gr.init("autocomp/u8_128", np.array(128, np.uint8))
        nodes = [helper.make_node("DynamicQuantizeLinear", [a], [xq, xs, xz]),
                 helper.make_node("MatMulInteger", [xq, wq, xz, wz], [acc])]
    elif w.act_grid == 127:
        wq = gr.init(f"{key}.qweight", np.ascontiguousarray(w.codes.T))  # int8 [K, N]
        zero, top, tiny = (gr.init(f"autocomp/{n}", np.array(v, np.float32))
                           for n, v in (("f0", 0.0), ("f127", 127.0), ("f1e-12", 1e-12)))
        mn, mx, lo, hi, rg, s0, nlo, z0, zf, xd, xr, xa, xc = (gr.tmp(s) for s in (
            "min", "max", "lo", "hi", "range", "s0", "nlo", "z0", "zf", "xd", "xr", "xa", "xc"))
        nodes = [helper.make_node("ReduceMin", [a], [mn], keepdims=0),
                 helper.make_node("ReduceMax", [a], [mx], keepdims=0),
                 helper.make_node("Min", [mn, zero], [lo]), helper.make_node("Max", [mx, zero], [hi]),
                 helper.make_node("Sub", [hi, lo], [rg]), helper.make_node("Div", [rg, top], [s0]),
                 helper.make_node("Max", [s0, tiny], [xs]),
                 helper.make_node("Neg", [lo], [nlo]), helper.make_node("Div", [nlo, xs], [z0]),
                 helper.make_node("Round", [z0], [zf]),
                 helper.make_node("Div", [a, xs], [xd]), helper.make_node("Round", [xd], [xr]),
                 helper.make_node("Add", [xr, zf], [xa]), helper.make_node("Clip", [xa, zero, top], [xc]),
                 helper.make_node("Cast", [xc], [xq], to=TensorProto.UINT8),
                 helper.make_node("Cast", [zf], [xz], to=TensorProto.UINT8),
                 helper.make_node("MatMulInteger", [xq, wq, xz], [acc])]
    else:
        raise ValueError(f"act_grid must be 255 or 127, got {w.act_grid}")
    return nodes + [helper.make_node("Cast", [acc], [acc_f], to=TensorProto.FLOAT),
                    helper.make_node("Mul", [xs, ws], [sc]),
                    helper.make_node("Mul", [acc_f, sc], [out])]


def _lower_gather(gr: _Graph, indices: str, out: str, w: Any, key: str) -> list[Any]:
    import numpy as np
    from onnx import helper

    inputs = [gr.init(f"{key}.qweight", _pack(w.codes, w.bits)), indices,
              gr.init(f"{key}.scales", np.ascontiguousarray(w.scales.astype(np.float32)))]
    if w.zero_points is not None:
        inputs.append(gr.init(f"{key}.zero_points", _zero_points(w.zero_points, w.bits)))
    return [helper.make_node("GatherBlockQuantized", inputs, [out], domain=MS_DOMAIN, gather_axis=0,
                             quantize_axis=1, block_size=w.block, bits=w.bits)]


def _row_packed(codes: Any, bits: int) -> Any:
    """Indices ``[rows, m]`` packed per row in autocomp's bit order (a little-endian bit stream: index i at
    bits ``i * bits ...``), each row padded with zero bits to whole bytes -> uint8 ``[rows, ceil(m * bits / 8)]``."""
    import numpy as np

    rows, m = codes.shape
    if bits == 8:
        return codes.astype(np.uint8)
    planes = ((codes.astype(np.uint32)[:, :, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    stream = np.zeros((rows, -(-m * bits // 8) * 8), np.uint8)
    stream[:, :m * bits] = planes.reshape(rows, -1)
    return np.packbits(stream, axis=1, bitorder="little")


def _unpack_last(gr: _Graph, packed: str, bits: int, m: int, width: int, out: str) -> list[Any]:
    """Nodes: the ``m`` int32 indices of each row of ``packed`` (uint8, ``width`` bytes along its last axis,
    any leading axes) -> ``out``. Index i starts at bit ``i * bits``: the (up to 3) bytes it spans are
    gathered, summed little-endian, divided by ``2^shift`` and reduced modulo ``2^bits``. A byte past the
    row's end is clamped to its last byte: the bits it would give are above the index and reduced away."""
    import numpy as np
    from onnx import TensorProto, helper

    if bits == 8:
        return [helper.make_node("Cast", [packed], [out], to=TensorProto.INT32)]
    start = np.arange(m, dtype=np.int64) * bits
    byte, shift = start // 8, start % 8
    spans = int(((shift + bits + 7) // 8).max())
    stem = f"autocomp/vq{bits}x{m}in{width}"
    nodes, total = [], None
    for j in range(spans):
        pos = gr.init(f"{stem}_byte{j}", np.minimum(byte + j, width - 1))
        raw, val = gr.tmp("vqbyte"), gr.tmp("vqint")
        nodes += [helper.make_node("Gather", [packed, pos], [raw], axis=-1),
                  helper.make_node("Cast", [raw], [val], to=TensorProto.INT32)]
        if j:
            scaled = gr.tmp("vqint")
            nodes.append(helper.make_node("Mul", [val, gr.init(f"autocomp/i32_{1 << 8 * j}",
                                                                np.array(1 << 8 * j, np.int32))], [scaled]))
            val = scaled
        if total is not None:
            summed = gr.tmp("vqint")
            nodes.append(helper.make_node("Add", [total, val], [summed]))
            val = summed
        total = val
    if shift.any():
        shifted = gr.tmp("vqint")
        nodes.append(helper.make_node("Div", [total, gr.init(f"{stem}_shift", (1 << shift).astype(np.int32))],
                                      [shifted]))
        total = shifted
    nodes.append(helper.make_node("Mod", [total, gr.init(f"autocomp/i32_{1 << bits}", np.array(1 << bits, np.int32))],
                                  [out]))
    return nodes


def _lower_codebook(gr: _Graph, w: Any, key: str, indices: str | None, out: str, transposed: bool = False) -> list[Any]:
    """Nodes decoding a codebook layer (:class:`OnnxWeight` ``Codebook``) -> ``out``. ``indices`` None: the
    whole matrix (``[rows, cols]``, or ``[cols, rows]`` when ``transposed``), from constants only, so ONNX
    Runtime folds it when it builds the session; else a table's rows at ``indices`` (``[..., cols]``), the
    packed index rows gathered first and only they decoded, at run time."""
    import numpy as np
    from onnx import TensorProto, helper

    rows, m = w.codes.shape
    cols = m * w.block
    packed = _row_packed(w.codes, w.bits)
    codes = gr.init(f"{key}.vqcodes", packed)
    book = gr.init(f"{key}.codebook", np.ascontiguousarray(w.scales.astype(np.float16)))
    book32, ix, vectors = gr.tmp("vqbook"), gr.tmp("vqindex"), gr.tmp("vqvectors")
    nodes = [helper.make_node("Cast", [book], [book32], to=TensorProto.FLOAT)]
    bitmap = None if w.mask is None else gr.init(f"{key}.mask", _row_packed(w.mask.astype(np.int64), 1))

    def masked(rows_of_mask: str, decoded: str, result: str) -> list[Any]:
        """``decoded`` times the kept positions of the bitmap rows ``rows_of_mask`` -> ``result``."""
        bit, keep = gr.tmp("vqbit"), gr.tmp("vqkeep")
        return (_unpack_last(gr, rows_of_mask, 1, cols, -(-cols // 8), bit)
                + [helper.make_node("Cast", [bit], [keep], to=TensorProto.FLOAT),
                   helper.make_node("Mul", [decoded, keep], [result])])

    if indices is None:
        nodes += _unpack_last(gr, codes, w.bits, m, packed.shape[1], ix)
        nodes.append(helper.make_node("Gather", [book32, ix], [vectors], axis=0))
        dense = gr.tmp("vqdense") if transposed else out
        full = gr.tmp("vqfull") if bitmap is not None else dense
        nodes.append(helper.make_node("Reshape", [vectors, gr.init(f"autocomp/shape_{rows}x{cols}",
                                                                   np.array([rows, cols], np.int64))], [full]))
        if bitmap is not None:
            nodes += masked(bitmap, full, dense)
        if transposed:
            nodes.append(helper.make_node("Transpose", [dense], [out], perm=[1, 0]))
        return nodes
    picked, shape, target = gr.tmp("vqrows"), gr.tmp("vqshape"), gr.tmp("vqtarget")
    full = gr.tmp("vqfull") if bitmap is not None else out
    nodes += [helper.make_node("Gather", [codes, indices], [picked], axis=0)]
    nodes += _unpack_last(gr, picked, w.bits, m, packed.shape[1], ix)
    nodes += [helper.make_node("Gather", [book32, ix], [vectors], axis=0),
              helper.make_node("Shape", [indices], [shape]),
              helper.make_node("Concat", [shape, gr.init(f"autocomp/cols_{cols}", np.array([cols], np.int64))],
                               [target], axis=0),
              helper.make_node("Reshape", [vectors, target], [full])]
    if bitmap is not None:
        mask_rows = gr.tmp("vqmaskrows")
        nodes.append(helper.make_node("Gather", [bitmap, indices], [mask_rows], axis=0))
        nodes += masked(mask_rows, full, out)
    return nodes


def _lower(model: Any, lowerings: dict[str, tuple[str, Any]], accuracy: int = 0,
           int8_kernel: str = "portable") -> dict[str, Any]:
    """Replace every node whose weight initializer is a quantized layer's decoded matrix. ``lowerings``:
    digest of the matrix as the graph holds it ([N, K] or [K, N]) -> (key, OnnxWeight)."""
    from onnx import helper, numpy_helper

    gr = _Graph(model, int8_kernel)
    shapes = {d.split(":")[0] for d in lowerings}
    digests: dict[str, str | None] = {}

    def match(name: str) -> tuple[str, Any] | None:
        t = gr.inits.get(name)
        if t is None or str(tuple(t.dims)) not in shapes:
            return None
        if name not in digests:
            digests[name] = _digest(numpy_helper.to_array(t))
        return lowerings.get(digests[name] or "")

    done: dict[str, int] = {}
    nodes = []
    decoded: dict[str, str] = {}  # initializer -> its codebook decoding's output

    def decode(name: str, key: str, w: Any) -> str:
        """A codebook matrix as the graph holds it, decoded by nodes added before the first node reading it."""
        if name not in decoded:
            import numpy as np

            dims = tuple(int(d) for d in gr.inits[name].dims)
            rows, cols = w.codes.shape[0], w.codes.shape[1] * w.block
            dense = w.scales.astype(np.float32)[w.codes].reshape(rows, cols)
            if w.mask is not None:
                dense = dense * w.mask
            transposed = dims != (rows, cols) or (rows == cols and not np.array_equal(
                numpy_helper.to_array(gr.inits[name]), dense))
            decoded[name] = gr.tmp("vqmatrix")
            nodes.extend(_lower_codebook(gr, w, key, None, decoded[name], transposed))
            done["Codebook"] = done.get("Codebook", 0) + 1
        return decoded[name]

    for node in gr.g.node:
        new = None
        hits = {i: match(x) for i, x in enumerate(node.input) if x in gr.inits}
        books = {i: h for i, h in hits.items() if h is not None and h[1].op == "Codebook"}
        if books:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Gather" and list(books) == [0] and attrs.get("axis", 0) == 0:
                key, w = books[0]
                new = _lower_codebook(gr, w, key, node.input[1], node.output[0])
            else:
                for i, (key, w) in books.items():
                    node.input[i] = decode(node.input[i], key, w)
        elif node.op_type == "MatMul" and len(node.input) == 2:
            hit = match(node.input[1])
            if hit is not None and hit[1].op in ("MatMulNBits", "MatMulInteger"):
                key, w = hit
                k, n = (int(d) for d in gr.inits[node.input[1]].dims)
                new = _lower_matmul(gr, node.input[0], node.output[0], w, key, n, k, accuracy)
        elif node.op_type == "Gemm" and len(node.input) >= 2:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            hit = match(node.input[1])
            if (hit is not None and hit[1].op in ("MatMulNBits", "MatMulInteger") and not attrs.get("transA", 0)
                    and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0):
                key, w = hit
                d0, d1 = (int(d) for d in gr.inits[node.input[1]].dims)
                n, k = (d0, d1) if attrs.get("transB", 0) else (d1, d0)
                if w.codes.shape == (n, k):
                    mid = gr.tmp("gemm") if len(node.input) > 2 and node.input[2] else node.output[0]
                    new = _lower_matmul(gr, node.input[0], mid, w, key, n, k, accuracy)
                    if mid != node.output[0]:
                        new.append(helper.make_node("Add", [mid, node.input[2]], [node.output[0]]))
        elif node.op_type == "Gather" and len(node.input) == 2:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            hit = match(node.input[0])
            if hit is not None and hit[1].op == "GatherBlockQuantized" and attrs.get("axis", 0) == 0:
                key, w = hit
                if w.codes.shape[1] % w.block == 0:
                    new = _lower_gather(gr, node.input[1], node.output[0], w, key)
        if new is None:
            nodes.append(node)
        else:
            nodes.extend(new)
            op = next((x.op_type for x in new if x.op_type in ("MatMulNBits", "MatMulInteger", "GatherBlockQuantized")),
                      "Codebook" if books else new[0].op_type)
            done[op] = done.get(op, 0) + 1
    del gr.g.node[:]
    gr.g.node.extend(nodes)
    gr.g.initializer.extend(gr.added.values())
    used = {i for n in gr.g.node for i in n.input}
    keep = [t for t in gr.g.initializer if t.name in used]
    del gr.g.initializer[:]
    gr.g.initializer.extend(keep)
    if done and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return done


# -- export -----------------------------------------------------------------------------------------------
def export_onnx(module: Any, desc: Any, plan: Any, path: str | Path, batch: Any, *, parts: Any = None,
                spec: str | None = None, output_name: str = "output", accuracy_level: int = 4,
                int8_kernel: str = "portable") -> dict[str, Any]:
    """Write ``plan`` applied to ``module`` (or the fp32 model when ``plan`` is None) as one ONNX file.

    ``int8_kernel`` (:data:`INT8_KERNELS`): ``portable`` stores W8A8 weights for ORT's u8 x u8 path, exact
    on every CPU; ``vnni`` for its u8 x s8 path, faster, and exact only on CPUs with VNNI (x86 CPUs without
    it saturate; see :func:`_lower_w8a8`).

    ``batch``: one calibration batch (the graph's inputs and a trace). ``parts``: a trained student's
    ``name -> (parts, rows, cols)``. -> ``{"path", "format": "onnx", "predicted_bytes", "file_bytes",
    "kernels", "notes", "int8_kernel"}``: ``kernels`` counts the nodes per integer kernel; ``notes`` says what
    is stored otherwise than the plan's format (e.g. 3-bit codes in 4-bit containers, dense layers);
    ``int8_kernel`` the W8A8 kernel the file's ``int8f`` layers are stored for ("" when it has none)."""
    _require()
    from autocomp.cost.size import plan_bytes
    from autocomp.files import atomic_write

    if accuracy_level not in (0, 1, 2, 3, 4):
        raise AutocompError(f"accuracy level must be 0..4 (ONNX Runtime's MatMulNBits), got {accuracy_level}")
    if int8_kernel not in INT8_KERNELS:
        raise AutocompError(f"int8 kernel must be one of {', '.join(INT8_KERNELS)}, got {int8_kernel!r}")
    notes: dict[str, list[str]] = {}
    lowerings: dict[str, tuple[str, Any]] = {}
    nbits_layers: set[str] = set()
    int8_layers: set[str] = set()
    if plan is None:
        runtime = copy.deepcopy(module).eval()
        predicted = int(desc.fp32_bytes)
    else:
        from autocomp.models.introspect import compressible_modules
        from autocomp.runtime import build_runtime_model

        kinds = {n: k for n, (_, k) in compressible_modules(module).items()}

        def on_layer(name: str, built: list[tuple[Any, Any]]) -> None:
            choice = plan.layer(name)
            use = {"Linear": "matmul", "Conv1D": "matmul", "Embedding": "gather"}.get(kinds.get(name, ""))
            for i, (part, _) in enumerate(built):
                w = None
                if use is not None:
                    for tech, config in choice.steps():
                        w = tech.onnx_weight(config, part, use) or w
                if part.mask is not None and (w is None or w.mask is None):
                    notes.setdefault("sparsity stored as zeros (ORT has no sparse kernel)", []).append(name)
                if w is None:
                    if not choice.is_identity:
                        notes.setdefault("dense float32 (no integer kernel for this option or layer kind)",
                                         []).append(name)
                    continue
                if w.note:
                    notes.setdefault(w.note, []).append(name)
                if w.op == "MatMulNBits":
                    nbits_layers.add(name)
                if w.op == "MatMulInteger" and w.act_grid == 255:  # the 7-bit grid runs u8 x s8 safely anywhere
                    int8_layers.add(name)
                dense = (part.values if part.mask is None else part.values * part.mask).detach().cpu().numpy()
                key = f"{name}.{i}" if len(built) > 1 else name
                lowerings[_digest(dense)] = (key, w)
                lowerings[_digest(dense.T)] = (key, w)

        try:
            runtime = build_runtime_model(module, desc, plan, kernels=False, parts=parts, on_layer=on_layer)
        except ValueError as e:
            raise AutocompError(f"this plan has no ONNX lowering: {e}") from None
        predicted = int(plan_bytes(desc, plan))
    if hasattr(getattr(runtime, "config", None), "use_cache"):
        runtime.config.use_cache = False  # a causal LM's key/value cache is not an output of the graph
    model, in_names, out_names, in_kind, out_kind = _trace(runtime, batch, output_name)
    kernels = _lower(model, lowerings, accuracy_level, int8_kernel) if lowerings else {}
    if int8_layers and int8_kernel == "vnni":
        notes["W8A8 as u8 x s8 (--int8-kernel vnni): exact on CPUs with VNNI only; x86 CPUs without it "
              "saturate (autocomp.load refuses the file there)"] = list(int8_layers)
    if kernels.get("MatMulNBits") and accuracy_level:
        notes[f"MatMulNBits at accuracy level {accuracy_level}: activations rounded to int8 per block (not "
              f"simulated by the search; --accuracy-level 0 computes exactly the searched model)"] = list(nbits_layers)
    meta = {"autocomp_format": ONNX_FORMAT, "model_spec": spec or getattr(plan, "model_spec", "") or "",
            "plan": json.dumps(plan.to_dict(), separators=(",", ":")) if plan is not None else "",
            "predicted_bytes": str(predicted), "fingerprint": desc.fingerprint,
            "accuracy_level": str(accuracy_level), "int8_kernel": int8_kernel if int8_layers else "",
            "inputs": json.dumps(in_names), "input_kind": in_kind,
            "outputs": json.dumps(out_names), "output_kind": out_kind}
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    data = model.SerializeToString()
    if len(data) >= 2**31:
        raise AutocompError("the ONNX file would exceed protobuf's 2 GB; export the packed format instead "
                            "(autocomp export without --format onnx)")

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)

    out = atomic_write(path, write)
    return {"path": str(out), "format": "onnx", "predicted_bytes": predicted, "file_bytes": out.stat().st_size,
            "kernels": kernels, "notes": {k: sorted(set(v)) for k, v in notes.items()},
            "int8_kernel": meta["int8_kernel"]}


# -- serving ----------------------------------------------------------------------------------------------
class OrtOutput(dict):
    """A dict output whose entries also read as attributes (``out.logits``), like a transformers output."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class OrtModel:
    """An exported ONNX file behind an ``onnxruntime.InferenceSession``, called like the original model:
    ``model(**batch)`` (or positionally) -> torch tensors in the original output's form."""

    def __init__(self, path: str | Path, threads: int | None = None, optimization: str = "all",
                 spinning: bool = True) -> None:
        """``spinning=False``: the session's threads sleep between runs instead of spinning. Serving one model
        wants them spinning (lower latency); timing several sessions in one process needs them asleep (idle
        spinning sessions slowed an interleaved MiniLM session from 9.6 to 16-25 ms here)."""
        _, ort = _require()
        p = Path(path)
        if not p.is_file():
            raise AutocompError(f"file {str(p)!r} does not exist")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                         "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                         "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
        opts.log_severity_level = 3
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise AutocompError(f"{str(p)!r} is not a loadable ONNX model ({str(e).splitlines()[0][:200]}); "
                                f"re-export it") from None
        # building the session parsed the file and rewrote the graph in heap blocks it then freed, which glibc
        # keeps: give them back, so the served model's resident set is its weights (fp32 MiniLM: 28 MB less,
        # 123 -> 95 MB over the runtime's baseline; docs/BENCHMARKS.md)
        from autocomp.memory import release

        release()
        self.meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if self.meta.get("autocomp_format") != ONNX_FORMAT:
            raise AutocompError(f"{str(p)!r} is not an autocomp ONNX export; make one with "
                                f"`autocomp export --format onnx`")
        if self.meta.get("int8_kernel") == "vnni" and cpu_has_vnni() is False:
            raise AutocompError(f"{str(p)!r} stores its W8A8 layers for ONNX Runtime's u8 x s8 kernel, which "
                                f"saturates on this CPU (x86 without VNNI); export it again with --int8-kernel portable")
        self.path = p
        self._ran = False  # see _run
        self.input_names = json.loads(self.meta["inputs"])
        self.output_names = json.loads(self.meta["outputs"])
        self.plan = None
        if self.meta.get("plan"):
            from autocomp.plan import Plan

            self.plan = Plan.from_dict(json.loads(self.meta["plan"]))

    def run_numpy(self, feed: dict[str, Any]) -> list[Any]:
        return self._run(feed)

    def _run(self, feed: dict[str, Any]) -> list[Any]:
        outs = self.session.run(None, feed)
        if not self._ran:
            # the first run's one-time work (kernels' scratch, the memory planner's buffers) freed blocks that
            # glibc keeps, and later runs reuse the arena instead: give them back once (MiniLM plans: ~2 MB
            # of the session's resident set, 20.8 -> 19.0 MB for a 4-bit plan; docs/BENCHMARKS.md)
            from autocomp.memory import release

            self._ran = True
            release()
        return outs

    def feed(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        import numpy as np

        values = dict(zip(self.input_names, args))
        values.update(kwargs)
        missing = [n for n in self.input_names if n not in values]
        if missing:
            raise AutocompError(f"missing model inputs {missing} (the model takes {self.input_names})")
        out = {}
        for name in self.input_names:
            v = values[name]
            v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
            out[name] = v
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        outs = [torch.from_numpy(o) for o in self._run(self.feed(*args, **kwargs))]
        kind = self.meta.get("output_kind")
        if kind == "tensor":
            return outs[0]
        if kind == "dict":
            return OrtOutput(zip(self.output_names, outs))
        return tuple(outs)

    def eval(self) -> "OrtModel":
        return self

