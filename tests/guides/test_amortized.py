"""Tests for AmortizedMixtureFlow, its posterior distribution and StratifiedELBO on local latents.

References are independent of the code under test where possible: torch's own
``MixtureSameFamily`` for the mixture density, Pyro's ``ConditionalTransformedDistribution``
for the flow, Gauss-Hermite quadrature (per data point and component) for expectations and
their gradients, closed-form evidence for a conjugate model, and the Kolmogorov-Smirnov
distance against a numerically integrated CDF for the law of the draws. Statistical checks fix
the seed and take their tolerance from a standard error or a classical quantile.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributions as tdist
from pyro.infer import SVI, Trace_ELBO
from scipy import stats

from pyro_mogflow import ESTIMATORS, AmortizedMixtureFlow, DiagNormalMixture, StratifiedELBO
from pyro_mogflow.distributions import MixtureFlow
from pyro_mogflow.flows import CONDITIONAL_FLOWS

DTYPES = [torch.float32, torch.float64]
FLOWS = [None, *sorted(CONDITIONAL_FLOWS)]


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread is fastest, and on a shared machine two threads can stall."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _quiet_stratified_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input_dim = 1.*")
        yield


def _encoder(context_dim=3, latent_dim=2, k=3, dtype=torch.float64, **kwargs):
    kwargs.setdefault("hidden_dims", (8,))
    return AmortizedMixtureFlow(context_dim, latent_dim, k, **kwargs).to(dtype)


def _mixture_reference(logits, locs, scales):
    """torch's own mixture of diagonal Gaussians (an independent density)."""
    return tdist.MixtureSameFamily(
        tdist.Categorical(logits=logits), tdist.Independent(tdist.Normal(locs, scales), 1)
    )


