"""Deprecated location, kept for one release; import from pyro_mogflow.examples.

The built-in targets moved to :mod:`pyro_mogflow.examples.targets`; this module re-exports their
public names (importing it issues a :class:`DeprecationWarning`).
"""

import warnings

from .examples.targets import (
    Target,
    gaussian_mixture_model,
    gaussian_mixture_target,
    label_switching_mixture,
    label_switching_model,
    mode_masses,
    sign_regression,
    sign_regression_model,
)

__all__ = [
    "Target",
    "gaussian_mixture_model",
    "gaussian_mixture_target",
    "label_switching_mixture",
    "label_switching_model",
    "mode_masses",
    "sign_regression",
    "sign_regression_model",
]

warnings.warn(
    "pyro_mogflow.models is deprecated and will be removed in the next release; import from "
    "pyro_mogflow.examples (pyro_mogflow.examples.targets) instead",
    DeprecationWarning,
    stacklevel=2,
)
