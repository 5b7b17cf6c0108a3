import math

import numpy as np
import pytest
import torch
from scipy import stats

from pyro_mogflow.distributions import RelaxedMixtureOfDiagNormals, mixture_log_prob

DTYPES = [torch.float32, torch.float64]


def _params(batch=(), k=3, d=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch + (k,), generator=g, dtype=dtype)
    locs = 3 * torch.randn(batch + (k, d), generator=g, dtype=dtype)
    scales = 0.5 + torch.rand(batch + (k, d), generator=g, dtype=dtype)
    return logits, locs, scales


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
@pytest.mark.parametrize("density", ["exact", "nested"])
def test_shapes(batch, density, dtype):
    d = RelaxedMixtureOfDiagNormals(*_params(batch, dtype=dtype), 0.5, density=density)
    assert d.batch_shape == batch and d.event_shape == (2,)
    x = d.rsample((5,))
    assert x.shape == (5,) + batch + (2,) and x.dtype == dtype
    lp = d.log_prob(x)
    assert lp.shape == (5,) + batch and lp.dtype == dtype
    assert torch.isfinite(lp).all()


@pytest.mark.parametrize("density", ["exact", "nested"])
def test_expand(density):
    d = RelaxedMixtureOfDiagNormals(*_params(), 0.5, density=density, num_nested=7)
    e = d.expand((4, 2))
    assert e.batch_shape == (4, 2) and e.density == density and e.num_nested == 7
    x = e.rsample((3,))
    assert x.shape == (3, 4, 2, 2)
    assert e.log_prob(x).shape == (3, 4, 2)
    if density == "exact":
        assert torch.allclose(e.log_prob(x), d.log_prob(x))


def test_temperature_per_row_never_gives_square_log_prob():
    logits, locs, scales = _params((6,))
    tau = torch.full((6, 1), 0.5, dtype=logits.dtype)
    d = RelaxedMixtureOfDiagNormals(logits, locs, scales, tau)
    assert d.batch_shape == (6,)
    assert d.log_prob(d.rsample()).shape == (6,)
    tau_vec = torch.linspace(0.1, 1.0, 6, dtype=logits.dtype)
    assert RelaxedMixtureOfDiagNormals(logits, locs, scales, tau_vec).batch_shape == (6,)


def test_exact_log_prob_matches_scipy():
    logits, locs, scales = _params((), k=4, d=3)
    d = RelaxedMixtureOfDiagNormals(logits, locs, scales, 0.3)
    x = torch.randn(10, 3, dtype=torch.float64) * 3
    w = torch.softmax(logits, -1).numpy()
    ref = np.zeros(10)
    for k in range(4):
        ref += w[k] * stats.multivariate_normal(
            locs[k].numpy(), np.diag(scales[k].numpy() ** 2)
        ).pdf(x.numpy())
    np.testing.assert_allclose(d.log_prob(x).numpy(), np.log(ref), rtol=1e-10)


def test_one_component_is_a_normal_in_both_densities():
    logits, locs, scales = _params((), k=1, d=3)
    x = torch.randn(7, 3, dtype=torch.float64)
    ref = torch.distributions.Normal(locs[0], scales[0]).log_prob(x).sum(-1)
    for density in ("exact", "nested"):
        d = RelaxedMixtureOfDiagNormals(logits, locs, scales, 0.7, density=density)
        assert torch.allclose(d.log_prob(x), ref, atol=1e-10)


