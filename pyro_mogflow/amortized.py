"""Deprecated location, kept for one release: import :class:`AmortizedMixtureFlow` from
:mod:`pyro_mogflow`, the distribution from :mod:`pyro_mogflow.distributions` (``MixtureFlow``,
formerly ``MixtureFlowPosterior``) and the conditional flows from :mod:`pyro_mogflow.flows`."""

from .distributions.mixture_flow import MixtureFlow
from .flows.conditional import CONDITIONAL_FLOWS, ConditionalFlowSpec, build_conditional_flow
from .guides.amortized import AmortizedMixtureFlow

#: The former name of :class:`~pyro_mogflow.distributions.MixtureFlow`.
MixtureFlowPosterior = MixtureFlow

__all__ = [
    "AmortizedMixtureFlow",
    "CONDITIONAL_FLOWS",
    "ConditionalFlowSpec",
    "MixtureFlowPosterior",
    "build_conditional_flow",
]
