"""Size budgets: ``200MB`` (10^6), ``1.5GB`` (10^9), ``30MiB`` (2^20), ``25%`` of the fp32 size, or bytes.

One rule for every form: a budget must be a finite, positive size; one above the model's size (``150%``, or
``2MB`` for a 1 MB model) is accepted, and the search says so (it then trades drift for size below it)."""

from __future__ import annotations

import math
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
    if not math.isfinite(value):
        raise AutocompError(f"budget {text!r} is not a finite size; use e.g. 200MB or 25%")
    if value <= 0:
        raise AutocompError(f"budget {text!r} must be positive; use e.g. 30MB or 25%")
    if unit == "%":
        if fp32_bytes is None:
            raise AutocompError(f"budget {text!r} is a percentage but the model size is unknown")
        return max(1, int(fp32_bytes * value / 100))
    if unit not in _UNITS:
        raise AutocompError(
            f"budget {text!r} has unknown unit {m.group(2)!r}; use B, KB, MB, GB (10^3) or KiB, MiB, GiB (2^10)"
        )
    if value * _UNITS[unit] >= 2**63:
        raise AutocompError(f"budget {text!r} is larger than any model (at most 9.2 EB); use e.g. 200MB")
    nbytes = int(value * _UNITS[unit])
    if nbytes <= 0:
        raise AutocompError(f"budget {text!r} is less than one byte; use e.g. 30MB or 25%")
    return nbytes


def format_bytes(n: float) -> str:
    """``12345678 -> '12.35 MB'`` (decimal units, as budgets are usually written)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
