r"""Amortized mixture-flow posteriors for local latent variables (VAEs and the like).

An :class:`~pyro_mogflow.AutoMixtureFlow` fits *one* posterior over the model's latents. Models
with one latent per data point (a VAE's codes, a mixed model's random effects) under a
subsampled ``pyro.plate`` need an *amortized* posterior instead: an encoder maps each data point
:math:`x_b` to the parameters of its own posterior :math:`q(z_b \mid x_b)`. This module gives that
posterior the package's shape, a normalizing flow on a mixture of diagonal Gaussians, with every
parameter a function of :math:`x_b`:

.. math::
    h_b = \mathrm{MLP}(x_b), \qquad
    z_b = f_{h_b}(u_b), \qquad
    u_b \sim \sum_{k=1}^K \pi_k(h_b)\, \mathcal{N}\big(\mu_k(h_b),
        \operatorname{diag} \sigma_k(h_b)^2\big),

where :math:`f_{h}` is a stack of Pyro's *conditional* transforms (IAF-style affine or spline
autoregressive layers, affine coupling, ...) conditioned on the encoder's features :math:`h_b`.
:class:`AmortizedMixtureFlow` is the ``nn.Module`` (register it with ``pyro.module``); calling it
on a batch of contexts returns a :class:`MixtureFlowPosterior`, a Pyro distribution with batch
shape ``(B,)`` and event shape ``(D,)``.

The conditional flows a name can build are listed in :data:`CONDITIONAL_FLOWS`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable, Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.conditional import ConditionalTransform
from torch import nn
from torch.distributions import Transform
from torch.distributions.utils import _sum_rightmost

from ._validation import check_int, check_real
from .autoguide import ESTIMATORS
from .distributions import DiagNormalMixture, RelaxedMixtureOfDiagNormals, mixture_log_prob
from .flows import DEFAULT_SPLINE_BOUND, BufferPermute

__all__ = [
    "AmortizedMixtureFlow",
    "CONDITIONAL_FLOWS",
    "ConditionalFlowSpec",
    "MixtureFlowPosterior",
    "build_conditional_flow",
]


# ----------------------------------------------------------------------------- flow registry
@dataclasses.dataclass(frozen=True)
class ConditionalFlowSpec:
    """How to build one conditional layer.

    :param builder: ``builder(latent_dim, context_dim, hidden_dims, **kwargs)`` returning a
        :class:`~pyro.distributions.ConditionalTransformModule`.
    :param min_dim: the smallest latent dimension the layer supports.
    :param description: one line for the docs and error messages.
    """

    builder: Callable[..., ConditionalTransform]
    min_dim: int = 1
    description: str = ""


def _hidden(hidden_dims):
    return None if hidden_dims is None else list(hidden_dims)


def _spline_kwargs(kwargs):
    kwargs = dict(kwargs)
    kwargs.setdefault("bound", DEFAULT_SPLINE_BOUND)
    kwargs.setdefault("count_bins", 8)
    return kwargs


#: Conditional flow layers buildable by name. Only invertible layers are registered, so the
#: posterior can score any point (e.g. the IWAE bound's draws, or a point from another guide).
CONDITIONAL_FLOWS: dict[str, ConditionalFlowSpec] = {
    "affine_autoregressive": ConditionalFlowSpec(
        lambda d, c, h, **kw: T.conditional_affine_autoregressive(d, c, _hidden(h), **kw),
        description="IAF (Kingma et al. 2016), conditioned on the encoder's features",
    ),
    "spline_autoregressive": ConditionalFlowSpec(
        lambda d, c, h, **kw: T.conditional_spline_autoregressive(
            d, c, _hidden(h), **_spline_kwargs(kw)
        ),
        description="autoregressive neural spline flow (Durkan et al. 2019)",
    ),
    "affine_coupling": ConditionalFlowSpec(
        lambda d, c, h, **kw: T.conditional_affine_coupling(d, c, _hidden(h), **kw),
        min_dim=2,
        description="Real NVP coupling (Dinh et al. 2017)",
    ),
    "spline": ConditionalFlowSpec(
        lambda d, c, h, **kw: T.conditional_spline(d, c, _hidden(h), **_spline_kwargs(kw)),
        description="elementwise rational-quadratic spline (Durkan et al. 2019)",
    ),
    "householder": ConditionalFlowSpec(
        lambda d, c, h, **kw: T.conditional_householder(d, c, _hidden(h), **kw),
        min_dim=2,
        description="Householder reflections (Tomczak & Welling 2016)",
    ),
}

#: Pyro's conditional layers that can only map forward (their inverse is missing or stale).
_FORWARD_ONLY = (T.ConditionalPlanar, T.ConditionalRadial, T.ConditionalNeuralAutoregressive)


def build_conditional_flow(
    flow,
    latent_dim: int,
    context_dim: int,
    num_flows: int = 2,
    hidden_dims: Sequence[int] | None = None,
    **flow_kwargs,
) -> nn.ModuleList:
    """Build ``num_flows`` conditional layers on ``R^latent_dim``, permutations in between.

    :param flow: a name in :data:`CONDITIONAL_FLOWS`, a callable
        ``(latent_dim, context_dim) -> ConditionalTransformModule`` (called once per layer), or
        ``None`` (no flow: an empty list).
    :param int latent_dim: ``D``.
    :param int context_dim: size of the context the layers are conditioned on.
    :param int num_flows: number of layers.
    :param hidden_dims: hidden sizes of the layers' networks (``None``: Pyro's defaults).
    :param flow_kwargs: extra keyword arguments of a registered builder (e.g. ``count_bins``,
        ``bound``; spline layers default to ``bound=8``, ``count_bins=8``).
    :return: an :class:`~torch.nn.ModuleList` of conditional layers and
        :class:`~pyro_mogflow.flows.BufferPermute` permutations (stored as buffers).
    :raises ValueError: for an unknown name, a too small ``latent_dim`` or a forward-only layer.
    """
    if flow is None:
        return nn.ModuleList()
    if isinstance(flow, str):
        if flow not in CONDITIONAL_FLOWS:
            raise ValueError(
                f"unknown conditional flow {flow!r}; registered ones are "
                f"{sorted(CONDITIONAL_FLOWS)}, or pass a callable "
                "(latent_dim, context_dim) -> ConditionalTransformModule"
            )
        spec = CONDITIONAL_FLOWS[flow]
        if latent_dim < spec.min_dim:
            raise ValueError(
                f"flow {flow!r} needs latent_dim >= {spec.min_dim}, got latent_dim={latent_dim}; "
                "use e.g. flow='affine_autoregressive' or 'spline' instead"
            )

        def make():
            return spec.builder(latent_dim, context_dim, hidden_dims, **flow_kwargs)

    elif callable(flow):
        if flow_kwargs or hidden_dims is not None:
            raise ValueError(
                "flow_hidden_dims and flow_kwargs apply only to a registered flow name, got a "
                f"callable flow with flow_hidden_dims={hidden_dims} and flow_kwargs={flow_kwargs}"
            )

        def make():
            return flow(latent_dim, context_dim)

    else:
        raise TypeError(
            "flow must be a name in CONDITIONAL_FLOWS, a callable "
            f"(latent_dim, context_dim) -> ConditionalTransformModule or None, got "
            f"{type(flow).__name__}"
        )
    layers = nn.ModuleList()
    for i in range(num_flows):
        if i > 0 and latent_dim > 1:
            layers.append(BufferPermute(torch.randperm(latent_dim)))
        layer = make()
        if not isinstance(layer, ConditionalTransform) or not isinstance(layer, nn.Module):
            raise TypeError(
                "a conditional flow layer must be a pyro ConditionalTransformModule, got "
                f"{type(layer).__name__}"
            )
        if isinstance(layer, _FORWARD_ONLY):
            raise ValueError(
                f"{type(layer).__name__} is forward-only: it cannot score a point it did not "
                "just produce, so the posterior's log_prob would be unavailable or stale. Use an "
                f"invertible layer, e.g. one of {sorted(CONDITIONAL_FLOWS)}"
            )
        layers.append(layer)
    return layers


# ------------------------------------------------------------------------- base distributions
class _SingleGaussian(DiagNormalMixture):
    """``K = 1``: the plain reparameterization ``mu + sigma * eps`` (same law and gradient)."""

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        eps = torch.randn(shape, dtype=self.locs.dtype, device=self.locs.device)
        return self.locs[..., 0, :] + self.scales[..., 0, :] * eps


class _PathwiseMixture(DiagNormalMixture):
    """Pyro's ``MixtureOfDiagNormals`` sampler, scored with the package's one mixture density."""

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        pyro_mixture = dist.MixtureOfDiagNormals(self.locs, self.scales, self.logits)
        return pyro_mixture.rsample(torch.Size(sample_shape))


def _check_int(name: str, value, minimum: int = 1) -> int:
    return check_int(name, value, minimum)


def _check_float(name: str, value, minimum: float = 0.0, strict: bool = True) -> float:
    return check_real(name, value, minimum=minimum, strict=strict)


# ------------------------------------------------------------------------------ distribution
class MixtureFlowPosterior(TorchDistribution):
    r"""A batch of conditional mixture flows: one posterior :math:`q(z_b \mid x_b)` per row.

    .. math::
        z = f(u), \quad u \sim \sum_{k=1}^K \pi_{k}\,\mathcal{N}(\mu_{k}, \operatorname{diag}
        \sigma_{k}^2), \qquad
        \log q(z) = \log q_0(u) - \log\left|\det \frac{\partial f}{\partial u}\right|,

    where the weights, means and scales are rows of ``logits``, ``locs`` and ``scales`` and the
    transforms are already conditioned on each row's context. The base :math:`q_0` is scored
    with :func:`~pyro_mogflow.mixture_log_prob` for every estimator (the ``"relaxed-nested"``
    estimator uses its nested estimate instead, as in :class:`RelaxedMixtureOfDiagNormals`).
    Usually built by :class:`AmortizedMixtureFlow`, not by hand.

    Stratified draws: :meth:`stratified_rsample` is the hook through which
    :class:`~pyro_mogflow.StratifiedELBO` takes the expectation over components exactly.

    :param torch.Tensor logits: shape ``(*batch, K)``.
    :param torch.Tensor locs: shape ``(*batch, K, D)``.
    :param torch.Tensor scales: positive, shape ``(*batch, K, D)``.
    :param list transforms: transforms on ``R^D`` (conditioned already), applied in order.
    :param str estimator: one of :data:`~pyro_mogflow.ESTIMATORS` (see
        :class:`AmortizedMixtureFlow`).
    :param float temperature: Gumbel-softmax temperature of the relaxed estimators.
    :param int num_nested: inner draws of the ``"relaxed-nested"`` density.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        logits: torch.Tensor,
        locs: torch.Tensor,
        scales: torch.Tensor,
        transforms: Sequence[Transform] = (),
        estimator: str = "implicit",
        temperature: float = 0.5,
        num_nested: int = 32,
        validate_args=None,
    ):
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
        for t in transforms:
            if not isinstance(t, Transform):
                raise TypeError(f"transforms must be torch Transforms, got {type(t).__name__}")
        k = logits.shape[-1]
        if estimator in ("relaxed", "relaxed-nested"):
            base = RelaxedMixtureOfDiagNormals(
                logits,
                locs,
                scales,
                temperature,
                density="nested" if estimator == "relaxed-nested" else "exact",
                num_nested=num_nested,
            )
        elif estimator == "pathwise":
            base = _PathwiseMixture(logits, locs, scales)
        elif k == 1:
            base = _SingleGaussian(logits, locs, scales)
        else:
            base = DiagNormalMixture(logits, locs, scales)
        self.logits, self.locs, self.scales = base.logits, base.locs, base.scales
        self.transforms = list(transforms)
        self.estimator = estimator
        self.base_dist = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)

    @property
    def num_components(self) -> int:
        """``K``, the number of mixture components."""
        return self.logits.shape[-1]

    @property
    def mixture_weights(self) -> torch.Tensor:
        r""":math:`\pi = \operatorname{softmax}(\text{logits})`, shape ``(*own_batch, K)``."""
        return torch.softmax(self.logits, dim=-1)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(MixtureFlowPosterior, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits, new.locs, new.scales = self.logits, self.locs, self.scales
        new.transforms = self.transforms
        new.estimator = self.estimator
        new.base_dist = self.base_dist.expand(batch_shape)
        super(MixtureFlowPosterior, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def _push(self, u: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            u = t(u)
        return u

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Reparameterized draw, shape ``(*sample_shape, *batch_shape, D)``."""
        if self.estimator == "stratified" and torch.is_grad_enabled():
            warnings.warn(
                "MixtureFlowPosterior(estimator='stratified') is sampled with gradients outside "
                "StratifiedELBO, so it draws the exact mixture with implicit reparameterization "
                "(unbiased, not stratified). Train with pyro_mogflow.StratifiedELBO, or use "
                "estimator='implicit'.",
                UserWarning,
                stacklevel=2,
            )
        return self._push(self.base_dist.rsample(sample_shape))

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Draw without gradients, shape ``(*sample_shape, *batch_shape, D)``."""
        with torch.no_grad():
            return self._push(self.base_dist.sample(sample_shape))

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
        self, num_particles: int, particle_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""``num_particles`` reparameterized draws from *every* component, for StratifiedELBO.

        The distribution must have been expanded (by the particle plate) to a batch shape
        ``(K * n, *rest)`` whose leftmost dimension is ``particle_dim``. Draw ``k * n + t`` is

        .. math:: z_{kt,b} = f_{b}(\mu_{bk} + \sigma_{bk} \odot \epsilon_{kt,b}), \qquad
            \epsilon \sim \mathcal{N}(0, I),

        and its log-density is the exact :math:`\log q(z_{kt,b})` of the whole mixture flow.

        :param int num_particles: ``n``, draws per component.
        :param int particle_dim: the negative batch dimension holding the ``K * n`` draws.
        :return: ``(value, log_q, log_weights)`` of shapes ``(K * n, *rest, D)``,
            ``(K * n, *rest)`` and ``(K, *rest)``; ``log_weights`` holds
            :math:`\log \pi_{bk}` aligned with the draws.
        :raises ValueError: if the estimator is not ``"stratified"`` or the batch shape does not
            have ``K * n`` draws at ``particle_dim``.
        """
        if self.estimator != "stratified":
            raise ValueError(
                "StratifiedELBO needs AmortizedMixtureFlow(..., estimator='stratified'), got a "
                f"posterior with estimator={self.estimator!r}. Rebuild the encoder with "
                "estimator='stratified', or train this one with pyro.infer.Trace_ELBO."
            )
        k, d = self.locs.shape[-2:]
        n = _check_int("num_particles", num_particles)
        batch = self.batch_shape
        if len(batch) + particle_dim != 0 or batch[0] != k * n:
            raise ValueError(
                f"stratified draws need the batch shape (K * n, *rest) = ({k * n}, ...) with the "
                f"draws at particle_dim={particle_dim}, got batch shape {tuple(batch)}. Declare "
                "every batch dimension of the encoder's input with pyro.plate."
            )
        rest = batch[1:]
        own = self.logits.shape[:-1]
        if len(own) > len(rest):
            raise ValueError(
                f"the posterior's own batch shape {tuple(own)} has more dims than the plates "
                f"{tuple(rest)} allow; declare each batch dim with pyro.plate"
            )
        pad = (1,) * (len(rest) - len(own))
        # component-major means and scales, (K, 1, *pad, *own, D), aligned with the draws
        locs = self.locs.movedim(-2, 0).reshape((k, 1) + pad + own + (d,))
        scales = self.scales.movedim(-2, 0).reshape((k, 1) + pad + own + (d,))
        eps = torch.randn((k, n) + rest + (d,), dtype=locs.dtype, device=locs.device)
        u = (locs + scales * eps).reshape((k * n,) + rest + (d,))
        log_q = mixture_log_prob(u, self.logits, self.locs, self.scales)
        z = u
        for t in self.transforms:
            y = t(z)
            log_q = log_q - _sum_rightmost(t.log_abs_det_jacobian(z, y), 1 - t.domain.event_dim)
            z = y
        log_weights = torch.log_softmax(self.logits, dim=-1).movedim(-1, 0)
        log_weights = log_weights.reshape((k,) + pad + own).expand((k,) + rest)
        return z, log_q.expand(batch), log_weights


# ---------------------------------------------------------------------------------- module
class AmortizedMixtureFlow(nn.Module):
    r"""An encoder that maps each data point to its own mixture-flow posterior (amortized VI).

    For a context :math:`x_b` (a data point, or any features it is conditioned on) the module
    computes encoder features :math:`h_b = \mathrm{MLP}(x_b)` and the posterior

    .. math::
        q(z_b \mid x_b):\quad z_b = f_{h_b}(u_b), \quad
        u_b \sim \sum_{k=1}^K \pi_k(h_b)\, \mathcal{N}\big(\mu_k(h_b), \operatorname{diag}
        \sigma_k(h_b)^2\big),

    .. math::
        \pi(h) = \operatorname{softmax}(W_\pi h + c_\pi), \quad
        \mu(h) = W_\mu h + c_\mu, \quad
        \sigma(h) = \operatorname{softplus}(W_\sigma h + c_\sigma) + \sigma_{\min},

    with :math:`f_{h}` a stack of ``num_flows`` conditional Pyro transforms that see
    :math:`h_b` as their context (as the IAF of Kingma et al. 2016 does). With ``num_components=1``
    and ``flow=None`` this is the usual diagonal-Gaussian VAE encoder (Kingma & Welling 2014);
    with ``num_components=1`` and ``flow="affine_autoregressive"`` it is an IAF encoder.

    Calling the module on contexts of shape ``(*batch, context_dim)`` returns a
    :class:`MixtureFlowPosterior` with batch shape ``batch`` and event shape ``(latent_dim,)``,
    to be sampled inside the user's guide::

        encoder = AmortizedMixtureFlow(64, latent_dim=2, num_components=8)

        def guide(x):
            pyro.module("encoder", encoder)
            with pyro.plate("data", len(x), subsample_size=128) as idx:
                pyro.sample("z", encoder(x[idx]))

        svi = SVI(model, guide, Adam({"lr": 1e-3}), Trace_ELBO())

    Estimators (how gradients cross the discrete choice of component, see
    :class:`~pyro_mogflow.AutoMixtureFlow`): ``"implicit"`` (exact draw, unbiased implicit
    reparameterization gradients), ``"stratified"`` (train with
    :class:`~pyro_mogflow.StratifiedELBO`: each data point's expectation over its own
    components is taken exactly, one draw set per component), ``"relaxed"`` and
    ``"relaxed-nested"`` (Gumbel-softmax, biased) and ``"pathwise"`` (Pyro's
    ``MixtureOfDiagNormals`` sampler). Every estimator works with every Pyro ELBO except
    ``"stratified"``, which is meant for StratifiedELBO (elsewhere it samples as ``"implicit"``
    does and warns).

    The module's parameters and buffers set the device and dtype: ``encoder.to(torch.float64)``
    or ``encoder.cuda()``, and pass contexts of the same dtype and device.

    :param int context_dim: size of the last dimension of the context ``x``.
    :param int latent_dim: ``D``, size of the latent ``z``.
    :param int num_components: ``K`` (default 4).
    :param flow: a name in :data:`CONDITIONAL_FLOWS`, a callable
        ``(latent_dim, hidden_size) -> ConditionalTransformModule`` called once per layer, or
        ``None`` for the bare mixture. Default ``"affine_autoregressive"`` (IAF).
    :param int num_flows: number of flow layers (default 2), with buffer permutations between.
    :param hidden_dims: hidden sizes of the encoder MLP (default ``(128, 128)``); its last
        hidden layer is the flow's context. An empty sequence feeds ``x`` itself to the heads
        and the flow.
    :param flow_hidden_dims: hidden sizes of the flow layers' networks (``None``: Pyro's
        defaults).
    :param dict flow_kwargs: extra keyword arguments of a registered flow.
    :param str estimator: one of :data:`~pyro_mogflow.ESTIMATORS` (default ``"implicit"``).
    :param temperature: Gumbel-softmax temperature of the relaxed estimators, a positive float
        or a callable ``step -> float`` of :attr:`step` (the number of calls with gradients
        enabled).
    :param int num_nested: inner draws of the ``"relaxed-nested"`` density (default 32).
    :param float init_scale: the initial component scale, through the scale head's bias
        (default 0.5).
    :param float init_spread: the components' mean offsets start as independent
        :math:`\mathcal{N}(0, \text{init\_spread}^2)` biases so components differ from the start
        (default 1.0; zero when ``K = 1``).
    :param float min_scale: :math:`\sigma_{\min}`, a floor that keeps scales positive (default
        ``1e-4``).

    References:

    * D. Kingma, M. Welling, *Auto-Encoding Variational Bayes*, ICLR 2014.
    * D. Kingma, T. Salimans, R. Jozefowicz, X. Chen, I. Sutskever, M. Welling, *Improved
      Variational Inference with Inverse Autoregressive Flow*, NeurIPS 2016.
    * D. Rezende, S. Mohamed, *Variational Inference with Normalizing Flows*, ICML 2015.
    * M. Figurnov, S. Mohamed, A. Mnih, *Implicit Reparameterization Gradients*, NeurIPS 2018.
    * W. Morningstar, S. Vikram, C. Ham, A. Gallagher, J. Dillon, *Automatic Differentiation
      Variational Inference with Mixtures*, AISTATS 2021.
    """

    def __init__(
        self,
        context_dim: int,
        latent_dim: int,
        num_components: int = 4,
        flow="affine_autoregressive",
        num_flows: int = 2,
        hidden_dims: Sequence[int] = (128, 128),
        flow_hidden_dims: Sequence[int] | None = None,
        flow_kwargs: dict | None = None,
        estimator: str = "implicit",
        temperature=0.5,
        num_nested: int = 32,
        init_scale: float = 0.5,
        init_spread: float = 1.0,
        min_scale: float = 1e-4,
    ):
        super().__init__()
        self.context_dim = _check_int("context_dim", context_dim)
        self.latent_dim = _check_int("latent_dim", latent_dim)
        self.num_components = _check_int("num_components", num_components)
        self.num_flows = _check_int("num_flows", num_flows) if flow is not None else 0
        self.hidden_dims = _check_dims("hidden_dims", hidden_dims, allow_empty=True)
        self.flow_hidden_dims = (
            None
            if flow_hidden_dims is None
            else _check_dims("flow_hidden_dims", flow_hidden_dims, allow_empty=False)
        )
        if flow_kwargs is not None and not isinstance(flow_kwargs, dict):
            raise TypeError(f"flow_kwargs must be a dict or None, got {type(flow_kwargs).__name__}")
        if not isinstance(estimator, str) or estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
        if not callable(temperature):
            _check_float("temperature", temperature)
        self.num_nested = _check_int("num_nested", num_nested)
        init_scale = _check_float("init_scale", init_scale)
        init_spread = _check_float("init_spread", init_spread, strict=False)
        self.min_scale = _check_float("min_scale", min_scale, strict=False)
        if init_scale <= self.min_scale:
            raise ValueError(
                f"init_scale must be larger than min_scale, got init_scale={init_scale} and "
                f"min_scale={self.min_scale}"
            )
        self.estimator = estimator
        self.temperature = temperature
        self.flow_name = flow
        #: Number of calls made with gradients enabled (drives a temperature schedule).
        self.step = 0

        k, d = self.num_components, self.latent_dim
        layers: list[nn.Module] = []
        width = self.context_dim
        for h in self.hidden_dims:
            layers += [nn.Linear(width, h), nn.ELU()]
            width = h
        self.encoder = nn.Sequential(*layers)
        self.feature_dim = width
        self.logits_head = nn.Linear(width, k)
        self.locs_head = nn.Linear(width, k * d)
        self.scales_head = nn.Linear(width, k * d)
        with torch.no_grad():
            self.logits_head.bias.zero_()
            if k > 1:
                self.locs_head.bias.copy_(torch.randn(k * d) * init_spread)
            else:
                self.locs_head.bias.zero_()
            # softplus^{-1}(init_scale - min_scale)
            target = init_scale - self.min_scale
            self.scales_head.bias.fill_(target + math.log(-math.expm1(-target)))
        self.flow = build_conditional_flow(
            flow, d, width, self.num_flows, self.flow_hidden_dims, **dict(flow_kwargs or {})
        )

    # --------------------------------------------------------------------------- encoder
    def _check_context(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        ref = self.logits_head.weight
        if x.dim() < 1 or x.shape[-1] != self.context_dim:
            raise ValueError(
                f"x must have shape (*batch, context_dim={self.context_dim}), got {tuple(x.shape)}"
            )
        if x.dtype != ref.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the module's parameters are {ref.dtype}; pass "
                f"x.to({ref.dtype}) or convert the module with .to({x.dtype})"
            )
        if x.device != ref.device:
            raise ValueError(
                f"x is on {x.device} but the module's parameters are on {ref.device}; move one "
                "of them"
            )
        if not torch._C._get_tracing_state() and not bool(torch.isfinite(x).all()):
            raise ValueError("x must be finite, got NaN or infinite entries")

    def encode(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The encoder's outputs for contexts ``x`` of shape ``(*batch, context_dim)``.

        :return: ``(logits, locs, scales, features)`` of shapes ``(*batch, K)``,
            ``(*batch, K, D)``, ``(*batch, K, D)`` and ``(*batch, feature_dim)``.
        """
        self._check_context(x)
        h = self.encoder(x)
        batch = x.shape[:-1]
        k, d = self.num_components, self.latent_dim
        logits = self.logits_head(h)
        locs = self.locs_head(h).reshape(batch + (k, d))
        scales = nn.functional.softplus(self.scales_head(h)).reshape(batch + (k, d))
        return logits, locs, scales + self.min_scale, h

    def current_temperature(self) -> float:
        """The Gumbel-softmax temperature at the current :attr:`step`."""
        tau = self.temperature(self.step) if callable(self.temperature) else self.temperature
        if isinstance(tau, torch.Tensor):
            tau = float(tau)
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not tau > 0:
            raise ValueError(f"temperature schedule returned {tau!r} at step {self.step}; need > 0")
        return float(tau)

    def forward(self, x: torch.Tensor, estimator: str | None = None) -> MixtureFlowPosterior:
        """The posterior :math:`q(z \\mid x)` for each row of ``x`` (``(*batch, context_dim)``).

        :param torch.Tensor x: contexts, shape ``(*batch, context_dim)``.
        :param str estimator: overrides the module's estimator for this call only, e.g.
            ``"implicit"`` to evaluate an encoder trained with a relaxed estimator on exact
            mixture draws (a relaxed draw does not follow the density that ``log_prob``
            returns, so importance weights need the exact draws).
        :return: a :class:`MixtureFlowPosterior`, batch shape ``batch``, event ``(latent_dim,)``.
        """
        if estimator is None:
            estimator = self.estimator
        elif not isinstance(estimator, str) or estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
        logits, locs, scales, h = self.encode(x)
        tau = self.current_temperature() if estimator.startswith("relaxed") else 0.5
        transforms = [_per_call(layer, h) for layer in self.flow]
        if torch.is_grad_enabled():
            self.step += 1
        return MixtureFlowPosterior(
            logits,
            locs,
            scales,
            transforms,
            estimator=estimator,
            temperature=tau,
            num_nested=self.num_nested,
        )

    @torch.no_grad()
    def component_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Mixture weights :math:`\\pi_k(x)` for each row, shape ``(*batch, K)`` (no gradients)."""
        return torch.softmax(self.encode(x)[0], dim=-1)

    # ----------------------------------------------------------------------- state_dict
    def get_extra_state(self) -> dict:
        """Extra ``state_dict`` entry: the step counter that drives temperature schedules."""
        return {"step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def extra_repr(self) -> str:
        return (
            f"context_dim={self.context_dim}, latent_dim={self.latent_dim}, "
            f"num_components={self.num_components}, flow={self.flow_name!r}, "
            f"num_flows={self.num_flows}, estimator={self.estimator!r}"
        )


def _per_call(layer: nn.Module, context: torch.Tensor) -> Transform:
    """A fresh transform for one posterior: conditioned layers, and permutations rebuilt so that
    no transform cache (which holds the last draw and its graph) lives on the module."""
    if isinstance(layer, ConditionalTransform):
        return layer.condition(context)
    if isinstance(layer, BufferPermute):
        return T.Permute(layer.permutation)
    raise TypeError(f"unexpected flow layer {type(layer).__name__}")


def _check_dims(name: str, dims, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(dims, numbers.Integral) and not isinstance(dims, bool):
        dims = (dims,)
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(dims).__name__}")
    out = tuple(_check_int(f"{name}[{i}]", h) for i, h in enumerate(dims))
    if not out and not allow_empty:
        raise ValueError(f"{name} must not be empty (use None for Pyro's defaults)")
    return out
