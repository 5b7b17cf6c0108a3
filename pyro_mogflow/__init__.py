"""pyro_mogflow: normalizing-flow guides for Pyro on a learnable mixture of diagonal Gaussians.

The main entry point is :class:`AutoMixtureFlow`, an autoguide for posteriors with several modes.
"""

from ._version import __version__
from .amortized import AmortizedMixtureFlow
from .autoguide import ESTIMATORS, AutoMixtureFlow
from .diagnostics import (
    IndependentFits,
    fit_independent,
    to_inference_data,
    vi_diagnostics,
    vi_loo,
)
from .distributions import DiagNormalMixture, RelaxedMixtureOfDiagNormals, mixture_log_prob
from .fit import FitResult, balance_weights, fit
from .flows import FLOWS, build_flow, register_flow
from .infer import (
    Schedule,
    StratifiedELBO,
    TemperedModel,
    cosine_schedule,
    exponential_schedule,
    linear_schedule,
    tempered,
)

__all__ = [
    "__version__",
    "AmortizedMixtureFlow",
    "AutoMixtureFlow",
    "DiagNormalMixture",
    "ESTIMATORS",
    "FLOWS",
    "FitResult",
    "IndependentFits",
    "RelaxedMixtureOfDiagNormals",
    "Schedule",
    "StratifiedELBO",
    "TemperedModel",
    "balance_weights",
    "build_flow",
    "cosine_schedule",
    "exponential_schedule",
    "fit",
    "fit_independent",
    "linear_schedule",
    "mixture_log_prob",
    "register_flow",
    "tempered",
    "to_inference_data",
    "vi_diagnostics",
    "vi_loo",
]
