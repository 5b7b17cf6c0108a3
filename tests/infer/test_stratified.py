"""Tests for StratifiedELBO and the guide's stratified-draw hook.

References are independent of the code under test: Gauss-Hermite quadrature of each component's
expectation (with Pyro's own ``MixtureOfDiagNormals`` density for log q), HMC's potential energy
for log p in unconstrained space, and closed-form evidence for a conjugate model. Statistical
checks fix the seed and take their tolerance from the standard error of the estimates.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal
from pyro.infer.mcmc.util import initialize_model
from torch.distributions import biject_to

from pyro_mogflow import AutoMixtureFlow, StratifiedELBO

DTYPES = [torch.float32, torch.float64]

# A bimodal target in R^2 with a non-separable likelihood: z ~ N(0, 2^2 I), y ~ N(z1 z2, 0.5^2).
Y_OBS = 2.0
LOCS = [[1.4, 1.4], [-1.4, -1.4], [0.3, -0.5]]
SCALES = [[0.5, 0.7], [0.6, 0.4], [1.0, 0.8]]
LOGITS = [0.5, 0.0, -1.0]


@pytest.fixture(autouse=True)
def _clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def hyperbola_model(y):
    z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=y.dtype), 2.0).to_event(1))
    pyro.sample("y", dist.Normal(z[..., 0] * z[..., 1], 0.5), obs=y)


def hyperbola_log_joint(z, y):
    """log p(y, z) written directly with torch distributions; z has shape (..., 2)."""
    prior = torch.distributions.Normal(torch.zeros((), dtype=z.dtype), 2.0).log_prob(z).sum(-1)
    return prior + torch.distributions.Normal(z[..., 0] * z[..., 1], 0.5).log_prob(y)


def _make_guide(model, args, dtype, flow=None, k=3, **kwargs):
    guide = AutoMixtureFlow(model, num_components=k, flow=flow, estimator="stratified", **kwargs)
    with torch.no_grad():
        guide(*args)  # set-up (exact sampling, no gradients: no warning)
    return guide


def _set_params(guide, dtype, locs=LOCS, scales=SCALES, logits=LOGITS):
    with torch.no_grad():
        guide.locs_unconstrained.copy_(torch.tensor(locs, dtype=dtype))
        scales = torch.tensor(scales, dtype=dtype)
        constraint = guide._pyro_params["scales"][0]  # the constraint the guide declares
        guide.scales_unconstrained.copy_(biject_to(constraint).inv(scales))
        guide.logits_unconstrained.copy_(torch.tensor(logits, dtype=dtype))


def _quadrature_elbo(guide, y, order=40):
    """sum_k pi_k E_{N(mu_k, sigma_k)}[log p(y, f(z0)) - log q(f(z0))] by Gauss-Hermite."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(order)
    dtype = guide.locs.dtype
    x = torch.as_tensor(nodes, dtype=dtype)
    w = torch.as_tensor(weights, dtype=dtype) / math.sqrt(2 * math.pi)
    grid = torch.cartesian_prod(x, x)  # (M, 2)
    wgrid = (w[:, None] * w[None, :]).reshape(-1)
    logits, locs, scales = guide.logits, guide.locs, guide.scales
    base = locs[:, None, :] + scales[:, None, :] * grid  # (K, M, 2)
    log_q = dist.MixtureOfDiagNormals(locs, scales, logits).log_prob(base)
    z = base
    if guide.flow is not None:
        z = guide.flow(base)
        log_q = log_q - guide.flow.log_abs_det_jacobian(base, z)
    per_component = ((hyperbola_log_joint(z, y) - log_q) * wgrid).sum(-1)
    return (torch.softmax(logits, -1) * per_component).sum()


