"""Objectives, schedules and training recipes for mixture-flow guides.

* :class:`StratifiedELBO` -- the ELBO (or SIWAE bound) with the sum over components exact.
* :class:`TemperedModel`, :class:`Schedule` -- tempering of the target and annealing schedules.
* :func:`balance_weights` and natural-gradient steps for the mixture weights; the same steps
  as a Pyro optimiser for a plain ``SVI`` loop (:class:`MixtureNaturalGradient`);
  natural-gradient (iBLR) steps for the components (:mod:`~pyro_mogflow.infer.component_steps`),
  in a plain loop through :class:`NaturalStratifiedELBO`.
* :func:`fit` -- the mode-finding recipe (module :mod:`~pyro_mogflow.infer.recipe`).
* :func:`fit_max_entropy` -- maximum-entropy flows under moment constraints (MEFN).
* :class:`DistributedSVI` -- data-parallel SVI on ``torch.distributed`` (``torchrun``), with
  :func:`rank_subsample`, :func:`broadcast_parameters` and :func:`all_reduce_grads`; or
  component-parallel (:func:`rank_components`).
"""

from .collectives import (
    all_reduce_grads,
    broadcast_parameters,
    rank_and_world_size,
    rank_components,
    rank_subsample,
)
from .distributed import DistributedSVI
from .max_entropy import MaxEntropyResult, fit_max_entropy
from .mixture_optim import MixtureNaturalGradient
from .mixture_weights import balance_weights
from .natural_elbo import NaturalStratifiedELBO
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
    "DistributedSVI",
    "FitResult",
    "MaxEntropyResult",
    "MixtureNaturalGradient",
    "NaturalStratifiedELBO",
    "Schedule",
    "StratifiedELBO",
    "StratifiedParticles",
    "TemperedModel",
    "all_reduce_grads",
    "balance_weights",
    "broadcast_parameters",
    "cosine_schedule",
    "default_beta_schedule",
    "exponential_schedule",
    "fit",
    "fit_max_entropy",
    "linear_schedule",
    "rank_and_world_size",
    "rank_components",
    "rank_subsample",
    "tempered",
]
