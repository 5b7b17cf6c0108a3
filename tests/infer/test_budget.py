"""fit(num_steps="auto"): adaptive or fixed anneal, pruning at beta 1, plateau stop, max_steps."""

from __future__ import annotations

import io
import math

import pyro
import pytest
import torch

from pyro_mogflow import AutoMixtureFlow, fit
from pyro_mogflow.examples import gaussian_mixture_target
from pyro_mogflow.infer.budget import (
    ANNEAL_RUNGS,
    PRUNE_MASS,
    RUNG_WINDOW,
    ladder_beta_schedule,
    reduce_components,
)
from pyro_mogflow.infer.convergence import PlateauTest
from tests.infer.helpers import fit_target


@pytest.fixture(autouse=True)
def _clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def two_modes(dtype=torch.float32):
    return gaussian_mixture_target([[-3.0], [3.0]], scales=0.5, dtype=dtype)


def _auto(target, k=8, **options):
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(target.model, num_components=k)
    options.setdefault("anneal_steps", 150)
    options.setdefault("convergence", PlateauTest(window=50))
    return fit_target(target, guide, num_steps="auto", **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_stops_on_the_plateau_with_both_modes_and_fewer_components(dtype):
    target = two_modes(dtype)
    result = _auto(target, max_steps=3000)
    assert result.reason.startswith("converged at step")
    assert result.next_step == len(result.losses) < 3000
    assert int(result.reason.split()[-1]) == result.next_step - 1
    guide = result.guide
    assert guide.num_components < 8 and result.reductions
    assert guide.locs.dtype == dtype
    z = guide.sample_posterior(20000, *target.args, **target.kwargs)["z"]
    right = float((z > 0).double().mean())
    assert abs(right - 0.5) < 0.05 + 3 * math.sqrt(0.25 / 20000)


def test_auto_reports_the_cap_when_it_does_not_converge():
    result = _auto(two_modes(), max_steps=200)
    assert result.reason == "reached max_steps=200" and len(result.losses) == 200


def test_the_progress_bar_says_why_the_fit_stopped(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    target = two_modes()
    pyro.set_rng_seed(0)
    fit(
        target.model,
        *target.args,
        guide=AutoMixtureFlow(target.model, num_components=4),
        anneal_steps=20,
        max_steps=60,
        model_kwargs=target.kwargs,
    )
    assert "reached max_steps=60" in err.getvalue()


def test_an_explicit_num_steps_runs_that_long_and_prunes_nothing():
    target = two_modes()
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(target.model, num_components=6)
    result = fit_target(target, guide, num_steps=300)
    assert result.reason == "num_steps" and len(result.losses) == 300
    assert guide.num_components == 6 and result.reductions == []


def test_an_auto_fit_resumes_where_the_callback_stopped_it():
    target = two_modes()
    first = _auto(target, max_steps=400, callback=lambda step, loss, beta: step == 99)
    assert first.stopped and first.next_step == 100
    assert first.reason == "stopped by callback at step 99"
    second = fit_target(
        target,
        first.guide,
        num_steps="auto",
        anneal_steps=150,
        max_steps=400,
        optim=first.optim,
        start_step=first.next_step,
    )
    assert second.next_step - 100 == len(second.losses)
    assert second.reason in ("reached max_steps=400",) or second.reason.startswith("converged")


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"num_steps": "forever"}, TypeError, "num_steps"),
        ({"max_steps": 0}, ValueError, "max_steps"),
        ({"anneal_steps": 0}, ValueError, "anneal_steps"),
        ({"prune": "yes"}, TypeError, "prune"),
        ({"anneal": "fast"}, ValueError, "anneal"),
        ({"convergence": 100}, TypeError, "convergence"),
        ({"max_steps": 10, "start_step": 10}, ValueError, "max_steps=10"),
    ],
)
def test_bad_budget_options_are_refused_before_any_work(options, error, match):
    target = two_modes()
    with pytest.raises(error, match=match):
        fit_target(target, None, **options)
    assert len(pyro.get_param_store()) == 0


def test_reduce_components_prunes_at_most_the_negligible_mass_and_merges_copies():
    target = two_modes(torch.float64)
    guide = AutoMixtureFlow(target.model, num_components=5).setup(*target.args, **target.kwargs)
    with torch.no_grad():
        guide.locs_unconstrained.copy_(torch.tensor([[-3.0], [-3.01], [3.0], [9.0], [0.0]]))
        guide.scales_unconstrained.fill_(0.0)
        # weights 0.45, 0.45, 0.1 - 5.2e-4, 2e-5 (negligible), 5e-4 (not: > 1e-3 / 5)
        pi = torch.tensor([0.45, 0.45, 0.1 - 5.2e-4, 2e-5, 5e-4], dtype=torch.float64)
        guide.logits_unconstrained.copy_(pi.log())
    change = reduce_components(guide)
    assert change["pruned"] == 1 and change["merged"] == 1
    assert (
        change["pruned_mass"] == pytest.approx(2e-5, rel=1e-6)
        and change["pruned_mass"] < PRUNE_MASS
    )
    assert guide.num_components == 3
    weights = torch.softmax(guide.logits.detach(), -1)
    torch.testing.assert_close(
        weights, torch.tensor([0.9, 0.1 - 5.2e-4, 5e-4]) / (1 - 2e-5), check_dtype=False
    )


def test_the_ladder_schedule_holds_each_rung_and_reaches_one_at_anneal_steps():
    ladder = ladder_beta_schedule(100, beta_start=0.01, rungs=4)
    betas = [ladder(t) for t in range(120)]
    assert betas[0] == pytest.approx(0.01) and betas[24] == pytest.approx(0.01)
    assert betas[25] == pytest.approx(0.01**0.75) and betas[99] == pytest.approx(0.01**0.25)
    assert set(betas[100:]) == {1.0}
    assert len(set(betas)) == 5 and betas == sorted(betas)
    assert [ladder.next_rung(t) for t in (0, 24, 25, 99)] == [25, 25, 50, 100]
    with pytest.raises(ValueError, match="beta_start"):
        ladder_beta_schedule(100, beta_start=2.0)
    with pytest.raises(ValueError, match="rungs"):
        ladder_beta_schedule(100, rungs=0)


def test_the_adaptive_anneal_cuts_flat_rungs_short_and_keeps_both_modes():
    target = two_modes()
    betas = []
    result = _auto(
        target,
        anneal_steps=1000,
        max_steps=3000,
        callback=lambda step, loss, beta: betas.append(beta) and None,
    )
    below_one = sum(b < 1 for b in betas)
    # every rung ran at least two windows of its plateau test, and some ended early
    assert 2 * RUNG_WINDOW * ANNEAL_RUNGS <= below_one < 1000
    assert len(set(b for b in betas if b < 1)) == ANNEAL_RUNGS
    z = result.guide.sample_posterior(20000, *target.args, **target.kwargs)["z"]
    right = float((z > 0).double().mean())
    assert abs(right - 0.5) < 0.05 + 3 * math.sqrt(0.25 / 20000)


def test_a_fixed_anneal_is_the_geometric_schedule():
    betas = []
    _auto(
        two_modes(),
        anneal="fixed",
        max_steps=160,
        callback=lambda step, loss, beta: betas.append(beta) and None,
    )
    assert sum(b < 1 for b in betas) == 150 and len(set(betas[:150])) == 150
