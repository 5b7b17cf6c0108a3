"""AutoMixtureFlow's summaries (median, quantiles, sample_posterior, components), every registered
flow inside the guide, and its errors for inputs it cannot handle."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_mogflow import AutoMixtureFlow
from pyro_mogflow.flows import FLOWS

FORWARD_ONLY = sorted(name for name, spec in FLOWS.items() if not spec.invertible)
INVERTIBLE = sorted(name for name, spec in FLOWS.items() if spec.invertible)
DTYPES = [torch.float32, torch.float64]
NORMAL = torch.distributions.Normal(0.0, 1.0)


def make_model(dtype=torch.float32):
    """A positive scalar and a 2-vector: latent_dim 3, unconstrained order (log s, theta)."""

    def model():
        pyro.sample("s", dist.LogNormal(torch.tensor(0.0, dtype=dtype), 1.0))
        pyro.sample("theta", dist.Normal(torch.zeros(2, dtype=dtype), 1.0).to_event(1))

    return model


def make_rich_model():
    """Simplex, correlation Cholesky and plate-local sites."""

    def model():
        pyro.sample("w", dist.Dirichlet(torch.ones(3)))
        pyro.sample("L", dist.LKJCholesky(3, torch.tensor(2.0)))
        with pyro.plate("data", 4):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    return model


RICH_SHAPES = {"w": (3,), "L": (3, 3), "z": (4,)}


def set_mixture(guide, logits, locs, scales):
    """Overwrite the guide's mixture parameters (constrained values)."""
    like = guide.locs
    guide.logits = torch.as_tensor(logits, dtype=like.dtype)
    guide.locs = torch.as_tensor(locs, dtype=like.dtype)
    guide.scales = torch.as_tensor(scales, dtype=like.dtype)


def constrain(latent):
    """The test model's constrained values from packed latents ``(..., 3)``."""
    return {"s": latent[..., 0].exp(), "theta": latent[..., 1:]}


# ------------------------------------------------------------------------------ summaries
MU = [0.3, -1.0, 2.0]
SIGMA = [0.5, 1.5, 0.2]


def gaussian_guide(dtype, num_samples=20000):
    guide = AutoMixtureFlow(
        make_model(dtype),
        num_components=1,
        flow=None,
        estimator="pathwise",
        num_quantile_samples=num_samples,
    ).setup()
    set_mixture(guide, [0.0], [MU], [SIGMA])
    return guide


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantiles_match_the_gaussian_through_the_constraint(dtype):
    # K = 1 and no flow: the latent is N(MU, SIGMA), so s = exp(latent_0) and theta = latent_1:.
    n, levels = 20000, [0.1, 0.5, 0.9]
    guide = gaussian_guide(dtype, n)
    got = guide.quantiles(levels)
    assert got["s"].shape == (3,) and got["theta"].shape == (3, 2)
    assert got["s"].dtype == dtype
    for i, q in enumerate(levels):
        z = NORMAL.icdf(torch.tensor(q)).item()
        density = NORMAL.log_prob(torch.tensor(z)).exp().item()
        se_quantile = math.sqrt(q * (1 - q) / n) / density  # in standard-normal units
        for d, (mu, sigma) in enumerate(zip(MU, SIGMA)):
            truth = mu + sigma * z
            value = got["s"][i].log() if d == 0 else got["theta"][i, d - 1]
            assert abs(float(value) - truth) < 4 * sigma * se_quantile, (q, d)


def test_median_is_the_half_quantile_through_the_constraint():
    n = 20000
    guide = gaussian_guide(torch.float64, n)
    median = guide.median()
    se = math.sqrt(0.25 / n) / NORMAL.log_prob(torch.tensor(0.0)).exp().item()
    assert median["s"].shape == () and median["theta"].shape == (2,)
    assert abs(float(median["s"].log()) - MU[0]) < 4 * SIGMA[0] * se
    for d in range(2):
        assert abs(float(median["theta"][d]) - MU[d + 1]) < 4 * SIGMA[d + 1] * se


