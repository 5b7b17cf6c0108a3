"""NaturalStratifiedELBO: fit()'s natural-gradient component steps in a plain SVI loop."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import AutoNormal

from pyro_mogflow import (
    AutoMixtureFlow,
    MixtureNaturalGradient,
    NaturalStratifiedELBO,
    StratifiedELBO,
    TemperedModel,
    exponential_schedule,
)
from pyro_mogflow.examples import mode_masses
from pyro_mogflow.infer.mixture_weights import natural_gradient_stepper

from .test_mixture_optim import bimodal_model


def gaussian_model():
    """z ~ N((1, -2), diag(0.5, 2)^2), written as a flat prior times a factor."""
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 10.0).to_event(1))
    target = dist.Normal(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])).to_event(1)
    prior = dist.Normal(torch.zeros(2), 10.0).to_event(1)
    pyro.factor("f", target.log_prob(z) - prior.log_prob(z))


def _guide(model=gaussian_model, k=4, seed=0, **kw):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    return AutoMixtureFlow(model, num_components=k, init_spread=1.0, **kw).setup()


@pytest.mark.parametrize("n", [1, 3, 0, True, 2.0])
def test_num_particles_must_be_an_even_int(n):
    with pytest.raises(TypeError if isinstance(n, (bool, float)) else ValueError, match="num_p"):
        NaturalStratifiedELBO(num_particles=n)


def test_other_guides_are_refused_by_name_before_any_work():
    elbo = NaturalStratifiedELBO()
    with pytest.raises(TypeError, match="AutoNormal"):
        elbo.loss_and_grads(gaussian_model, AutoNormal(gaussian_model))
    guide = AutoMixtureFlow(gaussian_model, num_components=2, estimator="implicit")
    with pytest.raises(TypeError, match="estimator='implicit'"):
        elbo.loss_and_grads(gaussian_model, guide)


def test_one_step_moves_the_components_as_fit_does_and_leaves_them_no_gradient():
    # The same draws (same seed) through fit()'s stepper (optimiser at lr 0, weights left to
    # it) and through the ELBO: the same means and scales after the step.
    guide_a = _guide()
    stepper = natural_gradient_stepper(
        gaussian_model,
        guide_a,
        pyro.optim.SGD({"lr": 0.0}),
        StratifiedELBO(num_particles=2, antithetic=True),
        None,
        lambda: False,
        component_step="natural",
    )
    pyro.set_rng_seed(1)
    stepper()
    locs_a, scales_a = guide_a.locs.detach().clone(), guide_a.scales.detach().clone()

    guide_b = _guide()
    before = guide_b.locs.detach().clone()
    pyro.set_rng_seed(1)
    loss = NaturalStratifiedELBO().loss_and_grads(gaussian_model, guide_b)
    assert math.isfinite(loss)
    assert torch.allclose(guide_b.locs.detach(), locs_a, atol=1e-6)
    assert torch.allclose(guide_b.scales.detach(), scales_a, atol=1e-6)
    assert not torch.allclose(guide_b.locs.detach(), before)
    assert guide_b.locs_unconstrained.grad is None
    assert guide_b.logits_unconstrained.grad is not None  # the optimiser's share


def test_the_plain_loop_converges_to_a_gaussian_target_exactly():
    # The iBLR fixed point of a Gaussian target is its exact mean and diagonal precision; the
    # antithetic pair leaves Monte Carlo noise only in the precision (E[eps^2] = 1), so the
    # average of the last 200 steps is within a few standard errors of the truth.
    guide = _guide(k=1)
    svi = SVI(gaussian_model, guide, pyro.optim.Adam({"lr": 0.01}), NaturalStratifiedELBO())
    locs, scales = [], []
    for step in range(600):
        svi.step()
        if step >= 400:
            locs.append(guide.locs.detach()[0].clone())
            scales.append(guide.scales.detach()[0].clone())
    loc, scale = torch.stack(locs).mean(0), torch.stack(scales).mean(0)
    truth_loc, truth_scale = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])
    # Steps of size b = 0.1 average ~1/b = 10 draws of eps^2 (variance 2): a relative sd of
    # sqrt(2 / 10) / 2 per scale at one step; 200 correlated steps, ~20 independent ones.
    tol = 4 * math.sqrt(2 / 10) / 2 / math.sqrt(20)
    assert torch.allclose(scale / truth_scale, torch.ones(2), atol=tol)
    assert torch.allclose((loc - truth_loc) / truth_scale, torch.zeros(2), atol=tol)


def test_the_tempered_plain_loop_finds_both_modes_with_their_masses():
    # fit()'s mode finding by hand: prior start, tempering, natural component and weight steps.
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(bimodal_model, num_components=8, init_spread="prior")
    tempered = TemperedModel(bimodal_model, exponential_schedule(0.01, 1.0, 150))
    optim = MixtureNaturalGradient(guide, pyro.optim.Adam({"lr": 0.02}))
    svi = SVI(tempered, guide, optim, NaturalStratifiedELBO())
    for step in range(300):
        if step == 150:
            guide.to_full_covariance()
        svi.step()
        tempered.advance()
    assert guide.scale_tril_unconstrained.grad is None
    num = 4000
    with torch.no_grad():
        z = guide.get_posterior().sample((num,))
    m = torch.tensor([[3.0, 1.0], [-3.0, -1.0]], dtype=z.dtype)
    masses = mode_masses(z, m, 1.5)
    se = math.sqrt(0.25 / num)
    assert all(abs(float(x) - 0.5) < 0.05 + 4 * se for x in masses)


def test_a_non_finite_step_raises_and_changes_nothing():
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        # finite everywhere, but the gradient is NaN where z0 < 0 (sqrt's, through where)
        pyro.factor("f", torch.where(z[..., 0] < 0, 0.0, torch.sqrt(z[..., 0])))

    guide = _guide(model)
    before = {k: v.detach().clone() for k, v in guide.named_parameters()}
    with pytest.raises(RuntimeError, match="not finite"):
        NaturalStratifiedELBO().loss_and_grads(model, guide)
    for name, value in guide.named_parameters():
        assert torch.equal(value.detach(), before[name]), name
        assert value.grad is None, name


def test_mixture_natural_gradient_steps_a_full_covariance_guide():
    # The weight step divides each component's gradient by its weight: with full covariance
    # that is scale_tril's (the step used to look for "scales" and fail). With SGD the change
    # of each component's factor is then the plain SGD change divided by its weight.
    def one_step(wrapped: bool):
        guide = _guide(bimodal_model)
        guide.to_full_covariance()
        with torch.no_grad():
            guide.logits_unconstrained.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
        pi = torch.softmax(guide.logits.detach(), -1)
        optim = pyro.optim.SGD({"lr": 1e-3})
        if wrapped:
            optim = MixtureNaturalGradient(guide, optim)
        svi = SVI(bimodal_model, guide, optim, StratifiedELBO())
        before = guide.scale_tril_unconstrained.detach().clone()
        pyro.set_rng_seed(5)
        assert math.isfinite(svi.step())
        return guide.scale_tril_unconstrained.detach() - before, pi

    wrapped, pi = one_step(True)
    plain, _ = one_step(False)
    assert plain.abs().sum() > 0
    expected = plain / pi.reshape(-1, 1, 1).to(plain.dtype)
    assert torch.allclose(wrapped, expected, rtol=1e-6, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    center = torch.tensor([1.0, -2.0], device="cuda")

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2, device="cuda"), 10.0).to_event(1))
        pyro.factor("f", -0.5 * (z - center).pow(2).sum(-1))

    pyro.clear_param_store()
    guide = AutoMixtureFlow(model, num_components=4, init_spread=1.0).setup()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), NaturalStratifiedELBO())
    for _ in range(3):
        assert math.isfinite(svi.step())
    assert guide.locs.device.type == "cuda" and guide.locs_unconstrained.grad is None
