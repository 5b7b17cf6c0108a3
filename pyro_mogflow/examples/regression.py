r"""A regression whose likelihood cannot tell the sign of its slope: two mirror modes.

:func:`sign_regression` builds the :class:`~pyro_mogflow.examples.Target` of
:func:`sign_regression_model` with generated data; its log evidence, the exact posterior mass
near each mode and exact posterior draws come from a one-dimensional quadrature in
:math:`\sigma` after integrating :math:`\theta` in closed form. It is the demo's model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch

from pyro_mogflow._validation import check_int

from .targets import Target, _check_dtype, _check_real, _generator

__all__ = ["sign_regression", "sign_regression_model"]


def sign_regression_model(
    x: torch.Tensor, y: torch.Tensor | None = None, prior_scale: float = 3.0
) -> torch.Tensor:
    r"""A linear regression whose likelihood only sees the slope's magnitude.

    .. math::
        \theta \sim \mathcal{N}(0, s_0^2), \qquad \sigma \sim \mathrm{HalfNormal}(1), \qquad
        y_i \mid \theta, \sigma \sim \mathcal{N}(|\theta|\, x_i,\ \sigma^2), \quad i = 1..N.

    Since :math:`p(y, \theta, \sigma) = p(y, -\theta, \sigma)`, the posterior has two mirror
    modes near :math:`\theta = \pm|\theta^\star|` with equal mass -- the way a sign is lost when
    only an amplitude is observed (an unsigned gain, a loading of a factor model).

    :param torch.Tensor x: covariates, shape ``(N,)``.
    :param y: responses, shape ``(N,)``, or ``None`` to sample them.
    :param float prior_scale: :math:`s_0`.
    :return: ``y``, shape ``(*particles, N)``.
    """
    s0 = torch.as_tensor(prior_scale, dtype=x.dtype, device=x.device)
    theta = pyro.sample("theta", dist.Normal(torch.zeros_like(s0), s0))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.ones_like(s0)))
    # theta and sigma have shape () or (*particles, 1) under vectorized particles: broadcasting
    # against x (N,) puts the data plate on dim -1.
    with pyro.plate("data", x.shape[-1]):
        return pyro.sample("y", dist.Normal(theta.abs() * x, sigma), obs=y)


def _log_normal_window(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(Phi(b) - Phi(a))`` for ``a < b`` elementwise, accurate in both tails."""
    # In the upper tail use the mirror image Phi(-a) - Phi(-b), so no two numbers near 1 are
    # subtracted.
    flip = a > 0
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log1p(-torch.exp(log_a - log_b))


def _sign_regression_log_lik_given_sigma(
    x: torch.Tensor, y: torch.Tensor, prior_scale: float, sigma: torch.Tensor, lo, hi
) -> torch.Tensor:
    r"""``log int_{lo < theta < hi} p(theta) p(y | theta, sigma) dtheta`` for ``0 <= lo < hi``.

    For :math:`\theta > 0` the integrand is Gaussian in :math:`\theta` with precision
    :math:`P = 1/s_0^2 + S_{xx}/\sigma^2` and mean :math:`\bar\theta = (S_{xy}/\sigma^2)/P`, so
    the integral is a difference of normal CDFs. ``sigma`` has any shape; so has the result.
    """
    n = x.shape[-1]
    sxx, sxy, syy = (x * x).sum(), (x * y).sum(), (y * y).sum()
    prec = 1.0 / prior_scale**2 + sxx / sigma**2
    b = sxy / sigma**2
    mean = b / prec
    root = prec.sqrt()
    log_window = _log_normal_window((lo - mean) * root, (hi - mean) * root)
    log_2pi = math.log(2 * math.pi)
    return (
        0.5 * b**2 / prec
        - 0.5 * syy / sigma**2
        - math.log(prior_scale)
        - 0.5 * log_2pi
        - n * sigma.log()
        - 0.5 * n * log_2pi
        + 0.5 * (log_2pi - prec.log())
        + log_window
    )


def _sign_regression_sigma_grid(x, y, prior_scale, lo=0.0, hi=math.inf):
    """``(u, log_f)``: ``log_f(u) = log int_{lo<theta<hi} p(theta) p(sigma) p(y|theta,sigma)``
    at ``sigma = exp(u)``, times the Jacobian ``sigma``, on a fine uniform grid ``u`` (float64).

    The integrand is smooth in ``u = log sigma`` and decays like a Gaussian on both sides of the
    grid ``[-12, 5]``, so the grid carries all of its mass.
    """
    x64, y64 = x.detach().double().cpu(), y.detach().double().cpu()
    u = torch.linspace(-12.0, 5.0, 40001, dtype=torch.float64)
    sigma = u.exp()
    log_prior = dist.HalfNormal(torch.tensor(1.0, dtype=torch.float64)).log_prob(sigma) + u
    log_f = log_prior + _sign_regression_log_lik_given_sigma(x64, y64, prior_scale, sigma, lo, hi)
    return u, log_f


def _sign_regression_log_integral(x, y, prior_scale, lo=0.0, hi=math.inf) -> float:
    """``log int int_{lo<theta<hi} p(theta) p(sigma) p(y|theta,sigma)``, by quadrature in sigma.

    The sigma integral is a sum over the grid of :func:`_sign_regression_sigma_grid` (the
    trapezoid rule in log space; the end points carry negligible mass).
    """
    u, log_f = _sign_regression_sigma_grid(x, y, prior_scale, lo, hi)
    du = float(u[1] - u[0])
    return float(torch.logsumexp(log_f, 0) + math.log(du))


