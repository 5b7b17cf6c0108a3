"""Objectives, schedules and training recipes for mixture-flow guides.

* :class:`StratifiedELBO` -- the ELBO (or SIWAE bound) with the sum over components exact.
* :class:`TemperedModel`, :class:`Schedule` -- tempering of the target and annealing schedules.
* :func:`balance_weights` and natural-gradient steps for the mixture weights.
* :func:`fit` -- the mode-finding recipe (module :mod:`~pyro_mogflow.infer.recipe`).
"""

from .mixture_weights import balance_weights
from .recipe import FitResult, default_beta_schedule, fit
from .stratified import StratifiedELBO, StratifiedParticles
from .tempering import (
    Schedule,
    TemperedModel,
    cosine_schedule,
    exponential_schedule,
    linear_schedule,
    tempered,
)

__all__ = [
    "FitResult",
    "Schedule",
    "StratifiedELBO",
    "StratifiedParticles",
    "TemperedModel",
    "balance_weights",
    "cosine_schedule",
    "default_beta_schedule",
    "exponential_schedule",
    "fit",
    "linear_schedule",
    "tempered",
]
