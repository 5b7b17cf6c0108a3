#!/usr/bin/env bash
# The package must import with its declared dependencies alone (no extras: no scipy, arviz,
# xarray, matplotlib, ray). Installs it into a fresh venv in .venv-bare (CPU torch first) and imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-bare/bin/python ]; then
  "$PY" -m venv .venv-bare
fi
.venv-bare/bin/python -m pip install -q --upgrade pip
.venv-bare/bin/python -m pip install -q "torch==2.13.0"
.venv-bare/bin/python -m pip install -q .
cd /tmp
"$OLDPWD/.venv-bare/bin/python" - <<'PY'
import sys

import pyro_mogflow

for name in ("scipy", "arviz", "xarray", "matplotlib", "ray"):
    assert name not in sys.modules, f"import pyro_mogflow imported {name}"
print(f"bare install imports pyro_mogflow {pyro_mogflow.__version__} without optional packages")
PY
