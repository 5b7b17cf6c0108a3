import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats

import pyro_mogflow.distributions.mixture as mixture_module
from pyro_mogflow import AutoMixtureFlow, DiagNormalMixture
from pyro_mogflow.distributions.mixture import implicit_mixture_rsample, mixture_rosenblatt

DTYPES = [torch.float32, torch.float64]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


def _params(batch=(), k=3, d=2, dtype=torch.float64, seed=0, spread=2.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = 0.5 * torch.randn(batch + (k,), generator=g, dtype=torch.float64)
    locs = spread * torch.randn(batch + (k, d), generator=g, dtype=torch.float64)
    scales = 0.5 + torch.rand(batch + (k, d), generator=g, dtype=torch.float64)
    return tuple(t.to(dtype=dtype, device=device) for t in (logits, locs, scales))


def _z_threshold(num_entries: int, level: float = 1e-3) -> float:
    """Two-sided normal quantile with a Bonferroni correction over ``num_entries`` tests."""
    return float(stats.norm.isf(level / (2 * num_entries)))


# --------------------------------------------------------------------------- shapes and basics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
@pytest.mark.parametrize("d", [1, 3])
def test_shapes_dtype_device(batch, d, dtype, device):
    q = DiagNormalMixture(*_params(batch, d=d, dtype=dtype, device=device))
    assert q.batch_shape == batch and q.event_shape == (d,) and q.has_rsample
    for draw in (q.sample((5,)), q.rsample((5,))):
        assert draw.shape == (5,) + batch + (d,)
        assert draw.dtype == dtype and draw.device.type == device
    lp = q.log_prob(q.sample((5,)))
    assert lp.shape == (5,) + batch and lp.dtype == dtype and torch.isfinite(lp).all()
    assert q.mean.shape == batch + (d,) and q.variance.shape == batch + (d,)


def test_expand_keeps_the_law():
    q = DiagNormalMixture(*_params())
    e = q.expand((4, 2))
    assert e.batch_shape == (4, 2) and e.event_shape == (2,)
    x = e.rsample((3,))
    assert x.shape == (3, 4, 2, 2)
    assert torch.allclose(e.log_prob(x), q.log_prob(x))
    assert torch.allclose(e.mean, q.mean.expand(4, 2, 2))


def test_broadcast_scales():
    logits, locs, _ = _params((2,))
    q = DiagNormalMixture(logits, locs, torch.tensor(0.7, dtype=locs.dtype).expand(1, 1))
    assert q.scales.shape == locs.shape and q.batch_shape == (2,)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_prob_matches_scipy(dtype):
    logits, locs, scales = _params((), k=4, d=3, dtype=dtype)
    q = DiagNormalMixture(logits, locs, scales)
    x = 3 * torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.softmax(logits.double(), -1).numpy()
    dens = sum(
        w[k]
        * stats.multivariate_normal(
            locs[k].double().numpy(), np.diag(scales[k].double().numpy() ** 2)
        ).pdf(x.numpy())
        for k in range(4)
    )
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(q.log_prob(x.to(dtype)).double().numpy(), np.log(dens), rtol=rtol)


# ----------------------------------------------------------------------------- sampled law
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_moments_match_mean_and_variance(dtype):
    torch.manual_seed(0)
    q = DiagNormalMixture(*_params((), k=3, d=2, dtype=dtype))
    n = 40000
    x = q.sample((n,)).double()
    mean, var = q.mean.double(), q.variance.double()
    se_mean = (var / n).sqrt()
    centred = x - x.mean(0)
    s2 = centred.pow(2).mean(0)
    se_var = ((centred.pow(4).mean(0) - s2.pow(2)) / n).sqrt()
    tol = _z_threshold(4)
    assert ((x.mean(0) - mean).abs() / se_mean).max() < tol
    assert ((x.var(0) - var).abs() / se_var).max() < tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_rosenblatt_of_samples_is_uniform(dtype):
    torch.manual_seed(1)
    q = DiagNormalMixture(*_params((), k=3, d=3, dtype=dtype, spread=3.0))
    u = q.cdf_rosenblatt(q.sample((4000,))).double().numpy()
    for j in range(3):
        assert stats.kstest(u[:, j], "uniform").pvalue > 1e-3


def test_disabled_component_is_never_drawn():
    torch.manual_seed(2)
    logits = torch.tensor([0.0, -math.inf, 0.0])
    locs = torch.tensor([[-5.0], [100.0], [5.0]])
    scales = torch.ones(3, 1)
    params = [t.clone().requires_grad_() for t in (logits, locs, scales)]
    z = DiagNormalMixture(*params).rsample((2000,))
    assert z.abs().max() < 20
    grads = torch.autograd.grad(z.pow(2).sum(), params)
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0][1] == 0


