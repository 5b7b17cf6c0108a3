"""Every tutorial is a jupytext percent-format notebook that runs start to finish in fast mode."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))


def _run(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYRO_MOGFLOW_FAST="1",
        MPLBACKEND="Agg",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    return subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """Run a tutorial once per test module (cwd: a fresh temporary folder) and cache the result."""
    done = {}

    def run(path: Path):
        if path not in done:
            cwd = tmp_path_factory.mktemp(path.stem)
            done[path] = (_run(path, cwd), cwd)
        return done[path]

    return run


def test_there_are_tutorials():
    assert any(p.name.startswith("01_") for p in TUTORIALS)


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.name for p in TUTORIALS])
def test_tutorial_is_a_percent_format_notebook(path):
    jupytext = pytest.importorskip("jupytext")
    notebook = jupytext.read(path)
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds[0] == "markdown" and notebook.cells[0].source.startswith("# "), "needs a title"
    assert "code" in kinds and kinds.count("markdown") >= 2
    assert "# %%" in path.read_text()


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.name for p in TUTORIALS])
def test_tutorial_runs_in_fast_mode(path, fast_run):
    res, _ = fast_run(path)
    assert res.returncode == 0, f"{path.name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"


def test_first_tutorial_reports_components_and_saves_its_figure(fast_run):
    res, cwd = fast_run(ROOT / "tutorials" / "01_multimodal_posterior.py")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "weight   theta   sigma" in res.stdout  # the components() table
    assert "AutoNormal: ELBO" in res.stdout and "AutoMixtureFlow: ELBO" in res.stdout
    png = cwd / "01_multimodal_posterior.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
