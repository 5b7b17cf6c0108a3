"""Tests for pyro_mogflow.fit: the one-call trainer with the mode-discovery defaults."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_mogflow import AutoMixtureFlow, FitResult, balance_weights, fit
from pyro_mogflow.distributions import mixture_log_prob
from pyro_mogflow.examples import gaussian_mixture_target
from pyro_mogflow.infer import default_beta_schedule, mixture_weights, recipe  # noqa: E402
from tests.infer.helpers import fit_target

DTYPES = [torch.float32, torch.float64]


def two_modes(dtype=torch.float32, weights=(0.5, 0.5)):
    """1-D posterior 0.5 N(-3, 0.5^2) + 0.5 N(3, 0.5^2) (log Z = 0) as a Pyro model."""
    return gaussian_mixture_target([[-3.0], [3.0]], scales=0.5, weights=weights, dtype=dtype)


def counting(model):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return model(*args, **kwargs)

    return counted, calls


def small_guide(target, **kwargs):
    kwargs.setdefault("num_components", 6)
    return AutoMixtureFlow(target.model, **kwargs)


# ----------------------------------------------------------------------------- results
def test_fit_returns_the_guide_and_one_finite_loss_per_step():
    target = two_modes()
    guide = small_guide(target)
    result = fit_target(target, guide, num_steps=7)
    assert isinstance(result, FitResult)
    fitted, losses = result
    assert fitted is guide
    assert losses.shape == (7,) and bool(torch.isfinite(torch.as_tensor(losses)).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_fit_keeps_the_dtype_of_the_model(dtype):
    target = two_modes(dtype)
    guide = small_guide(target)
    fit_target(target, guide, num_steps=3)
    assert {p.dtype for p in guide.parameters()} == {dtype}
    assert guide.locs.dtype == guide.logits.dtype == dtype


def test_fit_with_defaults_finds_both_modes_with_equal_mass():
    # The whole default path (prior init, tempering, natural gradients, balance) on a 1-D
    # posterior with two equal modes 12 standard deviations apart.
    target = two_modes()
    pyro.set_rng_seed(1)
    guide = small_guide(target, num_components=8)
    fit_target(target, guide, num_steps=400)
    n = 20000
    z = guide.sample_posterior(n, *target.args, **target.kwargs)["z"]
    right = float((z > 0).double().mean())
    # the goal of the benchmark (mass error <= 0.05) plus 3 Monte Carlo standard errors
    assert abs(right - 0.5) < 0.05 + 3 * math.sqrt(0.25 / n)
    assert float(target.mode_masses(z).min()) > 0.45


def test_fit_trains_any_pyro_guide_under_tempering():
    target = two_modes()
    guide = AutoNormal(target.model)
    model, calls = counting(target.model)
    _, losses = fit(
        model,
        *target.args,
        guide=guide,
        num_steps=5,
        num_particles=3,
        progress=False,
        model_kwargs=target.kwargs,
    )
    assert losses.shape == (5,) and len(calls) >= 5
    assert "AutoNormal.locs.z" in pyro.get_param_store()


def test_flow_is_frozen_while_beta_is_below_one():
    target = two_modes()
    guide = small_guide(target, flow="affine_autoregressive", hidden_dims=[4]).setup(
        *target.args, **target.kwargs
    )
    before = {k: v.detach().clone() for k, v in guide.flow.named_parameters()}
    locs = guide.locs.detach().clone()
    fit_target(target, guide, num_steps=5, beta_fraction=1.0)  # beta < 1 on every step
    for k, v in guide.flow.named_parameters():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(guide.locs.detach(), locs)


def test_flow_trains_once_beta_is_one():
    target = two_modes()
    guide = small_guide(target, flow="affine_autoregressive", hidden_dims=[4]).setup(
        *target.args, **target.kwargs
    )
    before = {k: v.detach().clone() for k, v in guide.flow.named_parameters()}
    fit_target(target, guide, num_steps=5, beta=None)
    assert any(not torch.equal(v, before[k]) for k, v in guide.flow.named_parameters())


def test_flow_gets_a_tenth_of_the_learning_rate():
    target = two_modes()
    guide = small_guide(target, flow="affine_autoregressive", hidden_dims=[4]).setup(
        *target.args, **target.kwargs
    )
    rates = recipe._learning_rates(guide, 0.02, 0.002)
    assert rates(f"{guide.name}.flow.0.arn.layers.0.weight") == {"lr": 0.002}
    assert rates(f"{guide.name}.locs") == {"lr": 0.02}


# ------------------------------------------------------------------- mixture weights
def test_natural_weight_step_of_one_jumps_to_the_optimum_of_separated_components():
    # For separated components L_k = log Z_k - log pi_k (exact fits): with eta = 1 the
    # update lands on pi_k = Z_k / Z in one step, whatever the start.
    log_pi = torch.log(torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64))
    z = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    logits = log_pi.clone()
    mixture_weights._natural_weight_step(logits, z.log() - log_pi, 1.0)
    assert torch.allclose(logits.exp(), z, atol=1e-12)


def test_natural_weight_step_keeps_a_floor_under_every_weight():
    logits = torch.zeros(3, dtype=torch.float64)
    mixture_weights._natural_weight_step(logits, torch.tensor([0.0, -1e4, -math.inf]), 1.0)
    assert torch.allclose(logits.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    assert float(logits.exp().min()) >= 0.99 * mixture_weights.MIN_WEIGHT


def exact_guide(target, logits, dtype):
    """A stratified guide whose components are exactly the target's, with given logits."""
    guide = AutoMixtureFlow(target.model, num_components=2).setup(*target.args, **target.kwargs)
    with torch.no_grad():
        guide.locs.unconstrained().copy_(target.args[1])
        guide.scales.unconstrained().copy_(torch.log(torch.expm1(target.args[2])))
        guide.logits.unconstrained().copy_(torch.tensor(logits, dtype=dtype))
    return guide


