r"""PSIS-LOO for a variational fit: :func:`vi_loo`.

Leave-one-out cross-validation from draws of a guide :math:`q` rather than of the posterior:
the importance ratios carry the correction :math:`p/q` (Magnusson et al. 2019), and are
Pareto-smoothed (:func:`~pyro_mogflow.diagnostics.psis`). ArviZ and xarray are imported only
inside the functions that need them.

Reference: M. Magnusson, M. Riis Andersen, J. Jonasson, A. Vehtari, *Bayesian Leave-One-Out
Cross-Validation for Large Data*, ICML 2019.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import numpy as np

from .._validation import check_bool
from ..infer.memory import DEFAULT_MEMORY_BUDGET, check_memory_budget, measure_traced_peak
from .groups import MASK_SUFFIX, _arviz_major, _group
from .importance import good_k_threshold, psis

__all__ = ["vi_loo"]

if TYPE_CHECKING:
    from arviz import InferenceData
    from arviz.stats.stats_utils import ELPDData
    from xarray import DataTree


def vi_loo(
    data: InferenceData | DataTree,
    *,
    var_name: str | None = None,
    pointwise: bool = True,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
) -> ELPDData:
    r"""PSIS-LOO for a variational fit, with the approximate-posterior correction.

    The draws come from :math:`q`, not from the posterior, so the leave-one-out importance
    ratios carry the correction :math:`p/q` (Magnusson et al. 2019):

    .. math::
        r_{is} \propto \frac{p(z_s \mid y_{-i})}{q(z_s)} \propto
        \frac{p(y, z_s)}{q(z_s)\, p(y_i \mid z_s)}, \qquad
        \widehat{\mathrm{elpd}}_i = \log \sum_s \tilde w_{is}\, p(y_i \mid z_s),

    with :math:`\tilde w_{i\cdot}` the Pareto-smoothed normalised ratios of observation
    :math:`i`. Each :math:`\hat k_i` then also reflects how well :math:`q` matches the
    posterior. ``p_loo`` is :math:`\sum_i \log \sum_s \tilde w_s p(y_i \mid z_s) -
    \widehat{\mathrm{elpd}}`, with :math:`\tilde w` the smoothed full-data weights
    :math:`p/q`. All chains are pooled (each draw weighted by its own run's :math:`p/q`).

    Do not call ``az.loo`` on a variational export: it would treat the draws of :math:`q` as
    posterior draws.

    :param data: the ``InferenceData`` / ``DataTree`` of :func:`to_inference_data` (it needs
        ``log_likelihood`` and ``sample_stats``).
    :param str var_name: the observed site to use when the model has several.
    :param bool pointwise: keep ``loo_i`` and ``pareto_k`` per observation (default True;
        needed by ``az.plot_khat`` and ``az.compare``).
    :param memory_budget: bytes of working memory (default 1 GiB; ``None``: no limit). The
        observations are processed in blocks: the first 64 are measured
        (:func:`~pyro_mogflow.infer.memory.measure_traced_peak`) and the rest go in blocks that
        fit the budget at that cost per observation, so the working memory stays bounded
        while ``data``'s ``log_likelihood`` (``draws x N`` values, the input) is read in
        place. With ArviZ >= 1, ArviZ's own ``loo_approximate_posterior`` runs, unblocked.
    :return: ArviZ's ``ELPDData`` (kind ``loo``), usable with ``az.compare`` and
        ``az.plot_khat``.

    Reference: M. Magnusson, M. Riis Andersen, J. Jonasson, A. Vehtari, *Bayesian Leave-One-Out
    Cross-Validation for Large Data*, ICML 2019.
    """
    if var_name is not None and not isinstance(var_name, str):
        raise TypeError(f"var_name must be a str or None, got {type(var_name).__name__}")
    check_bool("pointwise", pointwise)
    memory_budget = check_memory_budget(memory_budget)
    log_lik_group = _group(data, "log_likelihood")
    stats = _group(data, "sample_stats")
    if log_lik_group is None or not len(log_lik_group.data_vars):
        raise ValueError(
            "data has no log_likelihood group; export with to_inference_data(..., "
            "log_likelihood=True) from a model with observed sites"
        )
    if stats is None or "lp" not in stats or "lp_approx" not in stats:
        raise ValueError(
            "data has no sample_stats.lp / lp_approx; make it with pyro_mogflow.to_inference_data"
        )
    names = list(log_lik_group.data_vars)
    if var_name is None:
        if len(names) > 1:
            raise ValueError(
                f"the model has several observed sites {names}; choose one with var_name="
            )
        var_name = names[0]
    elif var_name not in names:
        raise ValueError(f"var_name={var_name!r} is not an observed site; choose from {names}")
    constants = _group(data, "constant_data")
    mask = None
    if constants is not None and f"{var_name}{MASK_SUFFIX}" in constants:
        mask = constants[f"{var_name}{MASK_SUFFIX}"]
        if not bool(mask.any()):
            raise ValueError(
                f"every observation of {var_name!r} is masked (obs_mask / poutine.mask): there "
                "are no data points to leave out"
            )
    if _arviz_major() >= 1:  # pragma: no cover - ArviZ >= 1 needs Python >= 3.12
        from arviz_stats import loo_approximate_posterior

        if mask is not None:
            raise NotImplementedError(
                "vi_loo with masked observations needs ArviZ < 1 for now; drop the masked "
                "observations from the data before exporting"
            )

        return loo_approximate_posterior(
            data,
            log_p=stats["lp"],
            log_q=stats["lp_approx"],
            pointwise=pointwise,
            var_name=var_name,
        )
    return _vi_loo_arviz0(log_lik_group[var_name], stats, pointwise, mask, memory_budget)


def _vi_loo_arviz0(log_lik, stats, pointwise: bool, mask=None, memory_budget=None):
    import xarray as xr
    from arviz.stats.stats_utils import ELPDData

    obs_dims = [d for d in log_lik.dims if d not in ("chain", "draw")]
    values = log_lik.transpose("chain", "draw", *obs_dims).values  # a view when in this order
    shape = values.shape[2:]
    ll_all = values.reshape(values.shape[0] * values.shape[1], -1)  # (S, M), draws chain-major
    keep = None
    if mask is not None:
        # masked observations are not data points: their log-likelihood is a recorded 0
        keep = np.broadcast_to(
            np.asarray(mask.transpose(*[d for d in obs_dims if d in mask.dims]).values, bool),
            shape,
        ).reshape(-1)
    columns = np.arange(ll_all.shape[1]) if keep is None else np.flatnonzero(keep)
    n_samples = ll_all.shape[0]
    log_w = np.asarray(
        (stats["lp"] - stats["lp_approx"]).stack(__sample__=("chain", "draw")).values,
        dtype=np.float64,
    )
    if not np.isfinite(log_w).all():
        raise ValueError(_NON_FINITE)
    full_weights, _ = psis(log_w)
    elpd_i, pareto_k, lpd_i = _pointwise_in_blocks(
        ll_all, columns, log_w, full_weights, memory_budget
    )
    n_points = int(elpd_i.size)
    elpd = float(elpd_i.sum())
    se = float(math.sqrt(n_points * np.var(elpd_i)))
    p_loo = float(lpd_i.sum() - elpd)
    good_k = good_k_threshold(n_samples)
    warn_high = bool(np.any(pareto_k > good_k))
    if warn_high:
        warnings.warn(
            f"Pareto k-hat above {good_k:.2f} for {int(np.sum(pareto_k > good_k))} "
            "observation(s): the leave-one-out estimate for them is unreliable (the guide may "
            "also be far from the posterior there). Inspect them with az.plot_khat.",
            UserWarning,
            stacklevel=3,
        )
    fields = {
        "elpd_loo": elpd,
        "se": se,
        "p_loo": p_loo,
        "n_samples": n_samples,
        "n_data_points": n_points,
        "warning": warn_high,
    }
    if pointwise:
        obs_coords = {d: log_lik.coords[d] for d in obs_dims if d in log_lik.coords}
        if keep is not None:  # NaN at the masked observations
            elpd_i, pareto_k = _unmask(elpd_i, keep), _unmask(pareto_k, keep)
        loo_i = xr.DataArray(np.reshape(elpd_i, shape), dims=obs_dims, coords=obs_coords)
        khat = xr.DataArray(np.reshape(pareto_k, shape), dims=obs_dims, coords=obs_coords)
        fields["loo_i"] = loo_i.rename("loo_i")
        fields["pareto_k"] = khat.rename("pareto_shape")
    fields["scale"] = "log"
    if keep is not None:
        fields["n_masked"] = int((~keep).sum())
    fields["good_k"] = good_k
    return ELPDData(data=list(fields.values()), index=list(fields))


_NON_FINITE = (
    "log_likelihood or the log weights hold non-finite values; PSIS-LOO needs finite "
    "log densities at every draw"
)


def _pointwise_in_blocks(ll_all, columns, log_w, full_weights, memory_budget):
    """``(elpd_i, k_i, lpd_i)`` of the observations ``columns`` of ``ll_all`` (shape ``(S, M)``),
    computed a block of observations at a time: the first block (64 observations) is measured
    (:func:`~pyro_mogflow.infer.memory.measure_traced_peak`) and the others hold as many as fit
    ``memory_budget`` at that cost per observation (``None``: one block)."""

    def block(idx):
        ll = np.asarray(ll_all[:, idx], dtype=np.float64).T  # (m, S)
        if not np.isfinite(ll).all():
            raise ValueError(_NON_FINITE)
        smoothed, khat = psis(log_w - ll)
        elpd = np.logaddexp.reduce(smoothed + ll, axis=-1)
        lpd = np.logaddexp.reduce(full_weights + ll, axis=-1)
        return elpd, khat, lpd

    total = columns.size
    if memory_budget is None:
        parts = [block(columns)]
    else:
        first = min(total, 64)
        peak, part = measure_traced_peak(lambda: block(columns[:first]))
        size = max(1, int(memory_budget // max(peak / first, 1)))
        parts = [part] + [block(columns[a : a + size]) for a in range(first, total, size)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def _unmask(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    full = np.full(keep.shape, np.nan)
    full[keep] = values
    return full
