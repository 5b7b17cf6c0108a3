"""The main job, ``python -m pyro_mogflow demo``: CLI, outputs, errors, and the demo's model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mogflow.__main__ import main
from pyro_mogflow.examples import demo, gaussian_mixture_target

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, cwd=None, timeout=180):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=path, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "pyro_mogflow", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=timeout,
    )


# ------------------------------------------------------------------------------ CLI
def test_top_level_help_lists_the_demo_command():
    res = _cli("--help")
    assert res.returncode == 0, res.stderr
    assert "demo" in res.stdout


def test_demo_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--steps", "--seed", "--device", "--out"):
        assert option in out


def _usage_error(argv, capsys) -> str:
    """Run the CLI in-process; it must exit with argparse's usage-error status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_no_command_is_a_usage_error(capsys):
    assert "COMMAND" in _usage_error([], capsys)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--steps", "0"], "argument --steps: must be a positive integer, got '0'"),
        (["--steps", "ten"], "argument --steps: must be a positive integer, got 'ten'"),
        (["--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ],
)
def test_bad_arguments_are_usage_errors_that_say_what_is_allowed(args, expected, capsys):
    assert expected in _usage_error(["demo", *args], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    err = _usage_error(["demo", "--device", "cuda"], capsys)
    assert "CUDA is not available" in err and "--device cpu" in err


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "not_a_folder"
    path.write_text("x")
    err = _usage_error(["demo", "--out", str(path)], capsys)
    assert "argument --out" in err and "not a folder" in err


def test_demo_prints_the_table_and_writes_the_png_and_json(tmp_path):
    out = tmp_path / "demo-out"
    res = _cli("demo", "--steps", "20", "--seed", "1", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    header = next(line for line in lines if line.startswith("guide"))
    for column in ("mass near theta=-1.5", "mass near theta=+1.5", "modes found", "ELBO"):
        assert column in header
    for row in ("exact posterior", "AutoNormal", "AutoMixtureFlow"):
        assert any(line.startswith(row) for line in lines), row
    # a verdict line per guide
    assert sum(("found" in line and "modes" in line) for line in lines[-4:]) >= 2
    assert "AutoMixtureFlow" in res.stderr  # the tqdm bar's label

    png = out / "posteriors.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000
    summary = json.loads((out / "results.json").read_text())
    assert summary["steps"] == 20 and summary["seed"] == 1
    for name in ("AutoNormal", "AutoMixtureFlow"):
        g = summary["guides"][name]
        assert len(g["mode_masses"]) == 2
        assert math.isfinite(g["elbo"]) and g["elbo_se"] >= 0
        assert 0 <= g["modes_found"] <= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_demo_runs_on_cuda(tmp_path):
    res = _cli("demo", "--steps", "10", "--device", "cuda", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "results.json").read_text())["device"].startswith("cuda")


# --------------------------------------------------------------------------- python API
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"steps": 0}, ValueError, "steps"),
        ({"steps": 1.5}, TypeError, "steps"),
        ({"seed": -2}, ValueError, "seed"),
        ({"device": "tpu"}, ValueError, "device"),
        ({"device": 3}, TypeError, "device"),
        ({"out": 3}, TypeError, "out"),
    ],
)
def test_run_demo_rejects_bad_arguments_before_any_work(kwargs, error, match, tmp_path):
    kwargs.setdefault("out", tmp_path / "never-created")
    with pytest.raises(error, match=match):
        demo.run_demo(progress=False, **kwargs)
    if isinstance(kwargs["out"], Path):
        assert not kwargs["out"].exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_run_demo_rejects_cuda_without_cuda(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        demo.run_demo(device="cuda", out=tmp_path, progress=False)


# --------------------------------------------------------------------------- the model
@pytest.mark.parametrize("seed", [0, 1])
def test_demo_model_is_bimodal_in_the_sign_of_theta(seed):
    target = demo.demo_target(seed)
    m = float(target.modes[1])
    sigma = torch.tensor(float(target.truth["sigma"]))

    def log_p(theta):
        return float(target.log_joint({"theta": torch.tensor(theta), "sigma": sigma}))

    # mirror modes of exactly equal height ...
    assert log_p(m) == log_p(-m)
    # ... each a local maximum ...
    for theta in (m, -m):
        assert log_p(theta) > log_p(theta + 0.3) and log_p(theta) > log_p(theta - 0.3)
    # ... separated by a deep valley at theta = 0
    assert log_p(0.0) < log_p(m) - 20
    assert target.reference_masses.tolist() == pytest.approx([0.5, 0.5], abs=1e-3)


def test_demo_model_has_a_constrained_site():
    target = demo.demo_target()
    trace = pyro.poutine.trace(target.model).get_trace(*target.args, **target.kwargs)
    support = trace.nodes["sigma"]["fn"].support
    assert support is not dist.constraints.real and support.lower_bound == 0


def test_evaluate_gives_log_z_and_exact_masses_for_the_exact_posterior():
    # A guide equal to the posterior: every importance weight is log Z, so the ELBO is log Z with
    # no Monte Carlo error, and its mode masses are exact draws (checked against 4 standard errors).
    target = gaussian_mixture_target(log_z=0.8, radius=0.6, dtype=torch.float64)
    logits, locs, scales = target.args

    def exact_guide(*args, **kwargs):
        mix = dist.MixtureSameFamily(
            dist.Categorical(logits=logits), dist.Normal(locs, scales).to_event(1)
        )
        pyro.sample("z", mix)

    pyro.set_rng_seed(0)
    ev = demo.evaluate_guide(target, exact_guide, num_samples=20000)
    assert ev["elbo"] == pytest.approx(0.8, abs=1e-9)
    assert ev["elbo_se"] == pytest.approx(0.0, abs=1e-9)
    ref = target.reference_masses
    se = (ref * (1 - ref) / 20000).sqrt()
    assert bool(((torch.tensor(ev["mode_masses"], dtype=ref.dtype) - ref).abs() < 4 * se).all())
    assert ev["modes_found"] == 4
    assert ev["samples"]["z"].shape == (20000, 2)


def test_old_module_path_keeps_the_old_names_with_a_deprecation_warning():
    import importlib

    sys.modules.pop("pyro_mogflow.demo", None)
    with pytest.warns(DeprecationWarning, match="pyro_mogflow.examples.demo"):
        old = importlib.import_module("pyro_mogflow.demo")
    assert old.fit is demo.fit_guide and old.evaluate is demo.evaluate_guide
    assert old.run_demo is demo.run_demo
    assert set(demo.__all__) < set(old.__all__)


def test_format_table_has_a_row_per_guide_and_the_exact_row():
    target = demo.demo_target()
    report = demo.GuideReport(
        name="SomeGuide",
        mode_masses=[0.25, 0.7],
        modes_found=2,
        elbo=-35.5,
        elbo_se=0.01,
        fit_seconds=1.25,
        samples={},
        losses=[1.0],
    )
    table = demo.format_table(target, [report]).splitlines()
    assert table[0].split()[0] == "guide"
    assert table[2].startswith("exact posterior")
    row = table[3].split()
    assert row[:4] == ["SomeGuide", "0.250", "0.700", "2/2"]
    assert f"{target.log_z + 35.5:.3f}" in row


# ------------------------------------------------------------- output folder, seeds, Ctrl-C
def _file_in(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


@pytest.mark.parametrize("where", ["under_a_file", "unwritable"])
def test_out_that_cannot_be_written_is_refused_before_any_work(where, tmp_path, monkeypatch):
    if where == "under_a_file":
        out = _file_in(tmp_path) / "sub" / "dir"
        match = "is a file"
    else:
        out = tmp_path / "ro" / "dir"

        def refuse(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(Path, "write_bytes", refuse)
        match = "Permission denied"
    fitted = []
    monkeypatch.setattr(demo, "fit_guide", lambda *a, **k: fitted.append(1))
    with pytest.raises(ValueError, match=match):
        demo.run_demo(steps=5, out=out, progress=False)
    assert not fitted
    assert not (tmp_path / "ro").exists()  # the check leaves no folder behind


def test_cli_out_under_a_file_is_a_usage_error(tmp_path, capsys):
    err = _usage_error(["demo", "--out", str(_file_in(tmp_path) / "x")], capsys)
    assert "argument --out" in err and "is a file" in err


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_cli_out_in_proc_is_a_usage_error(capsys):
    err = _usage_error(["demo", "--out", "/proc/mogflow-x"], capsys)
    assert "argument --out" in err


@pytest.mark.parametrize("seed", [2**32, 2**32 - 1, 2**40])
def test_seed_beyond_numpy_range_is_refused_up_front(seed, tmp_path, capsys):
    err = _usage_error(["demo", "--seed", str(seed), "--out", str(tmp_path)], capsys)
    assert "argument --seed" in err and "4294967294" in err
    with pytest.raises(ValueError, match="seed must be an int in"):
        demo.run_demo(seed=seed, out=tmp_path, progress=False)


def test_ctrl_c_keeps_the_finished_guides_and_prints_one_line(tmp_path, monkeypatch, capsys):
    real_fit = demo.fit_guide

    def fit_then_interrupt(target, guide, steps, **kwargs):
        if isinstance(guide, demo.AutoMixtureFlow):
            raise KeyboardInterrupt
        return real_fit(target, guide, 5, **kwargs)

    monkeypatch.setattr(demo, "fit_guide", fit_then_interrupt)
    assert main(["demo", "--steps", "5", "--out", str(tmp_path), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "AutoNormal" in err
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["interrupted"] is True
    assert list(summary["guides"]) == ["AutoNormal"]
    assert summary["not_fitted"] == ["AutoMixtureFlow"]
    assert (tmp_path / "posteriors.png").exists()


def test_ctrl_c_before_any_guide_is_fitted_saves_nothing(tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "fit_guide", interrupt)
    assert main(["demo", "--out", str(tmp_path / "o"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nothing saved" in err
    assert not (tmp_path / "o" / "results.json").exists()