def test_quantiles_reject_levels_outside_zero_one():
    guide = gaussian_guide(torch.float32, 100)
    with pytest.raises(ValueError, match="quantiles must be"):
        guide.quantiles([0.5, 1.5])
    with pytest.raises(TypeError, match="quantiles must be"):
        guide.quantiles("median")


def test_sample_posterior_draws_the_guide_law():
    n = 4000
    guide = gaussian_guide(torch.float64)
    samples = guide.sample_posterior(n)
    assert samples["s"].shape == (n,) and samples["theta"].shape == (n, 2)
    log_s = samples["s"].log()
    assert abs(float(log_s.mean()) - MU[0]) < 4 * SIGMA[0] / math.sqrt(n)
    for d in range(2):
        assert abs(float(samples["theta"][:, d].mean()) - MU[d + 1]) < 4 * SIGMA[d + 1] / n**0.5
    with pytest.raises(ValueError, match="num_samples"):
        guide.sample_posterior(0)
    with pytest.raises(TypeError, match="num_samples"):
        guide.sample_posterior(2.5)


def test_summaries_have_site_shapes_and_support_on_constrained_and_plate_sites():
    model = make_rich_model()
    guide = AutoMixtureFlow(model, num_components=3, flow="affine_coupling", estimator="pathwise")
    support = {
        "w": dist.Dirichlet(torch.ones(3)).support,
        "L": dist.LKJCholesky(3).support,
        "z": dist.Normal(0.0, 1.0).support,
    }
    found = guide.components()
    samples = guide.sample_posterior(5)
    median = guide.median()
    quantiles = guide.quantiles([0.25, 0.75])
    for name, shape in RICH_SHAPES.items():
        assert found["values"][name].shape == (3,) + shape
        assert samples[name].shape == (5,) + shape
        assert median[name].shape == shape
        assert quantiles[name].shape == (2,) + shape
        assert support[name].check(found["values"][name]).all()
        assert support[name].check(samples[name]).all()
    assert found["latent"].shape == (3, 2 + 3 + 4)  # unconstrained sizes of w, L and z


def test_components_are_the_weights_and_means_through_the_constraints():
    guide = AutoMixtureFlow(make_model(), num_components=2, flow=None, estimator="pathwise")
    guide.setup()
    locs = [[math.log(2.0), 1.0, -1.0], [math.log(0.5), -3.0, 3.0]]
    set_mixture(guide, [math.log(0.25), math.log(0.75)], locs, [[0.1] * 3] * 2)
    found = guide.components()
    assert torch.allclose(found["weights"], torch.tensor([0.25, 0.75]))
    assert torch.allclose(found["values"]["s"], torch.tensor([2.0, 0.5]))
    assert torch.allclose(found["values"]["theta"], torch.tensor([[1.0, -1.0], [-3.0, 3.0]]))


@pytest.mark.parametrize("flow", ["affine_autoregressive", "spline_coupling", "planar"])
def test_components_are_where_the_flow_puts_each_collapsed_component(flow):
    # With (almost) zero scales every draw is one component's mean pushed through the flow and
    # the constraints, with that component's weight as its frequency.
    n = 2000
    guide = AutoMixtureFlow(
        make_model(torch.float64),
        num_components=2,
        flow=flow,
        hidden_dims=[8],
        estimator="pathwise",
    ).setup()
    locs = [[0.5, 1.0, -1.0], [-0.5, -2.0, 2.0]]
    set_mixture(guide, [math.log(0.3), math.log(0.7)], locs, [[1e-6] * 3] * 2)
    found = guide.components()
    samples = guide.sample_posterior(n)
    first = (samples["theta"] - found["values"]["theta"][0]).abs().max(-1).values < 1e-3
    second = (samples["theta"] - found["values"]["theta"][1]).abs().max(-1).values < 1e-3
    assert bool((first ^ second).all()), "every draw must sit on exactly one component"
    s_of = torch.where(first, found["values"]["s"][0], found["values"]["s"][1])
    assert torch.allclose(samples["s"], s_of, rtol=1e-3)
    share = float(first.double().mean())
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)


