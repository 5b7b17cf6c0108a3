"""``python -m benchmarks.maxent --quick`` runs in seconds and writes its table and JSON."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_run_prints_the_table_with_machine_date_and_goals(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.maxent", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "maxent.json").read_text())
    assert results["meta"]["machine"] and results["meta"]["date"]
    cases = {r["case"] for r in results["runs"]}
    assert cases == {"dirichlet", "gaussian", "exponential", "bimodal-1d", "bimodal-2d"}
    assert any(r["K"] == 1 for r in results["runs"])  # the normal-base comparison
    text = (tmp_path / "maxent.md").read_text()
    assert "| case | base | estimator |" in text and "Goals:" in text
    assert text in proc.stdout