# ------------------------------------------------------------------------------------ value
@pytest.mark.parametrize("flow", [None, "planar"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_value_matches_quadrature(dtype, flow):
    pyro.set_rng_seed(0)
    y = torch.tensor(Y_OBS, dtype=dtype)
    guide = _make_guide(hyperbola_model, (y,), dtype, flow=flow)
    _set_params(guide, dtype)
    elbo = StratifiedELBO(num_particles=8)
    losses = torch.tensor([elbo.loss(hyperbola_model, guide, y) for _ in range(200)])
    with torch.no_grad():
        exact = -float(_quadrature_elbo(guide, y))
    se = float(losses.std() / math.sqrt(len(losses)))
    eps = 1e-4 * abs(exact) if dtype == torch.float32 else 0.0
    assert abs(float(losses.mean()) - exact) < 4 * se + eps, (float(losses.mean()), exact, se)


# -------------------------------------------------------------------------------- gradients
@pytest.fixture(scope="module")
def gradient_runs():
    """Exact and 300 stratified gradients wrt the unconstrained logits, locs and scales."""
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    dtype = torch.float64
    y = torch.tensor(Y_OBS, dtype=dtype)
    guide = _make_guide(hyperbola_model, (y,), dtype)
    _set_params(guide, dtype)
    leaves = {
        "logits": guide.logits_unconstrained,
        "locs": guide.locs_unconstrained,
        "scales": guide.scales_unconstrained,
    }
    exact = torch.autograd.grad(-_quadrature_elbo(guide, y, order=60), list(leaves.values()))
    elbo = StratifiedELBO(num_particles=4)
    draws = [[] for _ in leaves]
    for _ in range(300):
        loss = elbo.differentiable_loss(hyperbola_model, guide, y)
        for store, g in zip(draws, torch.autograd.grad(loss, list(leaves.values()))):
            store.append(g)
    pyro.clear_param_store()
    return {name: (exact[i], torch.stack(draws[i])) for i, name in enumerate(leaves)}


@pytest.mark.parametrize("param", ["logits", "locs", "scales"])
def test_gradient_unbiased_against_quadrature(gradient_runs, param):
    exact, draws = gradient_runs[param]
    mean = draws.mean(0)
    se = draws.std(0) / math.sqrt(draws.shape[0])
    z = (mean - exact).abs() / se
    assert bool((z < 4.5).all()), (param, mean, exact, se)


# ------------------------------------------------------------- general models, exact terms
def rich_model(data):
    zero = torch.zeros((), dtype=data.dtype, device=data.device)
    sigma = pyro.sample("sigma", dist.LogNormal(zero, 0.5))  # positive
    w = pyro.sample("w", dist.Dirichlet(torch.ones_like(data[:3])))  # simplex
    with pyro.plate("groups", 2):
        mu = pyro.sample("mu", dist.Normal(zero, 1.0))
    idx = torch.tensor([0, 0, 0, 1, 1, 1], device=data.device)
    with pyro.plate("data", 6):
        loc = mu.index_select(-1, idx) * (1 + w[..., 0:1].squeeze(-1))
        pyro.sample("x", dist.Normal(loc, sigma), obs=data)


RICH_DATA = [0.3, -0.2, 0.5, 1.4, 1.1, 0.9]


def _unpack(guide, u):
    """Unconstrained latent (D,) -> {site: unconstrained value}, in the guide's packing order."""
    out, pos = {}, 0
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        shape = biject_to(site["fn"].support).inv(site["value"]).shape
        size = int(np.prod(shape))
        out[name] = u[pos : pos + size].reshape(shape)
        pos += size
    assert pos == u.shape[-1]
    return out


@pytest.mark.parametrize("flow", [None, "affine_autoregressive"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_particles_match_potential_energy(dtype, flow):
    """Plates, positive and simplex sites, observed data: every per-draw log ratio equals
    -U(u) - log q(u), with U the HMC potential energy and log q by Pyro's own densities."""
    pyro.set_rng_seed(2)
    data = torch.tensor(RICH_DATA, dtype=dtype)
    guide = _make_guide(rich_model, (data,), dtype, flow=flow, init_spread=0.5)
    elbo = StratifiedELBO(num_particles=2)
    _, potential_fn, _, _ = initialize_model(rich_model, model_args=(data,))
    with torch.no_grad():
        log_ratio, log_weights, latent = elbo.particles(rich_model, guide, data)
        base = dist.MixtureOfDiagNormals(guide.locs, guide.scales, guide.logits)
        q = base if flow is None else dist.TransformedDistribution(base, [guide.flow])
        expected = torch.stack(
            [
                -potential_fn(_unpack(guide, u)) - q.log_prob(u.clone())
                for u in latent.reshape(-1, latent.shape[-1])
            ]
        ).reshape(log_ratio.shape)
    assert elbo.max_plate_nesting == 1
    assert log_ratio.shape == (3, 2) and latent.shape == (3, 2, 5)
    assert log_ratio.dtype == dtype
    tol = 1e-8 if dtype == torch.float64 else 2e-3
    torch.testing.assert_close(log_ratio, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(log_weights, torch.log_softmax(guide.logits.detach(), -1))


@pytest.mark.parametrize("importance_weighted", [False, True])
def test_loss_combines_particles(importance_weighted):
    data = torch.tensor(RICH_DATA, dtype=torch.float64)
    guide = _make_guide(rich_model, (data,), torch.float64, init_spread=0.5)
    elbo = StratifiedELBO(num_particles=3, importance_weighted=importance_weighted)
    pyro.set_rng_seed(3)
    loss = elbo.loss(rich_model, guide, data)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        log_ratio, log_weights, _ = elbo.particles(rich_model, guide, data)
    if importance_weighted:
        expected = -(torch.logsumexp(log_weights[:, None] + log_ratio, (0, 1)) - math.log(3))
    else:
        expected = -(log_weights.exp() * log_ratio.mean(-1)).sum()
    assert loss == pytest.approx(float(expected), rel=1e-12)


def test_losses_agree_across_entry_points():
    data = torch.tensor(RICH_DATA, dtype=torch.float64)
    guide = _make_guide(rich_model, (data,), torch.float64, init_spread=0.5)
    elbo = StratifiedELBO(num_particles=2)
    values = []
    for fn in (elbo.loss, elbo.differentiable_loss, elbo.loss_and_grads):
        pyro.set_rng_seed(4)
        value = fn(rich_model, guide, data)
        values.append(float(value.detach()) if isinstance(value, torch.Tensor) else value)
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    assert values[0] == pytest.approx(values[2], rel=1e-12)
    assert guide.locs_unconstrained.grad is not None
    assert bool(torch.isfinite(guide.locs_unconstrained.grad).all())


def test_explicit_max_plate_nesting_gives_same_draws():
    data = torch.tensor(RICH_DATA, dtype=torch.float64)
    guide = _make_guide(rich_model, (data,), torch.float64, init_spread=0.5)
    pyro.set_rng_seed(5)
    inferred = StratifiedELBO(num_particles=2).loss(rich_model, guide, data)
    pyro.set_rng_seed(5)
    explicit = StratifiedELBO(num_particles=2, max_plate_nesting=3).loss(rich_model, guide, data)
    assert inferred == pytest.approx(explicit, rel=1e-12)


def test_max_plate_nesting_inferred_from_nested_plates():
    def model(data):
        with pyro.plate("outer", 2, dim=-2):
            a = pyro.sample("a", dist.Normal(torch.zeros(()), 1.0))
            with pyro.plate("inner", 3, dim=-1):
                pyro.sample("x", dist.Normal(a, 1.0), obs=data)

    data = torch.zeros(2, 3)
    guide = _make_guide(model, (data,), torch.float32)
    elbo = StratifiedELBO(num_particles=2)
    assert math.isfinite(elbo.loss(model, guide, data))
    assert elbo.max_plate_nesting == 2


# ---------------------------------------------------------------------------------- SIWAE
@pytest.mark.parametrize("num_particles", [1, 4])
def test_siwae_at_least_elbo_draw_by_draw(num_particles):
    """log sum_kt pi_k w_kt / n >= sum_k pi_k mean_t log w_kt on every draw (Jensen)."""
    y = torch.tensor(Y_OBS, dtype=torch.float64)
    guide = _make_guide(hyperbola_model, (y,), torch.float64)
    _set_params(guide, torch.float64)
    plain = StratifiedELBO(num_particles=num_particles)
    iw = StratifiedELBO(num_particles=num_particles, importance_weighted=True)
    gaps = []
    for seed in range(20):
        pyro.set_rng_seed(seed)
        elbo_loss = plain.loss(hyperbola_model, guide, y)
        pyro.set_rng_seed(seed)
        gaps.append(elbo_loss - iw.loss(hyperbola_model, guide, y))
    assert min(gaps) >= -1e-9
    assert sum(gaps) / len(gaps) > 0.05  # strictly tighter here: the components overlap


def conjugate_model(y):
    z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=y.dtype), 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(z, 1.0), obs=y)


CONJ_Y = [0.8, 1.5, 0.3, 1.1]


def _conjugate_log_evidence(y):
    n = len(y)
    cov = torch.eye(n, dtype=torch.float64) + torch.ones(n, n, dtype=torch.float64)
    return float(
        dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(
            torch.tensor(y, dtype=torch.float64)
        )
    )


def test_siwae_bounded_by_log_evidence():
    y = torch.tensor(CONJ_Y, dtype=torch.float64)
    guide = _make_guide(conjugate_model, (y,), torch.float64, k=2)
    _set_params(guide, torch.float64, locs=[[0.5], [1.2]], scales=[[0.5], [0.3]], logits=[0.0, 0.3])
    log_z = _conjugate_log_evidence(CONJ_Y)
    pyro.set_rng_seed(6)
    iw = StratifiedELBO(num_particles=64, importance_weighted=True)
    plain = StratifiedELBO(num_particles=64)
    bounds = torch.tensor([-iw.loss(conjugate_model, guide, y) for _ in range(50)])
    elbos = torch.tensor([-plain.loss(conjugate_model, guide, y) for _ in range(50)])
    se = float((bounds.var() / len(bounds) + elbos.var() / len(elbos)).sqrt())
    assert float(bounds.mean()) <= log_z + 4 * float(bounds.std() / math.sqrt(len(bounds)))
    assert float(bounds.mean() - elbos.mean()) > 4 * se  # tighter than the ELBO
    assert float(elbos.mean()) < log_z


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("dtype", DTYPES)
def test_svi_recovers_conjugate_posterior(dtype):
    pyro.set_rng_seed(7)
    y = torch.tensor(CONJ_Y, dtype=dtype)
    guide = _make_guide(conjugate_model, (y,), dtype, k=2)
    svi = SVI(conjugate_model, guide, pyro.optim.Adam({"lr": 0.05}), StratifiedELBO(4))
    for _ in range(400):
        svi.step(y)
    # Posterior N(sum(y) / (n + 1), 1 / (n + 1)).
    n = len(CONJ_Y)
    post_mean, post_var = sum(CONJ_Y) / (n + 1), 1.0 / (n + 1)
    w = torch.softmax(guide.logits.detach(), -1)
    locs, scales = guide.locs.detach()[:, 0], guide.scales.detach()[:, 0]
    mean = float((w * locs).sum())
    var = float((w * (scales**2 + locs**2)).sum()) - mean**2
    assert guide.locs.dtype == dtype
    assert abs(mean - post_mean) < 0.1
    assert abs(var - post_var) < 0.05


def test_predictive_samples_exactly_without_warning():
    y = torch.tensor(CONJ_Y)
    guide = _make_guide(conjugate_model, (y,), torch.float32, k=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samples = Predictive(conjugate_model, guide=guide, num_samples=7)(y)
    assert samples["z"].shape[0] == 7


def test_other_elbo_on_stratified_guide_is_quiet_and_finite():
    y = torch.tensor(CONJ_Y)
    guide = _make_guide(conjugate_model, (y,), torch.float32, k=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = Trace_ELBO().loss(conjugate_model, guide, y)
    assert math.isfinite(loss)


def test_finite_in_float32_at_high_dimension():
    """D = 1000, K = 32, float32, components far apart: loss and gradients stay finite."""
    pyro.set_rng_seed(8)

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(1000), 1.0).to_event(1))

    guide = _make_guide(model, (), torch.float32, k=32, init_spread=3.0, init_scale=0.01)
    loss = StratifiedELBO(num_particles=2, importance_weighted=True).differentiable_loss(
        model, guide
    )
    grads = torch.autograd.grad(loss, [guide.logits_unconstrained, guide.scales_unconstrained])
    assert bool(torch.isfinite(loss))
    assert all(bool(torch.isfinite(g).all()) for g in grads)


# -------------------------------------------------------------------------------- errors
def test_rejects_other_guides():
    y = torch.tensor(CONJ_Y)
    with pytest.raises(TypeError, match="got AutoNormal"):
        StratifiedELBO().loss(conjugate_model, AutoNormal(conjugate_model), y)


def test_rejects_plain_callable_guide():
    with pytest.raises(TypeError, match="got function"):
        StratifiedELBO().loss(conjugate_model, lambda y: None, torch.tensor(CONJ_Y))


def test_rejects_autoguidelist():
    guides = AutoGuideList(conjugate_model)
    guides.append(AutoDelta(conjugate_model))
    with pytest.raises(TypeError, match="AutoGuideList"):
        StratifiedELBO().loss(conjugate_model, guides, torch.tensor(CONJ_Y))


def test_rejects_non_stratified_estimator():
    guide = AutoMixtureFlow(conjugate_model, num_components=2, flow=None, estimator="implicit")
    with pytest.raises(ValueError, match="estimator='implicit'"):
        StratifiedELBO().loss(conjugate_model, guide, torch.tensor(CONJ_Y))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_particles": 0}, ValueError, "num_particles must be >= 1, got 0"),
        ({"num_particles": 2.0}, TypeError, "num_particles must be an int, got float"),
        ({"importance_weighted": 1}, TypeError, "importance_weighted must be a bool, got int"),
        ({"max_plate_nesting": -1}, ValueError, "max_plate_nesting must be >= 0, got -1"),
        ({"max_plate_nesting": 1.5}, TypeError, "max_plate_nesting must be an int"),
        ({"retain_graph": "yes"}, TypeError, "retain_graph must be a bool or None"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        StratifiedELBO(**kwargs)


def test_too_small_max_plate_nesting_raises():
    guide = _make_guide(rich_model, (torch.tensor(RICH_DATA),), torch.float32)
    with pytest.raises(ValueError, match="max_plate_nesting=0, but the model nests 1 plate"):
        StratifiedELBO(max_plate_nesting=0).loss(rich_model, guide, torch.tensor(RICH_DATA))


def test_stratified_draw_requires_stratified_estimator():
    guide = AutoMixtureFlow(conjugate_model, num_components=2, flow=None, estimator="implicit")
    guide.setup(torch.tensor(CONJ_Y))
    posterior = guide.get_posterior().expand((4,))
    with pytest.raises(ValueError, match="estimator='implicit'"):
        posterior.stratified_rsample(2, particle_dim=-1)


# ---------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    data = torch.tensor(RICH_DATA, device="cuda")
    guide = _make_guide(rich_model, (data,), torch.float32, flow="affine_autoregressive")
    assert guide.locs.device.type == "cuda"
    elbo = StratifiedELBO(num_particles=2)
    loss = elbo.differentiable_loss(rich_model, guide, data)
    assert loss.device.type == "cuda" and bool(torch.isfinite(loss))


# ------------------------------------------------------------- any stratifiable site
def _two_site_model():
    pyro.sample("a", dist.Normal(torch.tensor([1.0, -1.0]), 2.0).to_event(1))
    pyro.sample("b", dist.Normal(0.0, 1.0))


def _a_only_model():
    pyro.sample("a", dist.Normal(torch.tensor([1.0, -1.0]), 2.0).to_event(1))


def test_autoguidelist_with_a_mixture_flow_is_stratified():
    """The stratified site may sit inside an AutoGuideList: the other guides' terms are averaged
    over the K * n draws, so with a Delta guide on ``b`` the loss is the mixture's loss minus
    log p(b0) exactly (same seed, same draws)."""
    pyro.set_rng_seed(3)
    mixture = AutoMixtureFlow(
        pyro.poutine.block(_two_site_model, expose=["a"]), num_components=3, init_spread=1.0
    )
    guides = AutoGuideList(_two_site_model)
    guides.append(mixture)
    guides.append(AutoDelta(pyro.poutine.block(_two_site_model, hide=["a"])))
    elbo = StratifiedELBO(num_particles=2)
    pyro.set_rng_seed(4)
    loss_list = elbo.loss(_two_site_model, guides)
    b0 = float(guides[1].median()["b"])
    pyro.set_rng_seed(4)
    loss_alone = StratifiedELBO(num_particles=2).loss(_a_only_model, mixture)
    log_p_b0 = float(dist.Normal(0.0, 1.0).log_prob(torch.tensor(b0)))
    assert loss_list == pytest.approx(loss_alone - log_p_b0, rel=1e-5, abs=1e-5)


# ------------------------------------------------------------ models that do not vectorize
_X = torch.linspace(-1, 1, 12).reshape(4, 3)
_Y = torch.tensor([0.3, -0.2, 0.9, 1.4])


def _matmul_model(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 2.0).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)  # x @ w: not vectorized over draws


def _broadcast_model(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 2.0).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal((x * w).sum(-1), 0.5), obs=y)


@pytest.mark.parametrize("importance_weighted", [False, True])
def test_a_model_that_does_not_vectorize_is_evaluated_draw_by_draw(importance_weighted):
    """``x @ w`` fails inside the particle plate; the ELBO then runs the model once per draw
    and gets exactly the loss of the same model written with broadcasting."""
    losses = []
    for model in (_broadcast_model, _matmul_model):
        pyro.clear_param_store()
        pyro.set_rng_seed(5)
        guide = AutoMixtureFlow(model, num_components=3, init_spread=1.0)
        elbo = StratifiedELBO(num_particles=2, importance_weighted=importance_weighted)
        pyro.set_rng_seed(6)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses.append(elbo.differentiable_loss(model, guide, _X, _Y))
        vectorize = [w for w in caught if "does not vectorize" in str(w.message)]
        assert len(vectorize) == (1 if model is _matmul_model else 0)
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6)
    assert losses[1].requires_grad


# ------------------------------------------------------- models that do not vectorize
def _unsqueezed_model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("v", dist.Normal(w.unsqueeze(0), 1.0).to_event(1), obs=torch.zeros(3))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), 0.1), obs=y)


