"""Tests for the multimodal benchmark: exact targets, metrics, and a tiny run of the command."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.infer.importance import vectorized_importance_weights

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks import metrics, targets  # noqa: E402
from benchmarks.guides import PyroMixtureIAF  # noqa: E402
from pyro_mogflow import AutoMixtureFlow  # noqa: E402
from pyro_mogflow.examples import mode_masses  # noqa: E402

N = 20000


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- targets
@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_exact_draws_have_finite_log_density_and_the_site_shapes(name):
    bench = targets.build_target(name)
    draws = bench.sample(64, gen())
    trace = pyro.poutine.trace(bench.target.model).get_trace(
        *bench.target.args, **bench.target.kwargs
    )
    for site, value in draws.items():
        assert value.shape[1:] == trace.nodes[site]["value"].shape
    assert bool(torch.isfinite(bench.target.log_joint_batch(draws)).all())


@pytest.mark.parametrize("name", ["grid9", "gmm40", "mix10"])
def test_mixture_draws_fall_near_each_mode_as_often_as_its_weight(name):
    bench = targets.build_target(name)
    z = bench.sample(N, gen())["z"].double()
    logits, locs = bench.target.args[0].double(), bench.target.args[1].double()
    nearest = torch.cdist(z, locs).argmin(-1)
    freq = torch.bincount(nearest, minlength=locs.shape[0]).double() / N
    w = logits.softmax(-1)
    # nearest-mean frequencies equal the weights up to the components' overlap, which is
    # negligible for these (checked by the tolerance: 4 standard errors of a frequency)
    assert bool(((freq - w).abs() < 4 * (w * (1 - w) / N).sqrt() + 2e-3).all())


def test_sign_regression_draws_match_the_quadrature_masses():
    bench = targets.signreg()
    theta = bench.sample(N, gen())["theta"]
    masses = bench.target.mode_masses(theta).double()
    ref = bench.target.reference_masses.double()
    assert bool(((masses - ref).abs() < 4 * (ref * (1 - ref) / N).sqrt()).all())
    assert abs(float((theta > 0).double().mean()) - 0.5) < 4 * math.sqrt(0.25 / N)


def test_sign_regression_draws_match_the_posterior_mean_of_sigma_by_importance():
    # E[sigma | y] from the exact draws against self-normalised importance sampling from a
    # wide proposal, to 4 combined standard errors.
    bench = targets.signreg()
    sigma = bench.sample(N, gen())["sigma"].double()
    g = gen(1)
    prop_theta = 3 * torch.randn(N, generator=g, dtype=torch.float64)
    prop_sigma = torch.rand(N, generator=g, dtype=torch.float64) * 2
    values = {"theta": prop_theta.float(), "sigma": prop_sigma.float().clamp(min=1e-3)}
    log_w = bench.target.log_joint_batch(values).double() + 0.5 * (prop_theta / 3) ** 2
    w = (log_w - log_w.max()).exp()
    w = w / w.sum()
    est = float((w * values["sigma"].double()).sum())
    ess = float(1 / (w**2).sum())
    se = float(sigma.std()) * (1 / math.sqrt(N) + 1 / math.sqrt(ess))
    assert abs(float(sigma.mean()) - est) < 4 * se


def test_funnel_draws_have_the_funnel_law():
    d = targets.funnel10().sample(N, gen())
    v, x = d["v"].double(), d["x"].double()
    assert abs(float(v.std()) - 3.0) < 4 * 3.0 / math.sqrt(2 * N)
    ratio = x / (v / 2).exp().unsqueeze(-1)  # standard normal given v
    assert abs(float(ratio.std()) - 1.0) < 4 / math.sqrt(2 * ratio.numel())


def test_gmm40_means_are_fixed_by_their_seed():
    a, b = targets.gmm40(), targets.gmm40()
    assert torch.equal(a.target.modes, b.target.modes)
    assert float(a.target.modes.abs().max()) <= 40
    assert a.target.num_modes == 40


def test_unknown_target_names_the_choices():
    with pytest.raises(ValueError, match="unknown target 'grid10'; choose one of"):
        targets.build_target("grid10")


# ---------------------------------------------------------------------------- metrics
def true_bins(bench, draws):
    """Mode masses of exact draws with the "elsewhere" bin, as the benchmark computes them."""
    return mode_masses(draws.double(), bench.target.modes, bench.capture_radius, elsewhere=True)


def test_every_target_has_an_exact_sampler_and_a_capture_radius():
    for name in targets.TARGETS:
        bench = targets.build_target(name)
        assert bench.target.exact_sampler is not None
        assert bench.capture_radius == bench.target.radius > 0


def exact_grid9_guide():
    """An AutoMixtureFlow that is exactly the grid9 posterior (9 components, no flow)."""
    bench = targets.grid9(torch.float64)
    logits, locs, scales = bench.target.args
    guide = AutoMixtureFlow(bench.target.model, num_components=9).setup(
        *bench.target.args, **bench.target.kwargs
    )
    with torch.no_grad():
        guide.locs.unconstrained().copy_(locs)
        guide.scales.unconstrained().copy_(torch.log(torch.expm1(scales)))
        guide.logits.unconstrained().copy_(logits)
    return bench, guide


def test_evaluate_scores_the_exact_posterior_as_perfect():
    bench, guide = exact_grid9_guide()
    true = bench.sample(4096, gen(1))
    big = bench.sample(N, gen(2))["z"]
    bins = true_bins(bench, big)
    out = metrics.evaluate(guide, bench, true, bins, num_samples=N)
    assert abs(out["reverse_kl"]) < 1e-6 and abs(out["forward_kl"]) < 1e-6  # q = p exactly
    assert abs(out["log_z_error"]) < 1e-6
    assert out["modes_covered"] == 9 and out["num_modes"] == 9
    # TV between two independent multinomial samples of 10 bins: a few standard errors
    assert out["mass_tv"] < 0.5 * 10 * 3 * math.sqrt(0.11 * (1 / N + 1 / N))
    assert out["khat"] < 0.5 and out["ess"] > 0.99


def test_evaluate_scores_a_one_mode_guide_as_missing_modes():
    bench, guide = exact_grid9_guide()
    with torch.no_grad():
        guide.logits.unconstrained().copy_(torch.tensor([0.0] + [-30.0] * 8).double())
    true = bench.sample(4096, gen(1))
    big = bench.sample(N, gen(2))["z"]
    bins = true_bins(bench, big)
    out = metrics.evaluate(guide, bench, true, bins, num_samples=4096)
    assert out["modes_covered"] == 1
    assert abs(out["reverse_kl"] - math.log(9)) < 1e-3  # q = one of 9 equal modes exactly
    assert out["mass_tv"] > 0.85


@pytest.mark.parametrize(
    "make",
    [
        AutoNormal,
        AutoMultivariateNormal,
        lambda m: PyroMixtureIAF(m, 3),
        lambda m: AutoMixtureFlow(m, num_components=3, flow="spline_autoregressive"),
    ],
)
def test_guide_log_density_agrees_with_the_guide_trace(make):
    bench = targets.signreg()
    guide = make(bench.target.model)
    args, kwargs = bench.target.args, bench.target.kwargs
    with torch.no_grad():
        log_w, _, guide_trace = vectorized_importance_weights(
            bench.target.model, guide, *args, num_samples=50, max_plate_nesting=1, **kwargs
        )
    values = {s: guide_trace.nodes[s]["value"].reshape(50) for s in ("theta", "sigma")}
    log_p = bench.target.log_joint_batch(values)
    ours = metrics.guide_log_density(guide, values, *args, **kwargs)
    assert torch.allclose(log_p - ours, log_w, atol=1e-3, rtol=1e-4)


# ----------------------------------------------------------------------------- command
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multimodal")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.multimodal",
        "--targets",
        "ring8",
        "--guides",
        "AutoNormal",
        "AMF defaults",
        "--seeds",
        "1",
        "--steps",
        "60",
        "--no-timing",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_tiny_run_writes_the_table_json_and_plot(tiny_run):
    out, proc = tiny_run
    doc = json.loads((out / "multimodal.json").read_text())
    assert {r["guide"] for r in doc["runs"]} == {"AutoNormal", "AMF defaults"}
    assert all("metrics" in r for r in doc["runs"])
    cell = doc["summary"]["ring8"]["AMF defaults"]
    assert cell["seeds"] == 1 and cell["num_modes"] == 8
    assert np.isfinite(cell["reverse_kl"]["mean"])
    md = (out / "multimodal.md").read_text()
    assert "## ring8" in md and "| AMF defaults |" in md and "## Goals" in md
    assert (out / "multimodal_ring8.png").stat().st_size > 10_000
    assert "| AutoNormal |" in proc.stdout


def test_merge_rebuilds_the_same_summary(tiny_run, tmp_path):
    out, _ = tiny_run
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.multimodal",
            "--merge",
            str(out / "multimodal.json"),
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((out / "multimodal.json").read_text())["summary"]
    b = json.loads((tmp_path / "multimodal.json").read_text())["summary"]
    assert a == b
