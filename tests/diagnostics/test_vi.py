"""Tests for pyro_mogflow.diagnostics.vi: evidence, warnings and the multi-run check."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_sample
from torch.distributions import transform_to

from pyro_mogflow import AutoMixtureFlow, fit_independent, to_inference_data, vi_diagnostics
from pyro_mogflow.diagnostics.groups import _as_datatree
from pyro_mogflow.diagnostics.importance import psis
from pyro_mogflow.diagnostics.vi import MISSED_MODES_WARNING, VIDiagnosticsWarning

az = pytest.importorskip("arviz")

DTYPES = [torch.float32, torch.float64]


def _set_param(module, name, value):
    """Set a (Pyro)parameter of a set-up guide to a constrained value, in place."""
    with torch.no_grad():
        if name in module._pyro_params:
            constraint = module._pyro_params[name][0]
            target = getattr(module, name + "_unconstrained")
            target.copy_(transform_to(constraint).inv(value.to(target.dtype)))
        else:
            target = getattr(module, name)
            target.copy_(value.to(target.dtype))


# ----------------------------------------------------------- evidence of a conjugate model
M0, S0, SIGMA, A, B = 0.5, 2.0, 1.0, 2.0, 1.0


def conjugate_model(y, k):
    """mu ~ N(M0, S0), y_i ~ N(mu, SIGMA); lam ~ Gamma(A, B), k_j ~ Poisson(lam)."""

    def t(v):
        return torch.tensor(v, dtype=y.dtype)

    mu = pyro.sample("mu", dist.Normal(t(M0), t(S0)))
    lam = pyro.sample("lam", dist.Gamma(t(A), t(B)))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, t(SIGMA)), obs=y)
    with pyro.plate("counts", k.shape[0]):
        pyro.sample("k", dist.Poisson(lam), obs=k)


def _conjugate_data(dtype):
    g = torch.Generator().manual_seed(0)
    y = 1.0 + SIGMA * torch.randn(10, generator=g, dtype=torch.float64)
    k = torch.poisson(torch.full((20,), 3.0, dtype=torch.float64), generator=g)
    return y.to(dtype), k.to(dtype)


def _conjugate_truth(y, k):
    """log p(y, k) in closed form, and the posterior of (mu, log lam) as (mean, sd) pairs."""
    y, k = y.double(), k.double()
    n, m = y.numel(), k.numel()
    cov = SIGMA**2 * torch.eye(n, dtype=torch.float64) + S0**2
    log_z = dist.MultivariateNormal(torch.full((n,), M0, dtype=torch.float64), cov).log_prob(y)
    alpha, beta = A + k.sum(), B + m
    log_z = log_z + A * math.log(B) - math.lgamma(A) + torch.lgamma(alpha)
    log_z = log_z - alpha * math.log(beta) - torch.lgamma(k + 1).sum()
    prec = 1 / S0**2 + n / SIGMA**2
    mu = ((M0 / S0**2 + y.sum() / SIGMA**2) / prec, prec**-0.5)
    log_lam = (torch.digamma(alpha) - math.log(beta), torch.polygamma(1, alpha).sqrt())
    return float(log_z), mu, log_lam


def _near_posterior_guide(name, y, k, widen=1.25):
    """A set-up guide placed near the exact posterior, ``widen`` times too wide."""
    _, mu, log_lam = _conjugate_truth(y, k)
    loc = torch.tensor([float(mu[0]), float(log_lam[0])])
    scale = widen * torch.tensor([float(mu[1]), float(log_lam[1])])
    pyro.set_rng_seed(0)
    if name == "AutoNormal":
        guide = AutoNormal(conjugate_model)
        guide(y, k)
        for i, site in enumerate(("mu", "lam")):
            _set_param(guide.locs, site, loc[i])
            _set_param(guide.scales, site, scale[i])
    elif name == "AutoMultivariateNormal":
        guide = AutoMultivariateNormal(conjugate_model)
        guide(y, k)
        _set_param(guide, "loc", loc)
        _set_param(guide, "scale", scale)
        _set_param(guide, "scale_tril", torch.eye(2))
    else:
        guide = AutoMixtureFlow(conjugate_model, num_components=2, estimator="pathwise", flow=None)
        guide(y, k)
        offset = torch.tensor([[0.3], [-0.3]]) * scale
        _set_param(guide, "locs", loc + offset)
        _set_param(guide, "scales", scale.expand(2, 2))
        _set_param(guide, "logits", torch.zeros(2))
    return guide


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guide_name", ["AutoNormal", "AutoMultivariateNormal", "AutoMixtureFlow"])
def test_log_evidence_converges_to_the_exact_evidence(guide_name, dtype):
    y, k = _conjugate_data(dtype)
    truth, _, _ = _conjugate_truth(y, k)
    guide = _near_posterior_guide(guide_name, y, k)
    idata = to_inference_data(
        guide,
        conjugate_model,
        model_args=(y, k),
        num_samples=3000,
        seed=0,
        posterior_predictive=False,
        log_likelihood=False,
    )
    result = vi_diagnostics(idata, warn=False)
    assert result.khat < result.khat_threshold  # the SE below is trustworthy
    assert abs(result.log_evidence - truth) < 4 * result.log_evidence_se
    assert result.log_evidence_se < 0.05  # the test has power: a Jacobian is ~0.1-1 nat
    # the ELBO is below the evidence by KL(q || p) > 0, and above it by no more than noise
    assert result.elbo < truth
    assert result.ok


def test_khat_and_ess_are_those_of_psis_on_each_run():
    y, k = _conjugate_data(torch.float64)
    guide = _near_posterior_guide("AutoNormal", y, k, widen=0.6)  # too narrow: heavier tail
    idata = to_inference_data(guide, conjugate_model, model_args=(y, k), num_samples=500, seed=1)
    result = vi_diagnostics(idata, warn=False)
    log_w = idata.sample_stats["log_weight"].values[0]
    smoothed, khat = az.psislw(log_w.copy())
    assert result.khat_per_run[0] == pytest.approx(float(khat))
    assert result.khat == pytest.approx(float(khat))
    weights = np.exp(smoothed - az.stats.stats_utils.logsumexp(smoothed))
    assert result.ess == pytest.approx(1 / np.sum(weights**2))
    assert result.elbo == pytest.approx(log_w.mean())
    assert result.log_evidence == pytest.approx(np.log(np.mean(np.exp(log_w))))


def standard_normal():
    pyro.sample("x", dist.Normal(0.0, 1.0).expand([2]).to_event(1))


def test_too_narrow_guide_warns_that_khat_is_high():
    # q = N(0, 0.2^2 I) against p = N(0, I): the weights have a Pareto tail with k = 1 - 0.2^2
    guide = AutoNormal(standard_normal)
    guide()
    _set_param(guide.scales, "x", torch.full((2,), 0.2))
    idata = to_inference_data(guide, standard_normal, num_samples=1000, seed=0)
    with pytest.warns(VIDiagnosticsWarning, match=r"k-hat = .* > 0.7"):
        result = vi_diagnostics(idata)
    assert result.khat > 0.7 and not result.ok


def _near_posterior_export(num_samples):
    """An AutoNormal near the conjugate posterior and ``num_samples`` of its draws (seed 0)."""
    y, k = _conjugate_data(torch.float64)
    guide = _near_posterior_guide("AutoNormal", y, k)
    idata = to_inference_data(
        guide, conjugate_model, model_args=(y, k), num_samples=num_samples, seed=0
    )
    return guide, idata


def test_too_few_draws_warns():
    _, idata = _near_posterior_export(40)
    with pytest.warns(VIDiagnosticsWarning, match="too few draws"):
        vi_diagnostics(idata)


def test_diagnostics_from_guides_equal_those_from_their_export():
    y, k = _conjugate_data(torch.float64)
    guide = _near_posterior_guide("AutoMultivariateNormal", y, k)
    idata = to_inference_data(guide, conjugate_model, model_args=(y, k), num_samples=300, seed=3)
    from_export = vi_diagnostics(idata, warn=False)
    drawn = vi_diagnostics(
        guide, conjugate_model, model_args=(y, k), num_samples=300, seed=3, warn=False
    )
    assert drawn.log_evidence == pytest.approx(from_export.log_evidence)
    assert drawn.khat == pytest.approx(from_export.khat)


def test_diagnostics_accept_a_datatree():
    xr = pytest.importorskip("xarray")
    if not hasattr(xr, "DataTree"):
        pytest.skip("this xarray has no DataTree")
    y, k = _conjugate_data(torch.float64)
    guide = _near_posterior_guide("AutoNormal", y, k)
    idata = to_inference_data(guide, conjugate_model, model_args=(y, k), num_samples=300, seed=0)
    tree = _as_datatree({name: idata[name] for name in idata.groups()})
    from_tree = vi_diagnostics(tree, warn=False)
    from_idata = vi_diagnostics(idata, warn=False)
    assert from_tree.log_evidence == from_idata.log_evidence
    assert from_tree.khat == from_idata.khat


# ----------------------------------------------------------------- mixture components
def two_bumps(weights=(0.7, 0.3), scale=0.5):
    """x has the normalised density sum_j w_j N(x; +-3, scale): log Z = 0."""
    mix = dist.MixtureSameFamily(
        dist.Categorical(torch.tensor(weights)),
        dist.Normal(torch.tensor([-3.0, 3.0]), torch.full((2,), scale)),
    )
    prior = dist.Normal(0.0, 2.0)
    x = pyro.sample("x", prior)
    pyro.factor("target", mix.log_prob(x) - prior.log_prob(x))


def test_component_masses_before_and_after_reweighting():
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(two_bumps, num_components=2, estimator="pathwise", flow=None)
    guide()
    _set_param(guide, "locs", torch.tensor([[-3.0], [3.0]]))
    _set_param(guide, "scales", torch.full((2, 1), 0.6))
    _set_param(guide, "logits", torch.zeros(2))  # q puts 0.5 / 0.5 on the bumps
    n = 4000
    idata = to_inference_data(guide, two_bumps, num_samples=n, seed=0)
    result = vi_diagnostics(idata, warn=False)
    before, after = result.component_mass[0], result.component_mass_psis[0]
    assert abs(before[0] - 0.5) < 4 * math.sqrt(0.25 / n)
    # standard error of a self-normalised importance estimate of P(component 0)
    log_w = idata.sample_stats["log_weight"].values[0]
    w = np.exp(psis(log_w)[0])
    in_0 = idata.sample_stats["component"].values[0] == 0
    se = math.sqrt(np.sum(w**2 * (in_0 - after[0]) ** 2))
    assert abs(after[0] - 0.7) < 4 * se
    assert after.sum() == pytest.approx(1.0)
    assert abs(result.log_evidence) < 4 * result.log_evidence_se


# ------------------------------------------------------------------- the missed mode
def one_bump():
    prior = dist.Normal(0.0, 2.0)
    x = pyro.sample("x", prior)
    pyro.factor("target", dist.Normal(3.0, 0.5).log_prob(x) - prior.log_prob(x))


def _fit_runs(model, seed):
    # AutoNormal started at a prior draw: the seed decides which bump it climbs.
    return fit_independent(
        model,
        lambda m: AutoNormal(m, init_loc_fn=init_to_sample, init_scale=0.5),
        num_runs=4,
        num_steps=400,
        optim=pyro.optim.ClippedAdam({"lr": 0.1, "lrd": 0.995}),
        seed=seed,
    )


def test_missed_mode_is_flagged_by_independent_runs_not_by_khat():
    fits = _fit_runs(two_bumps, seed=2)
    locs = np.array([float(g.locs.x.detach()) for g in fits])
    assert (locs > 2).any() and (locs < -2).any(), "precondition: runs found different bumps"
    # Each run alone looks fine: light tails, no warning; only the note about single runs.
    single = vi_diagnostics(fits[0], two_bumps, num_samples=1000, seed=0, warn=False)
    assert single.ok and single.khat < single.khat_threshold
    assert any(MISSED_MODES_WARNING in note for note in single.notes)
    # Together they disagree, and say so.
    with pytest.warns(VIDiagnosticsWarning, match=MISSED_MODES_WARNING):
        result = fits.vi_diagnostics(num_samples=1000, seed=0)
    assert (result.khat_per_run < result.khat_threshold).all()
    assert result.rhat > 1.1
    # log Z of a run in one bump is log of that bump's weight, 0.3 or 0.7
    expected = np.where(locs > 0, math.log(0.3), math.log(0.7))
    assert np.all(
        np.abs(result.log_evidence_per_run - expected) < 4 * result.log_evidence_se_per_run
    )
    assert result.evidence_spread > 0.8
    assert not result.ok and any("runs disagree" in w for w in result.warnings)


def test_runs_that_agree_are_not_flagged():
    fits = _fit_runs(one_bump, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VIDiagnosticsWarning)
        result = fits.vi_diagnostics(num_samples=1000, seed=0)
    assert result.ok
    assert result.rhat < 1.01
    assert abs(result.log_evidence) < 4 * result.log_evidence_se


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rhat_threshold": 0.9}, ValueError, "rhat_threshold"),
        ({"rhat_threshold": "1.01"}, TypeError, "rhat_threshold"),
        ({"evidence_z": -1.0}, ValueError, "evidence_z"),
        ({"warn": 1}, TypeError, "warn"),
    ],
)
def test_bad_options_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        vi_diagnostics(None, **kwargs)


def test_bad_sources_raise():
    guide, idata = _near_posterior_export(20)
    with pytest.raises(ValueError, match="model is required"):
        vi_diagnostics(guide)
    with pytest.raises(ValueError, match="model must be None"):
        vi_diagnostics(idata, conjugate_model)
    del idata.sample_stats["log_weight"]
    with pytest.raises(ValueError, match="log_weight"):
        vi_diagnostics(idata)


def test_non_finite_log_weights_raise():
    _, idata = _near_posterior_export(20)
    idata.sample_stats["log_weight"].values[0, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        vi_diagnostics(idata)


def test_printed_component_masses_are_grouped_by_mode_and_wrapped():
    # 128 components: 60 near-copies on each bump, 8 stragglers far out with tiny weight
    pyro.set_rng_seed(0)
    k = 128
    guide = AutoMixtureFlow(two_bumps, num_components=k, estimator="pathwise", flow=None)
    guide()
    g = torch.Generator().manual_seed(0)
    locs = torch.cat(
        [
            -3.0 + 0.05 * torch.randn(60, 1, generator=g),
            3.0 + 0.05 * torch.randn(60, 1, generator=g),
            torch.linspace(-30.0, 30.0, 8).unsqueeze(-1),
        ]
    )
    logits = torch.cat([torch.zeros(120), torch.full((8,), -12.0)])
    _set_param(guide, "locs", locs)
    _set_param(guide, "scales", torch.full((k, 1), 0.5))
    _set_param(guide, "logits", logits)
    result = vi_diagnostics(
        to_inference_data(guide, two_bumps, num_samples=4000, seed=0), warn=False
    )
    text = str(result)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert len(text.splitlines()) < 30
    assert "on 2 mode(s)" in text
    groups = [gr for gr in result.component_groups[0] if gr["mass_psis"] > 0.05]
    assert len(groups) == 2
    assert sorted(len(gr["components"]) for gr in groups) == [60, 60]
    assert sorted(gr["mass_psis"] for gr in groups) == pytest.approx([0.3, 0.7], abs=0.05)