@pytest.mark.parametrize("objective", ["elbo", "forward"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_balance_weights_recovers_the_true_weights_of_exact_components(objective, dtype):
    target = two_modes(dtype, weights=(0.7, 0.3))
    guide = exact_guide(target, [2.0, -2.0], dtype)
    weights = balance_weights(
        target.model, guide, *target.args, num_particles=64, objective=objective, **target.kwargs
    )
    # With exact components the optimum is the truth and every importance weight there is
    # one, so the only error is the modes' overlap (their tails 12 sd apart: < 1e-20).
    expected = torch.tensor([0.7, 0.3], dtype=dtype)
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    assert torch.allclose(weights, expected, atol=tol)
    assert torch.allclose(torch.softmax(guide.logits.detach(), -1), expected, atol=tol)


def test_balance_weights_needs_a_stratified_mixture():
    target = two_modes()
    guide = AutoMixtureFlow(target.model, num_components=2, estimator="implicit")
    with pytest.raises(TypeError, match="estimator='stratified'"):
        balance_weights(target.model, guide, *target.args, **target.kwargs)


# ---------------------------------------------------------------------- schedules
def test_default_beta_schedule_is_geometric_then_one():
    schedule = default_beta_schedule(1000, beta_start=0.01, beta_fraction=0.5)
    assert schedule(0) == pytest.approx(0.01)
    assert schedule(250) == pytest.approx(0.1)  # halfway in log space
    assert schedule(500) == schedule(999) == 1.0


# -------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_steps": 0}, ValueError, "num_steps must be an int >= 1, got 0"),
        ({"num_steps": 2.5}, TypeError, "num_steps must be an int"),
        ({"num_steps": "forever"}, TypeError, "num_steps must be .auto. or an int"),
        ({"lr": -1.0}, ValueError, "lr must be a finite float > 0, got -1.0"),
        ({"flow_lr": 0.0}, ValueError, "flow_lr must be a finite float > 0"),
        ({"num_particles": 0}, ValueError, "num_particles must be an int >= 1"),
        ({"beta": 2.0}, ValueError, r"beta must be in \(0, 1\], got 2.0"),
        ({"beta": "linear"}, TypeError, "beta must be a finite float > 0"),
        ({"beta_start": 0.0}, ValueError, "beta_start must be a finite float > 0"),
        ({"beta_fraction": 1.5}, ValueError, r"beta_fraction must be in \(0, 1\]"),
        ({"observed_only": 1}, TypeError, "observed_only must be a bool"),
        ({"weight_step": -0.1}, ValueError, "weight_step must be a finite float > 0"),
        ({"balance": "em"}, ValueError, "balance must be None or one of"),
        ({"balance_particles": 0}, ValueError, "balance_particles must be an int >= 1"),
        ({"optim": torch.optim.Adam}, TypeError, "optim must be a Pyro optimizer"),
        ({"guide": 3}, TypeError, "guide must be a Pyro guide"),
        ({"model_kwargs": [1]}, TypeError, "model_kwargs must be a dict"),
        ({"progress": "yes"}, TypeError, "progress must be a bool"),
    ],
)
def test_bad_arguments_raise_before_any_work(kwargs, error, match):
    target = two_modes()
    model, calls = counting(target.model)
    kwargs.setdefault("model_kwargs", target.kwargs)
    with pytest.raises(error, match=match):
        fit(model, *target.args, **{"num_steps": 3, "progress": False, **kwargs})
    assert calls == []


