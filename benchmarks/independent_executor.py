"""Does a process pool speed up fit_independent? ``python -m benchmarks.independent_executor``

Times :func:`pyro_mogflow.fit_independent` with R = 4 runs of ``AutoMixtureFlow(K=8)`` and
``StratifiedELBO`` on the 200-point sign regression, sequential (``executor=None``) against a
``ProcessPoolExecutor`` (worker start-up included, one thread per process), in one run, and
checks that both give the same losses.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date

import numpy as np
import torch

from pyro_mogflow import AutoMixtureFlow, StratifiedELBO, fit_independent
from pyro_mogflow.examples import sign_regression, sign_regression_model

make_guide = functools.partial(AutoMixtureFlow, num_components=8)


def _time(executor, steps: int, runs: int):
    start = time.perf_counter()
    fits = fit_independent(
        sign_regression_model,
        make_guide,
        num_runs=runs,
        num_steps=steps,
        model_args=sign_regression(num_data=200, seed=0).args,
        loss=StratifiedELBO(),
        executor=executor,
    )
    return time.perf_counter() - start, fits.losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--start-method", default="spawn", choices=["spawn", "fork", "forkserver"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"{date.today()}, {platform.machine()}, {multiprocessing.cpu_count()} cores, torch "
        f"{torch.__version__}; R={args.runs}, pool of {args.workers} ({args.start_method})"
    )
    print("| steps | sequential (s) | pool (s) | speed-up | same losses |")
    print("|---|---|---|---|---|")
    for steps in args.steps:
        seq, seq_losses = _time(None, steps, args.runs)
        context = multiprocessing.get_context(args.start_method)
        with ProcessPoolExecutor(
            args.workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            par, par_losses = _time(pool, steps, args.runs)
        same = bool(np.array_equal(seq_losses, par_losses))
        print(f"| {steps} | {seq:.1f} | {par:.1f} | {seq / par:.2f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
