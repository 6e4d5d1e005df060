"""Size budgets: ``200MB`` (10^6), ``1.5GB`` (10^9), ``30MiB`` (2^20), ``25%`` of the fp32 size, or bytes."""

from __future__ import annotations

import re

from autocomp.errors import AutocompError

__all__ = ["parse_budget", "format_bytes"]

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_RE = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z%]*)\s*$")


def parse_budget(text: str, fp32_bytes: int | None = None) -> int:
    """Parse a budget string into bytes (rounded down).

    ``fp32_bytes`` is needed only for percentages. Raises :class:`AutocompError` with the accepted forms.
    """
    m = _RE.match(str(text))
    if not m:
        raise AutocompError(
            f"budget {text!r} is not a size; use e.g. 200MB, 1.5GB, 30MiB, 25% or a byte count"
        )
    value, unit = float(m.group(1)), m.group(2).upper()
    if value <= 0:
        raise AutocompError(f"budget {text!r} must be positive; use e.g. 30MB or 25%")
    if unit == "%":
        if fp32_bytes is None:
            raise AutocompError(f"budget {text!r} is a percentage but the model size is unknown")
        if not 0 < value <= 100:
            raise AutocompError(f"budget {text!r} must be a percentage in (0, 100]")
        return int(fp32_bytes * value / 100)
    if unit not in _UNITS:
        raise AutocompError(
            f"budget {text!r} has unknown unit {m.group(2)!r}; use B, KB, MB, GB (10^3) or KiB, MiB, GiB (2^10)"
        )
    nbytes = int(value * _UNITS[unit])
    if nbytes <= 0:
        raise AutocompError(f"budget {text!r} must be positive")
    return nbytes


def format_bytes(n: float) -> str:
    """``12345678 -> '12.35 MB'`` (decimal units, as budgets are usually written)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
