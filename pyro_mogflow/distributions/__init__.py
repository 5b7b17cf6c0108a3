"""Distributions over R^D built from a mixture of diagonal Gaussians (no SVI knowledge here)."""

from .density import component_log_prob, mixture_log_prob, mixture_moments
from .mixture import DiagNormalMixture
from .relaxed import RelaxedMixtureOfDiagNormals

__all__ = [
    "DiagNormalMixture",
    "RelaxedMixtureOfDiagNormals",
    "component_log_prob",
    "mixture_log_prob",
    "mixture_moments",
]
