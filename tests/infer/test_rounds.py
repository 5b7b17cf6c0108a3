"""Rounds of fresh starts: fit(rounds=...) adds starts where the first ones missed modes."""

from __future__ import annotations

import pyro
import pytest
import torch

from pyro_mogflow import AutoMixtureFlow, fit
from pyro_mogflow.examples import gaussian_mixture_target
from pyro_mogflow.infer import rounds as rounds_module
from pyro_mogflow.infer.rounds import fresh_start, join, mode_counts, singletons

SIX = [[-8.0, -8.0], [-8.0, 8.0], [8.0, -8.0], [8.0, 8.0], [0.0, 12.0], [0.0, -12.0]]


def _covered(target, guide) -> int:
    with torch.no_grad():
        z = guide.get_posterior().sample((4000,))
    masses = target.mode_masses(z)
    return int((masses > 0.2 * masses.sum() / len(masses)).sum())


def test_good_turing_counts():
    assert singletons([1.0, 2.0, 1.0, 5.0]) == 2
    assert singletons([64.0]) == 0
    target = gaussian_mixture_target([[-5.0], [5.0]], scales=0.5)
    guide = AutoMixtureFlow(target.model, num_components=3, init_scale=0.5).setup(*target.args)
    with torch.no_grad():
        guide.locs_unconstrained.copy_(torch.tensor([[-5.0], [-5.1], [5.0]]))
    # two components on one mode, one on the other; the first stands for 3 starts
    assert sorted(mode_counts(guide, torch.tensor([3.0, 1.0, 1.0]))) == [1.0, 4.0]


def test_a_fresh_start_and_the_join_keep_both_mixtures():
    target = gaussian_mixture_target(SIX, scales=0.5)
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(target.model, num_components=3).setup(*target.args)
    guide.to_full_covariance()
    before = guide.locs.detach().clone()
    saved = fresh_start(guide, 4, target.args)
    assert guide.num_components == 4 and not torch.equal(guide.locs[:3].detach(), before)
    fresh = guide.locs.detach().clone()
    join(guide, saved)
    assert guide.num_components == 7
    assert torch.equal(guide.locs.detach(), torch.cat([before, fresh]))
    weights = torch.softmax(guide.logits.detach(), -1)
    assert float(weights[:3].sum()) == pytest.approx(0.5, abs=1e-6)


def test_later_starts_are_the_prior_draws_spread_about_their_median():
    target = gaussian_mixture_target(SIX, scales=0.5, dtype=torch.float64)
    locs = {}
    for spread in (1.0, 2.0):
        pyro.set_rng_seed(3)
        guide = AutoMixtureFlow(target.model, num_components=3).setup(*target.args)
        pyro.set_rng_seed(4)
        fresh_start(guide, 9, target.args, spread=spread)
        locs[spread] = guide.locs.detach().clone()
    mid = locs[1.0].median(0).values
    assert torch.allclose(locs[2.0], mid + 2.0 * (locs[1.0] - mid))
    assert float((locs[1.0] - mid).abs().sum()) > 1.0  # the prior draws differ
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="spread"):
            fresh_start(guide, 9, target.args, spread=bad)
    with pytest.raises(TypeError, match="spread"):
        fresh_start(guide, 9, target.args, spread="wide")
    assert guide.num_components == 9  # a refused call changed nothing


