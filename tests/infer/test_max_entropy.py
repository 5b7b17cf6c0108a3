"""fit_max_entropy: argument checks, the change of variables, and closed-form solutions.

Closed forms (exact maximum-entropy solutions): Dirichlet(1, 2, 3) on the simplex (MEFN's case),
a Gaussian from its first two moments, an exponential from its mean, and the bimodal
p(z) ∝ exp(9 z²/4 - z⁴/8) from E[z²], E[z⁴] (modes at ±3, a 10-nat trough; reference by
quadrature, benchmarks.maxent).
Training budgets here are small (the goals are checked at the full budget by
``python -m benchmarks.maxent``, whose table is in the README), so the
tolerances on the fitted law are those budgets' accuracy; tolerances on estimates of a fixed
law are multiples of their standard errors.
"""

import math

import numpy as np
import pytest
import torch
from torch.distributions import constraints

from benchmarks.maxent import evaluate, make_case
from pyro_mogflow import ESTIMATORS, MixtureFlow, fit_max_entropy
from pyro_mogflow.infer import MaxEntropyResult

stats = pytest.importorskip("scipy.stats")

TINY = dict(num_outer=1, num_inner=3, num_samples=32, num_check=256, num_eval=1024)


def _moments2(x):
    return torch.cat([x, x * x], -1)


# ---------------------------------------------------------------- argument checks, before work


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(statistic=3), TypeError, "statistic must be callable"),
        (dict(target=torch.zeros(2, 2)), ValueError, "target must have shape (M,)"),
        (dict(target=torch.zeros(0)), ValueError, "target must have shape (M,)"),
        (dict(target=torch.tensor([float("nan"), 1.0])), ValueError, "target must be finite"),
        (dict(target=torch.zeros(3)), ValueError, "statistic must map points"),
        (dict(statistic=lambda x: x.sum()), ValueError, "statistic must map points"),
        (dict(statistic=lambda x: x[:, 0]), ValueError, "statistic must map points"),
        (dict(statistic=lambda x: torch.cat([x, (x - 10).log()], -1)), ValueError, "non-finite"),
        (dict(statistic=lambda x: x.undefined()), ValueError, "statistic raised"),
        (dict(dim=0), ValueError, "dim must be an int >= 1"),
        (dict(dim=1.5), TypeError, "dim must be an int"),
        (dict(support="real"), TypeError, "support must be a torch constraint"),
        (dict(support=constraints.boolean), ValueError, "no bijection"),
        (dict(support=constraints.corr_cholesky), ValueError, "constraint on matrices"),
        (dict(support=constraints.simplex, dim=1), ValueError, "dim=1 is too small"),
        (dict(num_components=0), ValueError, "num_components must be an int >= 1"),
        (dict(num_components=True), TypeError, "num_components must be an int"),
        (dict(estimator="gumbel"), ValueError, "unknown estimator 'gumbel'"),
        (dict(flow="nope"), ValueError, "unknown flow 'nope'"),
        (dict(flow="planar"), ValueError, "forward-only"),
        (dict(flow=3), TypeError, "flow must be"),
        (dict(num_inner=0), ValueError, "num_inner must be an int >= 1"),
        (dict(lr=-1.0), ValueError, "lr must be a finite float > 0"),
        (dict(penalty_growth=0.5), ValueError, "penalty_growth"),
        (dict(average_fraction=2.0), ValueError, "average_fraction"),
        (dict(progress="yes"), TypeError, "progress must be a bool"),
        (dict(qmc=1), TypeError, "qmc must be a bool"),
        (dict(weight_step=0.0), ValueError, "weight_step must be a finite float > 0"),
    ],
)
def test_bad_arguments_raise_naming_the_argument_before_any_work(kwargs, error, words):
    args = dict(statistic=_moments2, target=torch.tensor([0.0, 1.0]), dim=1, progress=False)
    args.update({**TINY, **kwargs})
    with pytest.raises(error) as info:
        fit_max_entropy(**args)
    assert words in str(info.value)


# ---------------------------------------------------------------- the change of variables


