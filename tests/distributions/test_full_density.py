"""full_component_log_prob: every batch layout against torch's MultivariateNormal."""

import pytest
import torch
from torch.distributions import MultivariateNormal

from pyro_mogflow.distributions.density import full_component_log_prob

D, K = 3, 4


def _factors(batch=()):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(batch + (K, D, D), generator=gen, dtype=torch.float64)
    tril = torch.linalg.cholesky(a @ a.mT + torch.eye(D, dtype=torch.float64))
    return torch.randn(batch + (K, D), generator=gen, dtype=torch.float64), tril


def _reference(value, locs, tril):
    return MultivariateNormal(locs, scale_tril=tril).log_prob(value.unsqueeze(-2))


@pytest.mark.parametrize("shape", [(D,), (5, D), (5, 2, D), (7, 1, D)])
def test_points_of_any_sample_shape(shape):
    locs, tril = _factors()
    value = torch.randn(shape, dtype=torch.float64)
    assert torch.allclose(full_component_log_prob(value, locs, tril), _reference(value, locs, tril))


@pytest.mark.parametrize("shape", [(2, D), (5, 2, D), (3, 5, 2, D)])
def test_a_batch_of_distinct_mixtures(shape):
    locs, tril = _factors((2,))
    value = torch.randn(shape, dtype=torch.float64)
    assert torch.allclose(full_component_log_prob(value, locs, tril), _reference(value, locs, tril))


@pytest.mark.parametrize("shape", [(6, D), (9, 6, D)])
def test_an_expanded_batch(shape):
    locs, tril = _factors()
    locs, tril = locs.expand(6, K, D), tril.expand(6, K, D, D)
    value = torch.randn(shape, dtype=torch.float64)
    assert torch.allclose(full_component_log_prob(value, locs, tril), _reference(value, locs, tril))


def test_an_expanded_batch_is_solved_once_not_per_point():
    # A posterior expanded over 20000 draws (as Pyro's vectorized importance weights do) in
    # 60-D with 8 components: a copy of each factor per draw would take 2.3 GB; one solve per
    # factor with the draws as right-hand sides takes a few tens of MB.
    n, k, d = 20000, 8, 60
    tril = torch.eye(d).expand(n, k, d, d)
    locs = torch.zeros(n, k, d)
    value = torch.zeros(n, d)
    out = full_component_log_prob(value, locs, tril)
    assert out.shape == (n, k)
    assert torch.allclose(out, torch.full((n, k), -0.5 * d * torch.log(torch.tensor(2 * torch.pi))))
