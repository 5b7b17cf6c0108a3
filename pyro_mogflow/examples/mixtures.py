r"""Gaussian-mixture targets: a known mixture posterior, and label switching.

* :func:`gaussian_mixture_target` -- a mixture of Gaussians written as a Pyro model with
  ``pyro.factor`` (any number of modes; :math:`\log Z` known by construction, exact draws).
* :func:`label_switching_mixture` -- a two-component Gaussian mixture model fitted to data; its
  posterior is symmetric under swapping the component means (two mirror modes).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch

from pyro_mogflow import mixture_log_prob
from pyro_mogflow._validation import check_int

from .targets import Target, _check_dtype, _check_real, _generator

__all__ = [
    "gaussian_mixture_model",
    "gaussian_mixture_target",
    "label_switching_mixture",
    "label_switching_model",
]


# --------------------------------------------------------------- Gaussian mixture target
def gaussian_mixture_model(
    logits: torch.Tensor,
    locs: torch.Tensor,
    scales: torch.Tensor,
    log_z: float = 0.0,
    prior_scale: float = 10.0,
) -> torch.Tensor:
    r"""A mixture of Gaussians as a Pyro model with one latent site ``z``.

    .. math::
        z \sim \mathcal{N}(0, s_0^2 I_D), \qquad
        \text{factor} = \log \sum_k \pi_k \mathcal{N}(z; \mu_k, \Sigma_k)
        - \log \mathcal{N}(z; 0, s_0^2 I_D) + \log Z,

    so the joint density is exactly :math:`Z` times the mixture density and the evidence is
    :math:`Z`. The broad prior only serves Pyro's initialisation (it is cancelled by the factor).
    The components are diagonal, :math:`\Sigma_k = \operatorname{diag}\sigma_k^2`, when
    ``scales`` has shape ``(K, D)``, and full, :math:`\Sigma_k = L_k L_k^\top`, when it holds
    lower Cholesky factors of shape ``(K, D, D)``.

    :param torch.Tensor logits: shape ``(K,)``.
    :param torch.Tensor locs: shape ``(K, D)``.
    :param torch.Tensor scales: standard deviations ``(K, D)`` or Cholesky factors
        ``(K, D, D)``.
    :param float log_z: :math:`\log Z`.
    :param float prior_scale: :math:`s_0`.
    :return: ``z``, shape ``(*particles, D)``.
    """
    d = locs.shape[-1]
    zero = torch.zeros(d, dtype=locs.dtype, device=locs.device)
    prior = dist.Normal(zero, torch.full_like(zero, prior_scale)).to_event(1)
    z = pyro.sample("z", prior)
    if scales.dim() == locs.dim() + 1:
        comp = dist.MultivariateNormal(locs, scale_tril=scales)
        log_target = torch.logsumexp(
            torch.log_softmax(logits, -1) + comp.log_prob(z.unsqueeze(-2)), -1
        )
    else:
        log_target = mixture_log_prob(z, logits, locs, scales)
    pyro.factor("target", log_target - prior.log_prob(z) + log_z)
    return z


def _mixture_sampler(
    logits: torch.Tensor, locs: torch.Tensor, scales: torch.Tensor
) -> Callable[[int, torch.Generator], dict]:
    """Exact draws of ``z`` from the mixture of :func:`gaussian_mixture_model` (float64 inside,
    returned in the dtype and on the device of ``locs``)."""
    dtype, device = locs.dtype, locs.device
    logits, locs, scales = (t.detach().cpu().double() for t in (logits, locs, scales))

    def sample(num_samples: int, generator: torch.Generator) -> dict:
        k = torch.multinomial(logits.softmax(-1), num_samples, True, generator=generator)
        eps = torch.randn((num_samples, locs.shape[-1]), generator=generator, dtype=torch.float64)
        z = locs[k] + scales[k] * eps
        return {"z": z.to(dtype=dtype, device=device)}

    return sample


def gaussian_mixture_target(
    locs: torch.Tensor | Sequence | None = None,
    scales: float | torch.Tensor | Sequence = 0.5,
    weights: torch.Tensor | Sequence | None = None,
    log_z: float = 0.0,
    radius: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Target:
    r"""A Pyro model whose posterior is a given mixture of diagonal Gaussians, with known evidence.

    .. math:: p(z \mid \cdot) = \sum_{k=1}^K \pi_k\, \mathcal{N}(z;\ \mu_k,
        \operatorname{diag}\sigma_k^2), \qquad \log Z = \texttt{log\_z}

    (see :func:`gaussian_mixture_model`). The modes are the component means.

    :param locs: component means, shape ``(K, D)``; default the four corners
        :math:`(\pm 4, \pm 4)`.
    :param scales: a positive float, or per-component standard deviations ``(K, D)``.
    :param weights: mixture weights ``(K,)`` (positive; normalised here); default equal.
    :param float log_z: the evidence the model is built to have.
    :param float radius: capture radius for :func:`mode_masses`; default three times the
        largest scale, capped at half the smallest distance between two means (so the balls
        around the means do not overlap).
    :param dtype: ``torch.float32`` or ``torch.float64``.
    :param device: device of the parameters.
    :return: a :class:`Target` on site ``"z"`` with ``K`` modes. Its
        ``Target.reference_masses`` are :math:`\pi_k` times the Gaussian mass of each ball
        when every component is isotropic (a chi-square CDF), counting only the component's own
        mass (the others add at most their tail beyond the gap between means; an approximation
        when ``radius`` exceeds half that gap); otherwise ``None``. Its
        :meth:`~Target.sample_exact` draws the mixture exactly.
    """
    dtype = _check_dtype(dtype)
    device = torch.device(device)
    if locs is None:
        locs = [[-4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [4.0, 4.0]]
    locs = torch.as_tensor(locs, dtype=dtype).to(device).clone()
    if locs.dim() != 2 or locs.shape[0] < 1 or locs.shape[1] < 1:
        raise ValueError(f"locs must have shape (K, D) with K, D >= 1, got {tuple(locs.shape)}")
    if not bool(torch.isfinite(locs).all()):
        raise ValueError("locs must be finite")
    k, d = locs.shape
    if isinstance(scales, numbers.Real) and not isinstance(scales, bool):
        scales = torch.full((k, d), _check_real("scales", scales, positive=True), dtype=dtype)
    scales = torch.as_tensor(scales, dtype=dtype).to(device).clone()
    if scales.shape != (k, d):
        raise ValueError(
            f"scales must be a positive float or have shape {(k, d)}, got {tuple(scales.shape)}"
        )
    if not bool((scales > 0).all()) or not bool(torch.isfinite(scales).all()):
        raise ValueError("scales must be positive and finite")
    if weights is None:
        weights = torch.ones(k, dtype=dtype)
    weights = torch.as_tensor(weights, dtype=dtype).to(device).clone()
    if weights.shape != (k,) or not bool((weights > 0).all()):
        raise ValueError(
            f"weights must be {k} positive numbers (one per row of locs), got {weights.tolist()}"
        )
    weights = weights / weights.sum()
    log_z = _check_real("log_z", log_z)
    if k > 1:
        gaps = torch.cdist(locs, locs) + torch.diag(
            torch.full((k,), math.inf, dtype=dtype, device=locs.device)
        )
        min_gap = float(gaps.min())
        if min_gap == 0:
            raise ValueError("locs must be distinct: two components share a mean")
    else:
        min_gap = math.inf
    if radius is None:
        radius = min(3.0 * float(scales.max()), 0.5 * min_gap)
    radius = _check_real("radius", radius, positive=True)
    logits = weights.log()
    reference = None
    isotropic = bool((scales == scales[:, :1]).all())
    if isotropic:
        x = torch.as_tensor(radius**2, dtype=dtype) / (2 * scales[:, 0].cpu() ** 2)
        own = torch.special.gammainc(torch.tensor(d / 2, dtype=dtype), x)
        reference = (weights.cpu() * own).to(device)
    return Target(
        name="gaussian_mixture",
        model=gaussian_mixture_model,
        args=(logits, locs, scales),
        kwargs={"log_z": log_z},
        site="z",
        modes=locs,
        radius=radius,
        log_z=log_z,
        reference_masses=reference,
        description=f"{k}-component Gaussian mixture in {d}-D",
        exact_sampler=_mixture_sampler(logits, locs, scales),
    )


# ----------------------------------------------------------------------- label switching
def label_switching_model(y: torch.Tensor, prior_scale: float = 5.0) -> torch.Tensor:
    r"""A two-component Gaussian mixture fitted to 1-D data: label switching makes two modes.

    .. math::
        \mu_1, \mu_2 \sim \mathcal{N}(0, s_0^2), \qquad \sigma \sim \mathrm{HalfNormal}(2),
        \qquad y_i \sim \tfrac12 \mathcal{N}(\mu_1, \sigma^2) + \tfrac12 \mathcal{N}(\mu_2,
        \sigma^2).

    The likelihood is unchanged when :math:`\mu_1` and :math:`\mu_2` swap, so the posterior of
    ``mu`` (shape ``(2,)``) has two mirror modes across the diagonal :math:`\mu_1 = \mu_2`.

    :param torch.Tensor y: observations, shape ``(N,)``.
    :param float prior_scale: :math:`s_0`.
    """
    zero = torch.zeros(2, dtype=y.dtype, device=y.device)
    mu = pyro.sample("mu", dist.Normal(zero, torch.full_like(zero, prior_scale)).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.full_like(zero[0], 2.0)))
    mix = dist.Categorical(logits=torch.zeros_like(zero))
    with pyro.plate("data", y.shape[-1]):
        # mu: (2,) or (*particles, 1, 2); the components sit on the last dim.
        comp = dist.Normal(mu, sigma[..., None])
        return pyro.sample("y", dist.MixtureSameFamily(mix, comp), obs=y)


def label_switching_mixture(
    num_data: int = 100,
    means: tuple[float, float] = (-2.0, 2.0),
    noise: float = 1.0,
    prior_scale: float = 5.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Target:
    r"""Data from a two-component Gaussian mixture, and :func:`label_switching_model` to fit it.

    The modes of ``mu`` are taken at the generating means and their swap,
    :math:`(\mu_1^\star, \mu_2^\star)` and :math:`(\mu_2^\star, \mu_1^\star)`, with radius
    :math:`|\mu_1^\star - \mu_2^\star| / 4`. The two balls hold exactly equal posterior mass (the
    posterior is symmetric under the swap); the evidence has no closed form.

    :param int num_data: ``N >= 1``.
    :param means: the two distinct generating means.
    :param float noise: generating standard deviation.
    :param float prior_scale: prior standard deviation of each mean.
    :param int seed: seed of the private generator that draws the data.
    :param dtype: ``torch.float32`` or ``torch.float64``.
    :param device: device of the data.
    :return: a :class:`Target` on site ``"mu"`` with two modes.
    """
    num_data = check_int("num_data", num_data, 1)
    if not isinstance(means, (tuple, list)) or len(means) != 2:
        raise ValueError(f"means must be a pair of floats, got {means!r}")
    m1 = _check_real("means[0]", means[0])
    m2 = _check_real("means[1]", means[1])
    if m1 == m2:
        raise ValueError(f"means must differ (the two modes would coincide), got {means!r}")
    noise = _check_real("noise", noise, positive=True)
    prior_scale = _check_real("prior_scale", prior_scale, positive=True)
    dtype = _check_dtype(dtype)
    device = torch.device(device)
    gen = _generator(seed)
    pick = torch.rand(num_data, generator=gen, dtype=torch.float64) < 0.5
    centre = torch.where(pick, torch.tensor(m1, dtype=torch.float64), m2)
    y = centre + noise * torch.randn(num_data, generator=gen, dtype=torch.float64)
    y = y.to(dtype=dtype, device=device)
    modes = torch.tensor([[m1, m2], [m2, m1]], dtype=dtype, device=device)
    return Target(
        name="label_switching",
        model=label_switching_model,
        args=(y,),
        kwargs={"prior_scale": prior_scale},
        site="mu",
        modes=modes,
        radius=abs(m1 - m2) / 4,
        truth={"mu": (m1, m2), "sigma": noise},
        description=f"2-component mixture, {num_data} points, means {m1:g}, {m2:g}",
    )
