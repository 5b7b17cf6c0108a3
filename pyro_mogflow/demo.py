"""Deprecated location, kept for one release; import from pyro_mogflow.examples.

The demo moved to :mod:`pyro_mogflow.examples.demo`; this module re-exports its public names,
and keeps the old names ``fit`` (now :func:`~pyro_mogflow.examples.demo.fit_guide`) and
``evaluate`` (now :func:`~pyro_mogflow.examples.demo.evaluate_guide`) as aliases. Importing it
issues a :class:`DeprecationWarning`.
"""

import warnings

from .examples import demo as _demo
from .examples.demo import *  # noqa: F403 (re-exported under the old path)

#: Deprecated alias of :func:`pyro_mogflow.examples.demo.fit_guide`.
fit = _demo.fit_guide
#: Deprecated alias of :func:`pyro_mogflow.examples.demo.evaluate_guide`.
evaluate = _demo.evaluate_guide

__all__ = [*_demo.__all__, "fit", "evaluate"]

warnings.warn(
    "pyro_mogflow.demo is deprecated and will be removed in the next release; import from "
    "pyro_mogflow.examples.demo instead",
    DeprecationWarning,
    stacklevel=2,
)
