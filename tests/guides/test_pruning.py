"""Pruning and merging the components of an AutoMixtureFlow (pyro_mogflow.guides.pruning)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mogflow import AutoMixtureFlow, StratifiedELBO
from pyro_mogflow.guides.pruning import mergeable_groups, prune_and_merge

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def _clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _model(dtype=torch.float64, d=2):
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(d, dtype=dtype), 1.0).to_event(1))

    return model


def _guide(locs, scales, logits, flow=None):
    dtype = locs.dtype
    guide = AutoMixtureFlow(
        _model(dtype, locs.shape[-1]), num_components=locs.shape[0], flow=flow
    ).setup()
    with torch.no_grad():
        guide.locs_unconstrained.copy_(locs)
        guide.scales_unconstrained.copy_(scales.expm1().log())  # softplus inverse
        guide.logits_unconstrained.copy_(logits)
    return guide


def _log_q(guide, z):
    with torch.no_grad():
        return guide.get_posterior().log_prob(z)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pruning_raises_log_q_by_at_most_minus_log_of_the_kept_mass(dtype):
    # components 0, 2 near the origin are kept; 1 and 3 lie 60 away and are pruned
    locs = torch.tensor([[0.0, 0.0], [60.0, 0.0], [1.0, -1.0], [0.0, 60.0]], dtype=dtype)
    scales = torch.tensor([[1.0, 0.5], [1.0, 1.0], [0.7, 1.2], [2.0, 2.0]], dtype=dtype)
    logits = torch.tensor([0.0, -1.0, 0.5, -2.0], dtype=dtype)
    guide = _guide(locs, scales, logits)
    far = locs[[1, 3]].repeat(10, 1) + torch.randn(20, 2, dtype=dtype)
    z = torch.cat([torch.randn(200, 2, dtype=dtype), far])
    before = _log_q(guide, z)
    pruned = guide.prune([2, 0])
    pi = torch.softmax(logits, -1)
    assert float(pruned) == pytest.approx(float(pi[1] + pi[3]), rel=1e-6)
    after = _log_q(guide, z)
    bound = -math.log1p(-float(pruned))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert bool((after - before <= bound + tol).all())
    # where the pruned components have no density (near the origin) the bound is attained
    torch.testing.assert_close(after[:200] - before[:200], torch.full_like(after[:200], bound))
    # and the draws of the pruned components lost their density
    assert bool((after[200:] < before[200:] - 10).all())
    assert guide.num_components == 2 and guide.locs.shape == (2, 2)
    torch.testing.assert_close(guide.locs.detach(), locs[[2, 0]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flow", [None, "affine_coupling"])
def test_merging_identical_components_leaves_the_density_unchanged(dtype, flow):
    torch.manual_seed(0)
    locs = torch.tensor([[0.5, -1.0], [0.5, -1.0], [3.0, 2.0]], dtype=dtype)
    scales = torch.tensor([[0.8, 1.5], [0.8, 1.5], [1.0, 1.0]], dtype=dtype)
    logits = torch.tensor([0.2, -0.7, 0.0], dtype=dtype)
    guide = _guide(locs, scales, logits, flow=flow)
    z = 3 * torch.randn(500, 2, dtype=dtype)
    before = _log_q(guide, z)
    assert mergeable_groups(guide.locs, guide.scales) == [[0, 1], [2]]
    assert guide.merge_components() == 1
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(_log_q(guide, z), before, rtol=rtol, atol=rtol)


def test_a_merged_component_has_the_groups_weight_and_first_two_moments():
    locs = torch.tensor([[0.0, 1.0], [0.4, 1.2], [9.0, 9.0]], dtype=torch.float64)
    scales = torch.tensor([[1.0, 2.0], [1.1, 1.8], [1.0, 1.0]], dtype=torch.float64)
    logits = torch.tensor([0.0, 1.0, -0.5], dtype=torch.float64)
    guide = _guide(locs, scales, logits)
    prune_and_merge(guide, [[0, 1], [2]])
    pi = torch.softmax(logits, -1)
    w = pi[:2] / pi[:2].sum()
    mean = (w[:, None] * locs[:2]).sum(0)
    var = (w[:, None] * (scales[:2] ** 2 + locs[:2] ** 2)).sum(0) - mean**2
    torch.testing.assert_close(guide.locs.detach()[0], mean)
    torch.testing.assert_close(guide.scales.detach()[0], var.sqrt())
    torch.testing.assert_close(
        torch.softmax(guide.logits.detach(), -1), torch.stack([pi[:2].sum(), pi[2]])
    )


def test_the_elbo_after_merging_near_copies_is_within_its_standard_error():
    pyro.set_rng_seed(3)
    model = _model(torch.float64, 3)
    locs = 0.05 * torch.randn(6, 3, dtype=torch.float64)  # near copies of N(0, 1)
    scales = 1 + 0.05 * torch.rand(6, 3, dtype=torch.float64)
    guide = _guide(locs, scales, torch.zeros(6, dtype=torch.float64))
    elbo = StratifiedELBO(num_particles=4000)

    def estimate():
        log_ratio, log_pi, _ = elbo.particles(model, guide)
        pi = log_pi.detach().exp()
        terms = log_ratio.detach()
        value = float((pi * terms.mean(-1)).sum())
        se = float((pi**2 * terms.var(-1) / terms.shape[-1]).sum().sqrt())
        return value, se

    before, se_before = estimate()
    assert guide.merge_components() == 5
    after, se_after = estimate()
    assert abs(after - before) <= 3 * math.hypot(se_before, se_after)
    assert after <= 3 * se_after  # still a lower bound on log Z = 0


def test_adam_keeps_the_flow_state_and_starts_fresh_on_the_new_parameters():
    pyro.set_rng_seed(0)
    model = _model(torch.float32, 2)
    guide = AutoMixtureFlow(model, num_components=4, flow="affine_coupling").setup()
    optim = pyro.optim.Adam({"lr": 0.01})
    svi = pyro.infer.SVI(model, guide, optim, StratifiedELBO())
    svi.step()
    svi.step()
    old_locs = guide.locs_unconstrained
    guide.prune([0, 3])
    loss = svi.step()
    assert math.isfinite(loss)
    new_locs = guide.locs_unconstrained
    assert new_locs is not old_locs and new_locs.shape == (2, 2)
    assert optim.optim_objs[new_locs].state[new_locs]["step"] == 1  # fresh state
    flow_param = next(guide.flow.parameters())
    assert optim.optim_objs[flow_param].state[flow_param]["step"] == 3  # kept
    assert set(pyro.get_param_store().keys()) >= {f"{guide.name}.locs", f"{guide.name}.logits"}
    assert pyro.get_param_store()[f"{guide.name}.locs"].shape == (2, 2)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda g: g.prune([0, 9]), ValueError, r"outside \[0, 4\)"),
        (lambda g: g.prune([]), ValueError, "empty"),
        (lambda g: g.prune([1, 1]), ValueError, "twice"),
        (lambda g: g.prune([0.5]), TypeError, "integer"),
        (lambda g: g.prune("01"), TypeError, "keep"),
        (lambda g: g.merge_components([[0, 1], [1, 2]]), ValueError, "twice"),
        (lambda g: g.merge_components([[0], []]), ValueError, "empty"),
    ],
)
def test_an_invalid_prune_or_merge_leaves_the_guide_unchanged(call, error, match):
    guide = AutoMixtureFlow(_model(), num_components=4).setup()
    before = {k: v.clone() for k, v in guide.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(error, match=match):
        call(guide)
    after = guide.state_dict()
    assert guide.num_components == 4
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_a_guide_that_is_not_set_up_cannot_be_pruned():
    guide = AutoMixtureFlow(_model(), num_components=4)
    with pytest.raises(RuntimeError, match="set up"):
        guide.prune([0])


def test_a_pruned_state_dict_reloads_into_a_guide_with_the_smaller_k():
    torch.manual_seed(1)
    guide = AutoMixtureFlow(_model(), num_components=5).setup()
    guide.prune([4, 1])
    fresh = AutoMixtureFlow(_model(), num_components=guide.num_components).setup()
    fresh.load_state_dict(guide.state_dict())
    z = torch.randn(50, 2, dtype=torch.float64)
    torch.testing.assert_close(_log_q(fresh, z), _log_q(guide, z))
