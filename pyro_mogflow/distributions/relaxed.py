"""The design note's base distribution: a Gumbel-softmax relaxed mixture of diagonal Gaussians."""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution, constraints

from .._validation import check_int
from .density import (
    _as_tensor,
    check_mixture_params,
    expand_mixture_params,
    mixture_log_prob,
    mixture_moments,
)

__all__ = ["RelaxedMixtureOfDiagNormals", "relaxed_one_hot_log"]

DENSITIES = ("exact", "nested")


def relaxed_one_hot_log(
    logits: torch.Tensor, temperature: torch.Tensor, sample_shape: torch.Size = torch.Size()
) -> torch.Tensor:
    r"""Draw ``log c`` for a Gumbel-softmax (concrete) relaxed one-hot vector, in log space.

    .. math:: \log c = \operatorname{log\_softmax}\big((\log\pi + g) / \tau\big),
        \qquad g_k = -\log(-\log u_k),\ u_k \sim U(0, 1)

    Working with ``log c`` (as :class:`~torch.distributions.ExpRelaxedCategorical` does) keeps
    samples and gradients finite in float32 down to ``tau = 0.01``.

    :param torch.Tensor logits: shape ``(*batch, K)``.
    :param torch.Tensor temperature: broadcastable to ``batch`` (no trailing K dim).
    :param torch.Size sample_shape: leading sample shape.
    :return: ``log c``, shape ``(*sample_shape, *batch, K)``.
    """
    shape = torch.Size(sample_shape) + logits.shape
    finfo = torch.finfo(logits.dtype)
    u = torch.rand(shape, dtype=logits.dtype, device=logits.device)
    u = u.clamp(min=finfo.tiny, max=1.0 - finfo.eps)
    gumbel = -torch.log(-torch.log(u))
    log_weights = torch.log_softmax(logits, dim=-1)
    return torch.log_softmax((log_weights + gumbel) / temperature.unsqueeze(-1), dim=-1)


