"""AutoMixtureFlow behaves as a Pyro autoguide: warning-free plain SVI, torch.jit tracing,
init_loc_fn / init_scale honoured, Pyro's error messages, saving, and refusing a wrong model.
(Pyro's own battery runs with ``scripts/pyro_battery.sh``.)"""

import io
import math
import pickle
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value

from pyro_mogflow import AutoMixtureFlow


def model(dtype=torch.float64):
    pyro.sample("x", dist.Normal(torch.tensor(0.0, dtype=dtype), 1.0))
    pyro.sample("y", dist.LogNormal(torch.zeros(2, dtype=dtype), 1.0).to_event(1))
    pyro.sample("obs", dist.Normal(torch.tensor(0.5, dtype=dtype), 1.0), obs=torch.tensor(0.3))


def _strict_warnings():
    """Pyro's own test settings: every warning is an error, save the deprecation of
    torch.jit.trace and the constants note that Pyro's setup.cfg also ignores."""
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="torch.tensor results are registered as constants")


@pytest.mark.parametrize("estimator", ["stratified", "implicit"])
def test_plain_svi_with_trace_elbo_is_warning_free(estimator):
    guide = AutoMixtureFlow(model, num_components=4, estimator=estimator)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    with warnings.catch_warnings():
        _strict_warnings()
        losses = [svi.step() for _ in range(5)]
    assert all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("estimator", ["stratified", "implicit"])
def test_jit_trace_elbo_trains_the_guide(estimator):
    guide = AutoMixtureFlow(model, num_components=4, estimator=estimator)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), JitTrace_ELBO())
    guide.setup()
    before = guide.locs.detach().clone()
    with warnings.catch_warnings():
        _strict_warnings()
        losses = [svi.step() for _ in range(5)]
    assert all(math.isfinite(x) for x in losses)
    assert not torch.equal(before, guide.locs.detach())


@pytest.mark.parametrize("estimator", ["stratified", "implicit"])
def test_traced_guide_draws_what_the_guide_draws(estimator):
    guide = AutoMixtureFlow(model, num_components=3, estimator=estimator)
    guide()
    pyro.set_rng_seed(1)
    expected = guide.call()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        traced = torch.jit.trace_module(guide, {"call": ()}, check_trace=False)
    pyro.set_rng_seed(1)
    for a, b in zip(traced.call(), expected):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("k", [1, 4, 5])
