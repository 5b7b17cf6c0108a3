"""Guides that return a :class:`~pyro_mogflow.distributions.MixtureFlow`.

* :class:`AutoMixtureFlow` -- an autoguide for the model's (global) latent sites.
* :class:`AmortizedMixtureFlow` -- an encoder giving each data point its own mixture flow.
"""

from .amortized import AmortizedMixtureFlow
from .auto import AutoMixtureFlow

__all__ = ["AmortizedMixtureFlow", "AutoMixtureFlow"]