def test_nested_estimate_is_unbiased_for_relaxed_density_and_biased_low_in_log():
    # exp(log q_hat) is an unbiased estimate of the relaxed density; log q_hat is biased low.
    torch.manual_seed(0)
    logits, locs, scales = _params((), k=3, d=1, seed=3)
    z = torch.tensor([[0.3]], dtype=torch.float64)
    big = RelaxedMixtureOfDiagNormals(
        logits, locs, scales, 0.5, density="nested", num_nested=400_000
    )
    reference = big.log_prob(z).exp().item()  # its own SE is ~100x smaller than below
    small = RelaxedMixtureOfDiagNormals(logits, locs, scales, 0.5, density="nested", num_nested=4)
    draws = torch.stack([small.log_prob(z) for _ in range(4000)]).squeeze()
    lin = draws.exp()
    se = lin.std().item() / math.sqrt(len(lin))
    assert abs(lin.mean().item() - reference) < 4 * se
    log_se = draws.std().item() / math.sqrt(len(draws))
    assert draws.mean().item() < math.log(reference) - 2 * log_se  # Jensen: biased low


def test_small_temperature_samples_are_mixture_samples():
    # At tau -> 0 the relaxed one-hot is one-hot, so samples follow the mixture exactly.
    torch.manual_seed(1)
    logits, locs, scales = _params((), k=3, d=2, seed=5)
    d = RelaxedMixtureOfDiagNormals(logits, locs, scales, 1e-3)
    x = d.rsample((40_000,))
    se_mean = d.mixture_variance.sqrt() / math.sqrt(len(x))
    assert ((x.mean(0) - d.mixture_mean).abs() < 4 * se_mean).all()
    # variance: SE of a sample variance from the fourth central moment
    c = x - x.mean(0)
    se_var = ((c.pow(4).mean(0) - c.pow(2).mean(0).pow(2)) / len(x)).sqrt()
    assert ((x.var(0) - d.mixture_variance).abs() < 4 * se_var).all()


def test_equal_components_give_exact_normal_moments_at_any_temperature():
    torch.manual_seed(2)
    locs = torch.tensor([[1.0, -2.0]] * 4, dtype=torch.float64)
    scales = torch.tensor([[0.5, 2.0]] * 4, dtype=torch.float64)
    d = RelaxedMixtureOfDiagNormals(torch.randn(4, dtype=torch.float64), locs, scales, 1.0)
    x = d.rsample((40_000,))
    se = scales[0] / math.sqrt(len(x))
    assert ((x.mean(0) - locs[0]).abs() < 4 * se).all()


def test_log_prob_gradients_match_finite_differences():
    logits, locs, scales = (p.clone().requires_grad_() for p in _params((), k=3, d=2))
    x = torch.randn(5, 2, dtype=torch.float64)

    def f(lg, lc, sc):
        return RelaxedMixtureOfDiagNormals(lg, lc, sc, 0.5).log_prob(x)

    assert torch.autograd.gradcheck(f, (logits, locs, scales))


@pytest.mark.parametrize("density", ["exact", "nested"])
def test_rsample_and_nested_log_prob_gradients_match_finite_differences(density):
    logits, locs, scales = (p.clone().requires_grad_() for p in _params((), k=3, d=2))

    def f(lg, lc, sc):
        torch.manual_seed(11)  # the same noise on every call: a deterministic function
        d = RelaxedMixtureOfDiagNormals(lg, lc, sc, 0.5, density=density, num_nested=5)
        x = d.rsample((4,))
        return x, d.log_prob(x)

    assert torch.autograd.gradcheck(f, (logits, locs, scales))


@pytest.mark.parametrize("density", ["exact", "nested"])
def test_float32_finite_at_d1000_k32_tau001(density):
    torch.manual_seed(0)
    k, d = 32, 1000
    logits = torch.randn(k).requires_grad_()
    locs = (3 * torch.randn(k, d)).requires_grad_()
    scales = (0.01 + torch.rand(k, d)).requires_grad_()
    dist = RelaxedMixtureOfDiagNormals(logits, locs, scales, 0.01, density=density, num_nested=8)
    x = dist.rsample((16,))
    lp = dist.log_prob(x)
    assert torch.isfinite(x).all() and torch.isfinite(lp).all()
    (lp.sum() + x.sum()).backward()
    for p in (logits, locs, scales):
        assert torch.isfinite(p.grad).all()


