"""Param-store prefixes: Pyro's autoguides are named after their class, so two guides of one
class would silently share parameters in the global param store unless one is renamed."""

from __future__ import annotations

from collections.abc import Callable

import pyro

__all__ = ["in_param_store", "first_free_prefix"]


def in_param_store(prefix: str) -> bool:
    """Whether any parameter in Pyro's global param store lives under ``prefix``."""
    return any(n == prefix or n.startswith(prefix + ".") for n in pyro.get_param_store())


def first_free_prefix(base: str, taken: Callable[[str], bool] = in_param_store) -> str:
    """The first of ``base``, ``base_1``, ``base_2``, ... for which ``taken`` is false."""
    prefix, i = base, 0
    while taken(prefix):
        i += 1
        prefix = f"{base}_{i}"
    return prefix
