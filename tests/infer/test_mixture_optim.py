"""MixtureNaturalGradient and the plain SVI loop with AutoMixtureFlow's defaults."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_mogflow import AutoMixtureFlow, MixtureNaturalGradient, StratifiedELBO
from pyro_mogflow.infer.mixture_weights import MIN_WEIGHT


def bimodal_model():
    """z ~ N(0, 5^2 I) in 2-D, times a factor making the posterior 0.5 N(+-m, 0.5^2 I), m =
    (3, 1): log Z = 0 exactly (the factor cancels the prior)."""
    z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=torch.float64), 5.0).to_event(1))
    m = torch.tensor([3.0, 1.0], dtype=torch.float64)
    comp = dist.Normal(torch.stack([m, -m]), 0.5).to_event(1).log_prob(z.unsqueeze(-2))
    log_post = torch.logsumexp(comp + math.log(0.5), -1)
    prior = dist.Normal(torch.zeros(2, dtype=torch.float64), 5.0).to_event(1).log_prob(z)
    pyro.factor("target", log_post - prior)


def _elbo_and_se(guide, num=4000):
    """Reverse KL's complement: mean and standard error of log p - log q over guide draws."""
    with torch.no_grad():
        log_w = pyro.infer.importance.vectorized_importance_weights(
            bimodal_model, guide, num_samples=num, max_plate_nesting=0
        )[0].double()
    return float(log_w.mean()), float(log_w.std() / math.sqrt(num))


@pytest.mark.parametrize("elbo", [Trace_ELBO, StratifiedELBO])
@pytest.mark.parametrize("natural", [False, True])
def test_the_plain_loop_with_the_defaults_is_warning_free(elbo, natural):
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(bimodal_model, num_components=8)
    optim = pyro.optim.Adam({"lr": 0.01})
    if natural:
        optim = MixtureNaturalGradient(guide, optim)
    svi = SVI(bimodal_model, guide, optim, elbo())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = [svi.step() for _ in range(5)]
    assert all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("elbo", [Trace_ELBO, StratifiedELBO])
def test_the_plain_loop_with_the_defaults_is_not_worse_than_auto_normal(elbo):
    # Same optimiser, learning rate and steps; AutoNormal finds one of the two modes (its best
    # ELBO is -log 2 = -0.69), so the defaults must reach at least that, up to 4 standard errors.
    # The learning rate decays (0.05 to 0.001) so the end point's optimiser jitter is small
    # next to the standard error of the ELBO estimate.
    results = {}
    for name, make, loss in [
        ("normal", AutoNormal, Trace_ELBO),
        ("mixture", lambda m: AutoMixtureFlow(m, num_components=8), elbo),
    ]:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = make(bimodal_model)
        optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99})
        svi = SVI(bimodal_model, guide, optim, loss())
        for _ in range(400):
            svi.step()
        results[name] = _elbo_and_se(guide)
    (normal, se_n), (mixture, se_m) = results["normal"], results["mixture"]
    assert normal > -math.log(2) - 0.1  # the anchor did its job: one mode, well fitted
    assert mixture >= normal - 4 * math.hypot(se_n, se_m), results


def _two_component_guide(locs):
    guide = AutoMixtureFlow(bimodal_model, num_components=2, init_spread="prior").setup()
    with torch.no_grad():
        guide.locs = torch.as_tensor(locs, dtype=torch.float64)
        guide.logits = torch.tensor([0.3, -0.3], dtype=torch.float64)
    return guide