def test_does_not_mutate_inputs():
    logits, locs, scales = _params((2,))
    copies = [p.clone() for p in (logits, locs, scales)]
    d = RelaxedMixtureOfDiagNormals(logits, locs, scales, 0.5, density="nested")
    d.log_prob(d.rsample((3,)))
    d.expand((5, 2))
    for p, c in zip((logits, locs, scales), copies):
        assert torch.equal(p, c)


def test_mixture_log_prob_is_the_shared_density():
    logits, locs, scales = _params((), k=2, d=2)
    x = torch.randn(3, 2, dtype=torch.float64)
    d = RelaxedMixtureOfDiagNormals(logits, locs, scales, 0.5)
    assert torch.equal(d.log_prob(x), mixture_log_prob(x, logits, locs, scales))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(density="sloppy"), ValueError, "density"),
        (dict(num_nested=0), ValueError, "num_nested"),
        (dict(num_nested=2.5), TypeError, "num_nested"),
        (dict(locs=torch.zeros(4, 2, dtype=torch.float64)), ValueError, "locs"),
        (dict(scales=-torch.ones(3, 2, dtype=torch.float64)), ValueError, "scales"),
        (dict(locs=torch.zeros(3, 2)), TypeError, "dtype"),
        (dict(logits=[0.0, 0.0, 0.0]), TypeError, "logits"),
        (dict(locs=torch.full((3, 2), float("nan"), dtype=torch.float64)), ValueError, "locs"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    logits, locs, scales = _params((), k=3, d=2)
    args = dict(logits=logits, locs=locs, scales=scales, temperature=0.5)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        RelaxedMixtureOfDiagNormals(**args)


def test_temperature_that_does_not_broadcast_raises():
    logits, locs, scales = _params((2,))
    with pytest.raises(ValueError, match="temperature"):
        RelaxedMixtureOfDiagNormals(logits, locs, scales, torch.ones(5, dtype=logits.dtype))


@pytest.mark.parametrize("temperature", [math.inf, -math.inf, math.nan, 0.0])
def test_non_finite_or_non_positive_temperature_is_refused(temperature):
    logits, locs, scales = torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        RelaxedMixtureOfDiagNormals(logits, locs, scales, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        RelaxedMixtureOfDiagNormals(
            logits, locs, scales, temperature=torch.tensor([1.0, temperature])[1]
        )


@pytest.mark.parametrize("scale", [-1.0, 0.0, math.nan])
def test_mixture_log_prob_refuses_non_positive_scales(scale):
    logits, locs = torch.zeros(2), torch.zeros(2, 3)
    scales = torch.ones(2, 3)
    scales[1, 2] = scale
    with pytest.raises(ValueError, match="scales must be positive"):
        mixture_log_prob(torch.zeros(5, 3), logits, locs, scales)


def test_mixture_log_prob_is_not_checked_inside_a_trace():
    logits, locs, scales = torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 3)
    traced = torch.jit.trace(
        lambda z, s: mixture_log_prob(z, logits, locs, s), (torch.zeros(5, 3), scales)
    )
    assert torch.allclose(
        traced(torch.ones(5, 3), scales), mixture_log_prob(torch.ones(5, 3), logits, locs, scales)
    )


@pytest.mark.parametrize("num_nested", [4, np.int64(4), np.int32(4)])
def test_num_nested_takes_numpy_integers_like_every_other_count(num_nested):
    d = RelaxedMixtureOfDiagNormals(
        torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 3), density="nested", num_nested=num_nested
    )
    assert d.num_nested == 4 and type(d.num_nested) is int


@pytest.mark.parametrize(
    "num_nested, error",
    [(True, TypeError), (np.bool_(True), TypeError), (0, ValueError), (2.0, TypeError)],
)
def test_num_nested_refuses_bools_and_non_integers(num_nested, error):
    with pytest.raises(error, match="num_nested must be an int"):
        RelaxedMixtureOfDiagNormals(
            torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 3), num_nested=num_nested
        )