# --------------------------------------------------------------------------------- shapes
def _vae(encoder, num_data, subsample_size, dtype):
    w = torch.linspace(-1, 1, encoder.latent_dim * encoder.context_dim, dtype=dtype)
    w = w.reshape(encoder.latent_dim, encoder.context_dim)

    def model(x):
        with pyro.plate("data", num_data, subsample_size=subsample_size) as idx:
            z = pyro.sample(
                "z", dist.Normal(torch.zeros((), dtype=dtype), 1.0).expand([w.shape[0]]).to_event(1)
            )
            pyro.sample("x", dist.Normal(z @ w, 0.5).to_event(1), obs=x[idx])

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", num_data, subsample_size=subsample_size) as idx:
            pyro.sample("z", encoder(x[idx]))

    return model, guide


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_site_shapes_with_subsampling(estimator, dtype):
    encoder = _encoder(estimator=estimator, dtype=dtype, flow="affine_autoregressive")
    x = torch.randn(20, 3, dtype=dtype)
    _, guide = _vae(encoder, 20, 5, dtype)
    trace = pyro.poutine.trace(guide).get_trace(x)
    trace.compute_log_prob()
    site = trace.nodes["z"]
    assert site["value"].shape == (5, 2)
    assert site["value"].dtype == dtype
    assert site["fn"].batch_shape == (5,) and site["fn"].event_shape == (2,)
    assert site["log_prob"].shape == (5,)
    assert site["scale"] == pytest.approx(4.0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_vectorized_particles_shapes(estimator):
    encoder = _encoder(estimator=estimator, flow="spline_autoregressive")
    q = encoder(torch.randn(5, 3, dtype=torch.float64)).expand((4, 5))
    z = q.rsample()
    assert z.shape == (4, 5, 2)
    assert q.log_prob(z).shape == (4, 5)
    assert q.rsample((3,)).shape == (3, 4, 5, 2)


def test_unbatched_context_gives_scalar_batch():
    encoder = _encoder(flow="affine_coupling")
    q = encoder(torch.randn(3, dtype=torch.float64))
    assert q.batch_shape == () and q.event_shape == (2,)
    assert q.log_prob(q.rsample((7,))).shape == (7,)


# ------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradients_reach_encoder_heads_and_flow(estimator):
    encoder = _encoder(estimator=estimator, flow="affine_autoregressive")
    x = torch.randn(12, 3, dtype=torch.float64)
    model, guide = _vae(encoder, 12, 6, torch.float64)
    elbo = StratifiedELBO() if estimator == "stratified" else Trace_ELBO()
    loss = elbo.differentiable_loss(model, guide, x)
    loss.backward()
    named = dict(encoder.named_parameters())
    for name in ("encoder.0.weight", "logits_head.weight", "locs_head.weight", "scales_head.bias"):
        grad = named[name].grad
        assert grad is not None and bool(torch.isfinite(grad).all()), name
        assert float(grad.abs().sum()) > 0, name
    flow_grads = [p.grad for n, p in named.items() if n.startswith("flow.")]
    assert flow_grads and all(g is not None and float(g.abs().sum()) > 0 for g in flow_grads)


# --------------------------------------------------------------------------- log density
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ["implicit", "pathwise", "relaxed", "stratified"])
def test_log_prob_without_flow_is_the_mixture_density(estimator, dtype):
    encoder = _encoder(flow=None, k=4, estimator=estimator, dtype=dtype)
    x = torch.randn(6, 3, dtype=dtype)
    q = encoder(x)
    logits, locs, scales, _ = encoder.encode(x)
    z = q.rsample((5,))
    expected = _mixture_reference(logits, locs, scales).log_prob(z)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(q.log_prob(z), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(
        q.log_prob(z), DiagNormalMixture(logits, locs, scales).log_prob(z), atol=tol, rtol=tol
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flow", sorted(CONDITIONAL_FLOWS))
def test_log_prob_matches_pyro_conditional_flow(flow, dtype):
    encoder = _encoder(flow=flow, latent_dim=3, dtype=dtype)
    x = torch.randn(4, 3, dtype=dtype)
    q = encoder(x)
    logits, locs, scales, h = encoder.encode(x)
    reference = dist.ConditionalTransformedDistribution(
        _mixture_reference(logits, locs, scales), list(encoder.flow)
    ).condition(h)
    z = q.rsample((6,))
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(q.log_prob(z), reference.log_prob(z), atol=tol, rtol=tol)
    # a point the flow did not just produce must be inverted, not read from a cache
    fresh = z.detach().clone() + 0.1
    torch.testing.assert_close(q.log_prob(fresh), reference.log_prob(fresh), atol=tol, rtol=tol)


@pytest.mark.parametrize("flow", [None, "spline", "affine_autoregressive"])
def test_draws_follow_the_density(flow):
    """KS distance between 4000 draws and the CDF integrated from exp(log_prob), D = 1."""
    torch.manual_seed(1)
    encoder = _encoder(context_dim=2, latent_dim=1, k=3, flow=flow, init_spread=2.0)
    q = encoder(torch.randn(2, 2, dtype=torch.float64))
    n = 4000
    with torch.no_grad():
        draws = q.sample((n,))[..., 0]  # (n, 2)
        grid = torch.linspace(-25, 25, 200001, dtype=torch.float64)
        dens = q.log_prob(grid.reshape(-1, 1, 1).expand(-1, 2, 1)).exp()  # (G, 2)
    step = float(grid[1] - grid[0])
    mass = (dens.sum(0) - 0.5 * (dens[0] + dens[-1])) * step
    torch.testing.assert_close(mass, torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)
    cdf = torch.cumsum(dens, 0) * step
    critical = stats.kstwo.ppf(0.999, n)  # 0.1% false-alarm rate per row
    for b in range(2):
        empirical = torch.searchsorted(torch.sort(draws[:, b]).values, grid).double() / n
        ks = float((empirical - cdf[:, b]).abs().max())
        assert ks < critical + 1e-3, (b, ks, critical)  # + grid error of the CDF


# ---------------------------------------------------------- StratifiedELBO, per data point
def _quadrature_objective(encoder, x, y, w, sigma, order=40):
    """sum_b sum_k pi_bk E_{u ~ N(mu_bk, s_bk)}[log p(y_b, f(u)) - log q(f(u) | x_b)], D = 1.

    Model: z_b ~ N(0, 1), y_b ~ N(w z_b, sigma). Differentiable wrt the encoder's parameters.
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(order)
    t = torch.as_tensor(nodes, dtype=x.dtype)
    wt = torch.as_tensor(weights, dtype=x.dtype) / math.sqrt(2 * math.pi)
    logits, locs, scales, h = encoder.encode(x)  # (B, K), (B, K, 1)
    u = locs + scales * t  # (B, K, Q), D = 1 folded into the node axis
    u = u.permute(2, 0, 1).unsqueeze(-1)  # (Q, B, K, 1): node, data, component, D
    base = _mixture_reference(logits, locs, scales)
    log_q = base.log_prob(u.transpose(1, 2)).transpose(1, 2)  # (Q, B, K)
    z = u
    for layer in encoder.flow:
        # context (B, 1, H) for points (Q, B, K, 1); permutations are not conditional
        t_b = layer.condition(h.unsqueeze(-2)) if hasattr(layer, "condition") else layer
        y_ = t_b(z)
        log_det = t_b.log_abs_det_jacobian(z, y_)
        log_q = log_q - (log_det.sum(-1) if t_b.domain.event_dim == 0 else log_det)
        z = y_
    z = z[..., 0]
    log_p = tdist.Normal(0.0, 1.0).log_prob(z) + tdist.Normal(w * z, sigma).log_prob(y[:, None])
    per_component = ((log_p - log_q) * wt[:, None, None]).sum(0)  # (B, K)
    return (torch.softmax(logits, -1) * per_component).sum()


def _local_problem(flow, k=3, estimator="stratified", num_data=3, subsample=None):
    torch.manual_seed(2)
    encoder = _encoder(
        context_dim=1,
        latent_dim=1,
        k=k,
        flow=flow,
        estimator=estimator,
        init_spread=1.5,
        hidden_dims=(6,),
    )
    with torch.no_grad():  # clearly unequal weights, so that weighting errors show
        encoder.logits_head.bias.copy_(torch.linspace(1.5, -1.5, k, dtype=torch.float64))
    y = torch.tensor([-2.0, 0.5, 3.0, 1.0, -0.5, 2.0], dtype=torch.float64)[:num_data]
    idx = torch.arange(num_data) if subsample is None else torch.as_tensor(subsample)
    w, sigma = 1.5, 0.7

    def model(y):
        with pyro.plate("data", num_data, subsample=idx):
            z = pyro.sample(
                "z", dist.Normal(torch.zeros((), dtype=y.dtype), 1.0).expand([1]).to_event(1)
            )
            pyro.sample("y", dist.Normal(w * z[..., 0], sigma), obs=y[idx])

    def guide(y):
        pyro.module("encoder", encoder)
        with pyro.plate("data", num_data, subsample=idx):
            pyro.sample("z", encoder(y[idx].unsqueeze(-1)))

    return encoder, model, guide, y, idx, w, sigma


@pytest.mark.parametrize("flow", [None, "affine_autoregressive"])
@pytest.mark.parametrize("num_particles", [1, 3])
def test_stratified_value_matches_quadrature(flow, num_particles):
    encoder, model, guide, y, idx, w, sigma = _local_problem(flow)
    with torch.no_grad():
        exact = float(_quadrature_objective(encoder, y[idx, None], y[idx], w, sigma))
    elbo = StratifiedELBO(num_particles=num_particles)
    draws = torch.tensor([-elbo.loss(model, guide, y) for _ in range(300)])
    se = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean()) - exact) < 4 * se, (float(draws.mean()), exact, se)
    # the estimator's spread is real: a constant estimate would pass with se = 0
    assert se > 0


def test_stratified_value_scales_with_subsampling():
    encoder, model, guide, y, idx, w, sigma = _local_problem(None, num_data=6, subsample=[1, 4])
    with torch.no_grad():
        exact = 3.0 * float(_quadrature_objective(encoder, y[idx, None], y[idx], w, sigma))
    draws = torch.tensor([-StratifiedELBO().loss(model, guide, y) for _ in range(300)])
    se = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean()) - exact) < 4 * se


def test_stratified_gradient_is_unbiased():
    # a smooth flow (with D = 1 the affine layer depends on the context only), so that the
    # quadrature converges; spline knots would leave a quadrature error above the SE
    encoder, model, guide, y, idx, w, sigma = _local_problem("affine_autoregressive")
    params = list(encoder.parameters())
    exact = torch.autograd.grad(_quadrature_objective(encoder, y[:, None], y, w, sigma), params)
    exact = torch.cat([g.reshape(-1) for g in exact])
    elbo = StratifiedELBO(num_particles=2)
    runs = []
    for _ in range(300):
        grads = torch.autograd.grad(-elbo.differentiable_loss(model, guide, y), params)
        runs.append(torch.cat([g.reshape(-1) for g in grads]))
    runs = torch.stack(runs)
    se = runs.std(0) / math.sqrt(runs.shape[0])
    live = se > 1e-12  # entries with no randomness must match exactly
    z = ((runs.mean(0) - exact) / se)[live]
    threshold = stats.norm.ppf(1 - 0.0027 / (2 * int(live.sum())))  # Bonferroni, 0.27% overall
    assert float(z.abs().max()) < threshold, float(z.abs().max())
    torch.testing.assert_close(runs.mean(0)[~live], exact[~live], atol=1e-8, rtol=1e-6)


def test_trace_elbo_with_implicit_matches_quadrature():
    encoder, model, guide, y, idx, w, sigma = _local_problem(
        "affine_autoregressive", estimator="implicit"
    )
    with torch.no_grad():
        exact = float(_quadrature_objective(encoder, y[:, None], y, w, sigma))
    draws = torch.tensor([-Trace_ELBO().loss(model, guide, y) for _ in range(400)])
    se = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean()) - exact) < 4 * se


def test_siwae_lies_between_elbo_and_evidence():
    encoder, model, guide, y, idx, w, sigma = _local_problem(None)
    # y_b ~ N(0, w^2 + sigma^2) marginally
    evidence = float(tdist.Normal(0.0, math.sqrt(w**2 + sigma**2)).log_prob(y).sum())
    with torch.no_grad():
        exact_elbo = float(_quadrature_objective(encoder, y[:, None], y, w, sigma))
    siwae = StratifiedELBO(num_particles=8, importance_weighted=True)
    draws = torch.tensor([-siwae.loss(model, guide, y) for _ in range(200)])
    se = float(draws.std() / math.sqrt(len(draws)))
    assert exact_elbo - 4 * se < float(draws.mean()) < evidence + 4 * se
    assert float(draws.mean()) > exact_elbo + 4 * se  # strictly tighter for 8 draws


def _global_problem(estimator):
    torch.manual_seed(3)
    encoder = _encoder(context_dim=1, latent_dim=1, k=2, flow=None, hidden_dims=(4,))
    y = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    m = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=y.dtype), 1.0))
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Normal(mu.unsqueeze(-1), 1.0).to_event(1))
            pyro.sample("y", dist.Normal(z[..., 0], 0.5), obs=y)

    def guide(y):
        pyro.sample("mu", dist.Normal(m, 0.4))
        with pyro.plate("data", 3):
            pyro.sample("z", encoder(y.unsqueeze(-1), estimator=estimator))

    return model, guide, y


def test_global_latents_are_averaged_over_draws():
    model, guide, y = _global_problem("stratified")
    _, guide_implicit, _ = _global_problem("implicit")
    strat = torch.tensor([-StratifiedELBO().loss(model, guide, y) for _ in range(400)])
    trace = torch.tensor([-Trace_ELBO().loss(model, guide_implicit, y) for _ in range(400)])
    se = math.hypot(strat.std() / 20, trace.std() / 20)
    assert abs(float(strat.mean() - trace.mean())) < 4 * se


def test_siwae_with_varying_global_latent_raises():
    model, guide, y = _global_problem("stratified")
    with pytest.raises(ValueError, match="fixed across draws"):
        StratifiedELBO(importance_weighted=True).loss(model, guide, y)


def test_stratified_elbo_rejects_other_estimators():
    encoder, model, guide, y, *_ = _local_problem(None, estimator="implicit")
    with pytest.raises(ValueError, match="estimator='stratified'"):
        StratifiedELBO().loss(model, guide, y)


def test_stratified_elbo_rejects_two_amortized_sites():
    encoder = _encoder(context_dim=1, latent_dim=1, k=2, flow=None, estimator="stratified")
    y = torch.zeros(3, 1, dtype=torch.float64)

    def model(y):
        with pyro.plate("data", 3):
            for name in ("a", "b"):
                pyro.sample(name, dist.Normal(torch.zeros(1, dtype=y.dtype), 1.0).to_event(1))

    def guide(y):
        with pyro.plate("data", 3):
            pyro.sample("a", encoder(y))
            pyro.sample("b", encoder(y))

    with pytest.raises(ValueError, match="one amortized site"):
        StratifiedELBO().loss(model, guide, y)


def test_stratified_estimator_outside_stratified_elbo_does_not_warn():
    encoder = _encoder(flow=None, estimator="stratified")
    q = encoder(torch.randn(2, 3, dtype=torch.float64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = q.rsample()
    assert not caught, [str(w.message) for w in caught]
    assert z.shape == (2, q.event_shape[0]) and bool(torch.isfinite(z).all())


# ----------------------------------------------------------------------------- a VAE
def _digits(n=300):
    from sklearn.datasets import load_digits

    data = load_digits().data[:n]
    return torch.as_tensor(data, dtype=torch.float32)


@pytest.mark.parametrize("estimator", ["implicit", "stratified"])
def test_short_vae_run_lowers_the_loss(estimator):
    torch.manual_seed(0)
    x = _digits()
    encoder = AmortizedMixtureFlow(
        64, 2, 3, flow="affine_autoregressive", hidden_dims=(32,), estimator=estimator
    )
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.ELU(), torch.nn.Linear(32, 64))

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x), subsample_size=50) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Binomial(16, logits=decoder(z)).to_event(1), obs=x[idx])

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", len(x), subsample_size=50) as idx:
            pyro.sample("z", encoder(x[idx] / 16))

    loss = StratifiedELBO() if estimator == "stratified" else Trace_ELBO()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss)
    losses = [svi.step(x) for _ in range(60)]
    first, last = np.array(losses[:10]), np.array(losses[-10:])
    se = math.sqrt(first.var(ddof=1) / 10 + last.var(ddof=1) / 10)
    assert last.mean() < first.mean() - 4 * se, (first.mean(), last.mean(), se)


# ------------------------------------------------------------------- dtype, device, state
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_follows_the_module(dtype):
    encoder = _encoder(flow="spline_autoregressive", dtype=dtype)
    q = encoder(torch.randn(4, 3, dtype=dtype))
    z = q.rsample((2,))
    assert z.dtype == dtype and q.log_prob(z).dtype == dtype
    assert bool(torch.isfinite(q.log_prob(z)).all())


def test_state_dict_round_trip_gives_the_same_posterior():
    encoder = _encoder(flow="affine_autoregressive", num_flows=3, estimator="relaxed")
    encoder.step = 7
    fresh = _encoder(flow="affine_autoregressive", num_flows=3, estimator="relaxed")
    fresh.load_state_dict(encoder.state_dict())
    x = torch.randn(5, 3, dtype=torch.float64)
    z = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(fresh(x).log_prob(z), encoder(x).log_prob(z))
    assert fresh.step == encoder.step


@pytest.mark.parametrize("flow", FLOWS)
def test_module_keeps_no_draws_after_a_call(flow):
    """No transform cache on the module: deepcopy works and no graph is kept alive."""
    encoder = _encoder(flow=flow, num_flows=3)
    q = encoder(torch.randn(4, 3, dtype=torch.float64))
    q.log_prob(q.rsample())
    copy = __import__("copy").deepcopy(encoder)
    z = torch.randn(4, 2, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(copy(x).log_prob(z), encoder(x).log_prob(z))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda(dtype):
    encoder = _encoder(flow="affine_autoregressive", estimator="stratified", dtype=dtype).cuda()
    x = torch.randn(10, 3, dtype=dtype, device="cuda")

    def model(x):
        with pyro.plate("data", 10, subsample_size=5, device="cuda") as idx:
            zero = torch.zeros((), dtype=dtype, device="cuda")
            z = pyro.sample("z", dist.Normal(zero, 1.0).expand([2]).to_event(1))
            loc = z.sum(-1, keepdim=True).expand(z.shape[:-1] + (3,))
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x[idx])

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", 10, subsample_size=5, device="cuda") as idx:
            pyro.sample("z", encoder(x[idx]))

    loss = StratifiedELBO(num_particles=2).differentiable_loss(model, guide, x)
    loss.backward()
    assert loss.device.type == "cuda" and bool(torch.isfinite(loss))
    assert encoder.locs_head.weight.grad.device.type == "cuda"
    q = encoder(x, estimator="implicit")
    z = q.rsample((3,))
    assert z.device.type == "cuda" and z.dtype == dtype
    assert bool(torch.isfinite(q.log_prob(z)).all())


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"context_dim": 0}, ValueError, "context_dim must be an int >= 1, got 0"),
        ({"context_dim": 2.0}, TypeError, "context_dim must be an int >= 1, got float"),
        ({"latent_dim": True}, TypeError, "latent_dim must be an int >= 1, got bool"),
        ({"num_components": 0}, ValueError, "num_components must be an int >= 1"),
        ({"estimator": "gumbel"}, ValueError, "unknown estimator 'gumbel'"),
        ({"flow": "maf"}, ValueError, "unknown conditional flow 'maf'"),
        ({"flow": 3}, TypeError, "flow must be a name"),
        ({"flow": "affine_coupling", "latent_dim": 1}, ValueError, "needs latent_dim >= 2"),
        ({"num_flows": 0}, ValueError, "num_flows must be an int >= 1"),
        ({"hidden_dims": (8, -1)}, ValueError, r"hidden_dims\[1\] must be an int >= 1"),
        ({"hidden_dims": "8"}, TypeError, "hidden_dims must be a sequence of ints"),
        ({"flow_hidden_dims": ()}, ValueError, "flow_hidden_dims must not be empty"),
        ({"temperature": -1.0}, ValueError, "temperature must be a finite float > 0"),
        ({"init_scale": 0.0}, ValueError, "init_scale must be a finite float > 0"),
        ({"init_scale": 1e-5}, ValueError, "init_scale must be larger than min_scale"),
        ({"flow_kwargs": [1]}, TypeError, "flow_kwargs must be a dict"),
        (
            {"flow": lambda d, c: pyro.distributions.transforms.conditional_planar(d, c)},
            ValueError,
            "forward-only",
        ),
        ({"flow": lambda d, c: torch.nn.Linear(d, d)}, TypeError, "ConditionalTransformModule"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"context_dim": 3, "latent_dim": 2, **kwargs}
    with pytest.raises(error, match=match):
        AmortizedMixtureFlow(**args)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (np.zeros((2, 3)), TypeError, "x must be a torch.Tensor, got ndarray"),
        (torch.zeros(2, 4, dtype=torch.float64), ValueError, r"context_dim=3\), got \(2, 4\)"),
        (torch.zeros(2, 3, dtype=torch.float32), TypeError, "x has dtype torch.float32"),
        (torch.full((2, 3), math.nan, dtype=torch.float64), ValueError, "x must be finite"),
        (torch.zeros(0, 3, dtype=torch.float64), ValueError, r"empty batch \(shape \(0, 3\)\)"),
        (torch.zeros(2, 0, 3, dtype=torch.float64), ValueError, "empty batch.*drop_last"),
    ],
)
def test_bad_context(x, error, match):
    with pytest.raises(error, match=match):
        _encoder()(x)


def test_bad_temperature_schedule_raises():
    encoder = _encoder(estimator="relaxed", temperature=lambda step: -1.0)
    with pytest.raises(ValueError, match="temperature schedule returned -1.0"):
        encoder(torch.zeros(2, 3, dtype=torch.float64))


def test_bad_estimator_override_raises():
    with pytest.raises(ValueError, match="unknown estimator 'exact'"):
        _encoder()(torch.zeros(2, 3, dtype=torch.float64), estimator="exact")


def test_posterior_rejects_bad_estimator():
    logits, locs, scales = torch.zeros(2), torch.zeros(2, 1), torch.ones(2, 1)
    with pytest.raises(ValueError, match="unknown estimator 'x'"):
        MixtureFlow(logits, locs, scales, estimator="x")


# ------------------------------------------------------------------ benchmark smoke run
def test_vae_benchmark_quick_run_writes_its_table(tmp_path):
    from benchmarks.vae import main

    results = main(["--quick", "--out", str(tmp_path), "--only", "gaussian,mixflow stratified"])
    assert [row["label"] for row in results["rows"]] == ["gaussian", "mixflow stratified"]
    assert all(math.isfinite(row["iwae"]) and row["iwae"] >= row["elbo"] for row in results["rows"])
    text = (tmp_path / "vae_quick.md").read_text()
    assert "| mixflow stratified |" in text and (tmp_path / "vae_quick.json").exists()
