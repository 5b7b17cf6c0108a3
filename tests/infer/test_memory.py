"""The memory budget: measured chunk sizes, and chunked evaluations equal to unchunked ones.

The Gaussian noise of the stratified draw is set to zero (every draw sits at its component's
mean), so a chunked and an unchunked evaluation see the same draws and must agree to float
precision, value and gradient alike.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pytest
import torch

from pyro_mogflow import AutoMixtureFlow, StratifiedELBO
from pyro_mogflow.infer import balance_weights
from pyro_mogflow.infer.memory import ChunkPlanner, check_memory_budget, measure_peak
from pyro_mogflow.infer.mixture_weights import natural_gradient_stepper

from .helpers import grads_of, regression, regression_data, zero_noise

MIB = 2**20


@pytest.fixture(autouse=True)
def _clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _tiny_budget(elbo):
    """Force one component per chunk (the budget is below one component's cost)."""
    elbo._planner.budget = 1
    return elbo


# ------------------------------------------------------------------------ measurement
@pytest.mark.parametrize("value", [True, "1GiB", 1.5j])
def test_a_budget_must_be_a_number(value):
    with pytest.raises(TypeError, match="memory_budget"):
        check_memory_budget(value)


@pytest.mark.parametrize("value", [0, -5, float("nan"), float("inf")])
def test_a_budget_must_be_positive_and_finite(value):
    with pytest.raises(ValueError, match="memory_budget"):
        check_memory_budget(value)


def test_the_peak_counts_transient_tensors_and_not_older_ones():
    held = torch.ones(4 * MIB // 4)  # allocated before: not counted

    def work():
        big = held * 2.0  # 4 MiB, freed before the end
        small = big.sum()
        del big
        return small

    peak, result = measure_peak(work)
    assert result == 2.0 * held.numel()
    assert 4 * MIB <= peak < 4 * MIB + 4096


def test_the_planner_sizes_chunks_from_the_measured_cost_per_item():
    def probe(m):  # 1 MiB fixed and 1 MiB per item, all alive at once
        return torch.empty(MIB // 4), torch.empty(m * MIB // 4)

    planner = ChunkPlanner(10 * MIB + 1000)
    assert planner.size("k", 100, probe) == 9  # (10 MiB - 1 MiB fixed) / 1 MiB per item
    assert planner.size("k", 100, lambda m: 1 / 0) == 9  # measured once per key
    assert ChunkPlanner(None).size("k", 100, lambda m: 1 / 0) == 100
    assert ChunkPlanner(10**12).size("k", 100, probe) == 100


def test_an_item_over_the_budget_warns_and_runs_one_at_a_time():
    planner = ChunkPlanner(MIB, "component")
    with pytest.warns(ResourceWarning, match="over the memory budget"):
        size = planner.size("k", 5, lambda m: torch.ones(m * MIB) + 0)
    assert size == 1


# ------------------------------------------------------------- chunked = unchunked
@pytest.mark.parametrize("importance_weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_loss_and_grads_equal_the_unchunked_ones(monkeypatch, dtype, importance_weighted):
    x, y = regression_data(dtype)
    guide = AutoMixtureFlow(regression, num_components=5, flow="affine_coupling").setup(x, y)
    zero_noise(monkeypatch)
    # the reference: the objective written out from one unchunked evaluation of the draws
    log_ratio, log_weights, _ = StratifiedELBO(num_particles=2).particles(regression, guide, x, y)
    if importance_weighted:
        objective = torch.logsumexp(log_weights[:, None] + log_ratio, (0, 1)) - math.log(2)
    else:
        objective = (log_weights.exp() * log_ratio.mean(-1)).sum()
    (-objective).backward()
    expected_loss = -float(objective.detach())
    expected = grads_of(guide)
    guide.zero_grad()
    elbo = StratifiedELBO(num_particles=2, importance_weighted=importance_weighted)
    _tiny_budget(elbo)
    with pytest.warns(ResourceWarning):
        loss = elbo.loss_and_grads(regression, guide, x, y)
    assert list(elbo._planner.sizes.values()) == [(1, 1)]  # ten chunks: one draw each
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    assert loss == pytest.approx(expected_loss, rel=rtol)
    assert elbo.loss(regression, guide, x, y) == pytest.approx(expected_loss, rel=rtol)
    got = grads_of(guide)
    assert got.keys() == expected.keys() and expected
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=rtol, atol=rtol, msg=name)
    guide.zero_grad()
    elbo.differentiable_loss(regression, guide, x, y).backward()
    for name, grad in expected.items():
        torch.testing.assert_close(grads_of(guide)[name], grad, rtol=rtol, atol=rtol, msg=name)


def test_chunks_inside_only_components_cover_that_share(monkeypatch):
    x, y = regression_data()
    guide = AutoMixtureFlow(regression, num_components=6).setup(x, y)
    zero_noise(monkeypatch)
    full = StratifiedELBO(memory_budget=None)
    with full.only_components([5, 1, 2]):
        expected = full.loss(regression, guide, x, y)
    elbo = _tiny_budget(StratifiedELBO())
    with pytest.warns(ResourceWarning), elbo.only_components([5, 1, 2]):
        assert elbo.loss(regression, guide, x, y) == pytest.approx(expected, rel=1e-12)


def test_chunked_natural_gradient_step_equals_the_unchunked_one(monkeypatch):
    x, y = regression_data()
    zero_noise(monkeypatch)
    after = []
    for budget in (None, 1):
        pyro.clear_param_store()
        torch.manual_seed(0)
        guide = AutoMixtureFlow(regression, num_components=4).setup(x, y)
        optim = pyro.optim.Adam({"lr": 0.1})
        elbo = StratifiedELBO(memory_budget=budget)
        step = natural_gradient_stepper(regression, guide, optim, elbo, 0.5, lambda: False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            losses = [step(x, y) for _ in range(3)]
        state = {k: v.detach().clone() for k, v in guide.named_parameters()}
        after.append((losses, state))
    assert after[0][0] == pytest.approx(after[1][0], rel=1e-12)
    for name, value in after[0][1].items():
        torch.testing.assert_close(after[1][1][name], value, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("objective", ["elbo", "forward"])
def test_chunked_balance_weights_equal_the_unchunked_ones(objective):
    x, y = regression_data()
    weights = []
    for budget in (None, 1):
        pyro.clear_param_store()
        torch.manual_seed(0)
        guide = AutoMixtureFlow(regression, num_components=4, init_scale=0.3).setup(x, y)
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            weights.append(
                balance_weights(
                    regression,
                    guide,
                    x,
                    y,
                    num_particles=8,
                    objective=objective,
                    memory_budget=budget,
                )
            )
    # chunks draw their noise in another order, so the draws differ: same weights up to
    # Monte Carlo error between two sets of 8 draws per component
    assert weights[0].shape == weights[1].shape == (4,)
    torch.testing.assert_close(weights[0].sum(), weights[1].sum())


# ------------------------------------------------------------- draws in pieces
def test_the_planner_splits_an_item_whose_parts_do_not_fit_together():
    def probe(m):  # 1 MiB fixed and 1 MiB per part
        return torch.empty(MIB // 4), torch.empty(m * MIB // 4)

    budget = 10 * MIB + 1000  # room for 9 parts
    assert ChunkPlanner(budget).split("k", 100, 4, probe) == (2, 4)  # two whole items
    assert ChunkPlanner(budget).split("k", 100, 20, probe) == (1, 9)  # pieces of 9 parts
    assert ChunkPlanner(None).split("k", 100, 20, lambda m: 1 / 0) == (100, 20)
    with pytest.warns(ResourceWarning, match="one draw"):
        assert ChunkPlanner(MIB).split("k", 5, 3, probe) == (1, 1)


def _planned(elbo, plan):
    elbo._planner.split = lambda key, total, parts, probe: plan
    return elbo


@pytest.mark.parametrize("importance_weighted", [False, True])
@pytest.mark.parametrize("plan", [(2, 4), (1, 3), (1, 1)])
def test_pieces_of_draws_give_the_unchunked_value_and_gradient(
    monkeypatch, plan, importance_weighted
):
    x, y = regression_data()
    guide = AutoMixtureFlow(regression, num_components=5, flow="affine_coupling").setup(x, y)
    zero_noise(monkeypatch)
    results = []
    for elbo in (
        StratifiedELBO(
            num_particles=4, importance_weighted=importance_weighted, memory_budget=None
        ),
        _planned(StratifiedELBO(num_particles=4, importance_weighted=importance_weighted), plan),
    ):
        guide.zero_grad()
        loss = elbo.loss_and_grads(regression, guide, x, y)
        grads = grads_of(guide)
        guide.zero_grad()
        elbo.differentiable_loss(regression, guide, x, y).backward()
        results.append((loss, elbo.loss(regression, guide, x, y), grads, grads_of(guide)))
    (loss, value, grads, diff_grads), (loss_c, value_c, grads_c, diff_grads_c) = results
    assert loss_c == pytest.approx(loss, rel=1e-12) and value_c == pytest.approx(value, rel=1e-12)
    assert grads.keys() == grads_c.keys() == diff_grads_c.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-10, atol=1e-10, msg=name)
        torch.testing.assert_close(diff_grads_c[name], grad, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("plan", [(2, 4), (1, 3)])
def test_particles_without_gradients_are_evaluated_in_chunks(monkeypatch, plan):
    x, y = regression_data()
    guide = AutoMixtureFlow(regression, num_components=5).setup(x, y)
    zero_noise(monkeypatch)
    whole = StratifiedELBO(num_particles=4, memory_budget=None)
    expected = whole.particles(regression, guide, x, y)  # with gradients: one evaluation
    elbo = _planned(StratifiedELBO(num_particles=4), plan)
    calls = []
    real = elbo._terms
    elbo._terms = lambda *a: calls.append(1) or real(*a)
    with torch.no_grad():
        got = elbo.particles(regression, guide, x, y)
    assert len(calls) == {(2, 4): 3, (1, 3): 10}[plan]  # chunks of components / of draws
    assert got.log_ratio.shape == (5, 4) and got.latent.shape[:2] == (5, 4)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


def test_chunked_natural_gradient_step_with_pieces_of_draws(monkeypatch):
    x, y = regression_data()
    zero_noise(monkeypatch)
    after = []
    for plan in (None, (1, 2)):
        pyro.clear_param_store()
        torch.manual_seed(0)
        guide = AutoMixtureFlow(regression, num_components=4).setup(x, y)
        elbo = StratifiedELBO(num_particles=3, memory_budget=None if plan is None else MIB)
        if plan is not None:
            _planned(elbo, plan)
        optim = pyro.optim.Adam({"lr": 0.1})
        step = natural_gradient_stepper(regression, guide, optim, elbo, 0.5, lambda: False)
        losses = [step(x, y) for _ in range(3)]
        after.append((losses, {k: v.detach().clone() for k, v in guide.named_parameters()}))
    assert after[0][0] == pytest.approx(after[1][0], rel=1e-12)
    for name, value in after[0][1].items():
        torch.testing.assert_close(after[1][1][name], value, rtol=1e-10, atol=1e-10, msg=name)


def test_balance_weights_stays_within_its_budget():
    """Measured: one component's 64 draws on 20,000 points need ~40 MiB; the budget is 4 MiB."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, 2, generator=g)
    y = (x * torch.tensor([1.0, -2.0])).sum(-1).abs()
    guide = AutoMixtureFlow(regression, num_components=4).setup(x, y)
    budget = 4 * MIB
    peaks, weights = [], []
    for memory_budget in (None, budget):
        torch.manual_seed(1)
        peak, w = measure_peak(
            lambda b=memory_budget: balance_weights(
                regression, guide, x, y, num_particles=64, num_iters=3, memory_budget=b
            )
        )
        peaks.append(peak)
        weights.append(w)
    assert peaks[0] > 10 * budget  # the unchunked evaluation holds every draw at once
    assert peaks[1] < 1.5 * budget, peaks
    torch.testing.assert_close(weights[0].sum(), weights[1].sum())
