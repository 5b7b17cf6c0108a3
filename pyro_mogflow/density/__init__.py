"""Density estimation with a mixture flow, and the RAD model it is compared with.

:func:`fit_density` fits a :class:`~pyro_mogflow.MixtureFlow` (or a plain mixture, Real NVP, a
neural spline flow, or RAD) to data by maximum likelihood and returns a :class:`FittedDensity`.
:mod:`~pyro_mogflow.density.rad` holds the Real-and-Discrete layer (Dinh et al. 2019).
"""

from .builders import MODELS, DensityModule, MixtureFlowDensity, RADDensity, stack_flow
from .estimate import FittedDensity, as_data, fit_density
from .kmeans import kmeans_init, kmeans_pp_centres
from .rad import RADCoupling, RADFlow, build_rad_layers

__all__ = [
    "MODELS",
    "DensityModule",
    "FittedDensity",
    "MixtureFlowDensity",
    "RADCoupling",
    "RADDensity",
    "RADFlow",
    "as_data",
    "build_rad_layers",
    "fit_density",
    "kmeans_init",
    "kmeans_pp_centres",
    "stack_flow",
]