def _sign_regression_sampler(
    x: torch.Tensor, y: torch.Tensor, prior_scale: float, dtype: torch.dtype, device
) -> Callable[[int, torch.Generator], dict]:
    r"""Exact posterior draws of ``theta`` and ``sigma`` for :func:`sign_regression_model`.

    :math:`\sigma` by inverse-CDF sampling of its marginal on the grid of
    :func:`_sign_regression_sigma_grid` (the quadrature behind :math:`\log Z`), then
    :math:`|\theta| \mid \sigma` from its Gaussian truncated to :math:`\theta > 0` and a fair
    random sign.
    """
    x64, y64 = x.detach().cpu().double(), y.detach().cpu().double()
    u, log_f = _sign_regression_sigma_grid(x64, y64, prior_scale)
    probs = (log_f - log_f.logsumexp(0)).exp()
    du = float(u[1] - u[0])
    sxx, sxy = float((x64 * x64).sum()), float((x64 * y64).sum())
    s0 = prior_scale

    def sample(num_samples: int, generator: torch.Generator) -> dict:
        idx = torch.multinomial(probs, num_samples, True, generator=generator)
        jitter = torch.rand(num_samples, generator=generator, dtype=torch.float64) - 0.5
        s = (u[idx] + du * jitter).exp()
        prec = 1.0 / s0**2 + sxx / s**2
        mean = (sxy / s**2) / prec
        sd = prec.rsqrt()
        # |theta| | sigma: N(mean, sd^2) truncated to (0, inf), by inverse CDF
        lo = torch.special.ndtr(-mean / sd)
        v = torch.rand(num_samples, generator=generator, dtype=torch.float64)
        p = (lo + v * (1 - lo)).clamp(1e-300, 1 - 1e-16)
        magnitude = mean + sd * torch.special.ndtri(p)
        sign = torch.where(torch.rand(num_samples, generator=generator) < 0.5, -1.0, 1.0)
        return {
            "theta": (sign * magnitude).to(dtype=dtype, device=device),
            "sigma": s.to(dtype=dtype, device=device),
        }

    return sample


def sign_regression(
    num_data: int = 40,
    slope: float = 1.5,
    noise: float = 0.5,
    prior_scale: float = 3.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Target:
    r"""The sign-symmetric regression of :func:`sign_regression_model`, with generated data.

    Covariates :math:`x_i \sim \mathcal{N}(0, 1)` and responses are drawn with
    :math:`\theta^\star` = ``slope`` and :math:`\sigma^\star` = ``noise``. The modes of
    ``theta`` are taken at :math:`\pm\theta^\star` with radius :math:`|\theta^\star|/2` (half the
    gap to the mirror mode; the posterior's own width is about
    :math:`\sigma^\star/\sqrt{N}`).

    Ground truth, by one-dimensional quadrature after integrating :math:`\theta` in closed form
    (for :math:`\theta > 0` the likelihood is Gaussian in :math:`\theta`):

    .. math::
        \log Z = \log 2 + \log \int_0^\infty \!\! \int_0^\infty
        p(\theta)\, p(\sigma)\, p(y \mid \theta, \sigma)\, d\theta\, d\sigma,

    and the exact posterior mass of each ball (equal for both modes by symmetry). Exact draws
    (:meth:`Target.sample_exact`): :math:`\sigma` by inverse-CDF sampling of its marginal on the
    quadrature grid, then :math:`|\theta|` given :math:`\sigma` from its truncated Gaussian and
    a fair random sign.

    :param int num_data: ``N >= 1``.
    :param float slope: :math:`\theta^\star \ne 0`.
    :param float noise: :math:`\sigma^\star > 0`.
    :param float prior_scale: prior standard deviation of ``theta``.
    :param int seed: seed of the private generator that draws the data.
    :param dtype: ``torch.float32`` or ``torch.float64``; the data (hence the model) use it.
    :param device: device of the data.
    :return: a :class:`Target` on site ``"theta"`` with two modes.
    """
    num_data = check_int("num_data", num_data, 1)
    slope = _check_real("slope", slope, nonzero=True)
    noise = _check_real("noise", noise, positive=True)
    prior_scale = _check_real("prior_scale", prior_scale, positive=True)
    dtype = _check_dtype(dtype)
    device = torch.device(device)
    gen = _generator(seed)
    x = torch.randn(num_data, generator=gen, dtype=torch.float64)
    y = abs(slope) * x + noise * torch.randn(num_data, generator=gen, dtype=torch.float64)
    m = abs(slope)
    radius = m / 2
    log_half = _sign_regression_log_integral(x, y, prior_scale)
    log_ball = _sign_regression_log_integral(x, y, prior_scale, m - radius, m + radius)
    ball_mass = 0.5 * math.exp(log_ball - log_half)
    x, y = x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)
    return Target(
        name="sign_regression",
        model=sign_regression_model,
        args=(x, y),
        kwargs={"prior_scale": prior_scale},
        site="theta",
        modes=torch.tensor([-m, m], dtype=dtype, device=device),
        radius=radius,
        log_z=math.log(2.0) + log_half,
        reference_masses=torch.full((2,), ball_mass, dtype=dtype, device=device),
        truth={"theta": slope, "sigma": noise},
        description=f"y ~ N(|theta| x, sigma), {num_data} points, theta* = +-{m:g}",
        # the posterior of the model as run: the data in ``dtype``
        exact_sampler=_sign_regression_sampler(x, y, prior_scale, dtype, device),
    )
