#!/usr/bin/env bash
# The checks that need a GPU, as one script for the project's lent device (never for CI):
# the CUDA-marked tests, the scaling tables on CUDA (N = 1e3 ... 1e6), and the memory peak at
# N = 1e6. Usage: OUT=DIR bash scripts/gpu_checks.sh   (python3 with torch and CUDA; the pure-
# Python dependencies the image lacks installed beside it, see README "GPU").
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__)"
  timeout 60 python3 -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tail -8
  timeout 200 python3 -m benchmarks.scaling --device cuda --max-n 1e5 --parts logistic \
    --out "$OUT/logistic"
  timeout 90 python3 -m benchmarks.scaling --device cuda --max-n 1e5 --parts sign per-step growth \
    --out "$OUT/sign"
  timeout 110 python3 -m benchmarks.scaling --device cuda --min-n 1e6 --max-n 1e6 \
    --parts logistic --out "$OUT/logistic1e6"
  timeout 50 python3 -m benchmarks.memory --device cuda --sizes 1000000 --steps 3 \
    --unchunked-up-to 0
} 2>&1 | tee "$OUT/log.txt"
tar -czf "$OUT/reports.tgz" -C "$OUT" logistic sign logistic1e6 2>/dev/null
rm -rf "$OUT/logistic" "$OUT/sign" "$OUT/logistic1e6"
