"""Tests for the natural-gradient component-update prototype (benchmarks.natural_components)."""

import os
import sys

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks import natural_components as nc  # noqa: E402


def _gaussian(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    mean = 3.0 * torch.randn(d, generator=g, dtype=torch.float64)
    return mean, cov


@pytest.mark.parametrize("full", [True, False])
def test_fixed_point_is_the_gaussian_posterior(full):
    # One component on a Gaussian target (correlated for the full update, diagonal for the
    # diagonal one): f = log p - log q is quadratic, so the antithetic estimates of the gradient
    # and Hessian are exact and the update converges to the posterior mean and covariance.
    d = 4
    mean, cov = _gaussian(d)
    if not full:
        cov = torch.diag(torch.diagonal(cov))
    target = MultivariateNormal(mean, cov)
    prior = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(30.0, dtype=torch.float64))
    torch.manual_seed(0)
    m0 = 30.0 * torch.randn(1, d, dtype=torch.float64)
    prec0 = torch.full((1, d), 1 / 900.0, dtype=torch.float64)
    logw, m, p = nc.natural_gradient_mixture(
        target.log_prob,
        lambda z: prior.log_prob(z).sum(-1),
        m0,
        prec0,
        400,
        full=full,
        temper=False,
    )
    assert torch.allclose(m[0], mean, atol=1e-6)
    precision = torch.linalg.inv(cov)
    if full:
        assert torch.allclose(p[0] @ p[0].T, precision, atol=1e-6)
    else:
        assert torch.allclose(p[0], torch.diagonal(precision), atol=1e-6)
    assert torch.allclose(logw, torch.zeros(1, dtype=torch.float64))


def test_run_one_scores_the_grid():
    out = nc.run_one("grid9", "diag", 0)
    assert out["num_modes"] == 9 and out["modes_covered"] == 9
    assert out["reverse_kl"] < 0.05
    assert torch.get_default_dtype() == torch.float32
