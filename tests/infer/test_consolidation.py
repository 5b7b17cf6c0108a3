"""consolidate_modes / estimate_elbo: one component per mode, kept only if the ELBO holds."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from pyro_mogflow import AutoMixtureFlow, fit
from pyro_mogflow.examples import gaussian_mixture_target
from pyro_mogflow.guides.covariance import replace_mixture_params
from pyro_mogflow.infer.consolidation import consolidate_modes, estimate_elbo
from pyro_mogflow.infer.convergence import PlateauTest


@pytest.fixture(autouse=True)
def _clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _guide(target, locs, scales, logits=None, full=True):
    locs = torch.as_tensor(locs, dtype=torch.float64)
    k = locs.shape[0]
    guide = AutoMixtureFlow(target.model, num_components=k, flow=None).setup(*target.args)
    scales = torch.as_tensor(scales, dtype=torch.float64).expand_as(locs)
    logits = torch.zeros(k, dtype=torch.float64) if logits is None else logits
    replace_mixture_params(guide, logits, locs, scales=scales.clone())
    if full:
        guide.to_full_covariance()
    return guide


def test_estimate_elbo_of_the_exact_posterior_is_log_z_with_no_noise():
    target = gaussian_mixture_target([[-3.0, 0.0], [3.0, 1.0]], scales=0.5, dtype=torch.float64)
    guide = _guide(target, [[-3.0, 0.0], [3.0, 1.0]], 0.5, full=False)
    est = estimate_elbo(target.model, guide, target.args, num_particles=8)
    # q = p exactly: every log ratio is log Z = 0, up to the modes' negligible overlap
    assert abs(est.value) < 1e-6 and est.se < 1e-6


def test_estimate_elbo_standard_error_matches_the_spread_of_repeated_estimates():
    target = gaussian_mixture_target([[0.0, 0.0]], scales=1.0, dtype=torch.float64)
    guide = _guide(target, [[0.3, -0.2], [-0.4, 0.1]], 0.7, full=False)
    pyro.set_rng_seed(0)
    runs = [estimate_elbo(target.model, guide, target.args, num_particles=16) for _ in range(60)]
    values = torch.tensor([r.value for r in runs], dtype=torch.float64)
    mean_se = sum(r.se for r in runs) / len(runs)
    # the sample sd of 60 estimates is within ~20% (4 SE of an sd estimate) of the claimed SE
    assert abs(float(values.std()) / mean_se - 1) < 4 / math.sqrt(2 * 59), (values.std(), mean_se)


def test_tiles_of_one_correlated_mode_become_one_component():
    # a target with one Gaussian mode; four components tile it along its long axis
    target = gaussian_mixture_target([[0.0, 0.0]], scales=[[2.0, 0.3]], dtype=torch.float64)
    locs = [[-1.8, 0.0], [-0.6, 0.0], [0.6, 0.0], [1.8, 0.0]]
    guide = _guide(target, locs, [[0.9, 0.3]])
    pyro.set_rng_seed(0)
    report = consolidate_modes(target.model, guide, target.args, num_particles=64)
    assert report["accepted"] and guide.num_components == 1
    assert report["groups"] == [[0, 1, 2, 3]]
    assert report["elbo_after"].value > report["elbo_before"].value
    cov = guide.scale_tril.detach()[0] @ guide.scale_tril.detach()[0].T
    # moment matching: var = 0.81 + mean of squared offsets (1.8) along the first axis
    torch.testing.assert_close(cov.diagonal(), torch.tensor([0.81 + 1.8, 0.09]).double())


def test_mode_groups_follow_the_modes_of_the_mixture_not_a_distance_chain():
    from pyro_mogflow.infer.consolidation import mode_groups

    target = gaussian_mixture_target([[0.0]], scales=1.0, dtype=torch.float64)
    # two clusters of narrow components at -4 and 4, and one wide light component between
    # them that a distance threshold would link to both
    locs = [[-4.2], [-3.8], [-4.0], [3.9], [4.1], [0.3]]
    scales = torch.tensor([[0.5]] * 5 + [[3.0]], dtype=torch.float64)
    logits = torch.tensor([0.0] * 5 + [-2.0], dtype=torch.float64)
    guide = _guide(target, locs, scales, logits, full=False)
    groups = [sorted(g) for g in mode_groups(guide)]
    # each cluster is one group, and no group holds both (the wide one may keep its own
    # local maximum of the mixture density, or join one cluster)
    assert any({0, 1, 2} <= set(g) for g in groups), groups
    assert any({3, 4} <= set(g) for g in groups), groups
    assert not any({0, 3} <= set(g) for g in groups), groups


def test_a_merge_that_loses_elbo_is_refused_and_leaves_the_guide_as_it_was():
    # the target is a mixture of N(-0.9, 1) and N(0.9, 1) (one flat-topped mode) and the
    # guide is that mixture exactly: its log ratios are all 0 (SE 0), so the moment-matched
    # single Gaussian, a little worse, must be refused
    target = gaussian_mixture_target([[-0.9], [0.9]], scales=1.0, dtype=torch.float64)
    guide = _guide(target, [[-0.9], [0.9]], 1.0)
    before = {n: p.detach().clone() for n, p in guide.named_parameters()}
    pyro.set_rng_seed(0)
    report = consolidate_modes(target.model, guide, target.args, num_particles=64)
    assert not report["accepted"] and guide.num_components == 2
    assert report["refused"] == [[0, 1]]
    assert report["elbo_before"].se < 1e-9
    for name, p in guide.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0, msg=name)


def test_fit_with_full_covariance_consolidates_and_keeps_both_modes():
    target = gaussian_mixture_target(
        [[-4.0, 0.0], [4.0, 0.0]], scales=[[1.5, 0.2], [1.5, 0.2]], dtype=torch.float64
    )
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(target.model, num_components=16, flow=None)
    result = fit(
        target.model,
        *target.args,
        guide=guide,
        covariance="full",
        anneal_steps=300,
        max_steps=1200,
        progress=False,
    )
    merged = [r for r in result.reductions if "consolidated" in r]
    assert merged and merged[0]["num_components"] < 16
    draws = guide.get_posterior().sample((4000,))
    plus = float((draws[:, 0] > 0).double().mean())
    assert abs(plus - 0.5) < 0.1, plus


@pytest.mark.parametrize(
    "dim, options, expected",
    [
        (2, {}, True),
        (2, {"component_step": "adam"}, False),
        (2, {"covariance": "diag"}, False),
        (201, {}, False),
        (201, {"covariance": "full"}, True),
    ],
)
def test_covariance_auto_is_full_for_natural_steps_up_to_200_dimensions(dim, options, expected):
    from pyro_mogflow.guides.covariance import is_full

    target = gaussian_mixture_target([[0.0] * dim], scales=1.0, dtype=torch.float64)
    guide = AutoMixtureFlow(target.model, num_components=2, flow=None)
    fit(target.model, *target.args, guide=guide, num_steps=1, beta=None, progress=False, **options)
    assert is_full(guide) is expected


def test_bad_arguments_are_refused_before_any_work():
    from pyro.infer.autoguide import AutoNormal

    from pyro_mogflow.infer.consolidation import mode_groups

    target = gaussian_mixture_target([[0.0]], scales=1.0, dtype=torch.float64)
    with pytest.raises(TypeError, match="guide must be an AutoMixtureFlow"):
        consolidate_modes(target.model, AutoNormal(target.model), target.args)
    with pytest.raises(RuntimeError, match="not set up"):
        estimate_elbo(target.model, AutoMixtureFlow(target.model), target.args)
    implicit = AutoMixtureFlow(target.model, estimator="implicit").setup(*target.args)
    with pytest.raises(ValueError, match="estimator='stratified'"):
        consolidate_modes(target.model, implicit, target.args)
    guide = _guide(target, [[0.0], [1.0]], 1.0)
    with pytest.raises(ValueError, match="num_particles"):
        estimate_elbo(target.model, guide, target.args, num_particles=1)
    with pytest.raises(ValueError, match="z"):
        consolidate_modes(target.model, guide, target.args, z=-1.0)
    with pytest.raises(TypeError, match="set-up AutoMixtureFlow"):
        mode_groups(AutoMixtureFlow(target.model))


def test_fit_holds_the_weights_until_the_components_settle_at_beta_one():
    target = gaussian_mixture_target([[-3.0], [3.0]], scales=0.5, dtype=torch.float64)
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(target.model, num_components=8, flow=None)
    seen = []

    def record(step, loss, beta):
        seen.append((beta, guide.logits.detach().clone()))

    fit(
        target.model,
        *target.args,
        guide=guide,
        anneal_steps=200,
        max_steps=800,
        progress=False,
        callback=record,
    )
    tempered = [logits for beta, logits in seen if beta < 1]
    assert tempered and all(torch.equal(logits, tempered[0]) for logits in tempered)
    # released at beta 1 once the ELBO is flat: then (balanced and stepped) weights differ
    final = seen[-1][1]
    assert final.shape != tempered[0].shape or not torch.equal(final, tempered[0])


def test_fit_consolidates_on_arrival_and_stops_at_the_release_with_one_component():
    # one mode: after the first window at beta 1 the components on it become one, the hold
    # runs on that one, and the fit ends at the release (nothing left to move)
    target = gaussian_mixture_target([[1.0, -2.0]], scales=[[0.5, 2.0]], dtype=torch.float64)
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(target.model, num_components=8, flow=None)
    betas = []
    window = 50
    result = fit(
        target.model,
        *target.args,
        guide=guide,
        anneal_steps=200,
        max_steps=2000,
        convergence=PlateauTest(window=window),
        progress=False,
        callback=lambda step, loss, beta: betas.append(beta),
    )
    first = betas.index(1.0)
    assert guide.num_components == 1
    merged = [r for r in result.reductions if "consolidated" in r]
    assert merged and merged[0]["consolidated"] == 7
    assert merged[0]["step"] == first + window  # target.step after the first window
    assert result.reason.startswith("converged")
    assert result.rounds == []  # every start reached the one mode: no evidence of a missed one
    # the hold needs two windows at beta 1; the stop test after it would need three more
    assert len(betas) - first < 5 * window