# ---------------------------------------------------------------------- implicit gradients
@pytest.mark.parametrize("d", [1, 2, 4])
def test_implicit_gradient_solves_the_rosenblatt_system(d):
    """The closed-form backward equals -J_z^{-1} dF/dtheta built with autograd jacobians."""
    torch.manual_seed(3)
    logits, locs, scales = _params((), k=3, d=d)
    params = [t.clone().requires_grad_() for t in (logits, locs, scales)]
    z = DiagNormalMixture(*params).rsample()
    g = torch.randn(d, dtype=z.dtype)
    mine = torch.autograd.grad((g * z).sum(), params)
    z0 = z.detach()
    jz = torch.autograd.functional.jacobian(lambda v: mixture_rosenblatt(v, *params), z0)
    jt = torch.autograd.functional.jacobian(
        lambda a, b, c: mixture_rosenblatt(z0, a, b, c), (logits, locs, scales)
    )
    v = torch.linalg.solve(jz.T, g)
    for ours, jac in zip(mine, jt):
        ref = -torch.tensordot(v, jac, dims=1)
        torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-10)


def test_implicit_gradient_keeps_rosenblatt_coordinates_fixed():
    """Moving theta along the implicit direction leaves u = F(z(theta); theta) unchanged."""
    torch.manual_seed(4)
    logits, locs, scales = _params((), k=3, d=3)
    direction = [torch.randn_like(t) for t in (logits, locs, scales)]
    z = DiagNormalMixture(logits, locs, scales).sample()

    def z_of(t):
        params = [(p + t * dp).requires_grad_() for p, dp in zip((logits, locs, scales), direction)]
        return params, implicit_mixture_rsample(z, *params)

    params, zt = z_of(0.0)
    dz = torch.stack(
        [
            sum(
                (gr * dp).sum()
                for gr, dp in zip(torch.autograd.grad(zt[j], params, retain_graph=True), direction)
            )
            for j in range(3)
        ]
    )
    h = 1e-6
    u_plus = mixture_rosenblatt(z + h * dz, *(p + h * dp for p, dp in zip(params, direction)))
    u_minus = mixture_rosenblatt(z - h * dz, *(p - h * dp for p, dp in zip(params, direction)))
    assert ((u_plus - u_minus) / (2 * h)).abs().max() < 1e-6


def test_chunked_solve_matches_single_solve(monkeypatch):
    torch.manual_seed(5)
    logits, locs, scales = _params((), k=4, d=5)
    z = DiagNormalMixture(logits, locs, scales).sample((7,))
    g = torch.randn(7, 5, dtype=z.dtype)

    def grads():
        params = [t.clone().requires_grad_() for t in (logits, locs, scales)]
        return torch.autograd.grad((g * implicit_mixture_rsample(z, *params)).sum(), params)

    whole = grads()
    monkeypatch.setattr(mixture_module, "_MAX_SYSTEM_NUMEL", 2 * 25)
    for a, b in zip(whole, grads()):
        torch.testing.assert_close(a, b)


