"""The full-covariance mixture: its density, its draws and MixtureFlow with ``scale_tril``."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_mogflow.distributions import FullNormalMixture, MixtureFlow
from pyro_mogflow.distributions.density import full_mixture_log_prob, marginal_scales


def _params(k=3, d=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, generator=g, dtype=dtype)
    locs = 3 * torch.randn(k, d, generator=g, dtype=dtype)
    a = torch.randn(k, d, d, generator=g, dtype=dtype)
    cov = a @ a.transpose(-1, -2) + 0.5 * torch.eye(d, dtype=dtype)
    return logits, locs, torch.linalg.cholesky(cov)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_density_matches_a_mixture_of_torch_multivariate_normals(dtype):
    logits, locs, tril = _params(dtype=dtype)
    x = 4 * torch.randn(7, 2, 4, dtype=dtype)
    mvn = torch.distributions.MultivariateNormal(locs, scale_tril=tril)
    ref = torch.logsumexp(torch.log_softmax(logits, -1) + mvn.log_prob(x.unsqueeze(-2)), -1)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(
        full_mixture_log_prob(x, logits, locs, tril), ref, rtol=tol, atol=tol
    )
    torch.testing.assert_close(
        FullNormalMixture(logits, locs, tril).log_prob(x), ref, rtol=tol, atol=tol
    )


def _moments(u):
    mean = u.mean(0)
    centred = u - mean
    return mean, centred.T @ centred / (u.shape[0] - 1)


def _exact_moments(logits, locs, tril):
    pi = torch.softmax(logits, -1)
    mean = (pi.unsqueeze(-1) * locs).sum(0)
    second = tril @ tril.transpose(-1, -2) + locs.unsqueeze(-1) * locs.unsqueeze(-2)
    return mean, (pi.reshape(-1, 1, 1) * second).sum(0) - torch.outer(mean, mean)


def _assert_moments(u, mean, cov, weights=None):
    # Tolerances from standard errors: the mean's is sqrt(var / n); a covariance entry's
    # sqrt((var_i var_j + cov_ij^2) / n) bounds it for a Gaussian (a mixture's is of that size).
    n = u.shape[0]
    m, c = _moments(u)
    var = cov.diagonal()
    assert bool(((m - mean).abs() <= 5 * (var / n).sqrt()).all())
    se = ((torch.outer(var, var) + cov.pow(2)) / n).sqrt()
    assert bool(((c - cov).abs() <= 6 * se + 1e-9).all()), (c - cov).abs() / se


def test_exact_sample_has_the_mixture_moments():
    torch.manual_seed(1)
    logits, locs, tril = _params(d=3)
    q = FullNormalMixture(logits, locs, tril)
    u = q.sample((40000,))
    mean, cov = _exact_moments(logits, locs, tril)
    _assert_moments(u, mean, cov)
    torch.testing.assert_close(q.mean, mean)
    torch.testing.assert_close(q.variance, cov.diagonal())
    torch.testing.assert_close(
        marginal_scales(tril), (tril @ tril.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1).sqrt()
    )


@pytest.mark.parametrize("antithetic", [False, True])
def test_stratified_draws_have_each_components_moments(antithetic):
    torch.manual_seed(2)
    logits, locs, tril = _params(k=2, d=3)
    n = 20000
    q = MixtureFlow(logits, locs, None, estimator="stratified", scale_tril=tril).expand((2 * n,))
    draw = q.stratified_rsample(n, -1, antithetic=antithetic)
    u = draw.base.reshape(2, n, 3)
    for k in range(2):
        cov = tril[k] @ tril[k].T
        if antithetic:  # the pairs are symmetric about the mean exactly
            torch.testing.assert_close(u[k].mean(0), locs[k])
            half = u[k, : n // 2] - locs[k]
            c = half.T @ half / (n // 2)
            se = ((torch.outer(cov.diagonal(), cov.diagonal()) + cov.pow(2)) / (n // 2)).sqrt()
            assert bool(((c - cov).abs() <= 6 * se).all())
        else:
            _assert_moments(u[k], locs[k], cov)
    torch.testing.assert_close(draw.log_q, full_mixture_log_prob(draw.base, logits, locs, tril))
    # one component alone: its draws, the whole mixture's density
    sub = MixtureFlow(logits, locs, None, estimator="stratified", scale_tril=tril).expand((8,))
    part = sub.stratified_rsample(8, -1, components=[1])
    torch.testing.assert_close(part.log_q, full_mixture_log_prob(part.base, logits, locs, tril))
    assert part.log_weights.shape == (1,)


def test_gradients_reach_locs_and_scale_tril_through_stratified_draws():
    logits, locs, tril = _params(k=2, d=2)
    locs.requires_grad_(True)
    tril.requires_grad_(True)
    q = MixtureFlow(logits, locs, None, estimator="stratified", scale_tril=tril).expand((8,))
    draw = q.stratified_rsample(4, -1)
    draw.value.pow(2).sum().backward()
    assert locs.grad is not None and bool(locs.grad.abs().sum() > 0)
    assert tril.grad is not None and bool(tril.grad.abs().sum() > 0)


def test_bad_scale_tril_and_estimators_are_refused():
    logits, locs, tril = _params()
    with pytest.raises(ValueError, match="scale_tril must have shape"):
        MixtureFlow(logits, locs, None, estimator="stratified", scale_tril=tril[:, :2])
    bad = tril.clone()
    bad[0, 1, 1] = -1.0
    with pytest.raises(ValueError, match="positive"):
        MixtureFlow(logits, locs, None, estimator="stratified", scale_tril=bad)
    with pytest.raises(TypeError, match="dtype"):
        MixtureFlow(logits, locs, None, estimator="stratified", scale_tril=tril.float())
    with pytest.raises(ValueError, match="estimator"):
        MixtureFlow(logits, locs, None, estimator="relaxed", scale_tril=tril)


def test_single_draw_rsample_reparameterizes_within_the_component():
    logits, locs, tril = _params(k=1, d=2)
    locs.requires_grad_(True)
    u = FullNormalMixture(logits, locs, tril).rsample((5,))
    u.sum().backward()
    torch.testing.assert_close(locs.grad, torch.full_like(locs, 5.0))
    assert math.isfinite(float(u.detach().sum()))
