"""The density benchmark's quick mode runs end to end in seconds."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_runs():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.density", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "Held-out log-likelihood" in out and "| grid |" in out and "Goals (2-D)" in out
    assert (ROOT / "benchmarks" / "results" / "density" / "density_2d.png").exists()
