"""Distributions over R^D built from a mixture of diagonal Gaussians (no SVI knowledge here).

* :mod:`~pyro_mogflow.distributions.density` -- the one log-density kernel.
* :mod:`~pyro_mogflow.distributions.mixture` -- the exact mixture, implicit reparameterization.
* :mod:`~pyro_mogflow.distributions.full_mixture` -- the mixture of full-covariance Gaussians.
* :mod:`~pyro_mogflow.distributions.relaxed` -- the Gumbel-softmax relaxed mixture.
* :mod:`~pyro_mogflow.distributions.estimators` -- the one estimator dispatch.
* :mod:`~pyro_mogflow.distributions.mixture_flow` -- :class:`MixtureFlow`, base and transforms.
"""

from .density import (
    component_log_prob,
    full_component_log_prob,
    full_mixture_log_prob,
    mixture_log_prob,
    mixture_moments,
)
from .estimators import ESTIMATORS, mixture_base
from .full_mixture import FullNormalMixture
from .mixture import DiagNormalMixture
from .mixture_flow import MixtureFlow, StratifiedSample
from .relaxed import RelaxedMixtureOfDiagNormals

__all__ = [
    "DiagNormalMixture",
    "ESTIMATORS",
    "FullNormalMixture",
    "MixtureFlow",
    "RelaxedMixtureOfDiagNormals",
    "StratifiedSample",
    "component_log_prob",
    "full_component_log_prob",
    "full_mixture_log_prob",
    "mixture_base",
    "mixture_log_prob",
    "mixture_moments",
]
