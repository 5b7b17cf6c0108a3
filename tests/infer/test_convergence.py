"""PlateauTest: a fit stops when the ELBO and the masses stop moving, not before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyro_mogflow.infer.convergence import PlateauTest


def _run(test, losses, weights=None, beta=1.0):
    for step, loss in enumerate(losses):
        w = None if weights is None else weights(step)
        if test.update(step, float(loss), beta, w):
            return step
    return None


def test_a_flat_noisy_loss_converges_after_patience_checks():
    rng = np.random.default_rng(0)
    test = PlateauTest(window=50, patience=2)
    # the first check happens after two windows; with patience 2 the earliest stop is at 150
    stop = _run(test, 10 + rng.normal(size=2000))
    assert stop is not None and 149 <= stop < 2000
    assert test.reason == f"converged at step {stop}"


def test_a_loss_still_falling_by_many_standard_errors_does_not_converge():
    rng = np.random.default_rng(0)
    # noise sd 1; the window means fall by 0.05 * 50 = 2.5 per window, ~9 standard errors
    losses = 100 - 0.05 * np.arange(3000) + rng.normal(size=3000)
    assert _run(PlateauTest(window=50), losses) is None


def test_the_noise_estimate_ignores_a_slow_drift():
    # a drift well below the threshold but a large one-off level difference between windows
    # would inflate a plain standard deviation; successive differences are not fooled
    rng = np.random.default_rng(1)
    test = PlateauTest(window=100, patience=1)
    _run(test, 5 + 0.1 * rng.normal(size=200))
    assert test.last["threshold"] == pytest.approx(2 * np.sqrt(2) * 0.1 / 10, rel=0.2)


def test_moving_masses_block_convergence():
    rng = np.random.default_rng(2)
    losses = rng.normal(size=1500)

    def drifting(step):  # one component gains 0.02 of mass per 100 steps
        a = 0.2 + 0.0002 * step
        return torch.tensor([a, 1 - a])

    assert _run(PlateauTest(window=100), losses, drifting) is None
    assert _run(PlateauTest(window=100), losses, lambda s: torch.tensor([0.3, 0.7])) is not None


def _ar_masses(n, drift, seed, start=0.5, rho=0.9, sd=0.05):
    """Mode masses [a, 1 - a]: a = start + drift * step + AR(1) noise of marginal sd ``sd``."""
    rng = np.random.default_rng(seed)
    noise = np.zeros(n)
    for t in range(1, n):
        noise[t] = rho * noise[t - 1] + sd * np.sqrt(1 - rho**2) * rng.normal()
    a = start + drift * np.arange(n) + noise
    return lambda step: torch.tensor([a[step], 1 - a[step]])


def test_masses_that_only_jitter_pass_by_their_standard_error():
    # big-data weight steps: a mode's window-averaged mass wanders by ~0.02 between windows
    # (more than the 0.01 tolerance) while nothing moves on average; the test must still pass
    losses = np.random.default_rng(3).normal(size=3000)
    stops = [_run(PlateauTest(window=100), losses, _ar_masses(3000, 0.0, s)) for s in range(5)]
    assert all(stop is not None for stop in stops), stops
    test = PlateauTest(window=100, mass_tolerance=0.0)  # passes by the noise rule alone
    assert _run(test, losses, _ar_masses(3000, 0.0, 0)) is not None
    assert test.last["masses_within_noise"]


def test_masses_drifting_under_the_same_noise_block_convergence():
    losses = np.random.default_rng(3).normal(size=800)
    # 0.1 of mass per 100 steps (0.1 -> 0.9 over the run): ~3 standard errors of a change
    for seed in range(5):
        assert _run(PlateauTest(window=100), losses, _ar_masses(800, 1e-3, seed, 0.1)) is None


def test_mass_moving_between_copies_on_one_mode_does_not_block_convergence():
    rng = np.random.default_rng(2)
    losses = rng.normal(size=1500)

    def shuffling(step):  # components 0 and 1 share one mode and trade its 0.4 of mass
        a = 0.2 + 0.0002 * step
        return torch.tensor([a, 0.4 - a, 0.6])

    test = PlateauTest(window=100)
    for step, loss in enumerate(losses):
        if test.update(step, float(loss), 1.0, shuffling(step), lambda: [[0, 1], [2]]):
            break
    assert test.converged_at is not None
    assert _run(PlateauTest(window=100), losses, shuffling) is None


def test_steps_below_beta_one_restart_the_test():
    test = PlateauTest(window=10, patience=1)
    for step in range(100):
        assert not test.update(step, 1.0, beta=0.5)
    assert test._losses == []


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"window": 1}, ValueError),
        ({"z": -1.0}, ValueError),
        ({"patience": 0}, ValueError),
        ({"window": "10"}, TypeError),
        ({"min_improvement": -1e-3}, ValueError),
    ],
)
def test_bad_options_are_refused(kwargs, error):
    with pytest.raises(error):
        PlateauTest(**kwargs)


def test_an_improvement_below_the_floor_counts_as_none():
    rng = np.random.default_rng(3)
    # falling 0.002 nats per window of 100 steps: dozens of standard errors of a precise
    # estimate (noise 1e-4), but below the default floor of 0.01 nats per window
    losses = 10 - 2e-5 * np.arange(2000) + 1e-4 * rng.normal(size=2000)
    assert _run(PlateauTest(window=100, min_improvement=0.0), losses) is None
    test = PlateauTest(window=100)
    assert _run(test, losses) is not None
    assert test.last["improvement"] > 10 * test.last["threshold"]
    assert test.last["improvement"] <= test.last["floor"] == pytest.approx(0.01)
