#!/usr/bin/env bash
# Build the documentation (API reference from the docstrings, the README, the tutorials) into
# docs/_build/html. Warnings are errors (-W), so a broken cross-reference fails the build;
# --keep-going reports every warning before failing. Needs the "docs" extra (scripts/setup.sh
# installs it); fetches nothing from the network.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m sphinx -E -W --keep-going -b "${DOCS_BUILDER:-html}" docs "docs/_build/${DOCS_BUILDER:-html}" "$@"
