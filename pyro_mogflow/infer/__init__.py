"""Objectives and schedules for training :class:`~pyro_mogflow.AutoMixtureFlow`.

* :class:`StratifiedELBO` -- the ELBO (or SIWAE bound) with the sum over components exact.
* :class:`TemperedModel`, :class:`Schedule` -- tempering of the target and annealing schedules.
"""

from .anneal import (
    Schedule,
    TemperedModel,
    cosine_schedule,
    exponential_schedule,
    linear_schedule,
    tempered,
)
from .stratified import StratifiedELBO, StratifiedParticles

__all__ = [
    "Schedule",
    "StratifiedELBO",
    "StratifiedParticles",
    "TemperedModel",
    "cosine_schedule",
    "exponential_schedule",
    "linear_schedule",
    "tempered",
]
