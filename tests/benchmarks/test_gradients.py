import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks import gradients  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gradients")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gradients", "--quick", "--out", str(out), "--seed", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "gradients.json") as fh:
        results = json.load(fh)
    return proc.stdout, (out / "gradients.md").read_text(), results


def test_quick_run_writes_every_case_and_estimator(quick_run):
    stdout, md, results = quick_run
    assert set(results["cases"]) == {"a4", "a1.5", "b", "c", "d0.1", "d1"}
    for case in results["cases"].values():
        assert set(case["estimators"]) == set(gradients.ESTIMATORS)
        assert case["title"] in md
    assert results["meta"]["quick"] is True and "ELBO" in results["meta"]["objective"]
    assert "| implicit |" in stdout and "## Goals" in md
    assert len(results["goals"]) >= 4


def test_quick_run_measures_what_it_claims(quick_run):
    _, _, results = quick_run
    a = results["cases"]["a1.5"]
    assert a["reference_error"] < 1e-3
    for label in ("implicit", "stratified"):
        row = a["estimators"][label]
        assert row["all_finite"] and row["seconds_per_gradient"] > 0
        for group in gradients.GROUPS:
            assert all(math.isfinite(v) for v in row["groups"][group]["mean"])
    # the relaxation's bias is large enough to be flagged even in the tiny run
    relaxed = a["estimators"]["relaxed tau=1"]["groups"]["locs"]
    assert relaxed["max_z"] > relaxed["threshold"]
    # case d reports finiteness only, and the exact estimators are finite there
    for name in ("d0.1", "d1"):
        d = results["cases"][name]
        assert d["estimators"]["implicit"]["all_finite"]
        assert d["estimators"]["stratified"]["all_finite"]
        assert d["estimators"]["implicit"]["unbiased"] is None


def test_quadrature_reference_matches_closed_form():
    """Two identical components form one Gaussian, whose ELBO under a Gaussian target is known:
    L = E_q log N(z; m, s^2 I) + H(q), so dL/dmu = (m - mu) / s^2, dL/dsigma = -sigma/s^2 + 1/sigma
    (shared equally by the two components), dL/dlogits = 0."""
    m, s = torch.tensor([0.3, -0.7], dtype=torch.float64), 1.7
    mu = torch.tensor([0.5, 1.0], dtype=torch.float64)
    sigma = torch.tensor([0.8, 1.3], dtype=torch.float64)

    def log_target(x):
        return (-0.5 * ((x - m) / s).pow(2) - math.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)

    case = gradients.Case(
        name="t",
        title="t",
        logits=torch.tensor([0.2, -0.2], dtype=torch.float64),
        locs=mu.expand(2, 2).clone(),
        scales=sigma.expand(2, 2).clone(),
        log_target=log_target,
        flow=None,
        dtype=torch.float64,
        particles=1,
        reps=1,
        reference="quadrature",
        reference_size=24,
    )
    ref = gradients.exact_reference(case)
    g_logits, g_locs, g_scales = ref["grads"]
    pi = torch.softmax(case.logits, -1)[:, None]
    torch.testing.assert_close(g_logits, torch.zeros(2, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(g_locs, pi * (m - mu) / s**2)
    torch.testing.assert_close(g_scales, pi * (-sigma / s**2 + 1 / sigma))
