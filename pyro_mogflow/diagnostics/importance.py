r"""Pareto-smoothed importance sampling (PSIS) and the evidence estimate of a variational fit.

Given draws :math:`z_s \sim q` and log importance ratios
:math:`\log w_s = \log p(x, z_s) - \log q(z_s)`:

* :func:`psis` smooths the largest ratios with a fitted generalized Pareto tail and returns
  the Pareto :math:`\hat k` of each row (Vehtari et al. 2024);
* :func:`good_k_threshold` is the sample-size-dependent threshold
  :math:`\min(1 - 1/\log_{10} S,\ 0.7)` that :math:`\hat k` is judged against;
* ``_evidence`` is :math:`\log \hat Z = \log \frac1S \sum_s w_s` with its delta-method
  standard error.

Log-sum-exp is numpy's ``np.logaddexp.reduce``; ArviZ is imported only inside :func:`psis`.

References:

* Y. Yao, A. Vehtari, D. Simpson, A. Gelman, *Yes, but Did It Work?: Evaluating Variational
  Inference*, ICML 2018.
* A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, *Pareto Smoothed Importance Sampling*,
  JMLR 25(72), 2024.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import TYPE_CHECKING

import numpy as np

from .groups import _arviz_major

__all__ = ["good_k_threshold", "psis"]

if TYPE_CHECKING:
    from numpy.typing import ArrayLike


def good_k_threshold(num_draws: int) -> float:
    r"""The largest Pareto :math:`\hat k` for which ``num_draws`` importance draws suffice.

    .. math:: k_{\text{good}}(S) = \min\left(1 - \frac{1}{\log_{10} S},\ 0.7\right)

    (Vehtari et al. 2024, section 3.2.4). Above it, the Monte Carlo error of an importance
    sampling estimate is large for this sample size; above 0.7 no feasible sample size helps.

    :param int num_draws: ``S >= 2``.
    :return: the threshold (negative for ``S < 10``, where no tail can be trusted).
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, numbers.Integral):
        raise TypeError(f"num_draws must be an int >= 2, got {type(num_draws).__name__}")
    if num_draws < 2:
        raise ValueError(f"num_draws must be an int >= 2, got {num_draws}")
    return float(min(1.0 - 1.0 / math.log10(num_draws), 0.7))


def _min_draws_for(khat: float) -> float:
    """Sample size at which ``khat`` becomes acceptable: ``10 ** (1 / (1 - k))``."""
    if not khat < 1:
        return math.inf
    return 10.0 ** (1.0 / (1.0 - max(khat, 0.0)))


def psis(log_ratios: ArrayLike, r_eff: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    r"""Pareto-smoothed importance sampling of log ratios, through ArviZ.

    Fits a generalized Pareto distribution to the largest ratios of each row and replaces them
    by the fitted quantiles (Vehtari et al. 2024). ArviZ 0.x's ``az.psislw`` takes the log
    ratios as they are; ArviZ >= 1 (arviz-stats) negates its input, expecting log-likelihoods
    for leave-one-out. This function passes the sign each installed version needs, so callers
    always give log ratios :math:`\log p - \log q`.

    :param log_ratios: array of shape ``(..., S)``; draws on the last axis. ``-inf`` (zero
        weight) is allowed; ``NaN`` and ``+inf`` are not.
    :param float r_eff: relative efficiency of the draws (1 for independent draws).
    :return: ``(log_weights, khat)``: smoothed log weights normalised along the last axis
        (``logsumexp == 0``), shape ``(..., S)``, and the Pareto :math:`\hat k` of each row,
        shape ``(...)``.
    :raises ValueError: for fewer than 10 draws, ``NaN`` or ``+inf``.
    """
    arr = np.array(log_ratios, dtype=np.float64, copy=True)
    if arr.ndim < 1:
        raise ValueError(f"log_ratios must have shape (..., S), got a scalar {log_ratios!r}")
    if arr.shape[-1] < 10:
        raise ValueError(
            f"log_ratios must hold at least 10 draws on its last axis, got shape {arr.shape}"
        )
    if np.isnan(arr).any() or np.isposinf(arr).any():
        raise ValueError("log_ratios must not contain NaN or +inf")
    if np.isneginf(arr).all(axis=-1).any():
        raise ValueError("log_ratios has a row where every draw has zero weight (-inf)")
    if isinstance(r_eff, bool) or not isinstance(r_eff, numbers.Real) or not r_eff > 0:
        raise ValueError(f"r_eff must be a positive float, got {r_eff!r}")
    with warnings.catch_warnings():
        # ArviZ warns about large k-hat in its own words; our callers give their own advice.
        warnings.simplefilter("ignore")
        if _arviz_major() >= 1:
            from arviz_stats.base import array_stats

            log_weights, khat = array_stats.psislw(-arr, r_eff=float(r_eff), axis=-1)
        else:
            import arviz as az

            log_weights, khat = az.psislw(arr, reff=float(r_eff))
    log_weights = np.asarray(log_weights, dtype=np.float64)
    log_weights = log_weights - np.logaddexp.reduce(log_weights, axis=-1, keepdims=True)
    return log_weights, np.asarray(khat, dtype=np.float64)


def _log_mean_exp(x: np.ndarray) -> float:
    return float(np.logaddexp.reduce(x) - math.log(x.size))


def _evidence(log_w: np.ndarray) -> tuple[float, float]:
    r"""``log Z_hat`` and its delta-method standard error.

    .. math:: \operatorname{se}(\log \hat Z) \approx
        \sqrt{\frac{\operatorname{Var}(w)}{S\, \bar w^2}}
        = \sqrt{\frac{S \sum_s \bar w_s^2 - 1}{S}}, \qquad \bar w_s = w_s / \sum_t w_t.
    """
    s = log_w.size
    norm = log_w - np.logaddexp.reduce(log_w)
    sum_sq = float(np.exp(np.logaddexp.reduce(2 * norm)))
    return _log_mean_exp(log_w), math.sqrt(max(s * sum_sq - 1.0, 0.0) / s)