def test_rounds_find_the_modes_one_round_of_few_starts_misses():
    # 6 separated modes, 4 starts a round: one round covers at most 4
    target = gaussian_mixture_target(SIX, scales=0.5, dtype=torch.float64)
    found = {}
    for rounds in (1, "auto"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoMixtureFlow(target.model, num_components=4)
        steps = []
        result = fit(
            target.model,
            *target.args,
            guide=guide,
            rounds=rounds,
            anneal_steps=300,
            progress=False,
            callback=lambda step, loss, beta, seen=steps: seen.append(step),
        )
        found[rounds] = _covered(target, guide)
        # the steps of every round, numbered on
        assert len(result.losses) == result.next_step == len(steps)
        assert steps == list(range(result.next_step))
    assert found[1] <= 4
    assert found["auto"] > found[1]
    assert result.rounds and result.rounds[0]["round"] == 2
    assert result.rounds[0]["modes_after"] > result.rounds[0]["modes_before"]


def test_a_round_that_fails_gives_back_the_mixture_found_before_it():
    target = gaussian_mixture_target(SIX, scales=0.5, dtype=torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(target.model, num_components=4)
    seen = []

    def callback(step, loss, beta):
        state = (guide.num_components, guide.locs.detach().clone())
        if seen and beta < 1 and seen[-1][2] == 1.0:  # a new round's anneal has begun
            raise KeyboardInterrupt
        seen.append((*state, beta))

    with pytest.raises(KeyboardInterrupt):
        fit(
            target.model,
            *target.args,
            guide=guide,
            anneal_steps=300,
            progress=False,
            callback=callback,
        )
    k, locs, _ = seen[-1]
    assert guide.num_components == k and torch.equal(guide.locs.detach(), locs)


@pytest.mark.parametrize("rounds, error", [("more", ValueError), (0, ValueError), (1.5, TypeError)])
def test_bad_rounds_are_refused_before_any_work(rounds, error):
    target = gaussian_mixture_target([[0.0]], scales=1.0)
    guide = AutoMixtureFlow(target.model, num_components=2)
    with pytest.raises(error, match="rounds"):
        fit(target.model, *target.args, guide=guide, rounds=rounds, progress=False)
    assert guide.prototype_trace is None


@pytest.mark.parametrize(
    "modes, ran",
    [
        ([30, 38, 38, 38, 40, 40], [2, 3, 4]),  # two empty rounds in a row end the rounds
        ([30, 38, 38, 39, 39, 39], [2, 3, 4, 5, 6]),  # an empty round, then a new mode
        ([30, 31, 32, 33, 34, 35], [2, 3, 4, 5, 6]),  # every round adds: up to max_rounds
    ],
)
def test_rounds_stop_after_patience_rounds_add_no_mode(monkeypatch, modes, ran):
    # the mode counts after each round are scripted; fresh starts and joins are no-ops
    counts = iter(modes)
    groups = [next(counts)]
    monkeypatch.setattr(rounds_module, "mode_groups", lambda guide: [[0]] * groups[0])
    monkeypatch.setattr(rounds_module, "join", lambda *a, **k: None)

    class Done:
        stopped, next_step = False, 10

    def settle():
        groups[0] = next(counts)

    saved = iter(range(100))
    monkeypatch.setattr(rounds_module, "fresh_start", lambda *a, **k: {"round": next(saved)})
    log, fallback = rounds_module.more_rounds(None, (), {}, [1.0, 3.0], 64, 6, Done, settle)
    assert [r["round"] for r in log] == ran
    # the fallback: the mixture of before the first of the last rounds that added no mode
    last_new = max(i for i in range(len(ran) + 1) if i == 0 or modes[i] > max(modes[:i]))
    expected = None if last_new == len(ran) else {"round": last_new}
    assert fallback == expected
    assert rounds_module.PATIENCE == 2


def test_better_of_returns_the_mixture_with_the_higher_elbo():
    # two modes; "before" holds both, the current mixture has lost one: before is restored,
    # and a current mixture that is the better one stays
    target = gaussian_mixture_target([[-4.0], [4.0]], scales=0.5, dtype=torch.float64)
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(target.model, num_components=2, init_scale=0.5).setup(*target.args)
    with torch.no_grad():
        guide.locs_unconstrained.copy_(torch.tensor([[-4.0], [4.0]], dtype=torch.float64))
    good = {n: getattr(guide, n).detach().clone() for n in ("locs", "scales", "logits")}
    with torch.no_grad():
        guide.locs_unconstrained.copy_(torch.tensor([[-4.0], [-4.0]], dtype=torch.float64))
    bad = {n: getattr(guide, n).detach().clone() for n in ("locs", "scales", "logits")}
    report = rounds_module.better_of(target.model, guide, good, target.args)
    assert report["restored"] and report["elbo_fallback"] > report["elbo"] + 0.5  # ~log 2
    assert torch.equal(guide.locs.detach(), good["locs"])
    report = rounds_module.better_of(target.model, guide, bad, target.args)
    assert not report["restored"] and torch.equal(guide.locs.detach(), good["locs"])
    # bad input is refused before any work, the guide as it was
    for value, error in ((1, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="draws"):
            rounds_module.better_of(target.model, guide, good, target.args, draws=value)
    with pytest.raises(TypeError, match="fallback"):
        rounds_module.better_of(target.model, guide, {"locs": good["locs"]}, target.args)
    assert torch.equal(guide.locs.detach(), good["locs"])
