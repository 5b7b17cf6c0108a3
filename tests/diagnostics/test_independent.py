"""Tests for pyro_mogflow.diagnostics.independent: fit_independent and IndependentFits."""

from __future__ import annotations

import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_sample

from pyro_mogflow import (
    AutoMixtureFlow,
    IndependentFits,
    StratifiedELBO,
    fit_independent,
    to_inference_data,
    vi_diagnostics,
)
from pyro_mogflow.examples import sign_regression, sign_regression_model

STEPS = 30


def regression(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=x.dtype)))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1), sigma), obs=y)


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 2, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5], dtype=torch.float64) + 0.3 * torch.randn(20, generator=g)
    return x.to(dtype), y.to(dtype)


def _fit(make_guide, num_runs=3, seed=0, dtype=torch.float64, **kwargs):
    return fit_independent(
        regression,
        make_guide,
        num_runs=num_runs,
        num_steps=STEPS,
        model_args=_data(dtype),
        optim=pyro.optim.Adam({"lr": 0.05}),
        seed=seed,
        **kwargs,
    )


def _params(guide):
    return torch.cat([p.detach().reshape(-1) for p in guide.parameters()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_runs_are_separate_fits_with_their_own_parameters(dtype):
    fits = _fit(lambda m: AutoNormal(m, init_loc_fn=init_to_sample), dtype=dtype)
    assert isinstance(fits, IndependentFits) and len(fits) == 3
    assert fits.seeds == (0, 1, 2)
    assert fits.losses.shape == (3, STEPS) and np.isfinite(fits.losses).all()
    names = [g._pyro_name for g in fits]
    assert len(set(names)) == 3
    params = [_params(g) for g in fits]
    assert params[0].dtype == dtype
    assert not torch.equal(params[0], params[1]) and not torch.equal(params[1], params[2])
    # each guide reads its own entries of the global param store
    store = pyro.get_param_store()
    for g in fits:
        assert store[f"{g._pyro_name}.locs.w"] is not None
    assert store[f"{names[0]}.locs.w"].data_ptr() != store[f"{names[1]}.locs.w"].data_ptr()


def test_runs_do_not_adopt_parameters_left_in_the_store():
    x, y = _data()
    leftover = AutoNormal(regression)
    leftover(x, y)  # "AutoNormal.*" now in the store, at its initial values
    before = _params(leftover).clone()
    fits = _fit(lambda m: AutoNormal(m), num_runs=2)
    assert all(g._pyro_name != "AutoNormal" for g in fits)
    assert torch.equal(_params(leftover), before)


def test_seed_reproduces_runs_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = _fit(lambda m: AutoNormal(m, init_loc_fn=init_to_sample), num_runs=2, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    pyro.clear_param_store()
    b = _fit(lambda m: AutoNormal(m, init_loc_fn=init_to_sample), num_runs=2, seed=5)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert a.seeds == (5, 6)


def test_fits_are_ready_for_export_and_diagnostics():
    fits = _fit(
        lambda m: AutoMixtureFlow(m, num_components=2, estimator="pathwise", flow=None),
        num_runs=2,
    )
    idata = fits.to_inference_data(num_samples=40, seed=0)
    assert idata.posterior.sizes["chain"] == 2
    assert idata.posterior["w"].shape == (2, 40, 2)
    assert "component" in idata.sample_stats
    # the chains are the runs: chain r holds draws of guide r
    for r, guide in enumerate(fits):
        mean = guide.components(*fits.model_args)["values"]["w"]
        weights = guide.components(*fits.model_args)["weights"]
        centre = (weights[:, None] * mean).sum(0).numpy()
        assert np.abs(idata.posterior["w"].values[r].mean(0) - centre).max() < 1.0
    result = fits.vi_diagnostics(num_samples=40, seed=0, warn=False)
    assert result.num_runs == 2 and result.num_draws == 40
    same = vi_diagnostics(fits, num_samples=40, seed=0, warn=False)
    assert same.log_evidence == pytest.approx(result.log_evidence)
    as_list = to_inference_data(list(fits), regression, model_args=fits.model_args, num_samples=5)
    assert as_list.posterior.sizes["chain"] == 2


def test_final_losses_and_best():
    fits = _fit(lambda m: AutoNormal(m), num_runs=3)
    tail = fits.losses[:, -max(1, STEPS // 10) :].mean(1)
    np.testing.assert_allclose(fits.final_losses, tail)
    assert fits.best is fits.guides[int(np.argmin(tail))]
    assert list(fits) == list(fits.guides) and fits[1] is fits.guides[1]


def test_progress_bar_runs():
    fits = _fit(lambda m: AutoNormal(m), num_runs=2, progress_bar=True)
    assert len(fits) == 2


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_runs": 1}, ValueError, "num_runs"),
        ({"num_runs": 2.0}, TypeError, "num_runs"),
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2**32}, ValueError, "seed must be an int in"),
        ({"seed": 2**32 - 2, "num_runs": 3}, ValueError, r"seed \+ 2"),
        ({"seed": True}, TypeError, "seed"),
        ({"optim": torch.optim.Adam}, TypeError, "optim"),
        ({"loss": "elbo"}, TypeError, "loss"),
        ({"model_kwargs": [1]}, TypeError, "model_kwargs"),
        ({"progress_bar": "yes"}, TypeError, "progress_bar"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    args = {"num_runs": 2, "num_steps": 1, "model_args": _data(), **kwargs}
    with pytest.raises(error, match=match):
        fit_independent(regression, lambda m: AutoNormal(m), **args)


def test_bad_guide_factories_raise():
    x, y = _data()
    with pytest.raises(TypeError, match="make_guide"):
        fit_independent(regression, "AutoNormal", model_args=(x, y))

    def plain_function_guide(x, y):
        pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))

    with pytest.raises(TypeError, match="PyroModule"):
        fit_independent(regression, lambda m: plain_function_guide, model_args=(x, y))
    used = AutoNormal(regression)
    used(x, y)
    with pytest.raises(ValueError, match="already been run"):
        fit_independent(regression, lambda m: used, model_args=(x, y))
    one = AutoNormal(regression)
    with pytest.raises(ValueError, match="same guide twice"):
        fit_independent(regression, lambda m: one, model_args=(x, y), num_steps=1)


@pytest.mark.filterwarnings("ignore:Encountered")
def test_non_finite_loss_raises():
    def broken(x, y):
        regression(x, y)
        pyro.factor("infinite", torch.tensor(float("inf"), dtype=x.dtype))

    with pytest.raises(RuntimeError, match="loss became -inf at step 0"):
        fit_independent(broken, lambda m: AutoNormal(m), model_args=_data(), num_steps=2)


def test_independent_fits_methods_refuse_their_own_arguments():
    fits = _fit(lambda m: AutoNormal(m), num_runs=2)
    with pytest.raises(TypeError, match="model"):
        fits.to_inference_data(model=regression)
    with pytest.raises(ValueError, match="IndependentFits"):
        vi_diagnostics(fits, regression)


# ---------------------------------------------------------------------------- executors
# Module-level guide factories: a process pool sends them to its workers by pickle.
make_normal = functools.partial(AutoNormal, init_loc_fn=init_to_sample)
make_amf = functools.partial(AutoMixtureFlow, num_components=2, flow="affine_autoregressive")


def _sign_data():
    target = sign_regression(num_data=20, seed=0, dtype=torch.float64)
    return target.args


def _fit_sign(make_guide, executor=None, loss=None):
    return fit_independent(
        sign_regression_model,
        make_guide,
        num_runs=3,
        num_steps=STEPS,
        model_args=_sign_data(),
        optim=pyro.optim.Adam({"lr": 0.05}),
        loss=loss,
        seed=4,
        executor=executor,
    )


def _assert_same_fits(a, b):
    np.testing.assert_array_equal(a.losses, b.losses)
    assert a.seeds == b.seeds
    for ga, gb in zip(a, b):
        sa, sb = ga.state_dict(), gb.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k], sb[k]), k
            else:
                assert sa[k] == sb[k], k
        # the rebuilt guide samples as the sequential one does
        pyro.set_rng_seed(0)
        da = ga(*a.model_args)
        pyro.set_rng_seed(0)
        db = gb(*b.model_args)
        assert all(torch.equal(da[k], db[k]) for k in da)


