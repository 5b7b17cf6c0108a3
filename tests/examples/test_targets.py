"""Built-in targets (pyro_mogflow.examples): ground truth checked against brute force."""

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_mogflow.examples import (
    Target,
    gaussian_mixture_target,
    label_switching_mixture,
    mode_masses,
    sign_regression,
)

DTYPES = [torch.float32, torch.float64]
TARGETS = {
    "sign_regression": sign_regression,
    "gaussian_mixture": gaussian_mixture_target,
    "label_switching": label_switching_mixture,
}


def _grid_log_integral(log_f: torch.Tensor, *steps: float) -> float:
    """log of a Riemann sum of exp(log_f) on a uniform grid with the given cell widths."""
    return float(torch.logsumexp(log_f.reshape(-1), 0)) + sum(math.log(s) for s in steps)


def _draw_prior_point(target: Target) -> dict:
    trace = pyro.poutine.trace(target.model).get_trace(*target.args, **target.kwargs)
    return {
        name: site["value"].detach()
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not pyro.poutine.util.site_is_subsample(site)
    }


# ------------------------------------------------------------------ sign regression
@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_regression_log_joint_is_symmetric_in_the_sign(dtype):
    target = sign_regression(dtype=dtype)
    sigma = torch.tensor(0.5, dtype=dtype)
    for theta in (0.3, 1.5, 2.7):
        t = torch.tensor(theta, dtype=dtype)
        lp_pos = target.log_joint({"theta": t, "sigma": sigma})
        lp_neg = target.log_joint({"theta": -t, "sigma": sigma})
        assert lp_pos.dtype == dtype
        assert torch.equal(lp_pos, lp_neg)


def test_sign_regression_log_z_matches_brute_force_grid():
    # Independent check: Pyro's own log densities on a fine (theta, log sigma) grid around the
    # positive mode, doubled by the symmetry. The grid resolves the posterior (sd ~0.08 in theta,
    # ~0.11 in log sigma) with >25 points per sd, so its error is far below the tolerance.
    target = sign_regression(dtype=torch.float64)
    theta = torch.linspace(0.8, 2.2, 561, dtype=torch.float64)
    u = torch.linspace(-1.8, 0.2, 321, dtype=torch.float64)
    tt, uu = torch.meshgrid(theta, u, indexing="ij")
    logp = target.log_joint_batch({"theta": tt.reshape(-1), "sigma": uu.exp().reshape(-1)})
    log_f = logp + uu.reshape(-1)  # d sigma = sigma du
    brute = math.log(2) + _grid_log_integral(log_f, theta[1] - theta[0], u[1] - u[0])
    assert target.log_z == pytest.approx(brute, abs=2e-3)


def test_sign_regression_reference_masses_are_equal_and_hold_nearly_all_mass():
    target = sign_regression(dtype=torch.float64)
    masses = target.reference_masses
    assert masses.shape == (2,)
    assert torch.equal(masses[0], masses[1])
    # each ball is ~9 posterior sds wide on each side: essentially all the mass of its mode
    assert 0.499 < float(masses[0]) <= 0.5


def test_sign_regression_modes_follow_the_slope():
    target = sign_regression(slope=-2.0)
    assert target.modes.tolist() == [-2.0, 2.0]
    assert target.radius == 1.0
    assert target.truth["theta"] == -2.0


# ------------------------------------------------------------------ Gaussian mixture
@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_mixture_log_z_matches_grid_integral(dtype):
    log_z = 1.7
    target = gaussian_mixture_target(
        locs=[[-2.0, 0.0], [2.0, 1.0]], scales=[[0.5, 0.7], [0.6, 0.4]], weights=[1.0, 3.0],
        log_z=log_z, dtype=dtype,
    )  # fmt: skip
    grid = torch.linspace(-6.0, 6.0, 481, dtype=dtype)
    g1, g2 = torch.meshgrid(grid, grid, indexing="ij")
    z = torch.stack([g1.reshape(-1), g2.reshape(-1)], -1)
    logp = target.log_joint_batch({"z": z})
    assert logp.dtype == dtype
    step = float(grid[1] - grid[0])
    assert _grid_log_integral(logp.double(), step, step) == pytest.approx(log_z, abs=1e-3)


