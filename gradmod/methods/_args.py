"""Checks of a method's hyperparameters, collected so that one error lists every bad argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from .._errors import ConfigurationError

__all__ = ["Check", "check_args"]

#: ``(name, value, low, low_inclusive, high)``: ``value`` must be a finite real number with
#: ``low < value`` (``low <= value`` when ``low_inclusive``) and ``value <= high`` when ``high`` is
#: given; ``low = None`` means no lower bound.
Check = tuple[str, object, float | None, bool, float | None]


def _describe(low: float | None, inclusive: bool, high: float | None) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>=' if inclusive else '>'} {low:g}")
    if high is not None:
        parts.append(f"<= {high:g}")
    return "a finite number " + " and ".join(parts) if parts else "a finite number"


def check_args(owner: str, checks: Sequence[Check], extra: Sequence[str] = ()) -> None:
    """Raise :class:`~gradmod.ConfigurationError` naming every argument out of its range.

    ``extra`` adds problems found by the caller (invalid choices), reported together.
    """
    problems = list(extra)
    for name, value, low, inclusive, high in checks:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        v = float(value) if ok else math.nan  # type: ignore[arg-type]
        if ok and math.isfinite(v):
            if low is not None and (v < low if inclusive else v <= low):
                ok = False
            if high is not None and v > high:
                ok = False
        else:
            ok = False
        if not ok:
            problems.append(
                f"{owner}: {name} must be {_describe(low, inclusive, high)}; got {value!r}"
            )
    if problems:
        raise ConfigurationError(problems)
