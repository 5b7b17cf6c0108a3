"""Upgrading an AutoMixtureFlow to full-covariance components, and what works on it after."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mogflow import AutoMixtureFlow
from pyro_mogflow.distributions.density import full_mixture_log_prob
from pyro_mogflow.guides.covariance import component_scales
from pyro_mogflow.infer.budget import reduce_components
from pyro_mogflow.infer.mixture_weights import balance_weights


def _model():
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 2.0).to_event(1))
    pyro.sample("obs", dist.Normal(z.abs().sum(-1), 1.0), obs=torch.tensor(2.0))


@pytest.mark.parametrize("flow", [None, "affine_coupling"])
def test_the_upgrade_keeps_the_density_and_drops_scales(flow):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(_model, num_components=4, flow=flow)
    guide()  # registers the parameters in the param store
    x = 3 * torch.randn(50, 3)
    before = guide.get_posterior().log_prob(x)
    scales = guide.scales.detach().clone()
    assert guide.to_full_covariance() is True
    assert guide.covariance == "full" and "scales" not in guide._pyro_params
    assert not any(name.endswith(".scales") for name in pyro.get_param_store().keys())
    torch.testing.assert_close(guide.get_posterior().log_prob(x), before, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(component_scales(guide), scales)
    assert guide.to_full_covariance() is False
    guide()  # the new parameters are registered and sampled
    assert any(name.endswith(".scale_tril") for name in pyro.get_param_store().keys())


def test_the_upgrade_needs_a_set_up_guide():
    with pytest.raises(RuntimeError, match="not set up"):
        AutoMixtureFlow(_model).to_full_covariance()


def _full_guide():
    pyro.clear_param_store()
    torch.manual_seed(0)
    guide = AutoMixtureFlow(_model, num_components=4, flow=None).setup()
    guide.to_full_covariance()
    with torch.no_grad():  # distinct correlated components
        a = torch.randn(4, 3, 3) * 0.3
        tril = torch.linalg.cholesky(a @ a.transpose(-1, -2) + 0.5 * torch.eye(3))
        guide.scale_tril = tril
        guide.logits = torch.tensor([0.0, 1.0, -8.0, 0.5])
        guide.locs = guide.locs.detach().clone()
        guide.locs[3] = guide.locs[1]  # 1 and 3 on one mode
    return guide


def test_prune_and_merge_of_full_components_match_rows_and_second_moments():
    guide = _full_guide()
    logits, locs = guide.logits.detach().clone(), guide.locs.detach().clone()
    tril = guide.scale_tril.detach().clone()
    guide.prune([0, 1, 3])
    assert guide.num_components == 3 and guide.covariance == "full"
    torch.testing.assert_close(guide.scale_tril.detach(), tril[[0, 1, 3]])
    guide.merge_components([[0], [1, 2]])
    w = torch.softmax(logits[[1, 3]], -1)
    cov = tril[[1, 3]] @ tril[[1, 3]].transpose(-1, -2)
    merged = guide.scale_tril.detach()[1]
    torch.testing.assert_close(merged @ merged.T, (w.reshape(-1, 1, 1) * cov).sum(0))
    torch.testing.assert_close(guide.locs.detach()[1], locs[1])


def test_fit_helpers_work_on_a_full_guide():
    guide = _full_guide()
    change = reduce_components(guide, prune_mass=1e-2)
    assert change["pruned"] == 1 and guide.covariance == "full"
    groups = guide.components()["groups"]
    assert abs(sum(g["weight"] for g in groups) - 1) < 1e-5
    weights = balance_weights(_model, guide, num_particles=16)
    assert torch.isclose(weights.sum(), torch.tensor(1.0))
    x = torch.randn(5, 3)
    ref = full_mixture_log_prob(x, guide.logits, guide.locs, guide.scale_tril)
    torch.testing.assert_close(guide.get_posterior().log_prob(x), ref)
    assert guide.quantiles([0.5])["z"].shape == (1, 3)
