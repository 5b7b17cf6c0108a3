"""The parts of :func:`~pyro_mogflow.fit_max_entropy`: the trained mixture flow on a support,
argument checks, quasi-random draws and the estimates made from them."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch.distributions import Transform, biject_to, constraints
from torch.distributions.transforms import IndependentTransform

from ..distributions import MixtureFlow, mixture_log_prob
from ..flows import FLOWS, build_flow, check_flow
from .mixture_weights import MIN_WEIGHT

__all__: list = []

#: Samples per chunk when the final estimates are computed (bounds the memory of evaluation).
_EVAL_CHUNK = 16384


class _MaxEntFlow(torch.nn.Module):
    """The trainable mixture flow on ``R^d'``: weights, means, log-scales and a flow stack."""

    def __init__(
        self, k: int, d: int, flow: Transform | None, init_spread: float, dtype, sobol: bool = False
    ):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(k, dtype=dtype))
        spread = init_spread if k > 1 else 0.0
        # Sobol' means (scrambled, through the normal quantile) cover the space evenly: with
        # K = 2^m every half-space of a coordinate gets K / 2 of them, where i.i.d. means may
        # leave a region (a mode) without a component.
        eps = (
            _sobol_normal(k, d, dtype, "cpu") if sobol and k > 1 else torch.randn(k, d, dtype=dtype)
        )
        self.locs = torch.nn.Parameter(spread * eps)
        self.log_scales = torch.nn.Parameter(torch.zeros(k, d, dtype=dtype))
        self.flow = flow.to(dtype) if isinstance(flow, torch.nn.Module) else flow

    def mixture_flow(self, estimator: str, temperature: float, num_nested: int) -> MixtureFlow:
        transforms = [] if self.flow is None else [self.flow]
        return MixtureFlow(
            self.logits,
            self.locs,
            self.log_scales.exp(),
            transforms,
            estimator=estimator,
            temperature=temperature,
            num_nested=num_nested,
        )


def _support_transform(support: object, dim: int) -> tuple[Transform, int]:
    """``biject_to(support)`` as a transform with event dim 1, and the free dimension ``d'``."""
    if not isinstance(support, constraints.Constraint):
        raise TypeError(
            "support must be a torch constraint (e.g. constraints.real, constraints.positive, "
            f"constraints.simplex, constraints.interval(0, 1)), got {type(support).__name__}"
        )
    try:
        transform = biject_to(support)
    except NotImplementedError:
        raise ValueError(
            f"support {support} has no bijection from real space (torch's biject_to does not "
            "know it); use a continuous constraint such as constraints.real, positive, "
            "interval(a, b), greater_than(a) or simplex"
        ) from None
    if transform.codomain.event_dim > 1 or transform.domain.event_dim > 1:
        raise ValueError(
            f"support {support} is a constraint on matrices (event dim "
            f"{transform.codomain.event_dim}); fit_max_entropy handles points of shape (dim,): "
            "elementwise constraints or the simplex"
        )
    if transform.codomain.event_dim == 0:
        transform = IndependentTransform(transform, 1)
    free = transform.inverse_shape(torch.Size([dim]))
    if len(free) != 1 or free[0] < 1:
        raise ValueError(
            f"dim={dim} is too small for support {support}: the free dimension would be "
            f"{tuple(free)} (the simplex needs dim >= 2)"
        )
    return transform, int(free[0])


def _check_target(target: object) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        try:
            target = torch.as_tensor(target, dtype=torch.get_default_dtype())
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"target must be a tensor (or a sequence of floats) of shape (M,), got "
                f"{type(target).__name__}"
            ) from None
    if not target.is_floating_point():
        target = target.to(torch.get_default_dtype())
    if target.dim() != 1 or target.numel() < 1:
        raise ValueError(
            f"target must have shape (M,) with M >= 1 (one entry per statistic), got shape "
            f"{tuple(target.shape)}"
        )
    if not bool(torch.isfinite(target).all()):
        raise ValueError(f"target must be finite, got {target.tolist()}")
    return target.detach()


def _check_flow(flow: object) -> None:
    check_flow(flow)
    if isinstance(flow, str) and not FLOWS[flow].invertible:
        raise ValueError(
            f"flow {flow!r} is forward-only: the fitted distribution could not score points "
            "(log_prob); choose an invertible flow such as 'spline_autoregressive'"
        )


def _build_flow(flow, d: int, num_flows: int, hidden_dims, flow_kwargs: dict):
    if flow is None or num_flows == 0:
        return None
    with warnings.catch_warnings():
        # Pyro warns that an autoregressive network on one input is affine; at d' = 1 the
        # spline layers still learn a (context-free) monotone spline, which is what we want.
        warnings.filterwarnings("ignore", message=".*input_dim = 1.*", category=UserWarning)
        return build_flow(flow, d, num_flows, hidden_dims, **flow_kwargs)


