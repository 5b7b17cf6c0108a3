"""StratifiedELBO.only_components: shares of a partition of the components add up to the ELBO.

The Gaussian noise of the stratified draw is set to zero (every draw sits at its component's
mean), so the full evaluation and the sum of the shares see the same draws and must agree to
float precision, value and gradient alike.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mogflow import AutoMixtureFlow, StratifiedELBO
from pyro_mogflow.distributions import MixtureFlow

from .helpers import grads_of, regression, regression_data, zero_noise

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def _clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flow", [None, "affine_coupling"])
def test_shares_of_a_partition_add_up_to_the_elbo_and_its_gradient(monkeypatch, dtype, flow):
    x, y = regression_data(dtype)
    torch.manual_seed(1)
    guide = AutoMixtureFlow(regression, num_components=5, flow=flow).setup(x, y)
    zero_noise(monkeypatch)
    elbo = StratifiedELBO()
    full = elbo.loss_and_grads(regression, guide, x, y)
    expected = grads_of(guide)
    guide.zero_grad()
    total = 0.0
    for part in ([0, 3], torch.tensor([4, 1]), [2]):
        with elbo.only_components(part):
            total += elbo.loss_and_grads(regression, guide, x, y)
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    assert total == pytest.approx(full, rel=rtol)
    got = grads_of(guide)
    assert expected.keys() == got.keys() and expected
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=rtol, atol=rtol, msg=name)


def test_a_share_draws_only_its_components(monkeypatch):
    x, y = regression_data(torch.float64)
    guide = AutoMixtureFlow(regression, num_components=4).setup(x, y)
    zero_noise(monkeypatch)
    elbo = StratifiedELBO(num_particles=3)
    with elbo.only_components([2, 0]):
        particles = elbo.particles(regression, guide, x, y)
    assert particles.log_ratio.shape == (2, 3)
    weights = guide.components(x, y)["weights"]
    torch.testing.assert_close(
        particles.log_weights.exp(), torch.as_tensor(weights, dtype=torch.float64)[[2, 0]]
    )
    torch.testing.assert_close(particles.latent[:, 0], guide.locs.detach()[[2, 0]])
    assert elbo._components is None  # the context restores the full evaluation


@pytest.mark.parametrize(
    "components, error, match",
    [
        ([0, 5], ValueError, r"\[0, 4\)"),
        ([1, 1], ValueError, "distinct"),
        ([], ValueError, "non-empty"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer"),
        (["a"], TypeError, "integer"),
    ],
)
def test_bad_components_are_refused(components, error, match):
    x, y = regression_data(torch.float64)
    guide = AutoMixtureFlow(regression, num_components=4).setup(x, y)
    elbo = StratifiedELBO()
    with pytest.raises(error, match=match):
        with elbo.only_components(components):
            elbo.loss(regression, guide, x, y)


def test_the_siwae_bound_does_not_split():
    with pytest.raises(ValueError, match="importance-weighted"):
        with StratifiedELBO(importance_weighted=True).only_components([0]):
            pass


def test_a_guide_whose_number_of_components_changes_is_probed_again():
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    class Guide:
        k = 3

        def __call__(self):
            k = self.k
            q = MixtureFlow(
                torch.zeros(k), torch.zeros(k, 2), torch.ones(k, 2), estimator="stratified"
            )
            pyro.sample("z", q)

    guide = Guide()
    elbo = StratifiedELBO()
    elbo.loss(model, guide)
    assert elbo.last_sample.log_weights.shape == (3,)
    guide.k = 2
    elbo.loss(model, guide)
    assert elbo.last_sample.log_weights.shape == (2,)
