"""AutoMixtureFlow.components(): components on the same mode are grouped."""

import pyro
import pytest
import torch

from pyro_mogflow import AutoMixtureFlow, fit
from pyro_mogflow.examples import gaussian_mixture_target
from pyro_mogflow.guides.summaries import group_components


def test_group_components_merges_near_copies_and_sums_their_weights():
    locs = torch.tensor([[-3.0, 0.0], [-2.8, 0.1], [3.0, 0.0], [3.2, -0.1], [0.0, 9.0]])
    scales = torch.full_like(locs, 0.5)
    weights = torch.tensor([0.3, 0.2, 0.25, 0.2, 0.05])
    groups = group_components(locs, scales, weights)
    assert [g["components"] for g in groups] == [[0, 1], [2, 3], [4]]
    assert [g["weight"] for g in groups] == pytest.approx([0.5, 0.45, 0.05])
    # far apart in only one coordinate is still another mode
    assert len(group_components(locs[[0, 4]], scales[[0, 4]], weights[[0, 4]])) == 2


def test_components_of_a_two_mode_fit_form_two_groups():
    target = gaussian_mixture_target([[-3.0], [3.0]], scales=0.5)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide, _ = fit(
        target.model,
        *target.args,
        guide=AutoMixtureFlow(target.model, num_components=16),
        num_steps=300,
        progress=False,
        **target.kwargs,
    )
    found = guide.components(*target.args, **target.kwargs)
    assert {"weights", "latent", "values", "groups"} <= set(found)
    heavy = [g for g in found["groups"] if g["weight"] > 0.05]
    assert len(heavy) == 2
    assert sorted(round(float(g["latent"][0])) for g in heavy) == [-3, 3]
    assert sum(g["weight"] for g in heavy) > 0.98
    every = sorted(i for g in found["groups"] for i in g["components"])
    assert every == list(range(16))