def _draw(
    module: _MaxEntFlow,
    estimator: str,
    n: int,
    support: Transform,
    temperature: float,
    num_nested: int,
    qmc: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reparameterized draws on the support with their exact log-densities and weights.

    :return: ``(x, log_p, w)``, shapes ``(N, dim)``, ``(N,)``, ``(N,)``, such that
        :math:`\\sum_i w_i f(x_i)` estimates :math:`\\mathbb{E}_q[f(x)]`.
    """
    q = module.mixture_flow(estimator, temperature, num_nested)
    k = q.num_components
    if estimator == "stratified" and qmc:
        per = max(1, n // k)
        eps = _sobol_normal(per, q.locs.shape[-1], q.locs.dtype, q.locs.device)
        u = (q.locs.unsqueeze(1) + q.scales.unsqueeze(1) * eps).reshape(k * per, -1)
        z, log_det = q.push(u)
        log_q = mixture_log_prob(u, q.logits, q.locs, q.scales) - log_det
        w = (torch.softmax(q.logits, -1) / per).repeat_interleave(per)
    elif estimator == "stratified":
        per = max(1, n // k)
        draw = q.expand((k * per,)).stratified_rsample(per, -1)
        z, log_q = draw.value, draw.log_q
        w = (draw.log_weights.exp() / per).repeat_interleave(per)
    else:
        u = q.base_dist.rsample((n,))
        z, log_det = q.push(u)
        log_q = q.base_dist.log_prob(u) - log_det
        w = torch.full((n,), 1.0 / n, dtype=z.dtype, device=z.device)
    x = support(z)
    log_p = log_q - support.log_abs_det_jacobian(z, x)
    return x, log_p, w


def _natural_weight_step(logits: torch.Tensor, step: float) -> None:
    r"""In place, from ``logits.grad``: :math:`\log\pi_k \leftarrow \log\pi_k - \eta\,(g_k -
    \pi^\top g)`, :math:`g_k = \partial \mathcal{L} / \partial \pi_k`, renormalised and floored
    at ``MIN_WEIGHT``.

    The gradient w.r.t. the logits is :math:`\pi_k (g_k - \pi^\top g)`, so dividing it by
    :math:`\pi_k` gives the natural gradient (the Fisher metric of the categorical): the
    mirror-descent step that moves a component's weight in proportion to how much better or
    worse its own draws score than the mixture's, whatever its current weight.
    """
    with torch.no_grad():
        log_pi = torch.log_softmax(logits, -1)
        nat = (logits.grad / log_pi.exp().clamp(min=MIN_WEIGHT)).clamp(-1e3 / step, 1e3 / step)
        new = torch.log_softmax(log_pi - step * nat, -1).clamp(min=math.log(MIN_WEIGHT))
        logits.copy_(torch.log_softmax(new, -1))
        logits.grad = None


def _sobol_normal(n: int, d: int, dtype, device) -> torch.Tensor:
    """``n`` standard normal points in ``R^d`` from a freshly scrambled Sobol' sequence."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    s = torch.quasirandom.SobolEngine(d, scramble=True, seed=seed).draw(n, dtype=dtype)
    return torch.special.ndtri(s.clamp(1e-12, 1 - 1e-12)).to(device)


@torch.no_grad()
def _rqmc_estimates(
    q: MixtureFlow, support: Transform, statistic: Callable, n: int, replicates: int = 8
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    r"""Moments of ``T`` and the entropy by randomized quasi-Monte Carlo, with standard errors.

    The expectation over components is taken exactly and each component's Gaussian by a
    scrambled Sobol' sequence mapped through the normal quantile:

    .. math:: \mathbb{E}_q[f(x)] \approx \sum_k \pi_k \frac{1}{m} \sum_{j=1}^m
        f\big(g(f_\theta(\mu_k + \sigma_k \odot \Phi^{-1}(s_j)))\big).

    ``replicates`` independent scramblings give an unbiased estimate each; their spread gives the
    standard error (Owen 1997). For the smooth integrands here the error falls almost as
    :math:`1/n` instead of :math:`1/\sqrt{n}`.

    :return: ``(mean T (M,), se (M,), entropy, entropy_se)``.
    """
    logits, locs, scales = q.logits, q.locs, q.scales
    k, d = locs.shape[-2:]
    log_pi = torch.log_softmax(logits, -1)
    per = max(1, n // (replicates * k))
    per = 1 << max(0, per.bit_length() - 1)  # a power of two: Sobol' balance
    moments, entropies = [], []
    for _ in range(replicates):
        eps = _sobol_normal(per, d, locs.dtype, locs.device)
        t_sum = h_sum = 0.0
        for c in range(0, k, max(1, _EVAL_CHUNK // per)):
            sl = slice(c, c + max(1, _EVAL_CHUNK // per))
            u = (locs[sl].unsqueeze(1) + scales[sl].unsqueeze(1) * eps).reshape(-1, d)
            z, log_det = q.push(u)
            x = support(z)
            log_p = (
                mixture_log_prob(u, logits, locs, scales)
                - log_det
                - support.log_abs_det_jacobian(z, x)
            )
            w = log_pi[sl].exp()
            t = statistic(x)
            t = t.reshape(-1, per, t.shape[-1]).mean(1)
            t_sum = t_sum + (w.unsqueeze(-1) * t).sum(0)
            h_sum = h_sum - (w * log_p.reshape(-1, per).mean(1)).sum()
        moments.append(t_sum)
        entropies.append(h_sum)
    m = torch.stack(moments)
    h = torch.stack(entropies)
    r = len(moments)
    return m.mean(0), m.std(0) / math.sqrt(r), float(h.mean()), float(h.std()) / math.sqrt(r)
