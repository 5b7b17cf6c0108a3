r"""Annealing: schedules for the relaxed estimators' temperature, and tempering of the model.

*Schedules* are callables ``step -> float`` that move from ``start`` to ``end`` over ``num_steps``
steps and then stay at ``end``. ``AutoMixtureFlow(temperature=...)`` accepts one for its
Gumbel-softmax temperature, and :class:`TemperedModel` accepts one for its inverse temperature.

*Tempering* replaces the target :math:`p(x, z)` by :math:`p(x, z)^\beta`: every log-density the
model scores is multiplied by :math:`\beta`, so the ELBO becomes

.. math:: \mathcal{L}_\beta = \beta\, \mathbb{E}_q[\log p(x, z)] + \mathbb{H}[q].

At small :math:`\beta` the tempered posterior is broad and its modes are joined by mass, so the
mixture's components can spread over all of them before :math:`\beta` reaches one and the target
is the posterior again. Tempering works with any Pyro ELBO and any guide.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

from pyro.poutine.messenger import Messenger

from .._validation import check_int, check_real

__all__ = [
    "Schedule",
    "TemperedModel",
    "cosine_schedule",
    "exponential_schedule",
    "linear_schedule",
    "tempered",
]

_KINDS = ("linear", "exponential", "cosine")


class Schedule:
    r"""A value moving from ``start`` to ``end`` over ``num_steps`` steps, then held at ``end``.

    With progress :math:`s = \min(t / T, 1)` at step :math:`t` (:math:`T` = ``num_steps``):

    .. math::
        \text{linear: } a + (b - a)\, s, \qquad
        \text{exponential: } a\, (b / a)^{s}, \qquad
        \text{cosine: } b + (a - b)\, \tfrac{1}{2}\big(1 + \cos(\pi s)\big).

    The exponential (geometric) schedule moves by a constant factor per step, which suits
    quantities that matter on a log scale, like a temperature falling from 1 to 0.05.

    Usage::

        guide = AutoMixtureFlow(model, estimator="relaxed",
                                temperature=exponential_schedule(1.0, 0.1, num_steps=2000))

    :param float start: ``a``, the value at step 0.
    :param float end: ``b``, the value from step ``num_steps`` on.
    :param int num_steps: ``T >= 1``.
    :param str kind: ``"linear"`` (default), ``"exponential"`` (needs ``a, b > 0``) or
        ``"cosine"``.
    """

    def __init__(self, start: float, end: float, num_steps: int, kind: str = "linear"):
        start = check_real("start", start)
        end = check_real("end", end)
        num_steps = check_int("num_steps", num_steps, 1)
        if kind not in _KINDS:
            raise ValueError(f"unknown schedule kind {kind!r}; choose one of {_KINDS}")
        if kind == "exponential" and not (start > 0 and end > 0):
            raise ValueError(
                f"an exponential schedule needs start > 0 and end > 0, got start={start}, "
                f"end={end}; use kind='linear' to reach or leave zero"
            )
        self.start, self.end, self.num_steps, self.kind = start, end, num_steps, kind

    def __call__(self, step: int) -> float:
        """The value at ``step`` (an int ``>= 0``)."""
        step = check_int("step", step, 0)
        s = min(step / self.num_steps, 1.0)
        if s == 1.0:
            return self.end
        if self.kind == "linear":
            return self.start + (self.end - self.start) * s
        if self.kind == "exponential":
            return math.exp(math.log(self.start) + (math.log(self.end) - math.log(self.start)) * s)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * s))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(start={self.start}, end={self.end}, "
            f"num_steps={self.num_steps}, kind={self.kind!r})"
        )


def linear_schedule(start: float, end: float, num_steps: int) -> Schedule:
    """A :class:`Schedule` moving linearly from ``start`` to ``end`` over ``num_steps`` steps."""
    return Schedule(start, end, num_steps, kind="linear")


def exponential_schedule(start: float, end: float, num_steps: int) -> Schedule:
    """A :class:`Schedule` moving geometrically (constant factor per step), ``start, end > 0``."""
    return Schedule(start, end, num_steps, kind="exponential")


def cosine_schedule(start: float, end: float, num_steps: int) -> Schedule:
    """A :class:`Schedule` following half a cosine from ``start`` to ``end`` (slow at both ends)."""
    return Schedule(start, end, num_steps, kind="cosine")


class _TemperMessenger(Messenger):
    """Multiplies the scale of sample sites (all of them, or only the observed ones) by beta."""

    def __init__(self, beta: float, observed_only: bool):
        super().__init__()
        self.beta = beta
        self.observed_only = observed_only

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        if self.observed_only and not msg["is_observed"]:
            return
        msg["scale"] = self.beta * msg["scale"]


class TemperedModel:
    r"""A Pyro model whose target is tempered: :math:`p(x, z)^\beta`, with :math:`\beta` scheduled.

    Calling it runs ``model`` with the log-density of every sample site (latent and observed,
    ``pyro.factor`` included) multiplied by :math:`\beta` = ``beta(step)``, exactly as
    ``poutine.scale`` would; with ``observed_only=True`` only observed sites (the likelihood and
    factors) are scaled, which tempers :math:`p(z)\, p(x \mid z)^\beta` instead and keeps the
    target proper at small :math:`\beta`. Sampling is unchanged, so a ``Predictive`` of the
    tempered model is a ``Predictive`` of the model.

    The step counter is explicit: :attr:`step` starts at 0 and moves only when you call
    :meth:`advance` (once per optimisation step, say), so extra model calls made by an ELBO
    (several particles, a plate-nesting guess) never move the schedule.

    Usage::

        tempered = TemperedModel(model, linear_schedule(0.01, 1.0, num_steps=500))
        svi = SVI(tempered, guide, Adam({"lr": 0.05}), StratifiedELBO())
        for _ in range(1500):
            svi.step(data)
            tempered.advance()

    The value of :math:`\beta` is read as a Python float at each call, so a JIT-compiled ELBO
    would freeze it at its first value; use a non-JIT ELBO.

    :param callable model: the Pyro model.
    :param beta: a positive float, or a callable ``step -> float`` (e.g. :class:`Schedule`)
        returning positive values.
    :param bool observed_only: scale only observed sites (default False: the whole joint).
    """

    def __init__(
        self,
        model: Callable,
        beta: float | Callable[[int], float],
        *,
        observed_only: bool = False,
    ):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if not callable(beta):
            beta = check_real("beta", beta)
            if not beta > 0:
                raise ValueError(f"beta must be > 0, got {beta}")
        if not isinstance(observed_only, bool):
            raise TypeError(f"observed_only must be a bool, got {type(observed_only).__name__}")
        self.model = model
        self.schedule = beta
        self.observed_only = observed_only
        self._step = 0

    @property
    def step(self) -> int:
        """Number of :meth:`advance` steps taken; settable (e.g. to 0 to restart)."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = check_int("step", value, 0)

    def advance(self, num_steps: int = 1) -> float:
        """Move the schedule on by ``num_steps`` (default 1) and return the new :attr:`beta`."""
        self._step += check_int("num_steps", num_steps, 0)
        return self.beta

    @property
    def beta(self) -> float:
        """The inverse temperature at the current :attr:`step`."""
        if not callable(self.schedule):
            return self.schedule
        value = self.schedule(self._step)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"the beta schedule returned {value!r} at step {self._step}; need a real number"
            )
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"the beta schedule returned {value!r} at step {self._step}; need a finite "
                "value > 0 (start a schedule at a small positive beta such as 1e-3, not 0)"
            )
        return float(value)

    def __call__(self, *args, **kwargs):
        with _TemperMessenger(self.beta, self.observed_only):
            return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({getattr(self.model, '__name__', type(self.model).__name__)}, "
            f"beta={self.schedule!r}, step={self._step}, observed_only={self.observed_only})"
        )


def tempered(
    model: Callable, beta: float | Callable[[int], float], *, observed_only: bool = False
) -> TemperedModel:
    """Shorthand for :class:`TemperedModel` ``(model, beta, observed_only=observed_only)``."""
    return TemperedModel(model, beta, observed_only=observed_only)
