"""Mode discovery on by default: AutoMixtureFlow's defaults and its prior initialisation."""

import inspect
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide.initialization import init_to_value

from pyro_mogflow import AutoMixtureFlow
from pyro_mogflow.examples import gaussian_mixture_target
from tests.infer.helpers import fit_target

DTYPES = [torch.float32, torch.float64]


def shifted_model(dtype=torch.float32):
    """theta ~ N(3, 2^2) (2-D), s ~ HalfNormal(1): a prior with a known law in both spaces."""
    loc = torch.full((2,), 3.0, dtype=dtype)
    pyro.sample("theta", dist.Normal(loc, 2.0).to_event(1))
    pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=dtype)))


def test_defaults_are_the_mode_discovery_defaults():
    params = inspect.signature(AutoMixtureFlow).parameters
    assert params["num_components"].default == 64
    assert params["estimator"].default == "stratified"
    assert params["flow"].default is None
    assert params["init_spread"].default == "auto"  # fit(): the prior spread unless told otherwise
    assert params["init_loc_fn"].default is None and params["init_scale"].default is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_prior_init_places_the_means_at_prior_draws(dtype):
    k = 2000
    guide = AutoMixtureFlow(shifted_model, num_components=k, init_spread="prior").setup(dtype)
    locs = guide.locs.detach().double()
    assert locs.dtype == torch.float64 and guide.locs.dtype == dtype
    theta, log_s = locs[:, :2], locs[:, 2]
    # means and standard deviations of K independent draws, to 4 standard errors
    se_mean, se_sd = 2.0 / math.sqrt(k), 2.0 / math.sqrt(2 * k)
    assert torch.allclose(
        theta.mean(0), torch.full((2,), 3.0, dtype=torch.float64), atol=4 * se_mean
    )
    assert torch.allclose(theta.std(0), torch.full((2,), 2.0, dtype=torch.float64), atol=4 * se_sd)
    # the positive site is drawn in its own space and mapped by log: E|N(0,1)| = sqrt(2/pi)
    s = log_s.exp()
    assert abs(float(s.mean()) - math.sqrt(2 / math.pi)) < 4 * float(s.std()) / math.sqrt(k)


def test_prior_init_overrides_the_init_strategy():
    # init_to_median would put every draw near the prior median (spread ~2/sqrt(15)).
    guide = AutoMixtureFlow(shifted_model, num_components=400, init_spread="prior").setup()
    assert float(guide.locs.detach()[:, 0].std()) > 1.5


def test_a_prior_that_cannot_be_sampled_falls_back_with_a_warning_naming_the_site():
    def model():
        pyro.sample("flat", dist.ImproperUniform(dist.constraints.real, (), (2,)))
        pyro.sample("b", dist.Normal(5.0, 0.1))

    with pytest.warns(UserWarning, match=r"\['flat'\] cannot be sampled"):
        init = init_to_value(values={"flat": torch.zeros(2)})  # Pyro's others sample too
        guide = AutoMixtureFlow(
            model, num_components=50, init_loc_fn=init, init_spread="prior"
        ).setup()
    locs = guide.locs.detach()
    assert bool(torch.isfinite(locs).all())
    assert abs(float(locs[:, 2].mean()) - 5.0) < 4 * 0.1 / math.sqrt(50)  # sampled site


def test_prior_init_with_one_component_is_the_initial_location():
    guide = AutoMixtureFlow(shifted_model, num_components=1, init_spread="prior").setup()
    assert torch.allclose(guide.locs.detach()[0], guide._init_loc().detach())


def test_init_spread_rejects_an_unknown_string():
    with pytest.raises(ValueError, match="init_spread must be 'auto', 'prior' or a finite float"):
        AutoMixtureFlow(shifted_model, init_spread="wide")


@pytest.mark.parametrize("seed", [0, 1])
def test_defaults_find_four_modes_with_their_masses(seed):
    # The 4-mode target of the design notes (corners (+-4, +-4), std 0.5), where the design
    # note's method finds one mode. A short fit with default settings but K = 16.
    target = gaussian_mixture_target()
    pyro.set_rng_seed(seed)
    guide = AutoMixtureFlow(target.model, num_components=16)
    fit_target(target, guide, num_steps=500)
    n = 20000
    masses = target.mode_masses(guide.sample_posterior(n, *target.args, **target.kwargs)["z"])
    ref = target.reference_masses
    # every mode within the benchmark's goal (TV <= 0.05) plus 3 Monte Carlo SE
    se = (ref * (1 - ref) / n).sqrt()
    assert bool(((masses - ref).abs() < 0.05 + 3 * se).all()), masses
