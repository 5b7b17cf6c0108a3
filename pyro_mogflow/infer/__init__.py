"""Objectives, schedules and training recipes for mixture-flow guides.

* :class:`StratifiedELBO` -- the ELBO (or SIWAE bound) with the sum over components exact.
* :class:`TemperedModel`, :class:`Schedule` -- tempering of the target and annealing schedules.
* :func:`balance_weights` and natural-gradient steps for the mixture weights; natural-gradient
  (iBLR) steps for the components (:mod:`~pyro_mogflow.infer.component_steps`).
* :func:`fit` -- the mode-finding recipe (module :mod:`~pyro_mogflow.infer.recipe`).
* :func:`fit_max_entropy` -- maximum-entropy flows under moment constraints (MEFN).
"""

from .max_entropy import MaxEntropyResult, fit_max_entropy
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
    "MaxEntropyResult",
    "Schedule",
    "StratifiedELBO",
    "StratifiedParticles",
    "TemperedModel",
    "balance_weights",
    "cosine_schedule",
    "default_beta_schedule",
    "exponential_schedule",
    "fit",
    "fit_max_entropy",
    "linear_schedule",
    "tempered",
]
