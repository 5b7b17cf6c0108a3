r"""Targets of the multimodal benchmark: Pyro models with known ground truth.

Each builder returns a :class:`BenchTarget`: a :class:`~pyro_mogflow.examples.Target` (the Pyro
model, its data, the modes and their capture radius, the exact :math:`\log Z` and an exact
sampler of the posterior, so the benchmark can measure the forward KL and the true mass near each
mode), plus how the benchmark scores and plots it. The targets are those of
:mod:`pyro_mogflow.examples` (the same ones the demo and the tutorials use), and the mass near a
mode is :func:`pyro_mogflow.examples.mode_masses`.

=============  ====  ===========================================================================
name           D     posterior
=============  ====  ===========================================================================
``grid9``      2     9 equal Gaussians (std 0.5) centred on :math:`\{-5, 0, 5\}^2`
``ring8``      2     8 equal Gaussians (std 0.5) on a circle of radius 6
``gmm40``      2     40 equal Gaussians (std :math:`\operatorname{softplus}(1) \approx 1.313`),
                     means uniform on :math:`[-40, 40]^2` (Midgley et al. 2023)
``funnel10``   10    Neal's funnel: unimodal, scale varying by orders of magnitude
``signreg``    2     :math:`y \sim \mathcal{N}(|\theta| x, \sigma)`: two mirror modes, a positive
                     site, observed data (:func:`~pyro_mogflow.examples.sign_regression`)
``mix10``      10    3 correlated Gaussians with weights 0.5 / 0.3 / 0.2
=============  ====  ===========================================================================

The mixtures are written with ``pyro.factor`` on a broad Gaussian "prior" that the factor cancels
(:func:`~pyro_mogflow.examples.gaussian_mixture_model`), so the posterior is exactly the mixture and
:math:`\log Z` = 0. The prior plays the role a prior plays in a real model: it says where the
latent can live (guides that initialise from the prior use it). For ``gmm40`` its standard
deviation is 25, about that of the uniform law on :math:`[-40, 40]` the means are drawn from.

References:

* L. Midgley, V. Stimper, G. Simm, B. Schölkopf, J. M. Hernández-Lobato, *Flow Annealed
  Importance Sampling Bootstrap*, ICLR 2023 (the 40-component benchmark).
* R. Neal, *Slice sampling*, Annals of Statistics 2003 (the funnel).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch

from pyro_mogflow.examples import (
    Target,
    gaussian_mixture_model,
    gaussian_mixture_target,
    sign_regression,
)

__all__ = [
    "BenchTarget",
    "GMM40_SEED",
    "TARGETS",
    "build_target",
    "funnel10",
    "funnel_model",
    "gmm40",
    "grid9",
    "mix10",
    "ring8",
    "signreg",
]

#: Seed of the private generator that draws the 40 means of ``gmm40`` (uniform on [-40, 40]^2).
GMM40_SEED = 0
#: Seed of the private generator that draws the means and covariances of ``mix10``.
MIX10_SEED = 0


@dataclasses.dataclass(frozen=True)
class BenchTarget:
    """A benchmark case: a :class:`~pyro_mogflow.examples.Target` with an exact sampler, and how
    the benchmark scores and plots it.

    :param str name: short key (a column of the table).
    :param Target target: the model, its data, modes (on :attr:`Target.site`), capture radius,
        log Z and exact sampler.
    :param bool multimodal: whether mode coverage and mode masses are scored.
    :param plot: for targets with two latent dimensions, ``(x_site, x_index, y_site, y_index,
        (x_lo, x_hi), (y_lo, y_hi))``: what to put on each axis of the 2-D plot; else ``None``.
    """

    name: str
    target: Target
    multimodal: bool = True
    plot: tuple | None = None

    def __post_init__(self):
        if self.target.exact_sampler is None:
            raise ValueError(f"benchmark target {self.name!r} needs an exact sampler")

    def sample(self, num_samples: int, generator: torch.Generator) -> dict:
        """Exact posterior draws: site name -> ``(num_samples, *site_shape)``."""
        return self.target.sample_exact(num_samples, generator)

    @property
    def capture_radius(self) -> float:
        """The radius used to assign points to modes: :attr:`Target.radius`."""
        return float(self.target.radius)

    @property
    def description(self) -> str:
        """One line for tables and plots."""
        return self.target.description


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _box(locs: torch.Tensor, margin: float) -> tuple:
    lo = float(locs.min()) - margin
    hi = float(locs.max()) + margin
    return ("z", 0, "z", 1, (lo, hi), (lo, hi))


# --------------------------------------------------------------------------- 2-D mixtures
def grid9(dtype: torch.dtype = torch.float32) -> BenchTarget:
    """Nine equal Gaussians, std 0.5, centred on the grid ``{-5, 0, 5}^2``; log Z = 0."""
    ticks = (-5.0, 0.0, 5.0)
    locs = torch.tensor([[a, b] for a in ticks for b in ticks], dtype=dtype)
    target = gaussian_mixture_target(locs, scales=0.5, dtype=dtype)
    target = dataclasses.replace(
        target, name="grid9", description="3x3 grid of Gaussians at {-5,0,5}^2, std 0.5"
    )
    return BenchTarget("grid9", target, plot=_box(locs, 3.0))


def ring8(dtype: torch.dtype = torch.float32) -> BenchTarget:
    """Eight equal Gaussians, std 0.5, on a circle of radius 6; log Z = 0."""
    angle = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    locs = (6.0 * torch.stack([angle.cos(), angle.sin()], -1)).to(dtype)
    target = gaussian_mixture_target(locs, scales=0.5, dtype=dtype)
    target = dataclasses.replace(
        target, name="ring8", description="8 Gaussians on a circle of radius 6, std 0.5"
    )
    return BenchTarget("ring8", target, plot=_box(locs, 3.0))


def gmm40(dtype: torch.dtype = torch.float32) -> BenchTarget:
    r"""The FAB benchmark: 40 equal Gaussians in 2-D, std :math:`\operatorname{softplus}(1)`.

    The means are ``80 * (U - 0.5)`` with ``U`` uniform on :math:`[0, 1)^2`, drawn (float32)
    from ``torch.Generator().manual_seed(GMM40_SEED)``. The prior the factor cancels has
    standard deviation 25 (see the module docstring). log Z = 0.
    """
    u = torch.rand((40, 2), generator=_generator(GMM40_SEED), dtype=torch.float32)
    locs = ((u - 0.5) * 80.0).to(dtype)
    scale = math.log1p(math.e)  # softplus(1)
    # Some means lie closer than 3 std to each other, so the default radius (half the smallest
    # gap) would be tiny; a draw is captured within 3 std of its nearest mean instead.
    target = gaussian_mixture_target(locs, scales=scale, radius=3 * scale, dtype=dtype)
    target = dataclasses.replace(
        target,
        name="gmm40",
        kwargs={**target.kwargs, "prior_scale": 25.0},
        description="40 Gaussians, means uniform on [-40,40]^2, std softplus(1)",
    )
    return BenchTarget("gmm40", target, plot=_box(locs, 6.0))


# ------------------------------------------------------------------------------ funnel
def funnel_model(
    dim: int = 10, scale: float = 3.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    r"""Neal's funnel in ``dim`` dimensions, as a Pyro model (no data).

    .. math:: v \sim \mathcal{N}(0, 3^2), \qquad x_i \mid v \sim \mathcal{N}(0, e^{v}),
        \quad i = 1..\texttt{dim}-1.

    The density is normalised, so :math:`\log Z = 0`.
    """
    zero = torch.zeros((), dtype=dtype)
    v = pyro.sample("v", dist.Normal(zero, zero + scale))
    x_scale = (v / 2).exp().unsqueeze(-1).expand(v.shape + (dim - 1,))
    return pyro.sample("x", dist.Normal(torch.zeros_like(x_scale), x_scale).to_event(1))


def funnel10(dtype: torch.dtype = torch.float32) -> BenchTarget:
    """Neal's funnel in 10-D: unimodal with hard geometry (mixtures must not hurt here)."""

    def sample(num_samples: int, generator: torch.Generator) -> dict:
        v = 3.0 * torch.randn(num_samples, generator=generator, dtype=torch.float64)
        x = torch.randn((num_samples, 9), generator=generator, dtype=torch.float64)
        return {"v": v.to(dtype), "x": (x * (v / 2).exp().unsqueeze(-1)).to(dtype)}

    target = Target(
        name="funnel10",
        model=funnel_model,
        args=(),
        kwargs={"dim": 10, "dtype": dtype},
        site="v",
        modes=torch.zeros(1, dtype=dtype),
        radius=1e6,
        log_z=0.0,
        description="Neal's funnel in 10-D, v ~ N(0, 3^2)",
        exact_sampler=sample,
    )
    return BenchTarget("funnel10", target, multimodal=False)