def test_stick_breaking_log_det_is_the_measure_of_dirichlet_entropy():
    """biject_to(simplex)'s log-det is w.r.t. the first dim-1 coordinates, as Dirichlet's
    density (and so Dirichlet.entropy) is."""
    t = torch.distributions.biject_to(constraints.simplex)
    torch.manual_seed(1)
    for _ in range(5):
        y = torch.randn(3, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda v: t(v)[:3], y)
        assert torch.allclose(torch.logdet(jac), t.log_abs_det_jacobian(y, t(y)), atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "support, dim, statistic, target",
    [
        (constraints.real, 2, _moments2, [0.0, 0.0, 1.0, 1.0]),
        (constraints.positive, 1, lambda x: x, [2.0]),
        (constraints.interval(-1.0, 2.0), 1, _moments2, [0.5, 0.7]),
        (constraints.simplex, 3, torch.log, [-2.0, -1.0, -0.8]),
    ],
    ids=["real", "positive", "interval", "simplex"],
)
def test_reported_estimates_agree_with_the_distributions_own_samples(
    support, dim, statistic, target, dtype
):
    """Entropy and moments reported (randomized QMC) match plain Monte Carlo with the returned
    distribution's sample and log_prob, within 4 standard errors; samples lie in the support."""
    target = torch.tensor(target, dtype=dtype)
    res = fit_max_entropy(
        statistic, target, dim, support, num_components=3, seed=0, progress=False,
        **{**TINY, "num_eval": 8192},
    )  # fmt: skip
    assert isinstance(res, MaxEntropyResult)
    x = res.distribution.sample((20000,))
    assert x.shape == (20000, dim) and x.dtype == dtype
    assert bool(support.check(x).all())
    log_p = res.distribution.log_prob(x)
    assert log_p.dtype == dtype and bool(torch.isfinite(log_p).all())
    h, h_se = float(-log_p.mean()), float(log_p.std() / math.sqrt(len(x)))
    assert abs(h - res.entropy) < 4 * math.hypot(h_se, res.entropy_se) + 1e-4
    t = statistic(x).double()
    se = t.std(0) / math.sqrt(len(x))
    diff = (t.mean(0) - res.moments.double()).abs()
    assert bool((diff < 4 * (se**2 + res.moments_se.double() ** 2).sqrt() + 1e-4).all())
    assert res.violation == pytest.approx(
        float(((res.moments - target).abs() / target.abs().clamp(min=1)).max()), rel=1e-5
    )
    assert len(res.history) == 1 and res.entropy_se > 0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_trains_and_returns_the_exact_mixture_flow(estimator):
    res = fit_max_entropy(
        _moments2, torch.tensor([0.0, 1.0]), 1, estimator=estimator, seed=0, progress=False,
        num_components=2, **TINY,
    )  # fmt: skip
    assert isinstance(res.distribution, MixtureFlow)
    assert res.distribution.estimator == "implicit"
    assert math.isfinite(res.entropy) and len(res.losses) == 3


def test_iid_stratified_draws_train_too():
    """qmc=False takes the core's i.i.d. stratified draw (MixtureFlow.stratified_rsample)."""
    res = fit_max_entropy(
        _moments2, torch.tensor([0.0, 1.0]), 1, qmc=False, seed=0, progress=False, **TINY
    )
    assert math.isfinite(res.entropy) and len(res.losses) == 3


def test_natural_gradient_weight_steps_move_the_weights_and_keep_them_a_distribution():
    """weight_step: mirror-descent steps on the stratified mixture's log-weights (not Adam)."""
    kwargs = dict(num_components=3, init_spread=2.0, seed=0, progress=False, flow=None, **TINY)
    target = torch.tensor([0.0, 4.0])
    plain = fit_max_entropy(_moments2, target, 1, **kwargs)
    res = fit_max_entropy(_moments2, target, 1, weight_step=0.5, **kwargs)
    pi = torch.softmax(res.distribution.logits, -1)
    assert float(pi.sum()) == pytest.approx(1.0) and bool((pi >= 0.999e-6).all())
    # Same draws and Adam steps for the rest; only the weight update differs.
    moved = (pi - torch.softmax(plain.distribution.logits, -1)).abs().max()
    assert float(moved) > 1e-3
    # Ignored (Adam on the logits) where there is no exact expectation over the components.
    other = fit_max_entropy(_moments2, target, 1, weight_step=0.5, estimator="implicit", **kwargs)
    assert math.isfinite(other.entropy)


