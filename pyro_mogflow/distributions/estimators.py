r"""The one estimator dispatch: how gradients pass through a mixture's discrete choice.

A mixture flow samples :math:`z = f(u)` with :math:`u` from a mixture of diagonal Gaussians.
The choice of component is discrete, so a reparameterized sample needs an *estimator*: a base
distribution whose ``rsample`` carries gradients to the weights, means and scales.

==================  ==============================  ==================  =====================
estimator           sample                          base log-density    weight gradient
==================  ==============================  ==================  =====================
``relaxed``         Gumbel-softmax soft selection   exact mixture       biased (relaxation)
``relaxed-nested``  Gumbel-softmax soft selection   nested estimate     biased (+ Jensen)
``implicit``        exact mixture sample            exact mixture       unbiased
``stratified``      one draw set per component      exact mixture       exact expectation
``pathwise``        Pyro ``MixtureOfDiagNormals``   exact mixture       Pyro's estimator
==================  ==============================  ==================  =====================

``stratified`` is the exact expectation over components taken by
:class:`~pyro_mogflow.StratifiedELBO` through
:meth:`~pyro_mogflow.distributions.MixtureFlow.stratified_rsample`; sampled on its own it draws
the exact mixture as ``implicit`` does (what ``Trace_ELBO``, the jit ELBOs and ``Predictive``
see; a supported path, without a warning). ``implicit`` and ``stratified`` samplers are built
from standard operations only, so ``torch.jit.trace`` records them; ``pathwise`` cannot be
traced. :func:`mixture_base` builds the base for a name, and is
the only place in the package that maps a name to a sampler.

References:

* E. Jang, S. Gu, B. Poole, *Categorical Reparameterization with Gumbel-Softmax*, ICLR 2017.
* M. Figurnov, S. Mohamed, A. Mnih, *Implicit Reparameterization Gradients*, NeurIPS 2018.
* W. Morningstar, S. Vikram, C. Ham, A. Gallagher, J. Dillon, *Automatic Differentiation
  Variational Inference with Mixtures*, AISTATS 2021.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from pyro.util import ignore_jit_warnings

from .._validation import check_real
from .mixture import DiagNormalMixture
from .relaxed import RelaxedMixtureOfDiagNormals

__all__ = [
    "ESTIMATORS",
    "RELAXED_ESTIMATORS",
    "check_estimator",
    "check_temperature",
    "mixture_base",
    "resolve_temperature",
]

#: How gradients pass through the mixture's discrete choice (see the module docstring).
ESTIMATORS = ("relaxed", "relaxed-nested", "implicit", "stratified", "pathwise")

#: The Gumbel-softmax estimators, which need a temperature.
RELAXED_ESTIMATORS = ("relaxed", "relaxed-nested")

#: A temperature: a positive float, or a schedule ``step -> float``.
Temperature = float | Callable[[int], float]


def check_estimator(estimator: object, name: str = "estimator") -> str:
    """Return ``estimator`` if it is one of :data:`ESTIMATORS`; raise ``ValueError`` otherwise."""
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"unknown {name} {estimator!r}; choose one of {ESTIMATORS}")
    return estimator


def check_temperature(temperature: object) -> Temperature:
    """Return ``temperature`` if it is a positive finite float or a callable schedule.

    :raises TypeError: if it is neither a real number nor callable.
    :raises ValueError: if it is a number that is not positive and finite.
    """
    if callable(temperature):
        return temperature
    return check_real("temperature", temperature, minimum=0.0, strict=True)


def resolve_temperature(temperature: Temperature, step: int) -> float:
    """The temperature at ``step``: the float itself, or the schedule evaluated at ``step``.

    :raises ValueError: if a schedule returns anything but a positive finite number, or is
        evaluated while ``torch.jit`` traces (which would freeze it at its first value).
    """
    if not callable(temperature):
        return float(temperature)
    if torch._C._get_tracing_state():
        raise ValueError(
            "temperature is a schedule (a callable), but the guide is being traced by "
            "torch.jit (e.g. JitTrace_ELBO), which would freeze it at its first value. Pass a "
            "fixed float temperature, or train with a non-jit ELBO such as Trace_ELBO."
        )
    tau = temperature(step)
    if isinstance(tau, torch.Tensor):
        tau = float(tau)
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not tau > 0:
        raise ValueError(f"temperature schedule returned {tau!r} at step {step}; need > 0")
    return float(tau)


class _SingleGaussian(DiagNormalMixture):
    """``K = 1``: the plain reparameterization ``mu + sigma * eps`` (same law and gradient as
    the implicit one, without the categorical draw and the triangular solve)."""

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        eps = torch.randn(shape, dtype=self.locs.dtype, device=self.locs.device)
        return self.locs[..., 0, :] + self.scales[..., 0, :] * eps


class _PathwiseMixture(DiagNormalMixture):
    """Pyro's ``MixtureOfDiagNormals`` sampler, scored with the package's one mixture density."""

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        if torch._C._get_tracing_state():
            raise ValueError(
                "estimator='pathwise' samples with Pyro's MixtureOfDiagNormals, whose custom "
                "autograd function torch.jit cannot trace, so it cannot run under JitTrace_ELBO "
                "(or any jit ELBO). Use estimator='implicit' or 'relaxed', or a non-jit ELBO such "
                "as Trace_ELBO."
            )
        shape = torch.Size(sample_shape)
        pyro_mixture = dist.MixtureOfDiagNormals(self.locs, self.scales, self.logits)
        return pyro_mixture.rsample(shape)


def mixture_base(
    estimator: str,
    logits: torch.Tensor,
    locs: torch.Tensor,
    scales: torch.Tensor,
    temperature: float = 0.5,
    num_nested: int = 32,
) -> TorchDistribution:
    """The base mixture whose ``rsample`` implements ``estimator``.

    :param str estimator: one of :data:`ESTIMATORS`.
    :param torch.Tensor logits: shape ``(*batch, K)``.
    :param torch.Tensor locs: shape ``(*batch, K, D)``.
    :param torch.Tensor scales: positive, shape ``(*batch, K, D)``.
    :param float temperature: Gumbel-softmax temperature (relaxed estimators only).
    :param int num_nested: inner draws of the ``"relaxed-nested"`` density.
    :return: a distribution with batch shape ``batch`` and event shape ``(D,)``.
    """
    check_estimator(estimator)
    if estimator in RELAXED_ESTIMATORS:
        return RelaxedMixtureOfDiagNormals(
            logits,
            locs,
            scales,
            temperature,
            density="nested" if estimator == "relaxed-nested" else "exact",
            num_nested=num_nested,
        )
    if estimator == "pathwise":
        return _PathwiseMixture(logits, locs, scales)
    # "implicit" and "stratified": the exact mixture, sampled exactly.
    with ignore_jit_warnings():  # K is fixed for a traced guide
        single = bool(logits.shape[-1] == 1)
    if single:
        return _SingleGaussian(logits, locs, scales)
    return DiagNormalMixture(logits, locs, scales)
