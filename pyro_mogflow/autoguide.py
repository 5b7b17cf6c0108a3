"""Deprecated location, kept for one release: import from :mod:`pyro_mogflow` or
:mod:`pyro_mogflow.guides` instead."""

from .distributions.estimators import ESTIMATORS
from .guides.auto import AutoMixtureFlow

__all__ = ["AutoMixtureFlow", "ESTIMATORS"]
