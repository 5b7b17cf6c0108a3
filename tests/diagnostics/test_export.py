"""Tests for pyro_mogflow.diagnostics.export (and .draws, .groups): to_inference_data."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_sample
from torch.distributions import biject_to

from pyro_mogflow import AutoMixtureFlow, to_inference_data, vi_loo
from pyro_mogflow.diagnostics.groups import _as_datatree, _build_groups

az = pytest.importorskip("arviz")

DTYPES = [torch.float32, torch.float64]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])]


def _tensor(value, like):
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def rich_model(y):
    """Scalar, constrained, vector, simplex and plated sites, deterministic sites, data (2, 5)."""
    mu = pyro.sample("mu", dist.Normal(_tensor(0.0, y), _tensor(1.0, y)))
    sigma = pyro.sample("sigma", dist.LogNormal(_tensor(0.0, y), _tensor(0.5, y)))
    pyro.sample("v", dist.Normal(_tensor(0.0, y), _tensor(1.0, y)).expand([3]).to_event(1))
    pyro.sample("w", dist.Dirichlet(torch.ones(3, dtype=y.dtype, device=y.device)))
    pyro.deterministic("mu2", 2 * mu)
    with pyro.plate("group", 2, dim=-2):
        a = pyro.sample("a", dist.Normal(_tensor(0.0, y), _tensor(1.0, y)))
        pyro.deterministic("center", mu + a)
        with pyro.plate("item", 5, dim=-1):
            pyro.sample("y", dist.Normal(mu + a, sigma), obs=y)


def _data(dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


GUIDES = {
    "AutoNormal": lambda m: AutoNormal(m),
    "AutoMultivariateNormal": lambda m: AutoMultivariateNormal(m),
    "AutoMixtureFlow": lambda m: AutoMixtureFlow(
        m, num_components=2, estimator="pathwise", flow="affine_autoregressive"
    ),
}


def _ready_guide(name, model, *args):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = GUIDES[name](model)
    guide(*args)  # set up (parameters at their initial values)
    return guide


# ------------------------------------------------------------------ groups and shapes
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guide_name", list(GUIDES))
def test_groups_dims_and_shapes(guide_name, dtype):
    y = _data(dtype)
    guide = _ready_guide(guide_name, rich_model, y)
    idata = to_inference_data(guide, rich_model, model_args=(y,), num_samples=30, seed=0)
    assert isinstance(idata, az.InferenceData)
    assert set(idata.groups()) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "sample_stats",
        "observed_data",
    }
    post = idata.posterior
    expected = {
        "mu": (("chain", "draw"), (1, 30)),
        "sigma": (("chain", "draw"), (1, 30)),
        "v": (("chain", "draw", "v_dim_0"), (1, 30, 3)),
        "w": (("chain", "draw", "w_dim_0"), (1, 30, 3)),
        "mu2": (("chain", "draw"), (1, 30)),
        "a": (("chain", "draw", "group"), (1, 30, 2)),
        "center": (("chain", "draw", "group"), (1, 30, 2)),
    }
    assert set(post.data_vars) == set(expected)  # no auxiliary (unconstrained/latent) site
    for name, (dims, shape) in expected.items():
        assert post[name].dims == dims, name
        assert post[name].shape == shape, name
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "group", "item")
    assert idata.posterior_predictive["y"].shape == (1, 30, 2, 5)
    assert idata.log_likelihood["y"].shape == (1, 30, 2, 5)
    assert idata.observed_data["y"].dims == ("group", "item")
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    assert post["mu"].dtype == np_dtype
    assert idata.sample_stats["lp"].dtype == np_dtype
    # constraints hold and deterministic sites are the model's functions of the draws
    assert (post["sigma"].values > 0).all()
    np.testing.assert_allclose(post["w"].values.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(post["mu2"].values, 2 * post["mu"].values, rtol=1e-6)
    np.testing.assert_allclose(
        post["center"].values, post["mu"].values[..., None] + post["a"].values, rtol=1e-5
    )


@pytest.mark.parametrize("guide_name", list(GUIDES))
def test_sample_stats_are_log_joint_log_q_and_their_difference(guide_name):
    y = _data()
    guide = _ready_guide(guide_name, rich_model, y)
    idata = to_inference_data(guide, rich_model, model_args=(y,), num_samples=20, seed=1)
    stats = idata.sample_stats
    assert stats["lp"].dims == ("chain", "draw")
    np.testing.assert_allclose(
        stats["log_weight"].values, stats["lp"].values - stats["lp_approx"].values
    )
    assert ("component" in stats) == (guide_name == "AutoMixtureFlow")
    assert idata.posterior.attrs["posterior_approximation"] == "variational"
    assert idata.posterior.attrs["guide"] == type(guide).__name__


def _draw_values(idata, s, like):
    post = idata.posterior
    values = {
        name: _tensor(post[name].values[0, s], like) for name in ("mu", "sigma", "v", "w", "a")
    }
    values["a"] = values["a"].reshape(2, 1)  # the model's own (padded) shape
    return values


@pytest.mark.parametrize("batch_size", [None, 3])
@pytest.mark.parametrize("guide_name", list(GUIDES))
def test_lp_is_the_model_log_joint_at_each_draw(guide_name, batch_size):
    y = _data()
    guide = _ready_guide(guide_name, rich_model, y)
    idata = to_inference_data(
        guide, rich_model, model_args=(y,), num_samples=7, seed=2, batch_size=batch_size
    )
    for s in range(7):
        values = _draw_values(idata, s, y)
        trace = poutine.trace(poutine.condition(rich_model, data=values)).get_trace(y)
        expected = float(trace.log_prob_sum())
        assert idata.sample_stats["lp"].values[0, s] == pytest.approx(expected, rel=1e-9, abs=1e-9)
        log_lik = dist.Normal(values["mu"] + values["a"], values["sigma"]).log_prob(y)
        np.testing.assert_allclose(
            idata.log_likelihood["y"].values[0, s], log_lik.numpy(), rtol=1e-10
        )


def _unconstrained_and_jacobian(guide, values):
    """Pack the constrained draw as AutoContinuous does; return (u, sum log|dx/du|)."""
    parts, log_det = [], 0.0
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        x = values[name].reshape(site["value"].shape)
        transform = biject_to(site["fn"].support)
        u = transform.inv(x)
        log_det = log_det + transform.log_abs_det_jacobian(u, x).sum()
        parts.append(u.reshape(-1))
    return torch.cat(parts), log_det


@pytest.mark.parametrize("guide_name", ["AutoMultivariateNormal", "AutoMixtureFlow"])
def test_lp_approx_is_the_density_of_the_constrained_draw(guide_name):
    # log q(x) = log q_u(u) - log|dx/du|: the guide's packed density (through the flow's
    # inverse for AutoMixtureFlow) minus the Jacobians of the constraints.
    y = _data()
    guide = _ready_guide(guide_name, rich_model, y)
    idata = to_inference_data(guide, rich_model, model_args=(y,), num_samples=6, seed=3)
    for s in range(6):
        u, log_det = _unconstrained_and_jacobian(guide, _draw_values(idata, s, y))
        with torch.no_grad():
            expected = float(guide.get_posterior().log_prob(u) - log_det)
        got = idata.sample_stats["lp_approx"].values[0, s]
        assert got == pytest.approx(expected, rel=1e-7, abs=1e-7)


def test_lp_approx_of_auto_normal_matches_its_normal_factors():
    y = _data()
    guide = _ready_guide("AutoNormal", rich_model, y)
    idata = to_inference_data(guide, rich_model, model_args=(y,), num_samples=6, seed=4)
    for s in range(6):
        values = _draw_values(idata, s, y)
        expected = 0.0
        for name, site in guide.prototype_trace.iter_stochastic_nodes():
            x = values[name].reshape(site["value"].shape)
            transform = biject_to(site["fn"].support)
            u = transform.inv(x)
            loc, scale = guide._get_loc_and_scale(name)
            with torch.no_grad():
                expected += float(dist.Normal(loc, scale).log_prob(u).sum())
                expected -= float(transform.log_abs_det_jacobian(u, x).sum())
        got = idata.sample_stats["lp_approx"].values[0, s]
        assert got == pytest.approx(expected, rel=1e-7, abs=1e-7)


# -------------------------------------------------------------------- mixture components
def _line_model(scale):
    pyro.sample("x", dist.Normal(torch.tensor(0.0), torch.tensor(scale)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_component_of_each_draw_is_recorded(dtype):
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(_line_model, num_components=2, estimator="pathwise", flow=None)
    guide(10.0)
    with torch.no_grad():  # two far-apart, narrow components with weights 0.25 / 0.75
        guide.locs_unconstrained.copy_(torch.tensor([[-5.0], [5.0]]))
        guide.logits_unconstrained.copy_(torch.tensor([0.0, math.log(3.0)]))
    n = 2000
    idata = to_inference_data(guide, _line_model, model_args=(10.0,), num_samples=n, seed=0)
    comp = idata.sample_stats["component"].values[0]
    x = idata.posterior["x"].values[0]
    assert comp.dtype.kind == "i"
    assert ((comp == 0) == (x < 0)).all()
    assert idata.sample_stats.attrs["num_components"] == 2
    se = math.sqrt(0.75 * 0.25 / n)
    assert abs((comp == 1).mean() - 0.75) < 4 * se


# --------------------------------------------------------------------------- chains
def test_independent_guides_become_chains():
    y = _data()
    guides = []
    for seed in range(3):
        pyro.set_rng_seed(seed)
        g = AutoMixtureFlow(rich_model, num_components=2, estimator="pathwise", flow=None)
        g(y)
        guides.append(g)
    idata = to_inference_data(None, rich_model, guides=guides, model_args=(y,), num_samples=15)
    assert idata.posterior.sizes["chain"] == 3
    assert idata.sample_stats["lp"].shape == (3, 15)
    assert idata.posterior.attrs["num_runs"] == 3
    # guides passed as a sequence in the first argument are the same thing
    again = to_inference_data(guides, rich_model, model_args=(y,), num_samples=15, seed=5)
    assert again.posterior.sizes["chain"] == 3
    # chains differ: each guide started from its own random component means
    means = idata.posterior["v"].mean("draw").values
    assert not np.allclose(means[0], means[1])


def test_guides_sharing_the_param_store_are_rejected():
    y = _data()
    first = AutoNormal(rich_model)
    first(y)
    second = AutoNormal(rich_model)  # same class name: the same param-store entries
    second(y)
    with pytest.raises(ValueError, match="one fit, not independent runs"):
        to_inference_data(None, rich_model, guides=[first, second], model_args=(y,))
    with pytest.raises(ValueError, match="the same guide"):
        to_inference_data(None, rich_model, guides=[first, first], model_args=(y,))

    def function_guide(y):  # plain guides share parameters by name, caught after one call
        loc = pyro.param("loc", torch.zeros((), dtype=y.dtype))
        pyro.sample("mu", dist.Normal(loc, 1.0))
        pyro.sample("sigma", dist.LogNormal(loc, 1.0))
        pyro.sample("v", dist.Normal(loc, 1.0).expand([3]).to_event(1))
        pyro.sample("w", dist.Dirichlet(torch.ones(3, dtype=y.dtype)))
        with pyro.plate("group", 2, dim=-2):
            pyro.sample("a", dist.Normal(loc, 1.0))

    with pytest.raises(ValueError, match="both read parameter 'loc'"):
        to_inference_data(
            None, rich_model, guides=[function_guide, lambda y: function_guide(y)], model_args=(y,)
        )


def test_module_local_guides_can_share_a_name():
    y = _data()
    with pyro.settings.context(module_local_params=True):
        guides = []
        for seed in range(2):
            pyro.set_rng_seed(seed)
            g = AutoNormal(rich_model, init_loc_fn=init_to_sample)
            g(y)
            guides.append(g)
        idata = to_inference_data(None, rich_model, guides=guides, model_args=(y,), num_samples=5)
    assert idata.posterior.sizes["chain"] == 2
    for r, g in enumerate(guides):  # chain r holds guide r's draws, not the other's
        loc, scale = (float(t.detach()) for t in g._get_loc_and_scale("mu"))
        z = (idata.posterior["mu"].values[r] - loc) / scale
        assert np.abs(z).max() < 6


# ---------------------------------------------------------------------------- copies
def test_exported_arrays_are_copies():
    y = _data()
    guide = _ready_guide("AutoNormal", rich_model, y)
    idata = to_inference_data(guide, rich_model, model_args=(y,), num_samples=10, seed=0)
    y_before = y.clone()
    obs = idata.observed_data["y"].values
    assert not np.shares_memory(obs, y.numpy())
    obs[...] = 123.0  # writing into the export leaves the data alone ...
    assert torch.equal(y, y_before)
    saved = idata.posterior["mu"].values.copy()
    y.add_(1.0)  # ... and changing the data leaves the export alone
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(1.0)
    np.testing.assert_array_equal(idata.posterior["mu"].values, saved)
    lp, lq, lw = (idata.sample_stats[k].values for k in ("lp", "lp_approx", "log_weight"))
    assert not np.shares_memory(lw, lp) and not np.shares_memory(lw, lq)


# ---------------------------------------------------------------- seeds, options, masks
def test_seed_reproduces_draws_and_leaves_global_rng_alone():
    y = _data()
    guide = _ready_guide("AutoMultivariateNormal", rich_model, y)
    state = torch.get_rng_state()
    a = to_inference_data(guide, rich_model, model_args=(y,), num_samples=10, seed=7)
    b = to_inference_data(guide, rich_model, model_args=(y,), num_samples=10, seed=7)
    c = to_inference_data(guide, rich_model, model_args=(y,), num_samples=10, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(a.posterior["v"].values, b.posterior["v"].values)
    np.testing.assert_array_equal(
        a.posterior_predictive["y"].values, b.posterior_predictive["y"].values
    )
    assert not np.array_equal(a.posterior["v"].values, c.posterior["v"].values)


def _export_auto_normal(**kwargs):
    """Five draws (seed 0) of an AutoNormal at its initial values on rich_model."""
    y = _data()
    guide = _ready_guide("AutoNormal", rich_model, y)
    return to_inference_data(guide, rich_model, model_args=(y,), num_samples=5, seed=0, **kwargs)


def test_optional_groups_and_log_prior():
    idata = _export_auto_normal(
        posterior_predictive=False,
        log_likelihood=False,
        log_prior=True,
    )
    assert "posterior_predictive" not in idata.groups()
    assert "log_likelihood" not in idata.groups()
    prior = idata.log_prior
    assert set(prior.data_vars) == {"mu", "sigma", "v", "w", "a"}
    assert prior["a"].dims == ("chain", "draw", "group")
    assert prior["v"].dims == ("chain", "draw")  # event dims summed
    mu = idata.posterior["mu"].values
    np.testing.assert_allclose(
        prior["mu"].values, dist.Normal(0.0, 1.0).log_prob(torch.as_tensor(mu)).numpy()
    )


def test_coords_and_dims_are_applied():
    idata = _export_auto_normal(
        coords={"item": list("abcde"), "coef": ["c0", "c1", "c2"]},
        dims={"v": ["coef"]},
    )
    assert idata.posterior["v"].dims == ("chain", "draw", "coef")
    assert list(idata.posterior["v"].coords["coef"].values) == ["c0", "c1", "c2"]
    assert list(idata.observed_data["y"].coords["item"].values) == list("abcde")


def scaled_masked_model(y, mask):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
    with pyro.plate("data", y.shape[0]), poutine.scale(scale=3.0):
        pyro.sample("y", dist.Normal(mu, 1.0).mask(mask), obs=y)


def test_log_likelihood_is_unscaled_and_masked_while_lp_keeps_scale():
    y = _data().reshape(-1)
    mask = torch.arange(10) % 3 != 0
    guide = _ready_guide("AutoNormal", scaled_masked_model, y, mask)
    idata = to_inference_data(
        guide, scaled_masked_model, model_args=(y, mask), num_samples=4, seed=0
    )
    mu = torch.as_tensor(idata.posterior["mu"].values[0])
    pointwise = dist.Normal(mu[:, None], 1.0).log_prob(y)
    expected_ll = torch.where(mask, pointwise, torch.zeros(()))
    np.testing.assert_allclose(idata.log_likelihood["y"].values[0], expected_ll.numpy())
    expected_lp = dist.Normal(0.0, 1.0).log_prob(mu) + 3.0 * expected_ll.sum(-1)
    np.testing.assert_allclose(idata.sample_stats["lp"].values[0], expected_lp.numpy())


def test_unguided_latent_site_counts_in_lp_and_lp_approx():
    # A guide that covers only "mu": "tau" is drawn from its prior, so its prior density
    # enters both log p and log q and cancels in the importance weight.
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("tau", dist.Gamma(2.0, 1.0))
        pyro.factor("f", -0.5 * mu**2)

    guide = AutoNormal(poutine.block(model, hide=["tau"]))
    guide()
    idata = to_inference_data(guide, model, num_samples=8, seed=0)
    post = idata.posterior
    tau = torch.as_tensor(post["tau"].values[0])
    mu = torch.as_tensor(post["mu"].values[0])
    prior_tau = dist.Gamma(2.0, 1.0).log_prob(tau)
    loc, scale = guide._get_loc_and_scale("mu")
    with torch.no_grad():
        log_q_mu = dist.Normal(loc, scale).log_prob(mu)
    lp = dist.Normal(0.0, 1.0).log_prob(mu) + prior_tau - 0.5 * mu**2
    np.testing.assert_allclose(idata.sample_stats["lp"].values[0], lp.numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        idata.sample_stats["lp_approx"].values[0], (log_q_mu + prior_tau).numpy(), rtol=1e-5
    )


def matmul_model(x, y):
    """Uses x @ w, which does not vectorize over an outer plate of draws."""
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)


def test_batch_size_one_draws_models_that_do_not_vectorize():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    y = torch.randn(6, generator=g, dtype=torch.float64)
    guide = _ready_guide("AutoMultivariateNormal", matmul_model, x, y)
    with pytest.raises(RuntimeError, match="batch_size=1"):
        to_inference_data(guide, matmul_model, model_args=(x, y), num_samples=4, seed=0)
    idata = to_inference_data(
        guide, matmul_model, model_args=(x, y), num_samples=4, seed=0, batch_size=1
    )
    assert idata.posterior["w"].shape == (1, 4, 2)
    assert idata.posterior_predictive["y"].shape == (1, 4, 6)
    for s in range(4):
        w = torch.as_tensor(idata.posterior["w"].values[0, s])
        expected = dist.Normal(torch.zeros(2, dtype=w.dtype), 1.0).log_prob(w).sum()
        expected = expected + dist.Normal(x @ w, 1.0).log_prob(y).sum()
        assert idata.sample_stats["lp"].values[0, s] == pytest.approx(float(expected))


@pytest.mark.parametrize("guide_name", ["AutoNormal", "AutoMixtureFlow"])
def test_unbatched_draws_match_the_model_log_joint(guide_name):
    y = _data()
    guide = _ready_guide(guide_name, rich_model, y)
    idata = to_inference_data(
        guide, rich_model, model_args=(y,), num_samples=3, seed=0, batch_size=1
    )
    assert idata.posterior["a"].dims == ("chain", "draw", "group")
    for s in range(3):
        values = _draw_values(idata, s, y)
        trace = poutine.trace(poutine.condition(rich_model, data=values)).get_trace(y)
        assert idata.sample_stats["lp"].values[0, s] == pytest.approx(float(trace.log_prob_sum()))
    u, log_det = _unconstrained_and_jacobian(guide, _draw_values(idata, 0, y))
    if guide_name == "AutoMixtureFlow":
        with torch.no_grad():
            expected = float(guide.get_posterior().log_prob(u) - log_det)
        assert idata.sample_stats["lp_approx"].values[0, 0] == pytest.approx(expected)


# ---------------------------------------------------------------------- DataTree path
def test_datatree_path_has_the_groups_and_dims():
    # ArviZ >= 1 returns an xarray.DataTree; build it from the same groups without arviz 1.
    xr = pytest.importorskip("xarray")
    if not hasattr(xr, "DataTree"):
        pytest.skip("this xarray has no DataTree")
    y = _data()
    guide = _ready_guide("AutoMultivariateNormal", rich_model, y)
    idata = to_inference_data(guide, rich_model, model_args=(y,), num_samples=9, seed=0)
    groups = {name: idata[name] for name in idata.groups()}
    tree = _as_datatree(groups)
    assert isinstance(tree, xr.DataTree)
    assert set(tree.children) == set(groups)
    assert tree["posterior"]["a"].dims == ("chain", "draw", "group")
    assert tree["posterior"].sizes["draw"] == 9
    assert tree["sample_stats"]["log_weight"].dims == ("chain", "draw")
    assert tree["observed_data"]["y"].dims == ("group", "item")
    assert tree["posterior"].attrs["posterior_approximation"] == "variational"
    assert callable(_build_groups)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 2.5}, TypeError, "num_samples"),
        ({"num_samples": True}, TypeError, "num_samples"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"seed": -1}, ValueError, "seed"),
        ({"posterior_predictive": 1}, TypeError, "posterior_predictive"),
        ({"coords": [1, 2]}, TypeError, "coords"),
        ({"dims": {"v": "coef"}}, TypeError, "dims"),
        ({"dims": {"v": ["a", "b"]}}, ValueError, r"dims\['v'\]"),
        ({"model_kwargs": [1]}, TypeError, "model_kwargs"),
        ({"max_plate_nesting": 1}, ValueError, "max_plate_nesting"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    y = _data()
    guide = _ready_guide("AutoNormal", rich_model, y)
    with pytest.raises(error, match=match):
        to_inference_data(guide, rich_model, model_args=(y,), **kwargs)


def test_bad_guides_and_models_raise():
    y = _data()
    fresh = AutoNormal(rich_model)
    with pytest.raises(ValueError, match="has not been run"):
        to_inference_data(fresh, rich_model, model_args=(y,))
    guide = _ready_guide("AutoNormal", rich_model, y)
    with pytest.raises(TypeError, match="model"):
        to_inference_data(guide, "not a model", model_args=(y,))
    with pytest.raises(ValueError, match="not both"):
        to_inference_data(guide, rich_model, guides=[guide], model_args=(y,))
    with pytest.raises(ValueError, match="guide is required"):
        to_inference_data(None, rich_model, model_args=(y,))
    with pytest.raises(ValueError, match="at least one guide"):
        to_inference_data(None, rich_model, guides=[], model_args=(y,))


# ------------------------------------------------------------------------------ CUDA
@pytest.mark.filterwarnings("ignore:Pareto k-hat")  # unfitted guides
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("guide_name", list(GUIDES))
def test_device_follows_the_model(guide_name, device):
    y = _data(torch.float32, device)
    guide = _ready_guide(guide_name, rich_model, y)
    idata = to_inference_data(guide, rich_model, model_args=(y,), num_samples=10, seed=0)
    assert idata.posterior["v"].shape == (1, 10, 3)
    assert np.isfinite(idata.sample_stats["log_weight"].values).all()
    for s in range(3):
        values = _draw_values(idata, s, y)
        trace = poutine.trace(poutine.condition(rich_model, data=values)).get_trace(y)
        expected = float(trace.log_prob_sum())
        assert idata.sample_stats["lp"].values[0, s] == pytest.approx(expected, rel=1e-5)
    assert vi_loo(idata, pointwise=False)["n_data_points"] == 10


# ------------------------------------------------------------- guides without a density
@pytest.mark.parametrize("guide_class", ["AutoDelta", "AutoLaplaceApproximation"])
def test_guide_without_a_density_is_refused(guide_class):
    from pyro.infer import autoguide

    from pyro_mogflow import vi_diagnostics

    y = _data()
    pyro.clear_param_store()
    guide = getattr(autoguide, guide_class)(rich_model)
    guide(y)
    for run in (
        lambda: to_inference_data(guide, rich_model, model_args=(y,), num_samples=20, seed=0),
        lambda: vi_diagnostics(guide, rich_model, model_args=(y,), num_samples=20, seed=0),
    ):
        with pytest.raises(ValueError, match="has no density.*point mass"):
            run()


def test_laplace_approximation_of_a_map_guide_has_a_density():
    from pyro.infer.autoguide import AutoLaplaceApproximation

    y = _data()
    pyro.clear_param_store()
    guide = AutoLaplaceApproximation(rich_model)
    guide(y)
    laplace = guide.laplace_approximation(y)
    idata = to_inference_data(laplace, rich_model, model_args=(y,), num_samples=20, seed=0)
    assert np.all(idata.sample_stats["lp_approx"].values != 0)


@pytest.mark.parametrize("seed", [2**32, 2**40, -1])
def test_seed_outside_numpy_range_is_refused_up_front(seed):
    y = _data()
    pyro.clear_param_store()
    guide = AutoNormal(rich_model)
    guide(y)
    with pytest.raises(ValueError, match="seed must be an int"):
        to_inference_data(guide, rich_model, model_args=(y,), num_samples=5, seed=seed)
