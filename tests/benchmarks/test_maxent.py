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
    # One row per (case, estimator, K), averaged over seeds; the mixture runs start spread out.
    assert len(results["table"]) == len(results["runs"])
    assert all(r["seeds"] == 1 for r in results["table"])


def test_merge_averages_the_runs_of_several_files_without_fitting(tmp_path):
    from benchmarks.maxent import main, make_case, mixture_settings

    assert mixture_settings(make_case("bimodal-1d"))["init_spread"] > 2.9  # sqrt(b2) ~ 2.96
    run = dict(case="bimodal-1d", estimator="stratified", K=8, exact=1.0, entropy=0.9,
               entropy_se=0.01, entropy_error=-0.1, violation=1e-3, kl=0.1, kl_se=0.01,
               ks_stat=0.1, ks_p=0.5, seconds=1.0)  # fmt: skip
    normal = dict(run, K=1, kl=0.5)
    for seed, kl in [(0, 0.1), (1, 0.3)]:
        meta = dict(command=f"c{seed}", machine="m", date="d", torch="t", seeds=[seed], seconds=1)
        runs = [dict(run, seed=seed, kl=kl), dict(normal, seed=seed)]
        (tmp_path / f"{seed}.json").write_text(json.dumps(dict(meta=meta, runs=runs)))
    files = f"{tmp_path / '0.json'},{tmp_path / '1.json'}"
    results = main(["--merge", files, "--out", str(tmp_path / "out")])
    (mix,) = [r for r in results["table"] if r["K"] == 8]
    assert mix["seeds"] == 2 and abs(mix["kl"] - 0.2) < 1e-12
    assert "ratio 2.5" in " ".join(results["goals"])
    assert "`c0`; `c1`" in (tmp_path / "out" / "maxent.md").read_text()
