r"""The exact mixture of full-covariance Gaussians: the base of an upgraded guide.

.. math::
    q_0(u) = \sum_{k=1}^K \pi_k\, \mathcal N\big(u;\ \mu_k, L_k L_k^\top\big), \qquad
    \pi = \operatorname{softmax}(\text{logits}),

with :math:`L_k` lower-triangular with a positive diagonal (a Cholesky factor). This is the base
of :class:`~pyro_mogflow.distributions.MixtureFlow` built with ``scale_tril`` (for example by
:meth:`~pyro_mogflow.AutoMixtureFlow.to_full_covariance`): a component can then take the shape
of a correlated mode, which a diagonal component cannot.

Draws and the density are exact. Gradients reach every parameter through
:meth:`~pyro_mogflow.distributions.MixtureFlow.stratified_rsample` (:math:`u = \mu_k + L_k
\epsilon` for every component, weighted by :math:`\pi_k`), which is how
:class:`~pyro_mogflow.StratifiedELBO` and :func:`~pyro_mogflow.fit` train it. :meth:`rsample`,
the single-draw path of ``Trace_ELBO`` and ``Predictive``, reparameterizes the draw within its
component only: ``locs`` and ``scale_tril`` get exact gradients, ``logits`` none through the
discrete choice (the implicit reparameterization of
:class:`~pyro_mogflow.distributions.DiagNormalMixture` relies on components that are products
of one-dimensional Gaussians), so such a loop does not train the weights.
"""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution, constraints

from .density import full_mixture_log_prob, marginal_scales, mixture_moments

__all__ = ["FullNormalMixture", "check_scale_tril"]


def check_scale_tril(scale_tril, locs: torch.Tensor) -> torch.Tensor:
    """``scale_tril`` if it is a floating tensor of shape ``(*batch, K, D, D)`` matching ``locs``
    (``(*batch, K, D)``) in dtype and ``K, D``, with a positive finite diagonal; else raise.

    :raises TypeError: if it is not a tensor of ``locs``' dtype.
    :raises ValueError: for a wrong shape or a diagonal entry that is not positive and finite.
    """
    if not isinstance(scale_tril, torch.Tensor):
        raise TypeError(f"scale_tril must be a torch.Tensor, got {type(scale_tril).__name__}")
    if scale_tril.dtype != locs.dtype:
        raise TypeError(
            f"scale_tril must have the dtype of locs ({locs.dtype}), got {scale_tril.dtype}"
        )
    k, d = locs.shape[-2:]
    if scale_tril.dim() < 3 or tuple(scale_tril.shape[-3:]) != (k, d, d):
        raise ValueError(
            f"scale_tril must have shape (*batch, K, D, D) = (..., {k}, {d}, {d}), got "
            f"{tuple(scale_tril.shape)}"
        )
    if not torch._C._get_tracing_state():
        diag = scale_tril.diagonal(dim1=-2, dim2=-1)
        if not bool(((diag > 0) & torch.isfinite(diag)).all()):
            raise ValueError("scale_tril must have a positive, finite diagonal")
        if not bool(torch.isfinite(scale_tril.tril()).all()):
            raise ValueError("scale_tril must be finite")
    return scale_tril


class FullNormalMixture(TorchDistribution):
    r"""A mixture of full-covariance Gaussians (see the module docstring).

    :param torch.Tensor logits: shape ``(*batch, K)``.
    :param torch.Tensor locs: shape ``(*batch, K, D)``.
    :param torch.Tensor scale_tril: Cholesky factors, shape ``(*batch, K, D, D)``.
    :ivar torch.Tensor scales: the components' marginal standard deviations
        :math:`\sqrt{\operatorname{diag} L_k L_k^\top}`, shape ``(*batch, K, D)`` (what code
        written for diagonal mixtures reads as per-coordinate scales: exact for moments and
        marginals).
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, logits, locs, scale_tril, validate_args=None):
        self.logits = logits
        self.locs = locs
        self.scale_tril = check_scale_tril(scale_tril, locs)
        self.scales = marginal_scales(self.scale_tril)
        batch = torch.broadcast_shapes(logits.shape[:-1], locs.shape[:-2], scale_tril.shape[:-3])
        super().__init__(batch, locs.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(FullNormalMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        k, d = self.locs.shape[-2:]
        new.logits = self.logits.expand(batch_shape + (k,))
        new.locs = self.locs.expand(batch_shape + (k, d))
        new.scale_tril = self.scale_tril.expand(batch_shape + (k, d, d))
        new.scales = self.scales.expand(batch_shape + (k, d))
        super(FullNormalMixture, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Exact draw reparameterized within its component, ``(*sample, *batch, D)``.

        The component is drawn as in :meth:`sample`; :math:`u = \\mu_k + L_k \\epsilon` then
        carries exact gradients to ``locs`` and ``scale_tril``, but the discrete choice passes
        none to ``logits`` (see the module docstring): a single-draw ELBO such as
        ``Trace_ELBO`` does not train the weights of a full-covariance mixture. Train it with
        :class:`~pyro_mogflow.StratifiedELBO` or :func:`~pyro_mogflow.fit`.
        """
        shape = torch.Size(sample_shape) + self.batch_shape
        k, d = self.locs.shape[-2:]
        with torch.no_grad():
            choice = torch.distributions.Categorical(
                logits=self.logits, validate_args=False
            ).sample(sample_shape)
        index = choice.reshape(shape + (1, 1)).expand(shape + (1, d))
        loc = self.locs.expand(shape + (k, d)).gather(-2, index).squeeze(-2)
        tril_index = choice.reshape(shape + (1, 1, 1)).expand(shape + (1, d, d))
        tril = self.scale_tril.expand(shape + (k, d, d)).gather(-3, tril_index).squeeze(-3)
        eps = torch.randn(shape + (d, 1), dtype=loc.dtype, device=loc.device)
        return loc + (tril.tril() @ eps).squeeze(-1)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Ancestral draw, :math:`u = \\mu_k + L_k \\epsilon`, shape ``(*sample, *batch, D)``."""
        return self.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Exact log-density, shape ``(*sample, *batch)``, of ``value`` ``(*sample, *batch, D)``."""
        if self._validate_args:
            self._validate_sample(value)
        return full_mixture_log_prob(value, self.logits, self.locs, self.scale_tril)

    @property
    def mean(self) -> torch.Tensor:
        """Exact mean, shape ``(*batch, D)``."""
        return mixture_moments(self.logits, self.locs, self.scales)[0]

    @property
    def variance(self) -> torch.Tensor:
        """Exact per-coordinate variance, shape ``(*batch, D)``."""
        return mixture_moments(self.logits, self.locs, self.scales)[1]