def test_gaussian_mixture_reference_masses_match_exact_draws():
    # four modes at (+-4, +-4), scale 0.5; a radius holding about half of each component's mass
    target = gaussian_mixture_target(radius=0.6, dtype=torch.float64)
    n = 40000
    gen = torch.Generator().manual_seed(1)
    comp = torch.randint(0, 4, (n,), generator=gen)
    draws = target.modes[comp] + 0.5 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    masses = target.mode_masses(draws)
    ref = target.reference_masses
    se = (ref * (1 - ref) / n).sqrt()
    assert bool(((masses - ref).abs() < 4 * se).all()), (masses, ref, se)


def test_gaussian_mixture_without_reference_for_anisotropic_scales():
    target = gaussian_mixture_target(locs=[[0.0, 0.0], [5.0, 5.0]], scales=[[1.0, 0.5]] * 2)
    assert target.reference_masses is None
    assert target.radius == pytest.approx(3.0)


def test_gaussian_mixture_does_not_keep_or_change_the_callers_tensors():
    locs = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    before = locs.clone()
    target = gaussian_mixture_target(locs=locs, scales=0.3)
    assert torch.equal(locs, before)
    locs.add_(10.0)
    assert torch.equal(target.modes, before)


# ------------------------------------------------------------------ label switching
@pytest.mark.parametrize("dtype", DTYPES)
def test_label_switching_log_joint_is_invariant_under_the_swap(dtype):
    target = label_switching_mixture(dtype=dtype)
    sigma = torch.tensor(1.1, dtype=dtype)
    mu = torch.tensor([-1.7, 2.3], dtype=dtype)
    a = target.log_joint({"mu": mu, "sigma": sigma})
    b = target.log_joint({"mu": mu.flip(0), "sigma": sigma})
    assert a.dtype == dtype
    assert a.item() == pytest.approx(b.item(), rel=1e-6 if dtype == torch.float32 else 1e-12)
    assert target.modes.tolist() == [[-2.0, 2.0], [2.0, -2.0]]


# ------------------------------------------------------------------ shared behaviour
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_log_joint_batch_equals_pointwise_log_joint(name):
    target = TARGETS[name](dtype=torch.float64)
    points = [_draw_prior_point(target) for _ in range(4)]
    batch = {k: torch.stack([p[k] for p in points]) for k in points[0]}
    expected = torch.stack([target.log_joint(p) for p in points])
    assert torch.allclose(target.log_joint_batch(batch), expected, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_models_run_with_vectorized_particles(name):
    target = TARGETS[name]()
    guide = AutoNormal(target.model)
    elbo = Trace_ELBO(
        num_particles=7, vectorize_particles=True, max_plate_nesting=target.max_plate_nesting
    )
    loss = elbo.differentiable_loss(target.model, guide, *target.args, **target.kwargs)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["sign_regression", "label_switching"])
