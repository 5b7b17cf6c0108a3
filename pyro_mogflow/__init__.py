"""pyro_mogflow: normalizing-flow guides for Pyro on a learnable mixture of diagonal Gaussians.

The main entry point is :class:`AutoMixtureFlow`, an autoguide for posteriors with several modes.
"""

from ._version import __version__
from .density import fit_density
from .diagnostics import (
    IndependentFits,
    fit_independent,
    to_inference_data,
    vi_diagnostics,
    vi_loo,
)
from .distributions import (
    ESTIMATORS,
    DiagNormalMixture,
    MixtureFlow,
    RelaxedMixtureOfDiagNormals,
    mixture_log_prob,
)
from .flows import FLOWS, build_flow, register_flow
from .guides import AmortizedMixtureFlow, AutoMixtureFlow
from .infer import (
    DistributedSVI,
    FitResult,
    MixtureNaturalGradient,
    NaturalStratifiedELBO,
    Schedule,
    StratifiedELBO,
    TemperedModel,
    balance_weights,
    cosine_schedule,
    exponential_schedule,
    fit,
    fit_max_entropy,
    linear_schedule,
    tempered,
)

__all__ = [
    "__version__",
    "AmortizedMixtureFlow",
    "AutoMixtureFlow",
    "DiagNormalMixture",
    "DistributedSVI",
    "ESTIMATORS",
    "FLOWS",
    "FitResult",
    "IndependentFits",
    "MixtureFlow",
    "MixtureNaturalGradient",
    "NaturalStratifiedELBO",
    "RelaxedMixtureOfDiagNormals",
    "Schedule",
    "StratifiedELBO",
    "TemperedModel",
    "balance_weights",
    "build_flow",
    "cosine_schedule",
    "exponential_schedule",
    "fit",
    "fit_density",
    "fit_independent",
    "fit_max_entropy",
    "linear_schedule",
    "mixture_log_prob",
    "register_flow",
    "tempered",
    "to_inference_data",
    "vi_diagnostics",
    "vi_loo",
]