class RelaxedMixtureOfDiagNormals(TorchDistribution):
    r"""A mixture of diagonal Gaussians whose discrete choice is relaxed with the Gumbel-softmax.

    This is the base distribution of the design note (§3.2). A draw first takes a relaxed one-hot
    vector :math:`c \sim \mathrm{RelaxedOneHotCategorical}(\tau, \pi)` (drawn in log space), then
    soft-selects a component's mean and scale and adds Gaussian noise:

    .. math::
        z = c^\top \mu + \varepsilon \odot (c^\top \sigma), \qquad
        \varepsilon \sim \mathcal{N}(0, I_D).

    Every step is differentiable, so :meth:`rsample` passes gradients to the weights, means and
    scales. The price is that the sampled law is *not* the mixture: at :math:`\tau = 1` much of
    its mass lies between components. :meth:`log_prob` offers two densities:

    * ``density="exact"``: the mixture density (note, eq. 1),
      :math:`\log \sum_k \pi_k \mathcal{N}(z; \mu_k, \sigma_k)`. Exact for the mixture, but not
      the density of the relaxed samples, so an ELBO built from it is biased for
      :math:`\tau > 0` (the bias vanishes as :math:`\tau \to 0`, while the gradient variance
      grows).
    * ``density="nested"``: the note's nested-minibatch estimate of the relaxed sample's own
      density,

      .. math:: \log \hat q(z) = \log \frac{1}{M} \sum_{j=1}^M
          \mathcal{N}\big(z;\ c_j^\top\mu,\ c_j^\top\sigma\big),
          \qquad c_j \sim \mathrm{RelaxedOneHotCategorical}(\tau, \pi),

      with ``M = num_nested`` **fresh** inner draws, independent of the point being scored and
      reparameterized (gradients flow through them). :math:`\hat q` is unbiased for the relaxed
      density, so by Jensen's inequality :math:`\mathbb{E}\log\hat q \le \log q`: the log-density
      is biased low, by about :math:`\operatorname{Var}[\hat q]/(2 M q^2)`, which makes an ELBO
      biased *high* and rewards collapsing onto few components.

    :param torch.Tensor logits: unnormalised log mixture weights, shape ``(*batch, K)``.
    :param torch.Tensor locs: component means, shape ``(*batch, K, D)``.
    :param torch.Tensor scales: component standard deviations (positive), ``(*batch, K, D)``.
    :param temperature: :math:`\tau > 0`, a float or a tensor broadcastable to ``batch_shape``
        (no ``K`` dim). As in torch, a temperature with as many dims as ``logits`` and a trailing
        singleton (``[n, 1]`` with logits ``[n, K]``) is read as one temperature per batch row,
        so it never yields an ``[n, n]`` log-density.
    :param str density: ``"exact"`` (default) or ``"nested"``.
    :param int num_nested: ``M``, the number of inner draws for ``density="nested"``.

    References:

    * E. Jang, S. Gu, B. Poole, *Categorical Reparameterization with Gumbel-Softmax*, ICLR 2017.
    * C. Maddison, A. Mnih, Y. W. Teh, *The Concrete Distribution*, ICLR 2017.
    """

    arg_constraints = {
        "logits": constraints.real_vector,
        "locs": constraints.independent(constraints.real, 2),
        "scales": constraints.independent(constraints.positive, 2),
        "temperature": constraints.positive,
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        logits: torch.Tensor,
        locs: torch.Tensor,
        scales: torch.Tensor,
        temperature=1.0,
        *,
        density: str = "exact",
        num_nested: int = 32,
        validate_args=None,
    ):
        if density not in DENSITIES:
            raise ValueError(f"density must be one of {DENSITIES}, got {density!r}")
        num_nested = check_int("num_nested", num_nested, 1)
        logits, locs, scales = check_mixture_params(logits, locs, scales)
        temperature = _as_tensor("temperature", temperature, like=logits)
        if not temperature.is_floating_point():
            temperature = temperature.to(logits.dtype)
        if (
            temperature.dim() == logits.dim()
            and temperature.dim() > 0
            and temperature.shape[-1] == 1
        ):
            # torch's convention: a trailing singleton dim that lines up with K is per-batch.
            temperature = temperature.squeeze(-1)
        if not torch._C._get_tracing_state() and not bool(
            ((temperature > 0) & torch.isfinite(temperature)).all()
        ):
            raise ValueError(
                f"temperature must be finite and > 0, got {temperature.detach().cpu()}"
            )
        try:
            batch_shape = torch.broadcast_shapes(logits.shape[:-1], temperature.shape)
        except RuntimeError as e:
            raise ValueError(
                f"temperature of shape {tuple(temperature.shape)} does not broadcast to the "
                f"batch shape {tuple(logits.shape[:-1])}"
            ) from e
        k, d = locs.shape[-2:]
        self.logits = logits.expand(batch_shape + (k,))
        self.locs = locs.expand(batch_shape + (k, d))
        self.scales = scales.expand(batch_shape + (k, d))
        self.temperature = temperature.to(logits.dtype).expand(batch_shape)
        self.density = density
        self.num_nested = num_nested
        super().__init__(batch_shape, torch.Size((d,)), validate_args=validate_args)

    @property
    def num_components(self) -> int:
        return self.logits.shape[-1]

    def expand(self, batch_shape, _instance=None):
        new = expand_mixture_params(self, RelaxedMixtureOfDiagNormals, batch_shape, _instance)
        new.temperature = self.temperature.expand(torch.Size(batch_shape))
        new.density = self.density
        new.num_nested = self.num_nested
        return new

    def _soft_select(self, log_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = log_c.exp().unsqueeze(-1)  # (..., K, 1)
        return (c * self.locs).sum(-2), (c * self.scales).sum(-2)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Reparameterized draw, shape ``(*sample_shape, *batch_shape, D)``."""
        sample_shape = torch.Size(sample_shape)
        log_c = relaxed_one_hot_log(self.logits, self.temperature, sample_shape)
        loc, scale = self._soft_select(log_c)
        eps = torch.randn(loc.shape, dtype=loc.dtype, device=loc.device)
        return loc + scale * eps

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log-density of ``value`` (shape ``(*sample, *batch, D)``), shape ``(*sample, *batch)``.

        With ``density="nested"`` the result is a fresh Monte Carlo estimate on every call.
        """
        if self._validate_args:
            self._validate_sample(value)
        if self.density == "exact":
            return mixture_log_prob(value, self.logits, self.locs, self.scales)
        return self._nested_log_prob(value)

    def _nested_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        nb = len(self.batch_shape)
        log_c = relaxed_one_hot_log(self.logits, self.temperature, (self.num_nested,))
        loc, scale = self._soft_select(log_c)  # (M, *batch, D)
        v = value.unsqueeze(-nb - 2)  # (*sample, 1, *batch, D)
        z = (v - loc) / scale
        terms = -(0.5 * z.pow(2) + scale.log() + 0.5 * math.log(2 * math.pi)).sum(-1)
        return torch.logsumexp(terms, dim=-nb - 1) - math.log(self.num_nested)

    @property
    def mixture_mean(self) -> torch.Tensor:
        """Mean of the mixture that is being relaxed (the ``tau -> 0`` limit), ``(*batch, D)``."""
        return mixture_moments(self.logits, self.locs, self.scales)[0]

    @property
    def mixture_variance(self) -> torch.Tensor:
        """Per-coordinate variance of the mixture being relaxed (``tau -> 0``), ``(*batch, D)``."""
        return mixture_moments(self.logits, self.locs, self.scales)[1]
