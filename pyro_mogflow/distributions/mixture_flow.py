r"""The mixture flow: a normalizing flow on a mixture of diagonal Gaussians, as one distribution.

.. math::
    z = f(u), \qquad u \sim \sum_{k=1}^K \pi_k\, \mathcal{N}(\mu_k, \operatorname{diag}
    \sigma_k^2), \qquad
    \log q(z) = \log q_0(u) - \log\left|\det \frac{\partial f}{\partial u}\right|.

:class:`MixtureFlow` is the package's one core object: every guide returns it
(:class:`~pyro_mogflow.AutoMixtureFlow` for the packed latent of a model,
:class:`~pyro_mogflow.AmortizedMixtureFlow` one per data point), and every objective works on it
(:class:`~pyro_mogflow.StratifiedELBO` through :meth:`MixtureFlow.stratified_rsample`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions import Transform
from torch.distributions.utils import _sum_rightmost

from .density import check_mixture_params, full_mixture_log_prob, mixture_log_prob, mixture_moments
from .estimators import check_estimator, mixture_base
from .full_mixture import FullNormalMixture, check_scale_tril
from .mixture import mixture_marginal_quantiles

__all__ = ["MixtureFlow", "StratifiedSample"]


def check_components(components, num_components: int, device=None) -> torch.Tensor:
    """Return ``components`` as a 1-D int64 tensor of distinct indices in ``[0, K)``, or raise.

    :param components: a sequence or 1-D integer tensor of component indices, shape ``(m,)``.
    :param int num_components: ``K``.
    :return: shape ``(m,)``, dtype ``torch.long``, on ``device``.
    """
    if isinstance(components, torch.Tensor):
        if components.dtype.is_floating_point or components.dtype == torch.bool:
            raise TypeError(f"components must hold integer indices, got dtype {components.dtype}")
        index = components.to(device=device, dtype=torch.long)
    else:
        try:
            values = [operator.index(c) for c in components]
        except TypeError:
            raise TypeError(
                "components must be a 1-D sequence or tensor of integer indices, got "
                f"{components!r}"
            ) from None
        index = torch.tensor(values, dtype=torch.long, device=device)
    if index.dim() != 1 or index.numel() == 0:
        raise ValueError(
            f"components must be a non-empty 1-D set of indices, got shape {tuple(index.shape)}"
        )
    if bool(((index < 0) | (index >= num_components)).any()):
        raise ValueError(
            f"components must be indices in [0, {num_components}), got {index.tolist()}"
        )
    if index.unique().numel() != index.numel():
        raise ValueError(f"components must be distinct, got {index.tolist()}")
    return index


class StratifiedSample(NamedTuple):
    r"""``n`` reparameterized draws from every component of a :class:`MixtureFlow`.

    With the distribution expanded to batch shape ``(K * n, *rest)``, draw ``k * n + t`` of
    batch element ``b`` is :math:`z_{kt,b} = f_b(u_{kt,b})`,
    :math:`u_{kt,b} = \mu_{bk} + \sigma_{bk} \odot \epsilon_{kt,b}`.

    :ivar torch.Tensor value: the draws :math:`z`, shape ``(K * n, *rest, D)``.
    :ivar torch.Tensor log_q: the exact :math:`\log q(z)` of the whole mixture flow,
        shape ``(K * n, *rest)``.
    :ivar torch.Tensor log_weights: :math:`\log \pi_{bk}`, shape ``(K, *rest)``.
    :ivar torch.Tensor base: the draws before the flow, :math:`u`, shape ``(K * n, *rest, D)``.
    """

    value: torch.Tensor
    log_q: torch.Tensor
    log_weights: torch.Tensor
    base: torch.Tensor


class MixtureFlow(TorchDistribution):
    r"""A normalizing flow on a mixture of diagonal Gaussians (a batch of them).

    .. math::
        z = f(u), \quad u \sim \sum_{k=1}^K \pi_{k}\,\mathcal{N}(\mu_{k}, \operatorname{diag}
        \sigma_{k}^2), \qquad
        \log q(z) = \log q_0(u) - \log\left|\det \frac{\partial f}{\partial u}\right|,

    where :math:`\pi = \operatorname{softmax}(\text{logits})` and :math:`f` applies
    ``transforms`` in order. The base :math:`q_0` is scored exactly by
    :func:`~pyro_mogflow.distributions.mixture_log_prob` (the ``"relaxed-nested"`` estimator
    uses its nested estimate instead). The ``estimator`` decides how :meth:`rsample` carries
    gradients through the discrete choice (see :mod:`pyro_mogflow.distributions.estimators`);
    :meth:`stratified_rsample` draws from every component, which is how
    :class:`~pyro_mogflow.StratifiedELBO` takes the expectation over components exactly.

    Usage::

        q = MixtureFlow(logits, locs, scales, [flow], estimator="implicit")
        z = q.rsample((64,))                 # (64, *batch, D), differentiable
        log_q = q.log_prob(z)                # (64, *batch)

    :param torch.Tensor logits: shape ``(*batch, K)``.
    :param torch.Tensor locs: shape ``(*batch, K, D)``.
    :param torch.Tensor scales: positive, shape ``(*batch, K, D)``.
    :param transforms: torch transforms on :math:`\mathbb{R}^D` (already conditioned, for
        conditional flows), applied in order; empty for the bare mixture.
    :param str estimator: one of :data:`~pyro_mogflow.ESTIMATORS` (default ``"implicit"``).
    :param float temperature: Gumbel-softmax temperature of the relaxed estimators.
    :param int num_nested: inner draws of the ``"relaxed-nested"`` density.
    :param validate_args: as for every torch distribution.
    :param torch.Tensor scale_tril: optional Cholesky factors :math:`L_k` of full-covariance
        components, shape ``(*batch, K, D, D)``: the base is then
        :math:`\sum_k \pi_k \mathcal N(\mu_k, L_k L_k^\top)`
        (:class:`~pyro_mogflow.distributions.full_mixture.FullNormalMixture`), ``scales`` is
        ignored (pass ``None``) and ``scales`` holds the marginal standard deviations.
        Only the exact estimators ``"stratified"`` and ``"implicit"`` take it; :meth:`rsample`
        then raises (train with :meth:`stratified_rsample`, i.e.
        :class:`~pyro_mogflow.StratifiedELBO`).
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        logits: torch.Tensor,
        locs: torch.Tensor,
        scales: torch.Tensor | None,
        transforms: Sequence[Transform] = (),
        estimator: str = "implicit",
        temperature: float = 0.5,
        num_nested: int = 32,
        validate_args: bool | None = None,
        scale_tril: torch.Tensor | None = None,
    ):
        check_estimator(estimator)
        transforms = list(transforms)
        for t in transforms:
            if not isinstance(t, Transform):
                raise TypeError(f"transforms must be torch Transforms, got {type(t).__name__}")
        if scale_tril is None:
            base = mixture_base(estimator, logits, locs, scales, temperature, num_nested)
        else:
            if estimator not in ("stratified", "implicit"):
                raise ValueError(
                    "scale_tril (full-covariance components) needs estimator='stratified' or "
                    f"'implicit' (the exact mixture), got estimator={estimator!r}"
                )
            if not isinstance(locs, torch.Tensor):
                raise TypeError(f"locs must be a torch.Tensor, got {type(locs).__name__}")
            check_scale_tril(scale_tril, locs)
            check_mixture_params(logits, locs, torch.ones_like(locs))
            base = FullNormalMixture(logits, locs, scale_tril)
        self.scale_tril = scale_tril
        self.logits, self.locs, self.scales = base.logits, base.locs, base.scales
        self.transforms = transforms
        self.estimator = estimator
        self.base_dist = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)

    @property
    def num_components(self) -> int:
        """``K``, the number of mixture components."""
        return self.logits.shape[-1]

    @property
    def mixture_weights(self) -> torch.Tensor:
        r""":math:`\pi = \operatorname{softmax}(\text{logits})`, shape ``(*batch, K)``."""
        return torch.softmax(self.logits, dim=-1)

    def _require_bare(self, what: str) -> None:
        if self.transforms:
            raise NotImplementedError(
                f"the {what} of a mixture flow with transforms has no closed form; estimate it "
                "from samples (e.g. AutoMixtureFlow.quantiles, which samples in that case)"
            )

    @property
    def mean(self) -> torch.Tensor:
        """Exact mean, shape ``(*batch, D)``, for the bare mixture (no transforms).

        :raises NotImplementedError: if there are transforms.
        """
        self._require_bare("mean")
        return mixture_moments(self.logits, self.locs, self.scales)[0].expand(
            self.batch_shape + self.event_shape
        )

    @property
    def variance(self) -> torch.Tensor:
        """Exact per-coordinate variance, shape ``(*batch, D)``, for the bare mixture.

        :raises NotImplementedError: if there are transforms.
        """
        self._require_bare("variance")
        return mixture_moments(self.logits, self.locs, self.scales)[1].expand(
            self.batch_shape + self.event_shape
        )

    def marginal_quantiles(self, levels) -> torch.Tensor:
        """Exact quantiles of every coordinate's marginal, shape ``(L, *batch, D)``, for the
        bare mixture (see ``pyro_mogflow.distributions.mixture.mixture_marginal_quantiles``).

        :param levels: ``L`` levels in ``[0, 1]``.
        :raises NotImplementedError: if there are transforms (a flow mixes the coordinates).
        """
        self._require_bare("marginal quantiles")
        # exact for full covariance too: each component's marginal is N(mu_kd, scales_kd^2)
        return mixture_marginal_quantiles(levels, self.logits, self.locs, self.scales)

    def expand(self, batch_shape, _instance=None) -> MixtureFlow:
        new = self._get_checked_instance(MixtureFlow, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits, new.locs, new.scales = self.logits, self.locs, self.scales
        new.scale_tril = self.scale_tril
        new.transforms = self.transforms
        new.estimator = self.estimator
        new.base_dist = self.base_dist.expand(batch_shape)
        super(MixtureFlow, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def push(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Map base points through the flow: ``(z, log|det df/du|)``.

        :param torch.Tensor u: shape ``(*sample, *batch, D)``.
        :return: ``z`` of the same shape and the log-determinant, shape ``(*sample, *batch)``.
        """
        log_det = torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
        for t in self.transforms:
            z = t(u)
            log_det = log_det + _sum_rightmost(t.log_abs_det_jacobian(u, z), 1 - t.domain.event_dim)
            u = z
        return u, log_det

    def _forward(self, u: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            u = t(u)
        return u

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Reparameterized draw, shape ``(*sample_shape, *batch_shape, D)``.

        With ``estimator="stratified"`` this is the draw any Pyro ELBO other than
        :class:`~pyro_mogflow.StratifiedELBO` makes (``Trace_ELBO``, ``JitTrace_ELBO``,
        ``Predictive``...): the exact mixture, sampled with implicit reparameterization
        gradients, exactly as ``estimator="implicit"`` (unbiased; one component per draw rather
        than every component). It is a supported path and does not warn.
        """
        return self._forward(self.base_dist.rsample(sample_shape))

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Draw without gradients, shape ``(*sample_shape, *batch_shape, D)``."""
        with torch.no_grad():
            return self._forward(self.base_dist.sample(sample_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Exact log-density (nested estimate for ``"relaxed-nested"``), ``(*sample, *batch)``.

        :param value: shape ``(*sample, *batch, D)``.
        """
        if self._validate_args:
            self._validate_sample(value)
        log_det = 0.0
        y = value
        for t in reversed(self.transforms):
            x = t.inv(y)
            log_det = log_det + _sum_rightmost(t.log_abs_det_jacobian(x, y), 1 - t.domain.event_dim)
            y = x
        return self.base_dist.log_prob(y) - log_det

    def stratified_rsample(
        self,
        num_particles: int,
        particle_dim: int,
        components: torch.Tensor | None = None,
        antithetic: bool = False,
    ) -> StratifiedSample:
        r"""``num_particles`` reparameterized draws from *every* component (stratified draw).

        The distribution must have been expanded (by a particle plate) to a batch shape
        ``(K * n, *rest)`` whose leftmost dimension is ``particle_dim``. Draw ``k * n + t`` is

        .. math:: z_{kt,b} = f_{b}(\mu_{bk} + \sigma_{bk} \odot \epsilon_{kt,b}), \qquad
            \epsilon \sim \mathcal{N}(0, I),

        (:math:`\mu_{bk} + L_{bk} \epsilon_{kt,b}` with full-covariance components),

        and its log-density is the exact :math:`\log q(z_{kt,b})` of the whole mixture flow, so
        weighting draw set :math:`k` by :math:`\pi_{bk}` gives the expectation over components
        exactly (Morningstar et al. 2021).

        With ``components`` (``m`` distinct indices into the ``K`` components, shape ``(m,)``)
        only those components are drawn: the batch shape must then be ``(m * n, *rest)``, draw
        ``j * n + t`` comes from component ``components[j]``, ``log_weights`` has shape
        ``(m, *rest)``, and ``log_q`` is still the density of the whole mixture flow. Draws of a
        partition of the components, taken piece by piece, add up to the full stratified draw.

        :param int num_particles: ``n``, draws per component.
        :param int particle_dim: the negative batch dimension holding the ``K * n`` draws.
        :param torch.Tensor components: optional indices of the components to draw, shape
            ``(m,)`` (default: all ``K``, in order).
        :param bool antithetic: draw the noise in antithetic pairs (default False): with ``n``
            even, :math:`\epsilon_{k,t + n/2} = -\epsilon_{kt}` for :math:`t < n/2`, so each
            component's draws are symmetric about its mean (the average of a function's gradient
            over a pair is exact when the function is quadratic in :math:`u`).
        :return: a :class:`StratifiedSample`.
        :raises ValueError: if the estimator is not ``"stratified"`` or the batch shape does not
            have ``K * n`` draws at ``particle_dim``.
        """
        if self.estimator != "stratified":
            raise ValueError(
                "StratifiedELBO needs a mixture flow built with estimator='stratified', got "
                f"estimator={self.estimator!r}. Rebuild the guide (AutoMixtureFlow or "
                "AmortizedMixtureFlow) with estimator='stratified', or train this one with "
                "pyro.infer.Trace_ELBO."
            )
        if isinstance(num_particles, bool) or not isinstance(num_particles, int):
            raise TypeError(f"num_particles must be an int, got {type(num_particles).__name__}")
        if num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        if not isinstance(antithetic, bool):
            raise TypeError(f"antithetic must be a bool, got {type(antithetic).__name__}")
        if antithetic and num_particles % 2:
            raise ValueError(
                f"antithetic draws come in pairs: num_particles must be even, got {num_particles}"
            )
        k_all, d = self.locs.shape[-2:]
        if components is not None:
            components = check_components(components, k_all, self.locs.device)
        k = k_all if components is None else components.numel()
        n = num_particles
        batch = self.batch_shape
        if len(batch) + particle_dim != 0 or batch[0] != k * n:
            raise ValueError(
                f"stratified draws need the batch shape ({'K' if components is None else 'm'} "
                f"* n, *rest) = ({k * n}, ...) with the "
                f"draws at particle_dim={particle_dim}, got batch shape {tuple(batch)}. Declare "
                "every batch dimension of the guide's inputs with pyro.plate."
            )
        rest = batch[1:]
        own = self.logits.shape[:-1]
        if len(own) > len(rest):
            raise ValueError(
                f"the distribution's own batch shape {tuple(own)} has more dims than the plates "
                f"{tuple(rest)} allow; declare each batch dim with pyro.plate"
            )
        pad = (1,) * (len(rest) - len(own))
        # component-major means and scales, (m, 1, *pad, *own, D), aligned with the draws
        locs, scales = self.locs.movedim(-2, 0), self.scales.movedim(-2, 0)
        if components is not None:
            locs, scales = locs[components], scales[components]
        locs = locs.reshape((k, 1) + pad + own + (d,))
        scales = scales.reshape((k, 1) + pad + own + (d,))
        if antithetic:
            half = torch.randn((k, n // 2) + rest + (d,), dtype=locs.dtype, device=locs.device)
            eps = torch.cat([half, -half], 1)
        else:
            eps = torch.randn((k, n) + rest + (d,), dtype=locs.dtype, device=locs.device)
        if self.scale_tril is None:
            u = (locs + scales * eps).reshape((k * n,) + rest + (d,))
            log_q = mixture_log_prob(u, self.logits, self.locs, self.scales)
        else:
            tril = self.scale_tril.movedim(-3, 0)
            if components is not None:
                tril = tril[components]
            tril = tril.tril().reshape((k, 1) + pad + own + (d, d))
            u = (locs + (tril @ eps.unsqueeze(-1)).squeeze(-1)).reshape((k * n,) + rest + (d,))
            log_q = full_mixture_log_prob(u, self.logits, self.locs, self.scale_tril)
        z, log_det = self.push(u)
        log_weights = torch.log_softmax(self.logits, dim=-1).movedim(-1, 0)
        if components is not None:
            log_weights = log_weights[components]
        log_weights = log_weights.reshape((k,) + pad + own).expand((k,) + rest)
        return StratifiedSample(z, (log_q - log_det).expand(batch), log_weights, u)
