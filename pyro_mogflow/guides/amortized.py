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
on a batch of contexts returns a :class:`~pyro_mogflow.distributions.MixtureFlow`, a Pyro
distribution with batch shape ``(B,)`` and event shape ``(D,)``.

The conditional flows a name can build are listed in :data:`~pyro_mogflow.flows.CONDITIONAL_FLOWS`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import pyro.distributions.transforms as T
import torch
from pyro.distributions.conditional import ConditionalTransform
from torch import nn
from torch.distributions import Transform

from .._validation import check_int, check_real
from ..distributions import MixtureFlow
from ..distributions.estimators import Temperature
from ..flows import BufferPermute, build_conditional_flow
from .state import EstimatorState

__all__ = ["AmortizedMixtureFlow"]


# ---------------------------------------------------------------------------------- module
class AmortizedMixtureFlow(EstimatorState, nn.Module):
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
    :class:`~pyro_mogflow.distributions.MixtureFlow` with batch shape ``batch`` and event shape
    ``(latent_dim,)``, to be sampled inside the user's guide::

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
    does).

    The module's parameters and buffers set the device and dtype: ``encoder.to(torch.float64)``
    or ``encoder.cuda()``, and pass contexts of the same dtype and device.

    :param int context_dim: size of the last dimension of the context ``x``.
    :param int latent_dim: ``D``, size of the latent ``z``.
    :param int num_components: ``K`` (default 4).
    :param flow: a name in :data:`~pyro_mogflow.flows.CONDITIONAL_FLOWS`, a callable
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
        flow: str | Callable[[int, int], ConditionalTransform] | None = "affine_autoregressive",
        num_flows: int = 2,
        hidden_dims: Sequence[int] = (128, 128),
        flow_hidden_dims: Sequence[int] | None = None,
        flow_kwargs: dict | None = None,
        estimator: str = "implicit",
        temperature: Temperature = 0.5,
        num_nested: int = 32,
        init_scale: float = 0.5,
        init_spread: float = 1.0,
        min_scale: float = 1e-4,
    ) -> None:
        super().__init__()
        self.context_dim = check_int("context_dim", context_dim, 1)
        self.latent_dim = check_int("latent_dim", latent_dim, 1)
        self.num_components = check_int("num_components", num_components, 1)
        self.num_flows = check_int("num_flows", num_flows, 1) if flow is not None else 0
        self.hidden_dims = _check_dims("hidden_dims", hidden_dims, allow_empty=True)
        self.flow_hidden_dims = (
            None
            if flow_hidden_dims is None
            else _check_dims("flow_hidden_dims", flow_hidden_dims, allow_empty=False)
        )
        if flow_kwargs is not None and not isinstance(flow_kwargs, dict):
            raise TypeError(f"flow_kwargs must be a dict or None, got {type(flow_kwargs).__name__}")
        self._init_estimator(estimator, temperature, num_nested)
        init_scale = check_real("init_scale", init_scale, minimum=0.0, strict=True)
        init_spread = check_real("init_spread", init_spread, minimum=0.0)
        self.min_scale = check_real("min_scale", min_scale, minimum=0.0)
        if init_scale <= self.min_scale:
            raise ValueError(
                f"init_scale must be larger than min_scale, got init_scale={init_scale} and "
                f"min_scale={self.min_scale}"
            )
        self.flow_name = flow

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
        if x.numel() == 0:
            # A deliberate refusal: the mixture's distributions cannot be built on an empty
            # batch, and an empty minibatch is almost always a data-loading slip.
            raise ValueError(
                f"x has an empty batch (shape {tuple(x.shape)}): AmortizedMixtureFlow needs at "
                "least one context row; skip empty minibatches (e.g. DataLoader(..., "
                "drop_last=True) or `if len(x) == 0: continue`)"
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

    def forward(self, x: torch.Tensor, estimator: str | None = None) -> MixtureFlow:
        """The posterior :math:`q(z \\mid x)` for each row of ``x`` (``(*batch, context_dim)``).

        :param torch.Tensor x: contexts, shape ``(*batch, context_dim)``.
        :param str estimator: overrides the module's estimator for this call only, e.g.
            ``"implicit"`` to evaluate an encoder trained with a relaxed estimator on exact
            mixture draws (a relaxed draw does not follow the density that ``log_prob``
            returns, so importance weights need the exact draws).
        :return: a :class:`~pyro_mogflow.distributions.MixtureFlow`, batch shape ``batch``,
            event shape ``(latent_dim,)``.
        :raises ValueError: if ``x`` has an empty batch (no rows): refused with a clear message
            rather than returning an empty distribution.
        """
        options = self._estimator_kwargs(estimator)
        logits, locs, scales, h = self.encode(x)
        transforms = [_per_call(layer, h) for layer in self.flow]
        self._count_step()
        return MixtureFlow(logits, locs, scales, transforms, **options)

    @torch.no_grad()
    def component_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Mixture weights :math:`\\pi_k(x)` for each row, shape ``(*batch, K)`` (no gradients)."""
        return torch.softmax(self.encode(x)[0], dim=-1)

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
    out = tuple(check_int(f"{name}[{i}]", h, 1) for i, h in enumerate(dims))
    if not out and not allow_empty:
        raise ValueError(f"{name} must not be empty (use None for Pyro's defaults)")
    return out