# ---------------------------------------------------------------------------------- flows
@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_every_registered_flow_builds_and_trains(flow):
    model = make_model()
    guide = AutoMixtureFlow(
        model, num_components=2, flow=flow, num_flows=2, hidden_dims=[8], estimator="pathwise"
    ).setup()
    assert any(k.endswith("permutation") for k in guide.state_dict())  # buffers, between layers
    before = {k: v.detach().clone() for k, v in guide.named_parameters()}
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step() for _ in range(3)]
    assert all(math.isfinite(x) for x in losses)
    moved = [k for k, v in guide.named_parameters() if not torch.equal(before[k], v.detach())]
    assert set(moved) == set(before)
    assert any(k.startswith("flow.") for k in moved)


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_guide_log_density_is_base_density_minus_autograd_log_det(flow):
    guide = AutoMixtureFlow(
        make_model(torch.float64),
        num_components=3,
        flow=flow,
        hidden_dims=[8],
        estimator="pathwise",
    ).setup()
    posterior = guide.get_posterior()
    (transform,) = posterior.transforms
    base = posterior.base_dist
    x = base.sample((4,))
    y = transform(x)
    log_q = posterior.log_prob(y)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(
            lambda v: guide.flow(v.unsqueeze(0)).squeeze(0), x[i].clone()
        )
        expected = base.log_prob(x[i]) - torch.linalg.slogdet(jac)[1]
        assert torch.allclose(log_q[i], expected, atol=1e-6), i
    if flow in INVERTIBLE:  # and any point can be scored, not only the ones just drawn
        assert torch.allclose(posterior.log_prob(y.detach().clone()), log_q, atol=1e-6)


@pytest.mark.parametrize("flow", FORWARD_ONLY)
def test_forward_only_flow_refuses_to_score_a_point_it_did_not_sample(flow):
    guide = AutoMixtureFlow(
        make_model(), num_components=2, flow=flow, hidden_dims=[8], estimator="pathwise"
    ).setup()
    posterior = guide.get_posterior()
    z = posterior.sample((3,))
    assert torch.isfinite(posterior.log_prob(z)).all()
    with pytest.raises(ValueError, match=f"'{flow}' is forward-only"):
        posterior.log_prob(z.clone())
    with pytest.raises(ValueError, match="forward-only"):
        guide.get_posterior().log_prob(z)


@pytest.mark.parametrize("flow", FORWARD_ONLY)
def test_forward_only_log_density_is_never_stale(flow):
    # Other calls of the flow in between (components(), a new posterior's draws of the same
    # size) must not leak their cached log-dets into the score of an earlier draw.
    guide = AutoMixtureFlow(
        make_model(), num_components=3, flow=flow, hidden_dims=[8], estimator="pathwise"
    ).setup()
    posterior = guide.get_posterior()
    z = posterior.sample((3,))
    expected = posterior.log_prob(z).detach().clone()
    guide.components()
    guide.get_posterior().sample((3,))
    assert torch.allclose(posterior.log_prob(z), expected)


