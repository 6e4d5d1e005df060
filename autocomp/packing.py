"""Bit packing with numpy: the on-disk form of integer payloads (little-endian bit order).

``pack_bits(codes, bits)`` stores each code in ``bits`` bits, codes back to back across byte boundaries,
the first code in the lowest bits of byte 0. The result has ``ceil(len(codes) * bits / 8)`` bytes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack_bits", "unpack_bits"]


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    codes = np.ascontiguousarray(codes).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes must be in [0, {1 << bits}) for {bits}-bit packing")
    if bits == 8:
        return codes.astype(np.uint8)
    if 8 % bits == 0:  # 1, 2, 4: whole codes per byte
        per = 8 // bits
        pad = (-codes.size) % per
        c = np.concatenate([codes.astype(np.uint8), np.zeros(pad, np.uint8)]).reshape(-1, per)
        shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
        return np.bitwise_or.reduce(c << shifts, axis=1).astype(np.uint8)
    planes = ((codes.astype(np.uint32)[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return packed[:count].astype(np.int64)
    planes = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits)
    return (planes.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(axis=1)


def _np(t):  # type: ignore[no-untyped-def]
    return t.detach().cpu().numpy()


def pack_layer(name: str, parts: list, bits: int | None, itemsize_dtype: str = "float32",
               bias=None) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """The arrays the packed format stores for one layer (docs/FORMAT.md), keyed by tensor name.

    ``parts`` come from :func:`autocomp.compressors.base.run_pipeline` on the (structurally pruned)
    matrix; ``bias`` is the kept bias (a tensor) or None.
    """
    out: dict[str, np.ndarray] = {}
    tags = [""] if len(parts) == 1 else [".B", ".A"]
    for tag, part in zip(tags, parts):
        key = f"{name}{tag}"
        mask = None if part.mask is None else _np(part.mask).astype(bool)
        if mask is not None and part.nm:
            rows, cols = mask.shape
            pos = np.nonzero(mask.reshape(rows, cols // 4, 4))[2]  # row-major: 2 ascending positions per group
            out[f"{key}.nm_index"] = pack_bits(pos, 2)
        elif mask is not None:
            out[f"{key}.mask"] = np.packbits(mask.reshape(-1), bitorder="little")
        if bits is None:
            vals = _np(part.values).astype(itemsize_dtype)
            out[f"{key}.values"] = vals[mask] if mask is not None else vals.reshape(-1)
            continue
        codes = _np(part.codes)
        out[f"{key}.qweight"] = pack_bits(codes[mask] if mask is not None else codes.reshape(-1), bits)
        out[f"{key}.scale"] = _np(part.scale).astype(np.float16).reshape(-1)
        if part.zero_point is not None:
            out[f"{key}.zero_point"] = pack_bits(_np(part.zero_point).reshape(-1), bits)
    if bias is not None:
        out[f"{name}.bias"] = _np(bias).reshape(-1)
    return out


def unpack_matrix(arrays: dict[str, np.ndarray], key: str, rows: int, cols: int, bits: int | None,
                  group_size: int, symmetric: bool, dtype: str = "float32") -> np.ndarray:
    """Inverse of :func:`pack_layer` for one stored matrix: the dense float32 matrix it represents."""
    numel = rows * cols
    if f"{key}.nm_index" in arrays:
        pos = unpack_bits(arrays[f"{key}.nm_index"], 2, numel // 2).reshape(rows, cols // 4, 2)
        mask = np.zeros((rows, cols // 4, 4), dtype=bool)
        np.put_along_axis(mask, pos, True, axis=-1)
        mask = mask.reshape(rows, cols)
    elif f"{key}.mask" in arrays:
        mask = np.unpackbits(arrays[f"{key}.mask"], bitorder="little")[:numel].astype(bool).reshape(rows, cols)
    else:
        mask = np.ones((rows, cols), dtype=bool)
    nnz = int(mask.sum())
    out = np.zeros((rows, cols), dtype=np.float32)
    if bits is None:
        out[mask] = arrays[f"{key}.values"].astype(np.float32)
        return out
    codes = np.zeros((rows, cols), dtype=np.int64)
    codes[mask] = unpack_bits(arrays[f"{key}.qweight"], bits, nnz)
    g = group_size or cols
    n_groups = -(-cols // g)
    scale = arrays[f"{key}.scale"].astype(np.float32).reshape(rows, n_groups)
    s = np.repeat(scale, g, axis=1)[:, :cols]
    if symmetric:
        q = codes - (1 << (bits - 1))
    else:
        zp = unpack_bits(arrays[f"{key}.zero_point"], bits, rows * n_groups).reshape(rows, n_groups)
        q = codes - np.repeat(zp, g, axis=1)[:, :cols]
    out = (q * s).astype(np.float32)
    out[~mask] = 0.0
    return out
