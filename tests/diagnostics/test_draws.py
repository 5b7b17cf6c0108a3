"""The export's draws in batches sized to a memory budget (pyro_mogflow.diagnostics.draws).

The guide is drawn once per chain and the model scores the draws batch by batch without
random numbers, so a budget that forces one draw per batch must give the same draws,
``lp``, ``lp_approx`` and log-likelihoods as one batch of every draw, given the seed.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_mogflow import AutoMixtureFlow, to_inference_data, vi_diagnostics
from pyro_mogflow.infer.memory import measure_peak

az = pytest.importorskip("arviz")

MIB = 2**20


def regression(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 2.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(torch.zeros((), dtype=x.dtype), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1), s), obs=y)


def _data(n=40, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g, dtype=dtype)
    return x, (x * torch.tensor([1.0, -2.0], dtype=dtype)).sum(-1) + 0.3


def _guide(name, x, y):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    if name == "AutoNormal":
        guide = AutoNormal(regression)
    else:
        guide = AutoMixtureFlow(regression, num_components=3, flow="affine_coupling")
    guide(x, y)
    return guide


def _export(guide, x, y, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # one draw over a budget of 1 byte
        return to_inference_data(
            guide, regression, model_args=(x, y), num_samples=25, seed=3, log_prior=True, **kwargs
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["AutoNormal", "AutoMixtureFlow"])
def test_batches_sized_by_the_budget_give_the_same_export(name, dtype):
    x, y = _data(dtype=dtype)
    guide = _guide(name, x, y)
    whole = _export(guide, x, y, memory_budget=None)
    for kwargs in ({"memory_budget": 1}, {"batch_size": 7}):
        other = _export(guide, x, y, **kwargs)
        for group in ("posterior", "sample_stats", "log_likelihood", "log_prior"):
            a, b = whole[group], other[group]
            assert set(a.data_vars) == set(b.data_vars) and a.data_vars
            for var in a.data_vars:
                np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=var)
        pred = other.posterior_predictive["y"].values
        assert pred.shape == (1, 25, 40) and np.isfinite(pred).all()


def test_the_budget_bounds_the_working_memory_of_the_export():
    """Measured: 200 draws on 20,000 points need ~60 MiB at once; the budget is 4 MiB."""
    x, y = _data(20_000, torch.float32)
    guide = _guide("AutoMixtureFlow", x, y)
    budget = 4 * MIB
    peaks = []
    for memory_budget in (None, budget):
        peak, _ = measure_peak(
            lambda b=memory_budget: to_inference_data(
                guide,
                regression,
                model_args=(x, y),
                num_samples=200,
                seed=0,
                posterior_predictive=False,
                log_likelihood=False,
                memory_budget=b,
            )
        )
        peaks.append(peak)
    assert peaks[0] > 10 * budget
    assert peaks[1] < 1.5 * budget, peaks


def test_vi_diagnostics_passes_its_budget_on():
    x, y = _data()
    guide = _guide("AutoMixtureFlow", x, y)
    kwargs = dict(model_args=(x, y), num_samples=100, seed=0, warn=False)
    whole = vi_diagnostics(guide, regression, memory_budget=None, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        small = vi_diagnostics(guide, regression, memory_budget=1, **kwargs)
    assert small.elbo == whole.elbo and small.khat == whole.khat
    with pytest.raises(ValueError, match="memory_budget"):
        vi_diagnostics(guide, regression, memory_budget=0, **kwargs)
    with pytest.raises(TypeError, match="memory_budget"):
        to_inference_data(guide, regression, model_args=(x, y), memory_budget="1GiB")