def test_the_update_is_the_documented_natural_gradient_step():
    # log pi <- log_softmax(log pi - eta g / pi); means and scales: SGD on g / pi_k
    guide = _two_component_guide([[2.0, 0.5], [-3.5, -1.0]])
    eta, lr = 0.3, 0.01
    elbo = StratifiedELBO(num_particles=4)
    logits0 = guide.logits.detach().clone()
    locs0, scales_u = guide.locs.detach().clone(), guide.scales.unconstrained().detach().clone()

    pyro.set_rng_seed(3)
    loss = elbo.differentiable_loss(bimodal_model, guide)
    leaves = [guide.logits.unconstrained(), guide.locs.unconstrained()]
    leaves.append(guide.scales.unconstrained())
    g_logits, g_locs, g_scales = torch.autograd.grad(loss, leaves)
    pi = torch.softmax(logits0, -1)
    expected_logits = torch.log_softmax(torch.log_softmax(logits0, -1) - eta * g_logits / pi, -1)
    expected_locs = locs0 - lr * g_locs / pi.unsqueeze(-1)
    expected_scales = scales_u - lr * g_scales / pi.unsqueeze(-1)

    optim = MixtureNaturalGradient(guide, pyro.optim.SGD({"lr": lr}), weight_step=eta)
    svi = SVI(bimodal_model, guide, optim, elbo)
    pyro.set_rng_seed(3)
    svi.step()
    torch.testing.assert_close(guide.logits.detach(), expected_logits)
    torch.testing.assert_close(guide.locs.detach(), expected_locs)
    torch.testing.assert_close(guide.scales.unconstrained().detach(), expected_scales)


def test_for_separated_components_minus_g_over_pi_is_each_components_elbo_term():
    # -g_k / pi_k = L_k - sum_j pi_j L_j, with L_k the mean of component k's log-ratios
    guide = _two_component_guide([[3.0, 1.0], [-3.0, -1.0]])
    elbo = StratifiedELBO(num_particles=64)
    pyro.set_rng_seed(0)
    log_ratio, log_pi = elbo.particles(bimodal_model, guide)[:2]
    terms = log_ratio.mean(-1).detach()
    pi = log_pi.exp().detach()
    loss = -(log_pi.exp() * log_ratio.mean(-1)).sum()
    (g,) = torch.autograd.grad(loss, [guide.logits.unconstrained()])
    torch.testing.assert_close(-g / pi, terms - (pi * terms).sum(), atol=1e-6, rtol=1e-6)


def test_a_weight_never_falls_below_the_floor():
    guide = _two_component_guide([[3.0, 1.0], [40.0, 40.0]])  # the second is far from the mass
    optim = MixtureNaturalGradient(guide, pyro.optim.Adam({"lr": 0.01}), weight_step=5.0)
    svi = SVI(bimodal_model, guide, optim, StratifiedELBO())
    for _ in range(5):
        svi.step()
    pi = torch.softmax(guide.logits.detach(), -1)
    assert float(pi[1]) >= MIN_WEIGHT * (1 - 1e-6)
    assert float(pi[1]) < 1e-3


def test_natural_steps_find_both_modes_in_a_plain_loop():
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(bimodal_model, num_components=16, init_spread="prior")
    optim = MixtureNaturalGradient(guide, pyro.optim.Adam({"lr": 0.02}))
    svi = SVI(bimodal_model, guide, optim, StratifiedELBO())
    for _ in range(300):
        svi.step()
    with torch.no_grad():
        z = guide.get_posterior().sample((4000,))
    right = float((z[:, 0] > 0).double().mean())
    # both modes hold half the mass: 4 binomial standard errors, plus 0.05 for the fit
    assert abs(right - 0.5) < 4 * math.sqrt(0.25 / 4000) + 0.05
    elbo, se = _elbo_and_se(guide)
    assert elbo > -0.1 - 4 * se  # log Z = 0: reverse KL under 0.1 nats


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((AutoNormal(bimodal_model), pyro.optim.Adam({})), TypeError, "guide must be"),
        ((None, torch.optim.Adam), TypeError, "optim must be a Pyro optimizer"),
        ((None, pyro.optim.Adam({}), 0.0), ValueError, "weight_step"),
    ],
)
def test_bad_arguments_are_refused_naming_them(args, error, match):
    if args[0] is None:
        args = (AutoMixtureFlow(bimodal_model),) + args[1:]
    with pytest.raises(error, match=match):
        MixtureNaturalGradient(*args)


def test_the_state_is_the_wrapped_optimisers():
    guide = AutoMixtureFlow(bimodal_model, num_components=2)
    inner = pyro.optim.Adam({"lr": 0.01})
    optim = MixtureNaturalGradient(guide, inner)
    SVI(bimodal_model, guide, optim, StratifiedELBO()).step()
    state = optim.get_state()
    assert state.keys() == inner.get_state().keys()
    assert not any(name.endswith("logits") for name in state)  # the logits are not Adam's