def _pool():
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method))


@pytest.mark.parametrize(
    "make_guide, loss",
    [(make_normal, None), (make_amf, StratifiedELBO())],
    ids=["AutoNormal", "AutoMixtureFlow"],
)
def test_a_process_pool_gives_the_sequential_fits(make_guide, loss):
    sequential = _fit_sign(make_guide, loss=loss)
    with _pool() as pool:
        pooled = _fit_sign(make_guide, executor=pool, loss=loss)
    _assert_same_fits(sequential, pooled)
    # the rebuilt guides own separate parameters in this process's store
    assert len({g._pyro_name for g in pooled}) == 3
    assert pooled.vi_diagnostics(num_samples=20, seed=0, warn=False).num_runs == 3


def test_executors_that_cannot_run_the_fits_are_refused():
    with ThreadPoolExecutor(2) as threads:
        with pytest.raises(TypeError, match="other processes"):
            _fit_sign(make_normal, executor=threads)
    with pytest.raises(TypeError, match="executor must be None"):
        _fit_sign(make_normal, executor="dask")
    with _pool() as pool:
        with pytest.raises(TypeError, match="picklable"):
            _fit_sign(lambda m: AutoNormal(m), executor=pool)


def test_ray_gives_the_sequential_fits():
    ray = pytest.importorskip(
        "ray", reason="ray is not installed (pip install 'pyro-mogflow[distributed]')"
    )
    # Ray 2.x has no local_mode any more: a real local Ray with two worker processes
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        sequential = _fit_sign(make_normal)
        _assert_same_fits(sequential, _fit_sign(make_normal, executor="ray"))
    finally:
        if started:
            ray.shutdown()
