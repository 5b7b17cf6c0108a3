"""Seconds per ``fit()`` step at N = 1e6 on CUDA under several ``memory_budget`` values.

Issue 11's lead for the N = 1e6 row: each step's 128 draws x 1e6 points x 20 weights are cut
into chunks that fit the budget. Run ``python -m benchmarks.cuda_budget`` on a GPU: for each
budget, a warm-up fit of 5 steps, then ``fit(num_steps=60)`` timed as a whole (its set-up at
prior draws and the final weight balancing included, so the figure is above a bare step's),
with the peak of CUDA memory allocated.
"""

from __future__ import annotations

import time

import pyro
import torch

from pyro_mogflow import AutoMixtureFlow, fit

from .scaling import _data, logistic_model

GIB = 2**30


def _fit(x, y, steps: int, budget: int) -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(logistic_model).setup(x, y)
    fit(logistic_model, x, y, guide=guide, num_steps=steps, progress=False, memory_budget=budget)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.cuda_budget: no CUDA device is available")
    x, y, _ = _data("logistic", 1_000_000, 20, "cuda")
    for budget in (GIB, 4 * GIB, 16 * GIB, 64 * GIB):
        _fit(x, y, 5, budget)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        _fit(x, y, 60, budget)
        torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - start) / 60
        peak = torch.cuda.max_memory_allocated() / GIB
        print(f"budget {budget / GIB:.0f} GiB: {ms:.1f} ms/step, peak CUDA {peak:.2f} GiB")


if __name__ == "__main__":
    main()
