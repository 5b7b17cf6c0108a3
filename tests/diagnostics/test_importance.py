"""Tests for pyro_mogflow.diagnostics.importance: PSIS and the k-hat threshold."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from pyro_mogflow.diagnostics import importance, psis
from pyro_mogflow.diagnostics.importance import good_k_threshold

az = pytest.importorskip("arviz")


# ------------------------------------------------------------------------------ PSIS
def _heavy_log_ratios(rows=3, draws=2000, seed=0):
    rng = np.random.default_rng(seed)
    # log ratios of a Student-t target against a normal proposal: a genuinely heavy tail
    x = rng.normal(size=(rows, draws)) * np.array([[1.0], [1.5], [2.5]])[:rows]
    return -0.5 * 3 * np.log1p(x**2 / 3) + 0.5 * x**2


def test_psis_matches_az_psislw():
    log_ratios = _heavy_log_ratios()
    ours, khat = psis(log_ratios)
    theirs, khat_az = az.psislw(log_ratios.copy())
    np.testing.assert_allclose(khat, khat_az)
    np.testing.assert_allclose(ours, theirs, atol=1e-10)
    np.testing.assert_allclose(np.exp(ours).sum(-1), 1.0)
    assert khat[2] > khat[0]  # a wider proposal against the same target: heavier weights


def test_psis_passes_the_sign_arviz_stats_expects(monkeypatch):
    # arviz-stats (ArviZ >= 1) negates its input. A stand-in with that convention must give
    # exactly what ArviZ 0.x gives for the same log ratios.
    def negating_psislw(ary, r_eff=1.0, axis=-1):
        return az.psislw(-np.asarray(ary), reff=r_eff)

    array_stats = types.SimpleNamespace(psislw=negating_psislw)
    base = types.ModuleType("arviz_stats.base")
    base.array_stats = array_stats
    monkeypatch.setitem(sys.modules, "arviz_stats", types.ModuleType("arviz_stats"))
    monkeypatch.setitem(sys.modules, "arviz_stats.base", base)
    monkeypatch.setattr(importance, "_arviz_major", lambda: 1)
    log_ratios = _heavy_log_ratios(rows=2)
    ours, khat = psis(log_ratios)
    theirs, khat_az = az.psislw(log_ratios.copy())
    np.testing.assert_allclose(khat, khat_az)
    np.testing.assert_allclose(ours, theirs, atol=1e-10)


def test_psis_does_not_modify_its_input():
    log_ratios = _heavy_log_ratios(rows=1)
    before = log_ratios.copy()
    psis(log_ratios)
    np.testing.assert_array_equal(log_ratios, before)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros(5), "at least 10"),
        (np.array([np.nan] + [0.0] * 20), "NaN"),
        (np.array([np.inf] + [0.0] * 20), r"\+inf"),
        (np.full(20, -np.inf), "zero weight"),
    ],
)
def test_psis_rejects_bad_log_ratios(bad, match):
    with pytest.raises(ValueError, match=match):
        psis(bad)


@pytest.mark.parametrize("draws, expected", [(100, 0.5), (1000, 1 - 1 / 3), (10**5, 0.7)])
def test_good_k_threshold(draws, expected):
    assert good_k_threshold(draws) == pytest.approx(expected)


@pytest.mark.parametrize("bad, error", [(1, ValueError), (10.0, TypeError), (True, TypeError)])
def test_good_k_threshold_rejects_bad_sizes(bad, error):
    with pytest.raises(error, match="num_draws"):
        good_k_threshold(bad)
