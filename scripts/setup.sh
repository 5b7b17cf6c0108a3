#!/usr/bin/env bash
# Everything a fresh machine needs: a virtual environment in .venv with the CPU build of torch
# (torch==2.13.0 is installed first, so no multi-GB CUDA build is pulled), then pyro_mogflow with
# all its extras. Safe to re-run: a finished environment is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[all]"
