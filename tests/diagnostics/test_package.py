"""The diagnostics package: old module paths still re-export, and no optional import at load."""

from __future__ import annotations

import os
import subprocess
import sys

import pyro_mogflow
from pyro_mogflow import arviz as old_arviz
from pyro_mogflow import diagnostics
from pyro_mogflow import runs as old_runs


def test_deprecated_modules_reexport_the_same_objects():
    for name in old_arviz.__all__:
        assert getattr(old_arviz, name) is getattr(diagnostics, name)
    for name in old_runs.__all__:
        assert getattr(old_runs, name) is getattr(diagnostics, name)
    assert set(old_arviz.__all__) == {"to_inference_data", "vi_loo"}
    assert set(old_runs.__all__) == {"IndependentFits", "fit_independent"}


def test_package_exports_every_name_of_the_old_module_and_the_top_level_ones():
    old = {
        "MISSED_MODES_WARNING",
        "VIDiagnostics",
        "VIDiagnosticsWarning",
        "good_k_threshold",
        "psis",
        "vi_diagnostics",
    }
    assert old <= set(diagnostics.__all__)
    for name in diagnostics.__all__:
        value = getattr(diagnostics, name)
        if name in pyro_mogflow.__all__:
            assert getattr(pyro_mogflow, name) is value


def test_import_needs_neither_arviz_nor_scipy_nor_xarray():
    code = (
        "import sys, pyro_mogflow; "
        "print(sorted({'arviz', 'scipy', 'xarray', 'ray'} & set(sys.modules)))"
    )
    # the copy of the package under test, whatever is installed
    root = os.path.dirname(os.path.dirname(os.path.abspath(pyro_mogflow.__file__)))
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert out.strip() == "[]"