def _closed_forms():
    a = torch.tensor([0.3, -0.2, 0.25], dtype=torch.float64)

    def exp_linear(logits, locs, scales):
        av = a[: locs.shape[-1]]
        log_terms = (locs * av).sum(-1) + 0.5 * (scales * av).pow(2).sum(-1)
        return torch.logsumexp(torch.log_softmax(logits, -1) + log_terms, -1).exp()

    return {
        # non-separable across coordinates: Pyro's pathwise logits gradient is biased here
        "z1*z2": (
            lambda z: z[..., 0] * z[..., 1],
            lambda lg, mu, sd: (torch.softmax(lg, -1) * mu[..., 0] * mu[..., 1]).sum(-1),
        ),
        "exp(a.z)": (lambda z: torch.exp((z * a[: z.shape[-1]].to(z.dtype)).sum(-1)), exp_linear),
        "|z|^2": (
            lambda z: z.pow(2).sum(-1),
            lambda lg, mu, sd: (torch.softmax(lg, -1) * (mu.pow(2) + sd.pow(2)).sum(-1)).sum(-1),
        ),
    }


def _finite_difference_gradient(expectation, params, h=1e-5):
    out = []
    for i, p in enumerate(params):
        grad = torch.zeros_like(p)
        for idx in np.ndindex(*p.shape):
            up = [q.clone() for q in params]
            down = [q.clone() for q in params]
            up[i][idx] += h
            down[i][idx] -= h
            grad[idx] = (expectation(*up) - expectation(*down)) / (2 * h)
        out.append(grad)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["z1*z2", "exp(a.z)", "|z|^2"])
def test_implicit_gradient_is_unbiased_against_finite_differences(name, dtype):
    """Mean of R independent gradient estimates vs the finite-difference gradient of the
    closed-form expectation; tolerance from the measured standard error (Bonferroni 1e-3)."""
    f, expectation = _closed_forms()[name]
    torch.manual_seed(6)
    base = _params((), k=3, d=3, spread=1.5)
    exact = _finite_difference_gradient(expectation, base)
    reps, n = 500, 32
    params = [t.to(dtype).expand((reps,) + t.shape).clone().requires_grad_() for t in base]
    z = DiagNormalMixture(*params).rsample((n,))  # (n, reps, D)
    grads = torch.autograd.grad(f(z).mean(0).sum(), params)
    entries = sum(t.numel() for t in base)
    worst = 0.0
    for g, ref in zip(grads, exact):
        g = g.double()
        se = g.std(0) / math.sqrt(reps)
        # logits gradients sum to zero, so one entry can have SE 0 only if all do
        z_scores = (g.mean(0) - ref).abs() / se.clamp(min=1e-12)
        worst = max(worst, float(z_scores.max()))
    assert worst < _z_threshold(entries), worst