# --------------------------------------------------------------------------------- errors
def _counting(model):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return model(*args, **kwargs)

    return counted, calls


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_components": 0}, ValueError, "num_components must be an int >= 1, got 0"),
        ({"num_components": -2}, ValueError, "num_components must be an int >= 1, got -2"),
        ({"num_components": 2.0}, TypeError, "num_components must be an int >= 1, got float"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite float > 0, got 0.0"),
        ({"temperature": -0.5}, ValueError, "temperature must be a finite float > 0, got -0.5"),
        (
            {"temperature": float("nan")},
            ValueError,
            "temperature must be a finite float > 0, got nan",
        ),
        ({"temperature": "hot"}, TypeError, "temperature must be a finite float > 0, got str"),
        ({"flow": "glow"}, ValueError, "unknown flow 'glow'; registered flows are"),
        ({"flow": 3}, TypeError, "flow must be a registered name"),
        ({"estimator": "reinforce"}, ValueError, "unknown estimator 'reinforce'; choose one of"),
        ({"num_flows": 0}, ValueError, "num_flows must be an int >= 1, got 0"),
        ({"init_scale": 0.0}, ValueError, "init_scale must be a finite float > 0"),
    ],
)
def test_bad_arguments_raise_before_any_work(kwargs, error, match):
    model, calls = _counting(make_model())
    with pytest.raises(error, match=match):
        AutoMixtureFlow(model, **kwargs)
    assert not calls and not list(pyro.get_param_store().keys())


def test_model_that_is_not_callable_raises_type_error():
    with pytest.raises(TypeError, match="model must be callable, got int"):
        AutoMixtureFlow(3)


def _discrete_model():
    pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.sample("b", dist.Bernoulli(0.5))


def _subsampled_local(subsample_size=4, subsample=None):
    def model():
        m = pyro.sample("m", dist.Normal(0.0, 1.0))
        with pyro.plate("N", 10, subsample_size=subsample_size, subsample=subsample):
            pyro.sample("z", dist.Normal(m, 1.0))

    return model


@pytest.mark.parametrize(
    "model, match",
    [
        (_discrete_model, "discrete latent site 'b'"),
        (_subsampled_local(), "site 'z' lies in plate 'N' subsampled to 4 of 10"),
        (
            _subsampled_local(None, torch.tensor([0, 3, 5])),
            "site 'z' lies in plate 'N' subsampled to 3 of 10",
        ),
    ],
    ids=["discrete", "subsample_size", "subsample_indices"],
)
def test_unsupported_sites_raise_before_creating_parameters(model, match):
    guide = AutoMixtureFlow(model, flow=None, estimator="pathwise")
    with pytest.raises(ValueError, match=match):
        guide()
    assert not list(pyro.get_param_store().keys())
    assert guide.prototype_trace is None
    with pytest.raises(ValueError, match=match):  # and again: no half-built guide is left
        guide()


@pytest.mark.parametrize("subsample_size", [None, 10])
def test_unsubsampled_local_latents_and_subsampled_likelihoods_are_accepted(subsample_size):
    data = torch.arange(10.0)

    def model():
        m = pyro.sample("m", dist.Normal(0.0, 1.0))
        with pyro.plate("N", 10, subsample_size=subsample_size):
            z = pyro.sample("z", dist.Normal(m, 1.0))
        with pyro.plate("obs", 10, subsample_size=4) as idx:
            pyro.sample("x", dist.Normal(m, 1.0), obs=data[idx])
        return z

    guide = AutoMixtureFlow(model, flow=None, estimator="pathwise")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert math.isfinite(svi.step())
    assert guide.latent_dim == 11 and guide()["z"].shape == (10,)


def test_autoregressive_hidden_dims_below_latent_dim_raise_naming_the_argument():
    model = make_model()  # latent_dim 3
    guide = AutoMixtureFlow(model, flow="affine_autoregressive", hidden_dims=[2])
    with pytest.raises(ValueError, match=r"hidden_dims=\[2\].*latent_dim=3"):
        guide()
    assert not list(pyro.get_param_store().keys()) and guide.prototype_trace is None


def test_temperature_schedule_returning_a_non_positive_value_raises():
    model = make_model()
    guide = AutoMixtureFlow(model, flow=None, estimator="relaxed", temperature=lambda step: -1.0)
    with pytest.raises(ValueError, match="temperature schedule returned -1.0 at step 0"):
        guide()
