"""Deprecated location, kept for one release; import from pyro_mogflow.examples.

The built-in targets moved to :mod:`pyro_mogflow.examples`; this module re-exports their public
names (importing it issues a :class:`DeprecationWarning`).
"""

import warnings

from . import examples as _examples
from .examples import *  # noqa: F403 (re-exported under the old path)

__all__ = list(_examples.__all__)

warnings.warn(
    "pyro_mogflow.models is deprecated and will be removed in the next release; import from "
    "pyro_mogflow.examples instead",
    DeprecationWarning,
    stacklevel=2,
)
