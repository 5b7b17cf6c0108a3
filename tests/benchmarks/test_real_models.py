"""Tests for the real-models benchmark: densities, exact samplers, symmetries, a quick run."""

import math
import os
import resource
import subprocess
import sys

import pyro
import pytest
import torch
from pyro.poutine.util import site_is_subsample
from torch.distributions import HalfCauchy, HalfNormal, MultivariateNormal, Normal

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks import real_targets as rt  # noqa: E402
from benchmarks.real_ground_truth import GROUND_TRUTH_DIR, load_ground_truth, split_rhat  # noqa: E402

N = 20000
SYMMETRIC = ["bgmm", "bnn", "factor"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _prior_draw(bench, seed=0):
    """One draw of every latent site from the model's own prior (no data conditioning)."""
    torch.manual_seed(seed)
    trace = pyro.poutine.trace(bench.target.model).get_trace(*bench.target.args)
    return {
        k: s["value"].detach()
        for k, s in trace.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    }


# ------------------------------------------------------------ densities vs formulas
def _independent_log_joint(name, bench, v):
    """log p(y, theta) written out with torch.distributions, apart from the Pyro models."""
    t = bench.target
    if name == "bgmm":
        (y,) = t.args
        comp = Normal(v["mu"][:, None], v["sigma"]).log_prob(y) - math.log(3)
        return (
            Normal(0, 5.0).log_prob(v["mu"]).sum()
            + HalfNormal(2.0).log_prob(v["sigma"])
            + torch.logsumexp(comp, 0).sum()
        )
    if name == "bnn":
        x, y = t.args
        f = v["b2"] + sum(v["w2"][h] * torch.tanh(v["w1"][h] * x + v["b1"][h]) for h in range(2))
        prior = sum(Normal(0, 1.0).log_prob(v[k]).sum() for k in ("w1", "b1", "w2", "b2"))
        return (
            prior + HalfNormal(1.0).log_prob(v["sigma"]) + Normal(f, v["sigma"]).log_prob(y).sum()
        )
    if name == "factor":
        (y,) = t.args
        cov = torch.outer(v["lam"], v["lam"]) + torch.diag(v["psi"] ** 2)
        return (
            Normal(0, 1.0).log_prob(v["lam"]).sum()
            + HalfNormal(1.0).log_prob(v["psi"]).sum()
            + MultivariateNormal(torch.zeros(6), cov).log_prob(y).sum()
        )
    if name == "frequency":
        tt, y = t.args
        a, b = v["ab"]
        mean = a * torch.cos(v["omega"] * tt) + b * torch.sin(v["omega"] * tt)
        return (
            -math.log(rt.FREQ_RANGE)
            + Normal(0, rt.FREQ_PRIOR).log_prob(v["ab"]).sum()
            + Normal(mean, rt.FREQ_NOISE).log_prob(y).sum()
        )
    if name == "eight_schools":
        y, s = t.args
        theta = v["mu"] + v["tau"] * v["theta_tilde"]
        return (
            Normal(0, 5.0).log_prob(v["mu"])
            + HalfCauchy(5.0).log_prob(v["tau"])
            + Normal(0, 1.0).log_prob(v["theta_tilde"]).sum()
            + Normal(theta, s).log_prob(y).sum()
        )
    logits, locs, tril = t.args
    return torch.logsumexp(
        logits.log_softmax(-1) + MultivariateNormal(locs, scale_tril=tril).log_prob(v["z"]), 0
    )


@pytest.mark.parametrize("name", ["bgmm", "bnn", "factor", "frequency", "eight_schools", "synth20"])
def test_log_joint_matches_an_independent_formula(name):
    bench = rt.build_real_target(name)
    for seed in range(3):
        v = _prior_draw(bench, seed)
        got = float(bench.target.log_joint(v))
        want = float(_independent_log_joint(name, bench, v))
        assert got == pytest.approx(want, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("name", list(rt.REAL_TARGETS))
def test_log_joint_batch_agrees_with_the_pointwise_log_joint(name):
    # the models are vectorized with plates: a batch of particles gives the same densities
    bench = rt.build_real_target(name)
    points = [_prior_draw(bench, s) for s in range(3)]
    batch = {k: torch.stack([p[k] for p in points]) for k in points[0]}
    got = bench.target.log_joint_batch(batch)
    want = torch.stack([bench.target.log_joint(p) for p in points])
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-2)


# ----------------------------------------------------------------- exact samplers
@pytest.mark.parametrize("name", ["synth20", "synth50", "synth100", "gmm40_50d"])
def test_mixture_sampler_moments_match_the_components(name):
    bench = rt.build_real_target(name)
    z = bench.target.sample_exact(N, gen())["z"].double()
    logits, locs = bench.target.args[0].double(), bench.target.args[1].double()
    nearest = torch.cdist(z, locs).argmin(-1)
    w = logits.softmax(-1)
    freq = torch.bincount(nearest, minlength=len(w)).double() / N
    assert bool(((freq - w).abs() < 4 * (w * (1 - w) / N).sqrt() + 1e-3).all())
    # the mean of the draws of the heaviest component, coordinate by coordinate
    k = int(w.argmax())
    sel = z[nearest == k]
    if len(bench.target.args) == 3 and bench.target.args[2].dim() == 3:
        cov = bench.target.args[2].double()[k] @ bench.target.args[2].double()[k].T
        sd = cov.diagonal().sqrt()
    else:
        sd = bench.target.args[2].double()[k]
    se = sd / math.sqrt(len(sel))
    assert bool(((sel.mean(0) - locs[k]).abs() < 5 * se).all())


def test_frequency_sampler_gives_each_alias_an_equal_share():
    bench = rt.frequency()
    omega = bench.target.sample_exact(N, gen())["omega"]
    masses = bench.target.mode_masses(omega).double()
    assert bool(((masses - 0.2).abs() < 4 * math.sqrt(0.2 * 0.8 / N)).all())
    assert float(masses.sum()) > 0.99


def _is_log_z_and_mean(bench, proposal_draws, log_q):
    log_w = bench.target.log_joint_batch(proposal_draws).double() - log_q
    log_z = float(torch.logsumexp(log_w, 0) - math.log(len(log_w)))
    w = (log_w - log_w.max()).exp()
    return log_z, w / w.sum()


def test_eight_schools_quadrature_matches_importance_sampling():
    # log Z and E[mu] from the quadrature sampler against importance sampling from the prior
    bench = rt.eight_schools()
    g = gen(1)
    m = 200_000
    mu = 5 * torch.randn(m, generator=g, dtype=torch.float64)
    tau = HalfCauchy(5.0).icdf(torch.rand(m, generator=g, dtype=torch.float64))
    tt = torch.randn(m, 8, generator=g, dtype=torch.float64)
    # proposal = prior of (mu, tau); theta_tilde from its exact conditional would be better,
    # but the prior works with this many draws (ESS checked below)
    draws = {"mu": mu.float(), "tau": tau.float(), "theta_tilde": tt.float()}
    log_prior = (
        Normal(0, 5.0).log_prob(mu)
        + HalfCauchy(5.0).log_prob(tau)
        + Normal(0, 1.0).log_prob(tt).sum(-1)
    )
    log_z, w = _is_log_z_and_mean(bench, draws, log_prior)
    ess = float(1 / (w**2).sum())
    assert ess > 500
    assert log_z == pytest.approx(bench.target.log_z, abs=4 / math.sqrt(ess))
    exact = bench.target.sample_exact(N, gen())
    est = float((w * mu).sum())
    sd = float(exact["mu"].double().std())
    assert float(exact["mu"].double().mean()) == pytest.approx(est, abs=4 * sd / math.sqrt(ess))


def test_frequency_log_z_matches_importance_sampling_near_the_modes():
    bench = rt.frequency()
    exact = bench.target.sample_exact(50_000, gen(2))
    # proposal: exact omega's aliases widened, (a, b) from the prior
    g = gen(3)
    m = 100_000
    k = torch.randint(5, (m,), generator=g)
    omega = bench.target.modes.double()[k] + 0.05 * torch.randn(m, generator=g, dtype=torch.float64)
    ab = rt.FREQ_PRIOR * torch.randn(m, 2, generator=g, dtype=torch.float64)
    log_q = (
        torch.logsumexp(Normal(bench.target.modes.double(), 0.05).log_prob(omega[:, None]), -1)
        - math.log(5)
        + Normal(0, rt.FREQ_PRIOR).log_prob(ab).sum(-1)
    )
    log_z, w = _is_log_z_and_mean(bench, {"omega": omega.float(), "ab": ab.float()}, log_q)
    ess = float(1 / (w**2).sum())
    assert ess > 100
    assert log_z == pytest.approx(bench.target.log_z, abs=4 / math.sqrt(ess))
    a_is = float((w * ab[:, 0]).sum())
    a_sd = float(exact["ab"][:, 0].double().std())
    assert float(exact["ab"][:, 0].double().mean()) == pytest.approx(
        a_is, abs=4 * a_sd / math.sqrt(ess)
    )


# ---------------------------------------------------------------------- symmetries
@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetry_group_leaves_the_log_joint_unchanged(name):
    bench = rt.build_real_target(name)
    points = [_prior_draw(bench, s) for s in range(4)]
    batch = {k: torch.stack([p[k] for p in points]) for k in points[0]}
    base = bench.target.log_joint_batch(batch)
    for element in bench.group:
        assert torch.allclose(bench.target.log_joint_batch(element(batch)), base, atol=1e-3)


@pytest.mark.parametrize("name", SYMMETRIC)
def test_canonical_labelling_is_the_same_for_every_symmetric_image(name):
    bench = rt.build_real_target(name)
    points = [_prior_draw(bench, s) for s in range(8)]
    batch = {k: torch.stack([p[k] for p in points]) for k in points[0]}
    ref = bench.canonical(batch)
    for element in bench.group:
        got = bench.canonical(element(batch))
        for k in ref:
            assert torch.allclose(got[k], ref[k])


@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetrize_gives_every_mode_its_exact_share(name):
    bench = rt.build_real_target(name)
    # draws stuck near one mode (as a chain that never switches labels would give)
    base = {k: v.unsqueeze(0).repeat(100, *([1] * v.dim())) for k, v in bench.init.items()}
    base = {k: v + 0.01 * torch.randn(v.shape, generator=gen()) for k, v in base.items()}
    base["sigma" if "sigma" in base else "psi"] = base["sigma" if "sigma" in base else "psi"].abs()
    sym = bench.symmetrize(base)
    assert next(iter(sym.values())).shape[0] == 100 * len(bench.group)
    moded = bench.with_modes(sym)
    masses = moded.target.mode_masses(sym[bench.target.site]).double()
    assert masses.shape == (len(bench.group),)
    assert torch.allclose(masses, torch.full_like(masses, 1 / len(bench.group)))


@pytest.mark.parametrize("name", SYMMETRIC)
def test_stored_ground_truth_loads_with_equal_mode_shares(name):
    path = os.path.join(GROUND_TRUTH_DIR, f"{name}.npz")
    if not os.path.exists(path):
        pytest.skip("ground truth not computed (python -m benchmarks.real_models --ground-truth)")
    bench = rt.build_real_target(name)
    draws = load_ground_truth(bench)
    moded = bench.with_modes(draws)
    masses = moded.target.mode_masses(draws[bench.target.site]).double()
    assert torch.allclose(masses, masses[0].expand_as(masses))


def test_split_rhat_is_one_for_identical_chains_and_large_for_separated_ones():
    g = gen()
    same = torch.randn(4, 1000, generator=g).double().numpy()
    assert split_rhat(same) == pytest.approx(1.0, abs=0.01)
    apart = same + torch.arange(4.0).double().numpy()[:, None] * 5
    assert split_rhat(apart) > 2


# ------------------------------------------------------------------------ quick run
def test_quick_run_writes_the_tables_and_the_goals(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.real_models", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    report = (tmp_path / "real_models.md").read_text()
    assert (tmp_path / "real_models.json").exists()
    for name in ("bgmm", "frequency", "synth20"):
        assert f"## {name}:" in report
    for guide in ("fit()", "SVI AMF + StratifiedELBO", "AutoNormal", "AutoIAFNormal"):
        assert f"| {guide} |" in report
    assert "## Goals of issue 10" in report
    assert report.count("- [") >= 5
    assert "cores" in report
    assert cpu < 60, f"--quick took {cpu:.0f} s of CPU time (budget: 60 s on one core)"


def test_ground_truth_command_writes_canonical_draws_and_a_sidecar(tmp_path, monkeypatch):
    import json

    from benchmarks import real_ground_truth, real_models

    monkeypatch.setattr(real_ground_truth, "GROUND_TRUTH_DIR", str(tmp_path))
    monkeypatch.setitem(real_ground_truth.NUTS_SETTINGS, "factor", (2, 5, 10, 1))
    docs = real_models.main(["--ground-truth", "--targets", "factor"])
    assert set(docs) == {"factor"}
    sidecar = json.loads((tmp_path / "factor.json").read_text())
    assert sidecar["chains"] == 2 and sidecar["stored_draws"] == 20
    assert sidecar["chains_info"][1]["start"]["lam"][0] < 0  # second chain in the other mode
    bench = rt.factor()
    draws = load_ground_truth(bench)
    assert draws["lam"].shape == (40, 6)  # 20 canonical draws x 2 sign images
    assert bool((bench.canonical(draws)["lam"].sum(-1) >= 0).all())


def test_fit_keeps_both_sign_modes_of_factor_analysis():
    """The final forward weight balancing must not move the mass onto one component whose
    importance weights dominate (here a loading near a Heywood boundary): fit() with its
    defaults used to end with masses (1.0, 0.0) on this target; the ELBO guard keeps the
    trained weights, which cover both sign modes."""
    import pyro

    from benchmarks.real_targets import build_real_target
    from pyro_mogflow import fit

    target = build_real_target("factor").target
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide, _ = fit(target.model, *target.args, progress=False)
    masses = target.mode_masses(guide.sample_posterior(4000, *target.args)["lam"])
    # each sign mode holds half the posterior; 0.3 leaves room for the guide's own error
    assert float(masses.min()) > 0.3, masses


# ------------------------------------------------------------------------ goal checks
def _runs(guide: str, elbos: list, modes: int | None = None) -> list:
    out = []
    for seed, elbo in enumerate(elbos):
        metrics = {"elbo": elbo}
        if modes is not None:
            metrics.update(num_modes=2, modes_covered=modes, mass_tv=0.01)
        out.append(
            {"target": "t", "guide": guide, "seed": seed, "metrics": metrics, "fit_seconds": 1.0}
        )
    return out


def test_summary_has_the_standard_error_of_the_mean():
    from benchmarks.real_models import summarise

    cell = summarise(_runs("AutoNormal", [-10.0, -12.0, -11.0]))["t"]["AutoNormal"]["elbo"]
    assert cell["mean"] == pytest.approx(-11.0)
    assert cell["se"] == pytest.approx(1.0 / math.sqrt(3))  # sd 1 over sqrt(3) seeds
    assert math.isnan(summarise(_runs("AutoNormal", [-1.0]))["t"]["AutoNormal"]["elbo"]["se"])


def test_elbo_gap_reads_seed_noise_as_noise_and_a_real_loss_as_worse():
    from benchmarks.real_models import ELBO_TOLERANCE, elbo_gap

    noisy = {"mean": -10.3, "se": 0.2}
    ref = {"mean": -10.0, "se": 0.2}
    gap, se, worse = elbo_gap(noisy, ref)
    assert gap == pytest.approx(0.3) and se == pytest.approx(math.sqrt(0.08))
    assert not worse  # 0.3 < 0.05 + 2 * 0.28
    assert elbo_gap({"mean": -11.0, "se": 0.1}, {"mean": -10.0, "se": 0.1})[2]
    # one seed: no standard error, the tolerance alone decides
    one = elbo_gap({"mean": -10.0 - 2 * ELBO_TOLERANCE, "se": float("nan")}, {"mean": -10.0})
    assert one[2] and math.isnan(one[1])


def test_goals_compare_with_autonormal_by_standard_error_and_need_fit_for_modes():
    from benchmarks.real_models import check_goals, summarise

    label = "SVI AMF + Trace_ELBO"
    runs = _runs(label, [-10.3, -10.1, -10.5, -10.2, -10.4], modes=1)
    runs += _runs("AutoNormal", [-9.8, -10.6, -10.0, -10.5, -9.9], modes=1)
    goals = check_goals(summarise(runs))
    never = next(g for g in goals if g["goal"].startswith(label) and "never worse" in g["goal"])
    assert never["met"] and "gap" in never["figure"]
    modes = next(g for g in goals if g["goal"].startswith(label) and "finds the modes" in g["goal"])
    assert not modes["met"] and "not measured" in modes["figure"]  # no fit() row to compare
    far = _runs(label, [-15.0, -15.1, -14.9, -15.0, -15.2], modes=1)
    far += _runs("AutoNormal", [-10.0, -10.1, -9.9, -10.0, -10.2], modes=1)
    far += _runs("fit()", [-9.0] * 5, modes=2)
    goals = check_goals(summarise(far))
    never = next(g for g in goals if g["goal"].startswith(label) and "never worse" in g["goal"])
    assert not never["met"] and "worse on t" in never["figure"]
    modes = next(g for g in goals if g["goal"].startswith(label) and "finds the modes" in g["goal"])
    assert not modes["met"] and "fewer modes" in modes["figure"]
