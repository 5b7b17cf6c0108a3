"""A guide whose training blew up: errors name the cause, not an internal site."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_mogflow import AutoMixtureFlow, StratifiedELBO, fit


def model():
    pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))


@pytest.mark.filterwarnings("ignore:a mixture flow with estimator='stratified'")
@pytest.mark.parametrize("estimator", ["stratified", "pathwise", "implicit"])
def test_a_blown_up_plain_svi_loop_names_the_non_finite_parameter(estimator):
    pyro.clear_param_store()
    guide = AutoMixtureFlow(model, num_components=2, estimator=estimator)
    guide()
    with torch.no_grad():
        guide.locs.unconstrained()[0, 0] = float("nan")  # what a blown-up step leaves
    loss = StratifiedELBO() if estimator == "stratified" else Trace_ELBO()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            ValueError, match=r"guide parameter\(s\) \['AutoMixtureFlow.*locs'\].*blown up"
        ):
            svi.step()


def test_pathwise_float32_overflow_in_fit_names_the_estimator():
    d = 100

    def narrow():
        pyro.sample("z", dist.Normal(torch.zeros(d), 0.01).to_event(1))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(narrow, num_components=4, estimator="pathwise", flow=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="estimator='pathwise'.*float32 at D=100"):
            fit(narrow, guide=guide, num_steps=50, progress=False)
    for _, p in pyro.get_param_store().named_parameters():
        assert bool(torch.isfinite(p).all())
