"""Bit packing with numpy: the on-disk form of integer payloads (little-endian bit order). The techniques
(:mod:`autocomp.compressors`) use it to pack their arrays.

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