def test_model_must_be_callable():
    with pytest.raises(TypeError, match="model must be a callable Pyro model, got int"):
        fit(3)


def test_a_diverging_loss_names_the_step():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("bad", torch.full_like(z, math.inf))

    guide = AutoMixtureFlow(model, num_components=2)
    with pytest.raises(RuntimeError, match="the loss became -?inf at step 0"):
        fit(model, guide=guide, num_steps=3, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_runs_on_cuda():
    target = gaussian_mixture_target([[-3.0], [3.0]], scales=0.5, device="cuda")
    guide = small_guide(target)
    fit_target(target, guide, num_steps=3)
    assert guide.locs.device.type == "cuda"
    z = guide.sample_posterior(10, *target.args, **target.kwargs)["z"]
    assert bool(torch.isfinite(mixture_log_prob(z, *[a.cuda() for a in target.args])).all())


def test_component_gradients_are_divided_by_their_weights():
    # One SGD step of fit moves component k's mean by -lr * grad(-sum_j pi_j L_j) / pi_k: the
    # natural-gradient scaling that keeps a component with a collapsed weight moving.
    from pyro_mogflow import StratifiedELBO

    target = two_modes(torch.float64)
    guide = exact_guide(target, [0.0, -8.0], torch.float64)  # pi_2 ~ 3e-4
    locs = guide.locs.unconstrained()
    start = locs.detach().clone()
    pyro.set_rng_seed(3)
    log_ratio, log_pi = StratifiedELBO().particles(
        target.model, guide, *target.args, **target.kwargs
    )[:2]
    loss = -(log_pi.exp() * log_ratio.mean(-1)).sum()
    (grad,) = torch.autograd.grad(loss, locs)
    expected = start - 0.1 * grad / log_pi.detach().exp().unsqueeze(-1)
    pyro.set_rng_seed(3)
    fit_target(
        target,
        guide,
        num_steps=1,
        beta=None,
        balance=None,
        optim=pyro.optim.SGD({"lr": 0.1}),
        component_step="adam",
    )
    assert torch.allclose(guide.locs.detach(), expected, rtol=1e-6, atol=1e-9)
    assert float((guide.locs.detach() - start).abs()[1].max()) > 1e-3  # it did move


def test_fit_trains_an_amortized_stratified_site_with_stratified_elbo():
    """A guide of one's own with an AmortizedMixtureFlow(estimator='stratified') site is
    trained by StratifiedELBO; under Trace_ELBO the site would warn that it is not stratified."""
    import warnings

    from pyro_mogflow import AmortizedMixtureFlow

    x = torch.randn(6, 2)
    encoder = AmortizedMixtureFlow(2, 2, num_components=2, flow=None, estimator="stratified")

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", len(x)):
            pyro.sample("z", encoder(x))

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*outside StratifiedELBO.*")
        _, losses = fit(model, x, guide=guide, num_steps=5, beta=None, progress=False)
    assert losses.shape == (5,) and all(math.isfinite(v) for v in losses)


def test_fit_refuses_a_guide_set_up_for_another_model():
    def one(data):
        pyro.sample("a", dist.Normal(0.0, 1.0))

    def other(data):
        pyro.sample("b", dist.Normal(0.0, 1.0).expand([2]).to_event(1))

    guide = AutoMixtureFlow(one, num_components=2)
    guide.setup(None)
    with pytest.raises(ValueError, match="latent site 'a'"):
        fit(other, None, guide=guide, num_steps=2, progress=False)