def test_init_loc_fn_is_where_the_guide_starts(k):
    inits = {"x": torch.tensor(0.7), "y": torch.tensor([0.5, 3.0])}
    inits = {name: value.double() for name, value in inits.items()}
    guide = AutoMixtureFlow(model, num_components=k, init_loc_fn=init_to_value(values=inits))
    guide.setup()
    median = guide.median()
    for name, value in inits.items():
        torch.testing.assert_close(median[name], value.to(median[name].dtype), rtol=0, atol=1e-10)
    loc, _ = guide._loc_scale()
    torch.testing.assert_close(loc, guide._init_loc().detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("init_scale", [0.3, 1e-4, 1e-8])
def test_init_scale_is_the_spread_the_guide_starts_with(init_scale):
    guide = AutoMixtureFlow(model, num_components=8, init_scale=init_scale).setup()
    assert torch.allclose(guide.scales.detach(), torch.tensor(init_scale, dtype=torch.float64))
    _, scale = guide._loc_scale()
    # components of scale s, means offset by +-s * N(0, 1): about sqrt(2) s per coordinate
    assert bool(((scale > 0.5 * init_scale) & (scale < 2.5 * init_scale)).all()), scale


def test_defaults_start_every_component_where_autonormal_starts():
    # x ~ N(0, 1), y ~ LogNormal(0, 1): every mean at the point that is zero in the
    # unconstrained space (x = 0, log y = 0), AutoNormal's start, scale 0.1 as AutoNormal's
    guide = AutoMixtureFlow(model, num_components=8).setup()
    ref = AutoNormal(model)
    ref._setup_prototype()
    expected = torch.cat([ref.locs.x.detach().reshape(1), ref.locs.y.detach().reshape(-1)])
    torch.testing.assert_close(expected, torch.zeros_like(expected))
    torch.testing.assert_close(guide.locs.detach(), expected.double().expand(8, 3))
    torch.testing.assert_close(guide.scales.detach(), torch.full_like(guide.scales, 0.1))


def test_fit_starts_a_default_guide_at_prior_draws():
    from pyro_mogflow import fit

    guide = AutoMixtureFlow(model, num_components=400)
    fit(model, guide=guide, num_steps=2, progress=False, callback=lambda *a: True)
    # prior draws of x ~ N(0, 1): standard deviation 1 (one step of lr 0.02 moves a mean
    # by at most 0.02)
    assert abs(float(guide.locs.detach()[:, 0].std()) - 1.0) < 4 / math.sqrt(2 * 400) + 0.04
    # a guide told where to start keeps that start under fit
    told = AutoMixtureFlow(model, num_components=400, init_scale=0.1)
    fit(model, guide=told, num_steps=2, progress=False, callback=lambda *a: True)
    assert float(told.locs.detach()[:, 0].std()) < 0.05


def test_fit_respreads_a_default_guide_set_up_at_one_point():
    from pyro_mogflow import fit

    guide = AutoMixtureFlow(model, num_components=400).setup()  # every mean at the prior mean
    fit(model, guide=guide, num_steps=2, progress=False, callback=lambda *a: True)
    assert abs(float(guide.locs.detach()[:, 0].std()) - 1.0) < 4 / math.sqrt(2 * 400) + 0.04
    # one that has left its start (here: components moved apart), or was told where to start,
    # is trained from where it is
    moved = AutoMixtureFlow(model, num_components=400).setup()
    with torch.no_grad():
        moved.locs_unconstrained[0, 0] += 0.5
    fit(model, guide=moved, num_steps=2, progress=False, callback=lambda *a: True)
    assert float(moved.locs.detach()[1:, 0].std()) < 0.05
    told = AutoMixtureFlow(model, num_components=400, init_spread=0.0).setup()
    fit(model, guide=told, num_steps=2, progress=False, callback=lambda *a: True)
    assert float(told.locs.detach()[:, 0].std()) < 0.05


def test_fit_finds_both_signs_from_a_guide_set_up_before_fit():
    # y ~ N(|x w|, 0.3): w and -w fit equally. From one point (w = 0) the antithetic pairs of
    # the natural steps give every component exactly zero mean gradient: without the redraw
    # the fit ends as one wide component on the saddle.
    pyro.set_rng_seed(0)
    x = torch.randn(200, dtype=torch.float64)
    y = (1.5 * x).abs() + 0.3 * torch.randn(200, dtype=torch.float64)

    def sign_model():
        w = pyro.sample("w", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 2.0))
        with pyro.plate("data", 200):
            pyro.sample("y", dist.Normal((x * w).abs(), 0.3), obs=y)

    from pyro_mogflow import fit

    guide = AutoMixtureFlow(sign_model, num_components=8, flow=None).setup()
    fit(sign_model, guide=guide, num_steps=600, progress=False)
    draws = guide.get_posterior().sample((4000,)).squeeze(-1)
    plus = float((draws > 0).double().mean())
    # both modes, about equal mass (binomial SE of 4000 draws is 0.008; weights are noisy)
    assert 0.3 < plus < 0.7, plus
    # and each mode is narrow: posterior sd of w about 0.3 / sqrt(200) = 0.02
    assert float(draws.abs().std()) < 0.1, float(draws.abs().std())


def test_prior_spread_can_be_combined_with_an_init_scale():
    guide = AutoMixtureFlow(model, num_components=400, init_scale=0.3, init_spread="prior")
    guide.setup()
    assert float(guide.locs.detach()[:, 0].std()) > 0.8
    torch.testing.assert_close(guide.scales.detach(), torch.full_like(guide.scales, 0.3))


