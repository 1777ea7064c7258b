"""The one rule for a number read from outside (a file, a flag, a request): a real number, not a bool, finite.

NaN turns every comparison false, so a NaN threshold, temperature or score silently switches a gate off; an
infinity does the same from the other side; and ``True`` is an int in Python. Every check of a single value goes
through :func:`is_finite_number` (a count through :func:`is_count`); arrays are checked with ``np.isfinite`` where they are computed.
"""
from __future__ import annotations

import math
import numbers


def is_finite_number(value) -> bool:
    """Whether ``value`` is a finite real number that is not a bool (NumPy scalars included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value) -> bool:
    """Whether ``value`` is a whole number >= 0 that is not a bool (an epoch, a step, a size)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0
