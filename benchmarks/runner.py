"""Shared plumbing of the benchmarks: run jobs (in worker processes), save a report, one seeded
``fit``."""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable

import pyro
from tqdm.auto import tqdm

from pyro_mogflow import fit

__all__ = ["run_jobs", "save_report", "seeded_fit"]


def run_jobs(run_job: Callable[[dict], dict], work: list, jobs: int, desc: str) -> list:
    """``[run_job(job) for job in work]``, in ``jobs`` spawned processes when ``jobs > 1``.

    :param run_job: a module-level function (it is pickled to the workers).
    :param list work: the jobs, each a picklable dict.
    :param int jobs: worker processes; 1 runs in this process.
    :param str desc: the progress bar's label.
    :return: the results, in completion order when ``jobs > 1``.
    """
    runs = []
    bar = tqdm(total=len(work), desc=desc, file=sys.stderr)
    if jobs == 1:
        for job in work:
            runs.append(run_job(job))
            bar.update(1)
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            for fut in cf.as_completed([pool.submit(run_job, job) for job in work]):
                runs.append(fut.result())
                bar.update(1)
    bar.close()
    return runs


def save_report(results: dict, text: str, out: str, name: str) -> None:
    """Write ``results`` to ``out/name.json`` and the markdown ``text`` to ``out/name.md``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as fh:
        fh.write(text)


def seeded_fit(model, args: tuple, kwargs: dict, seed: int, options: dict):
    """``pyro_mogflow.fit`` from a clear param store and seed ``seed``, with ``options``, no
    progress bar; returns ``(FitResult, wall seconds)``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    result = fit(model, *args, progress=False, model_kwargs=kwargs, **options)
    return result, time.perf_counter() - start
