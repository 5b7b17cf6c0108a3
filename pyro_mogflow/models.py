"""Deprecated location, kept for one release; import from pyro_mogflow.examples.

The built-in targets moved to :mod:`pyro_mogflow.examples.targets`; this module re-exports their
public names (importing it issues a :class:`DeprecationWarning`).
"""

import warnings

from .examples import targets as _targets
from .examples.targets import *  # noqa: F403 (re-exported under the old path)

__all__ = list(_targets.__all__)

warnings.warn(
    "pyro_mogflow.models is deprecated and will be removed in the next release; import from "
    "pyro_mogflow.examples (pyro_mogflow.examples.targets) instead",
    DeprecationWarning,
    stacklevel=2,
)