def test_pathwise_baseline_is_biased_where_implicit_is_not():
    """The same statistic flags Pyro's pathwise logits gradient on f = z1*z2 (findings.md)."""
    f, expectation = _closed_forms()["z1*z2"]
    torch.manual_seed(7)
    base = _params((), k=3, d=3, spread=1.5)
    exact = _finite_difference_gradient(expectation, base)[0]
    reps, n = 200, 64
    logits, locs, scales = (t.expand((reps,) + t.shape).clone().requires_grad_() for t in base)
    z = dist.MixtureOfDiagNormals(locs, scales, logits).rsample((n,))
    g = torch.autograd.grad(f(z).mean(0).sum(), logits)[0]
    z_scores = (g.mean(0) - exact).abs() / (g.std(0) / math.sqrt(reps))
    assert z_scores.max() > _z_threshold(base[0].numel())


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("device", DEVICES)
def test_float32_finite_at_d1000_k32(device):
    torch.manual_seed(8)
    k, d = 32, 1000
    logits = torch.randn(k, device=device).requires_grad_()
    locs = torch.randn(k, d, device=device).requires_grad_()
    scales = torch.full((k, d), 0.1, device=device).requires_grad_()
    q = DiagNormalMixture(logits, locs, scales)
    z = q.rsample((4,))
    loss = (z - 0.5).pow(2).sum() - q.log_prob(z).sum()
    grads = torch.autograd.grad(loss, (logits, locs, scales))
    assert torch.isfinite(loss)
    for g in grads:
        assert g.dtype == torch.float32 and g.device.type == device and torch.isfinite(g).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_gradient_matches_cpu(dtype):
    torch.manual_seed(12)
    base = _params((), k=4, d=6, dtype=dtype)
    z = DiagNormalMixture(*base).sample((16,))
    g = torch.randn(16, 6, dtype=dtype)
    out = {}
    for device in ("cpu", "cuda"):
        params = [t.to(device).requires_grad_() for t in base]
        zz = implicit_mixture_rsample(z.to(device), *params)
        out[device] = torch.autograd.grad((zz * g.to(device)).sum(), params)
    # the two devices solve the triangular systems in different orders: rounding differs
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    for a, b in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(b.cpu(), a, rtol=rtol, atol=rtol * float(a.abs().max()))


def test_float32_gradient_agrees_with_float64_at_d1000():
    torch.manual_seed(9)
    k, d = 32, 1000
    base = (torch.randn(k).double(), torch.randn(k, d).double(), torch.full((k, d), 0.5).double())
    z = DiagNormalMixture(*base).sample((2,))
    g = torch.randn(2, d, dtype=torch.float64)
    out = {}
    for dtype in DTYPES:
        params = [t.to(dtype).requires_grad_() for t in base]
        zz = implicit_mixture_rsample(z.to(dtype), *params)
        out[dtype] = torch.autograd.grad((zz * g.to(dtype)).sum(), params)
    for a, b in zip(out[torch.float32], out[torch.float64]):
        assert (a.double() - b).norm() <= 1e-3 * b.norm()


@pytest.mark.parametrize("dtype", DTYPES)
def test_coinciding_means_give_finite_gradients(dtype):
    torch.manual_seed(10)
    logits = torch.tensor([0.2, -0.1], dtype=dtype).requires_grad_()
    locs = torch.zeros(2, 3, dtype=dtype).requires_grad_()
    scales = torch.ones(2, 3, dtype=dtype).requires_grad_()
    z = DiagNormalMixture(logits, locs, scales).rsample((500,))
    grads = torch.autograd.grad(z.pow(2).sum(), (logits, locs, scales))
    assert all(torch.isfinite(g).all() for g in grads)
    # identical components: the weights cannot matter
    assert grads[0].abs().max() < 1e-4 * grads[2].abs().max()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "args, error, match",
    [
        (([0.0, 0.0], torch.zeros(2, 1), torch.ones(2, 1)), TypeError, "logits"),
        ((torch.zeros(2), torch.zeros(3, 1), torch.ones(3, 1)), ValueError, "K=2"),
        ((torch.zeros(2), torch.zeros(2, 1), -torch.ones(2, 1)), ValueError, "scales"),
        ((torch.zeros(2), torch.zeros(2, 1), torch.ones(2, 1).double()), TypeError, "dtype"),
        ((torch.zeros(2, dtype=torch.long), torch.zeros(2, 1), torch.ones(2, 1)), TypeError, "f"),
        ((torch.full((2,), -math.inf), torch.zeros(2, 1), torch.ones(2, 1)), ValueError, "-inf"),
        ((torch.zeros(2), torch.tensor([[math.nan], [0.0]]), torch.ones(2, 1)), ValueError, "locs"),
    ],
)
def test_bad_input_raises(args, error, match):
    with pytest.raises(error, match=match):
        DiagNormalMixture(*args)