@pytest.mark.parametrize("model", [_matmul_model, _unsqueezed_model])
def test_a_model_that_does_not_vectorize_over_particles_is_told_so(model):
    """fit() runs such a model (draw by draw) and says once how to vectorize it."""
    from pyro_mogflow import fit

    X = torch.randn(20, 3)
    y = X @ torch.tensor([1.0, -1.0, 0.5])
    pyro.clear_param_store()
    guide = AutoMixtureFlow(model, num_components=2)
    with pytest.warns(UserWarning, match=r"(?s)does not vectorize.*\(X \* w\).sum\(-1\)"):
        _, losses = fit(model, X, y, guide=guide, num_steps=2, progress=False)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_a_local_site_whose_model_does_not_vectorize_gets_the_advice():
    """Draw-by-draw evaluation serves global latents; a local (amortized) site needs a model
    that broadcasts, and the error says how to write one."""
    from pyro_mogflow import AmortizedMixtureFlow

    x = torch.randn(5, 2)
    encoder = AmortizedMixtureFlow(2, 2, num_components=2, flow=None, estimator="stratified")

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z.reshape(len(x), 2), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", len(x)):
            pyro.sample("z", encoder(x))

    with pytest.raises(RuntimeError, match=r"(?s)particles at once.*\(X \* w\).sum\(-1\)"):
        StratifiedELBO().loss(model, guide, x)
