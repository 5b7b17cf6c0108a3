"""Argument checks shared by every public entry point.

Each check raises before any work is done, with the argument's name, what was given and what is
allowed: ``TypeError`` for the wrong kind of value, ``ValueError`` for a value out of range.

Every check treats numpy scalars like Python numbers (``numpy.int64(3)`` is an int,
``numpy.float32(0.5)`` a float) and refuses booleans, Python's and numpy's alike.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["MAX_SEED", "check_bool", "check_int", "check_real", "check_seed"]

#: The largest seed accepted anywhere: numpy (through ``pyro.set_rng_seed``) takes seeds
#: below 2**32.
MAX_SEED = 2**32 - 1


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def check_int(name: str, value, minimum: int | None = None, *, allow_none: bool = False):
    """Return ``value`` as an ``int`` (``bool`` is refused), at least ``minimum`` if given.

    :raises TypeError: if ``value`` is not an integer (or ``None`` when ``allow_none``).
    :raises ValueError: if ``value < minimum``.
    """
    if value is None and allow_none:
        return None
    what = "an int" if minimum is None else f"an int >= {minimum}"
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        what += " or None" if allow_none else ""
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {what}, got {value}")
    return int(value)


def check_real(
    name: str,
    value,
    *,
    minimum: float | None = None,
    strict: bool = False,
    allow_inf: bool = False,
) -> float:
    """Return ``value`` as a finite ``float``, ``> minimum`` (``strict``) or ``>= minimum``.

    :raises TypeError: if ``value`` is not a real number (``bool`` is refused).
    :raises ValueError: if it is NaN, infinite (unless ``allow_inf``) or below the bound.
    """
    if minimum is None:
        what = "a finite float"
    else:
        what = f"a finite float {'>' if strict else '>='} {minimum:g}"
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be {what}, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {what}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """Return ``value`` if it is a ``bool``; raise ``TypeError`` otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_seed(name: str, value, *, offset: int = 0, allow_none: bool = False):
    """Return ``value`` as an ``int`` seed in ``[0, MAX_SEED - offset]`` (``None`` if allowed).

    ``offset`` is the largest amount the caller adds to the seed (``seed + r`` for run ``r``), so
    every seed actually used stays within numpy's range.

    :raises TypeError: if ``value`` is not an integer.
    :raises ValueError: if it is negative or too large.
    """
    if value is None and allow_none:
        return None
    value = check_int(name, value, 0, allow_none=allow_none)
    if value > MAX_SEED - offset:
        extra = f" (it is used up to seed + {offset})" if offset else ""
        raise ValueError(
            f"{name} must be an int in [0, {MAX_SEED - offset}]{extra}, got {value}: seeds "
            "are passed to numpy, which takes seeds below 2**32"
        )
    return value
