"""Tests for pyro_mogflow.diagnostics.loo: PSIS-LOO for a variational fit."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from torch.distributions import biject_to

from pyro_mogflow import to_inference_data, vi_loo
from pyro_mogflow.diagnostics.importance import psis
from pyro_mogflow.infer.memory import measure_traced_peak

az = pytest.importorskip("arviz")


def normal_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 5.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_vi_loo_matches_exact_leave_one_out_and_works_with_arviz():
    # Conjugate normal model: p(y_i | y_-i) is Gaussian in closed form, so the corrected
    # PSIS-LOO of a (slightly wrong) guide must match it within Monte Carlo error.
    g = torch.Generator().manual_seed(1)
    y = 1.0 + torch.randn(12, generator=g, dtype=torch.float64)
    guide = AutoNormal(normal_model)
    guide(y)
    n = y.numel()
    prec = 1 / 25 + n
    post_mean, post_sd = y.sum() / prec, prec**-0.5
    with torch.no_grad():  # a guide 30% too wide and shifted by 0.2 sd
        guide.locs.mu_unconstrained.fill_(float(post_mean + 0.2 * post_sd))
        guide.scales.mu_unconstrained.copy_(
            biject_to(guide.scales._pyro_params["mu"][0]).inv(torch.tensor(1.3 * post_sd))
        )
    idata = to_inference_data(guide, normal_model, model_args=(y,), num_samples=4000, seed=0)
    loo = vi_loo(idata)
    assert isinstance(loo, az.ELPDData)
    exact = []
    for i in range(n):
        rest = torch.cat([y[:i], y[i + 1 :]])
        p = 1 / 25 + (n - 1)
        m, v = rest.sum() / p, 1 / p
        exact.append(float(dist.Normal(m, math.sqrt(1 + v)).log_prob(y[i])))
    exact = np.array(exact)
    assert loo["loo_i"].dims == ("data",)
    assert (loo["pareto_k"].values < 0.7).all()
    # Monte Carlo standard error of each self-normalised IS estimate log sum_s w_is p(y_i|z_s):
    # se_i^2 = sum_s w_is^2 (p(y_i|z_s) / p_hat_i - 1)^2, with the smoothed LOO weights w_is.
    log_lik = idata.log_likelihood["y"].values[0].T  # (n, S)
    log_w = idata.sample_stats["log_weight"].values[0]
    weights = np.exp(psis(log_w - log_lik)[0])
    ratio = np.exp(log_lik - loo["loo_i"].values[:, None])
    se = np.sqrt((weights**2 * (ratio - 1) ** 2).sum(-1))
    assert (np.abs(loo["loo_i"].values - exact) < 4 * se).all()
    naive = az.loo(idata, pointwise=True)  # treats q draws as posterior draws
    assert (np.abs(naive["loo_i"].values - exact) > 4 * se).any()
    cmp = az.compare({"vi": loo, "vi_again": loo})
    assert list(cmp.index) and cmp.loc["vi", "elpd_loo"] == pytest.approx(loo["elpd_loo"])
    import matplotlib

    matplotlib.use("Agg")
    ax = az.plot_khat(loo, show=False)
    assert ax is not None
    matplotlib.pyplot.close("all")


def test_vi_loo_needs_a_choice_among_several_observed_sites():
    def two_obs(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y1", dist.Normal(mu, 1.0), obs=y)
            pyro.sample("y2", dist.Normal(mu, 2.0), obs=y)

    y = torch.randn(2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = y.reshape(-1)
    pyro.set_rng_seed(0)
    guide = AutoNormal(two_obs)
    guide(y)  # set up (parameters at their initial values)
    idata = to_inference_data(guide, two_obs, model_args=(y,), num_samples=50, seed=0)
    with pytest.raises(ValueError, match="var_name"):
        vi_loo(idata)
    with pytest.warns(UserWarning, match="Pareto k-hat"):  # an unfitted guide
        assert vi_loo(idata, var_name="y2")["n_data_points"] == 10


def _masked_model(y, mask):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 5.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=mask)


def _poutine_masked_model(y, mask):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 5.0))
    with pyro.plate("data", y.shape[0]), pyro.poutine.mask(mask=mask):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@pytest.mark.filterwarnings("ignore:Pareto k-hat above")  # an untrained guide: k-hat is high
@pytest.mark.parametrize("model", [_masked_model, _poutine_masked_model])
def test_vi_loo_does_not_count_masked_observations(model):
    g = torch.Generator().manual_seed(2)
    y = 1.0 + torch.randn(30, generator=g, dtype=torch.float64)
    mask = torch.arange(30) % 3 != 0  # 10 masked, 20 observed
    pyro.clear_param_store()
    guide = AutoNormal(model)
    guide(y, mask)
    idata = to_inference_data(guide, model, model_args=(y, mask), num_samples=500, seed=0)
    var_name = "y_observed" if model is _masked_model else "y"
    loo = vi_loo(idata, var_name=var_name)
    assert loo["n_data_points"] == 20 and loo["n_masked"] == 10
    assert np.isnan(loo["loo_i"].values[~mask.numpy()]).all()
    assert np.isfinite(loo["loo_i"].values[mask.numpy()]).all()
    assert loo["elpd_loo"] == pytest.approx(
        float(np.sum(loo["loo_i"].values[mask.numpy()])), rel=1e-12
    )


def _blocked_export(n, num_samples, mask=None):
    g = torch.Generator().manual_seed(3)
    y = 1.0 + torch.randn(n, generator=g, dtype=torch.float64)
    model = normal_model if mask is None else _poutine_masked_model
    args = (y,) if mask is None else (y, mask)
    pyro.clear_param_store()
    guide = AutoNormal(model)
    guide(*args)
    with torch.no_grad():  # near the posterior
        guide.locs.mu_unconstrained.fill_(float(y.mean()))
    return to_inference_data(guide, model, model_args=args, num_samples=num_samples, seed=0)


@pytest.mark.parametrize("masked", [False, True])
def test_vi_loo_in_blocks_equals_one_block(masked):
    mask = (torch.arange(300) % 7 != 0) if masked else None
    idata = _blocked_export(300, 100, mask)
    var = "y"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        whole = vi_loo(idata, var_name=var, memory_budget=None)
        blocks = vi_loo(idata, var_name=var, memory_budget=1)  # 64, then one at a time
    for key in ("elpd_loo", "p_loo", "se", "n_data_points"):
        assert blocks[key] == whole[key], key
    for key in ("loo_i", "pareto_k"):
        np.testing.assert_array_equal(blocks[key].values, whole[key].values)
    with pytest.raises(ValueError, match="memory_budget"):
        vi_loo(idata, var_name=var, memory_budget=-1)


def test_vi_loo_working_memory_stays_within_its_budget():
    """Measured with tracemalloc: 2,000 observations x 100 draws in float64 need several
    1.6 MB copies at once; the budget is 256 KiB."""
    idata = _blocked_export(2000, 100)
    budget = 2**18
    peaks = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for memory_budget in (None, budget):
            peaks.append(
                measure_traced_peak(lambda b=memory_budget: vi_loo(idata, memory_budget=b))[0]
            )
    assert peaks[0] > 10 * budget
    assert peaks[1] < 2 * budget, peaks