# ---------------------------------------------------------------------- sign regression
def signreg(dtype: torch.dtype = torch.float32) -> BenchTarget:
    r"""The sign-symmetric regression :math:`y \sim \mathcal{N}(|\theta| x, \sigma)`.

    :func:`~pyro_mogflow.examples.sign_regression` with its defaults (40 points, slope 1.5,
    noise 0.5, seed 0), and its exact sampler (inverse-CDF draws of :math:`\sigma` on the
    quadrature grid behind :math:`\log Z`, then :math:`|\theta|` given :math:`\sigma` and a
    fair random sign).
    """
    target = dataclasses.replace(sign_regression(dtype=dtype), name="signreg")
    return BenchTarget(
        "signreg", target, plot=("theta", None, "sigma", None, (-2.5, 2.5), (0.25, 1.0))
    )


# ------------------------------------------------------------------- correlated mixture
def mix10(dtype: torch.dtype = torch.float32) -> BenchTarget:
    r"""Three correlated Gaussians in 10-D with unequal weights 0.5 / 0.3 / 0.2; log Z = 0.

    The model is :func:`~pyro_mogflow.examples.gaussian_mixture_model` with full-covariance
    components (Cholesky factors in place of scales).

    Means: three points drawn :math:`\mathcal{N}(0, 4^2 I)` (seed :data:`MIX10_SEED`), at
    least 14 apart. Covariances :math:`\Sigma_k = 0.3 I + A_k A_k^\top` with
    :math:`A_{k,ij} \sim \mathcal{N}(0, 0.3^2)`: standard deviations about 0.8, correlations up
    to about 0.6. A mode's ball has radius 5 (holding about 99% of its component).
    """
    gen = _generator(MIX10_SEED)
    d = 10
    locs = 4.0 * torch.randn((3, d), generator=gen, dtype=torch.float64)
    a = 0.3 * torch.randn((3, d, d), generator=gen, dtype=torch.float64)
    cov = 0.3 * torch.eye(d, dtype=torch.float64) + a @ a.transpose(-1, -2)
    tril = torch.linalg.cholesky(cov)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    gaps = torch.cdist(locs, locs) + torch.eye(3, dtype=torch.float64) * 1e9
    if not float(gaps.min()) > 14:
        raise RuntimeError(f"MIX10_SEED={MIX10_SEED} gives means closer than 14")

    def sample(num_samples: int, generator: torch.Generator) -> dict:
        k = torch.multinomial(weights, num_samples, True, generator=generator)
        eps = torch.randn((num_samples, d, 1), generator=generator, dtype=torch.float64)
        z = locs[k] + (tril[k] @ eps).squeeze(-1)
        return {"z": z.to(dtype)}

    target = Target(
        name="mix10",
        model=gaussian_mixture_model,
        args=(weights.log().to(dtype), locs.to(dtype), tril.to(dtype)),
        kwargs={"log_z": 0.0},
        site="z",
        modes=locs.to(dtype),
        radius=5.0,
        log_z=0.0,
        description="3 correlated Gaussians in 10-D, weights 0.5/0.3/0.2",
        exact_sampler=sample,
    )
    return BenchTarget("mix10", target)


#: name -> builder ``(dtype) -> BenchTarget``; the order of the table's columns.
TARGETS: dict[str, Callable[..., BenchTarget]] = {
    "grid9": grid9,
    "ring8": ring8,
    "gmm40": gmm40,
    "funnel10": funnel10,
    "signreg": signreg,
    "mix10": mix10,
}


def build_target(name: str, dtype: torch.dtype = torch.float32) -> BenchTarget:
    """The benchmark target called ``name`` (one of :data:`TARGETS`)."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {list(TARGETS)}")
    return TARGETS[name](dtype=dtype)
