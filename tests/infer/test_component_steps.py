"""Tests for the natural-gradient (iBLR) component steps (pyro_mogflow.infer.component_steps)."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mogflow import AutoMixtureFlow, StratifiedELBO, fit
from pyro_mogflow.infer.component_steps import (
    KL_BOUND,
    STEP_SIZE,
    natural_component_deltas,
    natural_component_update,
    natural_full_update,
)
from pyro_mogflow.infer.mixture_weights import natural_gradient_stepper

MEAN = (3.0, -2.0, 1.0)
SD = (0.5, 2.0, 0.1)


def _gaussian_model(dtype):
    mean, sd = torch.tensor(MEAN, dtype=dtype), torch.tensor(SD, dtype=dtype)

    def model():
        pyro.sample("x", dist.Normal(mean, sd).to_event(1))

    return model, mean, sd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_fixed_point_is_the_exact_gaussian_posterior(dtype):
    # One component on a diagonal Gaussian target: h = log p - log q is quadratic, so the
    # antithetic pair gives the exact expected gradient, and the Hessian estimate is eps^2
    # times the exact (lam - s): both vanish exactly at the exact mean and precision, which
    # is therefore a fixed point with no Monte Carlo error; the update reaches it from afar.
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, mean, sd = _gaussian_model(dtype)
    guide = AutoMixtureFlow(model, num_components=1, init_scale=3.0)
    fit(
        model,
        guide=guide,
        num_steps=300,
        beta=None,
        balance=None,
        component_step="natural",
        covariance="diag",  # the diagonal step (the full one: test_full_steps_...)
        progress=False,
    )
    assert guide.locs.dtype == dtype and guide.scales.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(guide.locs.detach()[0], mean, rtol=tol, atol=tol)
    torch.testing.assert_close(guide.scales.detach()[0].pow(-2), sd.pow(-2), rtol=tol, atol=0)


def test_one_step_matches_the_iblr_formula_for_a_quadratic():
    # h(u) = -sum_i lam_i (u_i - c_i)^2 / 2 - (a Gaussian's own log-density, whose gradient
    # is -s (u - m)): gbar = -lam (m - c) exactly, and the one-pair Stein estimate of
    # G = lam - s is eps^2 (lam - s) (unbiased); the step is the iBLR formula with them.
    torch.manual_seed(0)
    k, d = 3, 4
    locs = torch.randn(k, d, dtype=torch.float64)
    scales = torch.rand(k, d, dtype=torch.float64) + 0.5
    lam = torch.rand(k, d, dtype=torch.float64) + 0.1
    c = torch.randn(k, d, dtype=torch.float64)
    eps = torch.randn(k, 1, d, dtype=torch.float64)
    base = locs.unsqueeze(1) + scales.unsqueeze(1) * torch.cat([eps, -eps], 1)
    s = scales.pow(-2)
    grads = -lam.unsqueeze(1) * (base - c.unsqueeze(1)) + s.unsqueeze(1) * (
        base - locs.unsqueeze(1)
    )
    b = 0.05
    new_locs, new_scales = natural_component_update(locs, scales, base, grads, b, kl_bound=1e9)
    big_g, gbar = eps.squeeze(1).pow(2) * (lam - s), -lam * (locs - c)
    new_s = s + b * big_g + b**2 / 2 * big_g**2 / s
    torch.testing.assert_close(new_scales.pow(-2), new_s, rtol=1e-12, atol=0)
    torch.testing.assert_close(new_locs, locs + b * gbar / new_s, rtol=1e-12, atol=1e-12)
    # The KL cap shrinks the step of a component whose move would be large:
    capped_locs, _ = natural_component_update(locs, scales, base, grads, b, kl_bound=1e-6)
    move = ((capped_locs - locs).pow(2) * s).sum(-1)
    assert bool((move < ((new_locs - locs).pow(2) * s).sum(-1)).all())


def test_a_non_finite_gradient_gives_a_non_finite_delta():
    pyro.clear_param_store()
    model, _, _ = _gaussian_model(torch.float64)
    guide = AutoMixtureFlow(model, num_components=2).setup()
    base = guide.locs.detach().unsqueeze(1).expand(2, 2, 3).clone()
    grads = torch.zeros(2, 2, 3, dtype=torch.float64)
    grads[1, 0, 2] = float("nan")
    deltas = natural_component_deltas(guide, base, grads)
    for delta in deltas.values():
        assert bool(torch.isfinite(delta[0]).all()) and not bool(torch.isfinite(delta[1]).all())


class _InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def test_a_non_finite_step_leaves_the_guide_unchanged_and_raises():
    def model():
        x = pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.factor("f", -_InfiniteGradient.apply(x).pow(2).sum(-1))

    pyro.clear_param_store()
    guide = AutoMixtureFlow(model, num_components=3).setup()
    before = {name: p.detach().clone() for name, p in guide.named_parameters()}
    with pytest.raises(RuntimeError, match="gradient"):
        fit(model, guide=guide, num_steps=5, component_step="natural", progress=False)
    for name, p in guide.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0, msg=name)


def _flow_params(guide):
    return {n: p.detach().clone() for n, p in guide.named_parameters() if ".flow." in f".{n}"}


@pytest.mark.parametrize("beta", [0.5, None])
def test_with_a_flow_it_is_frozen_while_beta_is_below_one(beta):
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    model, mean, _ = _gaussian_model(torch.float64)
    guide = AutoMixtureFlow(model, num_components=2, flow="affine_autoregressive", num_flows=1)
    guide.setup()
    flow = _flow_params(guide)
    locs = guide.locs.detach().clone()
    assert flow
    fit(model, guide=guide, num_steps=20, beta=beta, component_step="natural", progress=False)
    after = _flow_params(guide)
    moved = [n for n in flow if not torch.equal(flow[n], after[n])]
    assert (moved == []) if beta == 0.5 else bool(moved)
    assert not torch.equal(locs, guide.locs.detach())
    assert all(bool(torch.isfinite(p).all()) for p in guide.parameters())


@pytest.mark.parametrize("num_particles", [2, 4])  # 4: each component's pairs in two pieces
def test_chunked_natural_step_equals_the_unchunked_one(monkeypatch, num_particles):
    # Noise fixed at 0.7 everywhere, so a chunked and an unchunked step draw the same points.
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: torch.full_like(real(*a, **k), 0.7))
    model, _, _ = _gaussian_model(torch.float64)
    after = []
    for budget in (None, 1):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoMixtureFlow(model, num_components=4, init_scale=1.0, init_spread=2.0)
        guide.setup()
        elbo = StratifiedELBO(num_particles=num_particles, antithetic=True, memory_budget=budget)
        if budget is not None:
            elbo._planner.budget = 1  # one component per chunk, one antithetic pair per piece
        optim = pyro.optim.Adam({"lr": 0.1})
        step = natural_gradient_stepper(
            model, guide, optim, elbo, 0.05, lambda: False, component_step="natural"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            losses = [step() for _ in range(3)]
        after.append((losses, {n: p.detach().clone() for n, p in guide.named_parameters()}))
    assert after[0][0] == pytest.approx(after[1][0], rel=1e-12)
    for name, value in after[0][1].items():
        torch.testing.assert_close(after[1][1][name], value, rtol=1e-10, atol=1e-10, msg=name)


def test_bad_component_step_is_refused():
    model, _, _ = _gaussian_model(torch.float64)
    with pytest.raises(ValueError, match="component_step"):
        fit(model, num_steps=1, component_step="newton", progress=False)
    guide = AutoMixtureFlow(model, num_components=2, estimator="implicit")
    with pytest.raises(ValueError, match="component_step='natural' needs"):
        fit(model, guide=guide, num_steps=1, component_step="natural", progress=False)


def test_antithetic_elbo_needs_pairs():
    with pytest.raises(ValueError, match="even"):
        StratifiedELBO(num_particles=3, antithetic=True)
    with pytest.raises(TypeError, match="antithetic"):
        StratifiedELBO(antithetic=1)


# ---------------------------------------------------------------- full covariance
COV = ((4.0, 1.8, 0.3), (1.8, 1.0, 0.1), (0.3, 0.1, 0.25))


def _correlated_model(dtype):
    mean, cov = torch.tensor(MEAN, dtype=dtype), torch.tensor(COV, dtype=dtype)

    def model():
        pyro.sample("x", dist.MultivariateNormal(mean, cov))

    return model, mean, cov


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_full_component_reaches_the_exact_correlated_gaussian(dtype):
    # h = log p - log q is quadratic: the pair gives gbar exactly and the Stein estimate of the
    # Hessian is H L (eps eps^T) L^-1, which vanishes with H at the exact mean and covariance,
    # so that is a fixed point without Monte Carlo error (a diagonal component cannot reach it).
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, mean, cov = _correlated_model(dtype)
    guide = AutoMixtureFlow(model, num_components=1, init_scale=2.0)
    fit(
        model,
        guide=guide,
        num_steps=600,
        beta=None,
        balance=None,
        component_step="natural",
        covariance="full",
        progress=False,
    )
    assert guide.covariance == "full" and guide.scale_tril.dtype == dtype
    tril = guide.scale_tril.detach()[0]
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(guide.locs.detach()[0], mean, rtol=tol, atol=tol)
    torch.testing.assert_close(tril @ tril.T, cov, rtol=tol, atol=tol)


def test_one_full_step_matches_the_iblr_formula_for_a_quadratic():
    # h(u) = -(u - c)^T A (u - c) / 2 - log N(u; m, L L^T): g = -A (u - c) + S (u - m); the
    # one-pair Stein estimate is G = -sym((A - S) L eps eps^T L^-1) and gbar = -A (m - c).
    torch.manual_seed(0)
    d = 3
    m = torch.randn(1, d, dtype=torch.float64)
    a = torch.randn(d, d, dtype=torch.float64)
    tril = torch.linalg.cholesky(a @ a.T + torch.eye(d, dtype=torch.float64)).unsqueeze(0)
    r = torch.randn(d, d, dtype=torch.float64)
    big_a = r @ r.T + 0.1 * torch.eye(d, dtype=torch.float64)
    c = torch.randn(d, dtype=torch.float64)
    eps = torch.randn(d, dtype=torch.float64)
    base = (m + torch.stack([tril[0] @ eps, -(tril[0] @ eps)])).unsqueeze(0)  # (1, 2, D)
    s = torch.cholesky_inverse(tril[0])
    grads = -(base - c) @ big_a + (base - m.unsqueeze(1)) @ s
    b = 0.05
    new_m, new_tril = natural_full_update(m, tril, base, grads, b, kl_bound=1e9)
    hess = (s - big_a) @ tril[0] @ torch.outer(eps, eps) @ torch.linalg.inv(tril[0])
    big_g = -(hess + hess.T) / 2
    new_s = s + b * big_g + b**2 / 2 * big_g @ torch.linalg.inv(s) @ big_g
    gbar = -big_a @ (m[0] - c)
    torch.testing.assert_close(new_tril[0] @ new_tril[0].T, torch.linalg.inv(new_s))
    torch.testing.assert_close(new_m[0], m[0] + b * torch.linalg.solve(new_s, gbar))
    capped_m, _ = natural_full_update(m, tril, base, grads, b, kl_bound=1e-8)
    assert float((capped_m - m).norm()) < float((new_m - m).norm())


def test_a_non_finite_full_step_is_non_finite_and_leaves_the_guide_unchanged():
    pyro.clear_param_store()
    model, _, _ = _gaussian_model(torch.float64)
    guide = AutoMixtureFlow(model, num_components=2).setup()
    guide.to_full_covariance()
    base = guide.locs.detach().unsqueeze(1).expand(2, 2, 3).clone()
    grads = torch.zeros(2, 2, 3, dtype=torch.float64)
    grads[1, 0, 2] = float("nan")
    deltas = natural_component_deltas(guide, base, grads)
    assert set(deltas) == {"locs", "scale_tril"}
    for delta in deltas.values():
        assert bool(torch.isfinite(delta[0]).all()) and not bool(torch.isfinite(delta[1]).all())

    def bad_model():
        x = pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.factor("f", -_InfiniteGradient.apply(x).pow(2).sum(-1))

    pyro.clear_param_store()
    guide = AutoMixtureFlow(bad_model, num_components=3).setup()
    guide.to_full_covariance()
    before = {name: p.detach().clone() for name, p in guide.named_parameters()}
    with pytest.raises(RuntimeError, match="gradient"):
        fit(bad_model, guide=guide, num_steps=5, component_step="natural", progress=False)
    for name, p in guide.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0, msg=name)


def test_full_covariance_needs_a_stratified_mixture():
    model, _, _ = _gaussian_model(torch.float64)
    with pytest.raises(ValueError, match="covariance"):
        fit(model, guide=AutoMixtureFlow(model, estimator="implicit"), covariance="full")
    with pytest.raises(ValueError, match="covariance must be one of"):
        fit(model, covariance="dense")


def _kl_to_standard_normal(m, tril):
    cov = tril @ tril.T
    return 0.5 * float(cov.trace() + m @ m - m.numel() - torch.logdet(cov))


def _run_full_steps(dim, step_size, steps, seed=0):
    # one full component on N(0, I_D), one antithetic pair per step, gradients exact
    g = torch.Generator().manual_seed(seed)
    m = torch.full((1, dim), 0.5, dtype=torch.float64)
    tril = (1.5 * torch.eye(dim, dtype=torch.float64)).unsqueeze(0)
    for _ in range(steps):
        eps = torch.randn(dim, generator=g, dtype=torch.float64)
        base = torch.stack([m[0] + tril[0] @ eps, m[0] - tril[0] @ eps]).unsqueeze(0)
        s = torch.cholesky_inverse(tril[0])
        grads = -base + (base - m.unsqueeze(1)) @ s
        m, tril = natural_full_update(m, tril, base, grads, step_size, KL_BOUND)
    return _kl_to_standard_normal(m[0], tril[0])


def test_full_steps_contract_in_high_dimension_only_with_the_smaller_step():
    from pyro_mogflow.infer.component_steps import full_step_size

    start = _kl_to_standard_normal(
        torch.full((50,), 0.5, dtype=torch.float64), 1.5 * torch.eye(50, dtype=torch.float64)
    )
    small = _run_full_steps(50, full_step_size(50), 600)
    large = _run_full_steps(50, STEP_SIZE, 600)
    # with b = 1/(D+1) the error shrinks by orders of magnitude; with b = 0.1 the
    # multiplicative noise of the rank-one estimate keeps it at the order of a nat
    assert small < 1e-3 * start, (small, start)
    assert large > 100 * small, (large, small)
    assert full_step_size(50) == pytest.approx(1 / 51)