def test_improper_uniform_falls_back_with_the_default_init_loc_fn():
    def flat_model():
        pyro.sample("flat", dist.ImproperUniform(dist.constraints.positive, (), (2,)))
        pyro.sample("b", dist.Normal(5.0, 0.1))

    with pytest.warns(UserWarning, match=r"\['flat'\] cannot be sampled"):
        guide = AutoMixtureFlow(flat_model, num_components=6, init_spread="prior").setup()
    # the fallback initial location is zero in the unconstrained space: flat = exp(0) = 1
    torch.testing.assert_close(guide._init_loc()[:2], torch.zeros(2))
    assert bool(torch.isfinite(guide.locs).all())


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"init_spread": math.nan}, ValueError, "init_spread must be 'auto', 'prior' or a finite"),
        ({"init_spread": math.inf}, ValueError, "init_spread must be 'auto', 'prior' or a finite"),
        ({"hidden_dims": 5.5}, TypeError, "hidden_dims must be an int >= 1, a sequence"),
        ({"hidden_dims": [8, 2.5]}, TypeError, r"hidden_dims\[1\] must be an int >= 1"),
        ({"init_loc_fn": 3}, TypeError, "init_loc_fn must be a callable init strategy"),
        ({"create_plates": "plate"}, TypeError, "create_plates must be a callable"),
        ({"init_scale": -1.0}, ValueError, "init_scale must be a finite float > 0"),
    ],
)
def test_bad_arguments_are_refused_at_construction_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        AutoMixtureFlow(model, flow="affine_autoregressive", **kwargs)


@pytest.mark.parametrize("init_loc_fn", [None, init_to_value(values={})])
def test_discrete_site_error_points_to_the_enumeration_tutorial(init_loc_fn):
    def discrete_model():
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        pyro.sample("c", dist.Bernoulli(p))

    guide = AutoMixtureFlow(discrete_model, init_loc_fn=init_loc_fn)
    with pytest.raises(ValueError, match=r"site 'c'.*enumeration\.html"):
        guide()


def _sized_model(n):
    pyro.sample("w", dist.Normal(torch.zeros(n), 1.0).to_event(1))


def _other_model():
    pyro.sample("v", dist.Normal(0.0, 1.0))


@pytest.mark.parametrize(
    "other, match",
    [
        (_other_model, "set up for a model with latent site 'w'"),
        (lambda n: (_sized_model(n), _other_model()), "the model has latent site 'v'"),
        (lambda n: _sized_model(n + 1), r"latent site 'w' has shape \(4,\) in the model"),
    ],
)
def test_a_guide_set_up_for_another_model_is_refused(other, match):
    guide = AutoMixtureFlow(_sized_model, num_components=2).setup(3)
    guide.check_model(_sized_model, 3)  # its own model passes
    args = () if other is _other_model else (3,)
    with pytest.raises(ValueError, match=match):
        guide.check_model(other, *args)


def test_sample_posterior_refuses_a_model_whose_latent_size_changed():
    guide = AutoMixtureFlow(_sized_model, num_components=2).setup(3)
    assert guide.sample_posterior(5, 3)["w"].shape == (5, 3)
    with pytest.raises(ValueError, match=r"latent site 'w' has shape \(4,\).*\(3,\)"):
        guide.sample_posterior(5, 4)


# ------------------------------------------------------------------ saving
def test_whole_guide_loads_with_weights_only_false_and_its_state_dict_with_the_default():
    guide = AutoMixtureFlow(model, num_components=3).setup()
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buffer)  # torch's safe default refuses arbitrary pickled objects
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(copy.locs, guide.locs)

    buffer = io.BytesIO()
    torch.save(guide.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)  # weights_only=True
    fresh = AutoMixtureFlow(model, num_components=3).setup()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.locs, guide.locs)