def test_inputs_are_not_mutated():
    params = _params((), k=3, d=2)
    copies = [t.clone() for t in params]
    q = DiagNormalMixture(*[t.clone().requires_grad_() for t in params])
    q.log_prob(q.rsample((3,))).sum().backward()
    for a, b in zip(params, copies):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- with the guide
@pytest.mark.parametrize("vectorize", [False, True])
def test_guide_trains_with_trace_elbo(vectorize):
    pyro.clear_param_store()
    pyro.set_rng_seed(11)

    def model():
        x = pyro.sample("x", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
        pyro.sample("obs", dist.Normal(x.sum(-1), 1.0), obs=torch.tensor(1.0))

    guide = AutoMixtureFlow(model, num_components=3, flow=None, estimator="implicit")
    elbo = pyro.infer.Trace_ELBO(num_particles=4, vectorize_particles=vectorize)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    svi.step()
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    losses = [svi.step() for _ in range(3)]
    assert all(math.isfinite(x) for x in losses)
    for name, value in pyro.get_param_store().items():
        assert not torch.equal(before[name], value.detach()), name


# ------------------------------------------------------------ traceable implicit sampler
@pytest.mark.parametrize(
    "batch, k, d, sample, disabled",
    [
        ((), 3, 1, (5,), False),
        ((), 3, 4, (7,), False),
        ((2,), 4, 3, (6,), False),
        ((2, 3), 2, 5, (), False),
        ((), 3, 3, (4,), True),
    ],
)
def test_traceable_sampler_matches_the_custom_function_reference(batch, k, d, sample, disabled):
    """The standard-ops surrogate gives the first implementation's values and gradients."""
    from .implicit_reference import reference_implicit_rsample

    torch.manual_seed(13)
    logits, locs, scales = _params(batch, k=k, d=d)
    if disabled:
        logits[..., 1] = -math.inf
    z = DiagNormalMixture(logits, locs, scales).sample(sample)
    g = torch.randn(z.shape, dtype=z.dtype)
    out = []
    for f in (implicit_mixture_rsample, reference_implicit_rsample):
        params = [t.clone().requires_grad_() for t in (logits, locs, scales)]
        zz = f(z, *params)
        out.append((zz, *torch.autograd.grad((g * zz).sum(), params)))
    assert torch.equal(out[0][0], z)  # the value is the exact draw, bit for bit
    for ours, ref in zip(out[0], out[1]):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("d", [1, 3])
def test_implicit_rsample_can_be_traced_by_torch_jit(d):
    torch.manual_seed(14)
    base = _params((), k=3, d=d)
    z = DiagNormalMixture(*base).sample((8,))

    def grads(fn, params):
        zz = fn(z, *params)
        return (zz, *torch.autograd.grad(zz.pow(2).sum(), params))

    params = [t.clone().requires_grad_() for t in base]
    traced = torch.jit.trace(implicit_mixture_rsample, (z, *params), check_trace=False)
    fresh = [t.clone().requires_grad_() for t in base]
    for a, b in zip(grads(traced, fresh), grads(implicit_mixture_rsample, params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ marginal quantiles
@pytest.mark.parametrize("dtype", DTYPES)
def test_marginal_quantiles_invert_each_coordinate_cdf(dtype):
    logits, locs, scales = _params((2,), k=4, d=3, dtype=dtype)
    levels = torch.tensor([0.0, 0.01, 0.3, 0.5, 0.9, 1.0])
    q = mixture_module.mixture_marginal_quantiles(levels, logits, locs, scales)
    assert q.shape == (6, 2, 3) and q.dtype == dtype
    assert bool((q[0] == -math.inf).all()) and bool((q[-1] == math.inf).all())
    w = torch.softmax(logits.double(), -1).unsqueeze(-1)
    x = q[1:-1].double().unsqueeze(-2)
    cdf = (w * torch.special.ndtr((x - locs.double()) / scales.double())).sum(-2)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(
        cdf, levels[1:-1].double().reshape(-1, 1, 1).expand_as(cdf), rtol=0, atol=tol
    )