def test_data_depend_on_the_seed_only_and_leave_the_global_rng_alone(name):
    state = torch.get_rng_state()
    a = TARGETS[name](seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = TARGETS[name](seed=3)
    c = TARGETS[name](seed=4)
    assert torch.equal(a.args[-1], b.args[-1])
    assert not torch.equal(a.args[-1], c.args[-1])


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_data_and_modes_follow_the_requested_dtype(name, dtype):
    target = TARGETS[name](dtype=dtype)
    assert target.modes.dtype == dtype
    assert all(a.dtype == dtype for a in target.args if isinstance(a, torch.Tensor))
    lp = target.log_joint(_draw_prior_point(target))
    assert lp.dtype == dtype and torch.isfinite(lp)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_targets_live_on_cuda(name):
    target = TARGETS[name](device="cuda")
    assert target.modes.is_cuda
    assert all(a.is_cuda for a in target.args if isinstance(a, torch.Tensor))
    assert target.log_joint(_draw_prior_point(target)).is_cuda


def test_target_is_a_pyro_model():
    target = sign_regression()
    trace = pyro.poutine.trace(target).get_trace()
    assert {"theta", "sigma", "y"} <= set(trace.nodes)
    assert torch.equal(trace.nodes["y"]["value"], target.args[1])


def test_mode_masses_and_modes_found_count_draws_in_each_ball():
    target = sign_regression()  # modes -1.5, +1.5, radius 0.75
    draws = torch.tensor([-1.5, -1.0, 1.4, 0.0, 3.0, 1.6, 1.7, -0.7])
    assert target.mode_masses(draws).tolist() == [2 / 8, 3 / 8]
    assert target.modes_found(draws, threshold=0.3) == 1
    assert target.modes_found(draws, threshold=0.2) == 2


def test_mode_masses_assign_the_nearest_mode_within_the_radius():
    modes = torch.tensor([[0.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    pts = torch.tensor(
        [[0.1, 0.0], [1.4, 0.0], [1.6, 0.0], [3.0, 2.0], [9.0, 9.0]], dtype=torch.float64
    )
    bins = mode_masses(pts, modes, radius=1.5, elsewhere=True)
    assert bins.tolist() == [0.4, 0.2, 0.4]
    assert mode_masses(pts, modes, radius=1.5).tolist() == [0.4, 0.2]


def test_mode_masses_partition_the_draws_when_the_balls_overlap():
    # radius 2 > half the gap 1.5: a draw within 2 of both modes counts once, for the nearer.
    modes = torch.tensor([[0.0], [3.0]])
    pts = torch.tensor([[1.4], [1.6], [2.0], [-1.0], [10.0]])
    masses = mode_masses(pts, modes, radius=2.0, elsewhere=True)
    assert masses.dtype == torch.float32
    assert masses.tolist() == pytest.approx([0.4, 0.4, 0.2])


@pytest.mark.parametrize("name", ["sign_regression", "gaussian_mixture"])
def test_exact_draws_have_the_site_shapes_and_follow_the_generator(name):
    target = TARGETS[name]()
    a = target.sample_exact(64, torch.Generator().manual_seed(3))
    b = target.sample_exact(64, torch.Generator().manual_seed(3))
    trace = pyro.poutine.trace(target.model).get_trace(*target.args, **target.kwargs)
    for site, value in a.items():
        assert value.shape[1:] == trace.nodes[site]["value"].shape
        assert torch.equal(value, b[site])


def test_sample_exact_without_a_sampler_names_the_target():
    with pytest.raises(ValueError, match="'label_switching' has no exact sampler"):
        label_switching_mixture().sample_exact(10)


def test_old_module_path_reexports_the_targets_with_a_deprecation_warning():
    import importlib
    import sys

    sys.modules.pop("pyro_mogflow.models", None)
    with pytest.warns(DeprecationWarning, match="pyro_mogflow.examples"):
        models = importlib.import_module("pyro_mogflow.models")
    assert models.sign_regression is sign_regression and models.Target is Target


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [
        (sign_regression, {"num_data": 0}, ValueError, "num_data"),
        (sign_regression, {"num_data": 2.5}, TypeError, "num_data"),
        (sign_regression, {"slope": 0.0}, ValueError, "slope"),
        (sign_regression, {"noise": -1.0}, ValueError, "noise"),
        (sign_regression, {"seed": "0"}, TypeError, "seed"),
        (sign_regression, {"dtype": torch.int64}, TypeError, "dtype"),
        (gaussian_mixture_target, {"locs": [1.0, 2.0]}, ValueError, "locs"),
        (gaussian_mixture_target, {"locs": [[0.0, 0.0], [0.0, 0.0]]}, ValueError, "distinct"),
        (gaussian_mixture_target, {"scales": -0.5}, ValueError, "scales"),
        (gaussian_mixture_target, {"weights": [1.0, 1.0]}, ValueError, "weights"),
        (gaussian_mixture_target, {"log_z": math.nan}, ValueError, "log_z"),
        (label_switching_mixture, {"means": (1.0, 1.0)}, ValueError, "means"),
        (label_switching_mixture, {"means": 1.0}, ValueError, "means"),
        (label_switching_mixture, {"noise": 0.0}, ValueError, "noise"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        make(**kwargs)


@pytest.mark.parametrize(
    "samples, match",
    [(torch.zeros(5, 2), "shape"), (torch.zeros(0), "shape"), ([0.0, 1.0], "torch.Tensor")],
)
def test_mode_masses_rejects_bad_samples(samples, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sign_regression().mode_masses(samples)


def test_log_joint_requires_every_latent_site():
    with pytest.raises(ValueError, match="sigma"):
        sign_regression().log_joint({"theta": torch.tensor(1.0)})


def test_log_joint_batch_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="batch size"):
        sign_regression().log_joint_batch({"theta": torch.zeros(3), "sigma": torch.ones(4)})


def test_log_joint_batch_rejects_unknown_sites():
    with pytest.raises(ValueError, match="not a latent site"):
        sign_regression().log_joint_batch(
            {"theta": torch.zeros(3), "sigma": torch.ones(3), "y": torch.ones(3)}
        )