def test_sobol_initial_means_cover_every_quadrant_evenly():
    from pyro_mogflow.infer.max_entropy import _MaxEntFlow

    torch.manual_seed(0)
    for _ in range(5):
        locs = _MaxEntFlow(8, 2, None, 3.0, torch.float64, sobol=True).locs.detach()
        quadrant = (locs[:, 0] > 0).long() * 2 + (locs[:, 1] > 0).long()
        assert torch.bincount(quadrant, minlength=4).tolist() == [2, 2, 2, 2]
    res = fit_max_entropy(
        _moments2, torch.tensor([0.0, 4.0]), 1, num_components=4, init_spread=2.0,
        init_sobol=True, seed=0, progress=False, **TINY,
    )  # fmt: skip
    assert math.isfinite(res.entropy)


def test_progress_bar_and_bare_mixture(capsys):
    res = fit_max_entropy(
        _moments2, torch.tensor([0.0, 1.0]), 1, flow=None, progress=True, seed=0, **TINY
    )
    assert "max-entropy" in capsys.readouterr().err
    assert list(res.module.parameters())[0].requires_grad is False


# ---------------------------------------------------------------- closed forms

#: A small budget for the tests (the benchmark uses num_outer=10, num_inner=100, 512 samples).
SMALL = dict(num_outer=6, num_inner=60, num_samples=256, num_eval=32768)


def _check_closed_form(name, tol_entropy, tol_violation, **kwargs):
    case = make_case(name)
    res = fit_max_entropy(
        case.statistic, case.target, case.dim, case.support, seed=0, progress=False,
        **{**SMALL, **kwargs},
    )  # fmt: skip
    out = evaluate(case, res, num_ks=1000)
    # The fitted law is as close as the budget allows; the estimate adds 4 SE at most.
    assert abs(out["entropy_error"]) < tol_entropy + 4 * res.entropy_se, out
    assert out["violation"] < tol_violation, out
    # KS on 1000 draws of the first coordinate against the exact law.
    assert out["ks_p"] > 1e-3, out
    return out


def test_exponential_from_its_mean():
    _check_closed_form("exponential", 0.03, 0.02, num_components=4, num_flows=1)


def test_gaussian_from_first_and_second_moments():
    case = make_case("gaussian")
    assert case.entropy == pytest.approx(3.1177, abs=1e-4)
    _check_closed_form("gaussian", 0.03, 0.02, num_components=2, num_flows=1)


def test_dirichlet_of_mefn_from_expected_logs():
    case = make_case("dirichlet")
    assert case.entropy == pytest.approx(-1.2443, abs=1e-4)
    _check_closed_form("dirichlet", 0.05, 0.02, num_components=4, num_flows=1)


def test_bimodal_reference_by_quadrature_is_self_consistent():
    """The quadrature's moments satisfy the exponential-family identity d log Z / d eta = b."""
    from benchmarks.maxent import LAMBDA2, LAMBDA4, bimodal_reference

    ref, eps = bimodal_reference(), 1e-5
    up, down = bimodal_reference(lam2=LAMBDA2 + eps), bimodal_reference(lam2=LAMBDA2 - eps)
    assert (up["log_z"] - down["log_z"]) / (2 * eps) == pytest.approx(ref["m2"], rel=1e-6)
    up, down = bimodal_reference(lam4=LAMBDA4 + eps), bimodal_reference(lam4=LAMBDA4 - eps)
    assert (up["log_z"] - down["log_z"]) / (2 * eps) == pytest.approx(ref["m4"], rel=1e-6)
    # H = log Z - eta . b
    assert ref["entropy"] == pytest.approx(ref["log_z"] - LAMBDA2 * ref["m2"] - LAMBDA4 * ref["m4"])


def test_bimodal_target_is_well_separated_with_a_deep_trough():
    """Modes at ±3, trough more than 10 nats below the peaks: a mass split across a trough."""
    from benchmarks.maxent import LAMBDA2, LAMBDA4, bimodal_reference

    assert LAMBDA2 > 0 > LAMBDA4
    ref = bimodal_reference()
    z, cdf = ref["grid"], ref["cdf"]
    log_p = LAMBDA2 * z**2 + LAMBDA4 * z**4 - ref["log_z"]
    assert abs(abs(z[log_p.argmax()]) - 3.0) < 1e-3
    assert log_p.max() - log_p[len(z) // 2] > 10.0
    # mass between -1 and 1 is negligible; each half holds one half of the mass
    assert float(np.interp(1.0, z, cdf) - np.interp(-1.0, z, cdf)) < 1e-3
    assert float(np.interp(0.0, z, cdf)) == pytest.approx(0.5, abs=1e-9)
