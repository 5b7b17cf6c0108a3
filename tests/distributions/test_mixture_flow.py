"""MixtureFlow: the one mixture-flow distribution (base mixture, transforms, stratified draw)."""

import warnings

import pyro.distributions as dist
import pytest
import torch

from pyro_mogflow.distributions import DiagNormalMixture, MixtureFlow, mixture_log_prob
from pyro_mogflow.flows import build_flow

DTYPES = [torch.float32, torch.float64]


def _params(dtype, batch=(), k=3, d=2):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(batch + (k,), generator=g, dtype=dtype)
    locs = 2 * torch.randn(batch + (k, d), generator=g, dtype=dtype)
    scales = 0.5 + torch.rand(batch + (k, d), generator=g, dtype=dtype)
    return logits, locs, scales


def _flow(dtype):
    torch.manual_seed(2)
    flow = build_flow("affine_autoregressive", 2, num_flows=2).to(dtype)
    with torch.no_grad():  # bend the flow away from the identity
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_prob_matches_transformed_distribution(dtype):
    logits, locs, scales = _params(dtype)
    flow = _flow(dtype)
    q = MixtureFlow(logits, locs, scales, [flow])
    reference = dist.TransformedDistribution(DiagNormalMixture(logits, locs, scales), [flow])
    z = torch.randn(50, 2, dtype=dtype) * 3
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(q.log_prob(z), reference.log_prob(z), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stratified_draw_scores_every_component_exactly(dtype):
    logits, locs, scales = _params(dtype)
    flow = _flow(dtype)
    k, n = 3, 4
    q = MixtureFlow(logits, locs, scales, [flow], estimator="stratified").expand((k * n, 1))
    sample = q.stratified_rsample(n, particle_dim=-2)
    assert sample.value.shape == (k * n, 1, 2) and sample.log_q.shape == (k * n, 1)
    assert sample.log_weights.shape == (k, 1) and sample.base.shape == (k * n, 1, 2)
    # draw k * n + t comes from component k: its base point sits near mu_k in units of sigma_k
    base = sample.base.reshape(k, n, 2)
    z_scores = ((base - locs.unsqueeze(1)) / scales.unsqueeze(1)).abs()
    assert float(z_scores.max()) < 6
    # the log-density is the exact one of the whole mixture flow
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    exact = MixtureFlow(logits, locs, scales, [flow]).log_prob(sample.value.detach())
    assert torch.allclose(sample.log_q, exact, atol=tol, rtol=tol)
    assert torch.allclose(sample.log_weights.squeeze(-1), torch.log_softmax(logits, -1))


def test_stratified_draw_per_batch_element():
    logits, locs, scales = _params(torch.float64, batch=(5,))
    k, n = 3, 2
    q = MixtureFlow(logits, locs, scales, estimator="stratified").expand((k * n, 5))
    sample = q.stratified_rsample(n, particle_dim=-2)
    assert sample.value.shape == (k * n, 5, 2) and sample.log_weights.shape == (k, 5)
    exact = mixture_log_prob(sample.value, logits, locs, scales)
    assert torch.allclose(sample.log_q, exact)


@pytest.mark.parametrize("dtype", DTYPES)
def test_antithetic_stratified_draws_mirror_each_other(dtype):
    logits, locs, scales = _params(dtype)
    k, n = 3, 4
    q = MixtureFlow(logits, locs, scales, estimator="stratified").expand((k * n, 1))
    base = q.stratified_rsample(n, particle_dim=-2, antithetic=True).base.reshape(k, n, 2)
    eps = (base - locs.unsqueeze(1)) / scales.unsqueeze(1)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(eps[:, 2:], -eps[:, :2], rtol=0, atol=tol)
    assert float(eps[:, :2].abs().min()) > 0  # the first half is random, not zero
    with pytest.raises(ValueError, match="even"):
        MixtureFlow(logits, locs, scales, estimator="stratified").expand(
            (k * 3, 1)
        ).stratified_rsample(3, particle_dim=-2, antithetic=True)


def test_stratified_draw_needs_the_particle_batch():
    logits, locs, scales = _params(torch.float64)
    q = MixtureFlow(logits, locs, scales, estimator="stratified").expand((5,))
    with pytest.raises(ValueError, match=r"batch shape \(K \* n, \*rest\) = \(6, ...\)"):
        q.stratified_rsample(2, particle_dim=-1)


def test_expand_keeps_estimator_and_transforms():
    logits, locs, scales = _params(torch.float64)
    flow = _flow(torch.float64)
    q = MixtureFlow(logits, locs, scales, [flow], estimator="relaxed", temperature=0.3)
    big = q.expand((7,))
    assert big.batch_shape == (7,) and big.estimator == "relaxed"
    z = torch.randn(7, 2, dtype=torch.float64)
    assert torch.allclose(big.log_prob(z), q.log_prob(z))
    assert big.rsample().shape == (7, 2)


def test_rejects_bad_transforms_and_estimators():
    logits, locs, scales = _params(torch.float64)
    with pytest.raises(TypeError, match="transforms must be torch Transforms, got str"):
        MixtureFlow(logits, locs, scales, ["flow"])
    with pytest.raises(ValueError, match="unknown estimator 'reinforce'"):
        MixtureFlow(logits, locs, scales, estimator="reinforce")


def test_stratified_sampling_outside_the_elbo_is_the_implicit_draw_without_warning():
    """Outside StratifiedELBO a stratified mixture flow draws exactly as the implicit one."""
    logits, locs, scales = _params(torch.float64)
    draws = {}
    for estimator in ("stratified", "implicit"):
        params = [t.clone().requires_grad_() for t in (logits, locs, scales)]
        q = MixtureFlow(*params, estimator=estimator)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            z = q.rsample((5,))
        draws[estimator] = (z, *torch.autograd.grad(z.pow(2).sum(), params))
    for a, b in zip(draws["stratified"], draws["implicit"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
