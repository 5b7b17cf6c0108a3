"""State shared by both mixture-flow guides: the estimator, its temperature and a step counter."""

from __future__ import annotations

import torch

from .._validation import check_int
from ..distributions.estimators import (
    RELAXED_ESTIMATORS,
    Temperature,
    check_estimator,
    check_temperature,
    resolve_temperature,
)

__all__ = ["EstimatorState"]


class EstimatorState:
    """Mixin for a guide module that builds :class:`~pyro_mogflow.distributions.MixtureFlow`
    posteriors: it holds the estimator's settings and counts the calls made with gradients.

    :ivar str estimator: one of :data:`~pyro_mogflow.ESTIMATORS`.
    :ivar temperature: a positive float or a schedule ``step -> float`` (relaxed estimators).
    :ivar int num_nested: inner draws of the ``"relaxed-nested"`` density.
    :ivar int step: the number of calls made with gradients enabled; it drives a temperature
        schedule and is saved in the ``state_dict``.
    """

    estimator: str
    temperature: Temperature
    num_nested: int
    #: Number of guide calls with gradients so far; drives the temperature schedule.
    step: int

    def _init_estimator(self, estimator: str, temperature: Temperature, num_nested: int) -> None:
        self.estimator = check_estimator(estimator)
        self.temperature = check_temperature(temperature)
        self.num_nested = check_int("num_nested", num_nested, 1)
        self.step = 0

    def current_temperature(self) -> float:
        """The Gumbel-softmax temperature at the current :attr:`step`."""
        return resolve_temperature(self.temperature, self.step)

    def _estimator_kwargs(self, estimator: str | None = None) -> dict:
        """Keyword arguments of :class:`~pyro_mogflow.distributions.MixtureFlow` for a call."""
        estimator = self.estimator if estimator is None else check_estimator(estimator)
        relaxed = estimator in RELAXED_ESTIMATORS
        return {
            "estimator": estimator,
            "temperature": self.current_temperature() if relaxed else 0.5,
            "num_nested": self.num_nested,
        }

    def _count_step(self) -> None:
        if torch.is_grad_enabled():
            self.step += 1

    def get_extra_state(self) -> dict:
        """Extra ``state_dict`` entry: the step counter that drives temperature schedules."""
        return {"step": self.step}

    def set_extra_state(self, state: dict) -> None:
        """Restore :attr:`step` from a ``state_dict`` written by :meth:`get_extra_state`."""
        self.step = int(state["step"])
