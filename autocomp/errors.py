"""One exception root for everything a user can get wrong.

The CLI prints ``AutocompError`` as one line (no traceback) and exits with code 2. Messages name the rule,
the value and the fix, e.g. ``budget 20MB is below the smallest plan this search space allows (31.4 MB);
allow 2-bit weights or raise --budget``.
"""

from __future__ import annotations

__all__ = ["AutocompError", "PlanMismatchError"]


class AutocompError(Exception):
    """A user error: bad input, a missing file, an incompatible plan. Never a bug in autocomp."""


class PlanMismatchError(AutocompError):
    """A plan applied to a model it was not made for."""
