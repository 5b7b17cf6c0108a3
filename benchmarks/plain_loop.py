r"""The plain SVI loop: what a user's own ``SVI`` loop gets from ``AutoMixtureFlow``.

Run ``python -m benchmarks.plain_loop`` (every target, every row, ``--seeds`` seeds, ``--steps``
steps at Adam lr :data:`LR`). Each row trains as a user would write it, with the same optimiser,
learning rate and number of steps as the ``AutoNormal`` anchor:

=====================================  ===================================================
row                                    training
=====================================  ===================================================
``AutoNormal``                         ``SVI(model, AutoNormal(model), Adam, Trace_ELBO())``
``AMF + Trace_ELBO``                   ``SVI(model, AutoMixtureFlow(model), Adam, Trace_ELBO())``
``AMF + StratifiedELBO``               the same with ``StratifiedELBO()``
``AMF prior + StratifiedELBO``         ``AutoMixtureFlow(model, init_spread="prior")``: the
                                       components at prior draws (the former default)
``AMF prior + NG + StratifiedELBO``    that guide, ``MixtureNaturalGradient(guide, Adam)``
``AMF prior + NG + Trace_ELBO``        the same under ``Trace_ELBO``
``fit()``                              ``fit(model, *args, num_steps=steps)`` (its own lr), the
                                       reference for where the modes are found
=====================================  ===================================================

Each fitted guide is scored by :func:`benchmarks.real_models.evaluate` (modes covered, mode-mass
TV, reverse KL where :math:`\log Z` is known, moment errors) on :data:`NUM_EVAL` draws, and the
warnings raised while training are counted. Writes ``plain_loop.{md,json}`` to ``--out``
(default ``benchmarks/results/plain_loop/``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam

from pyro_mogflow import AutoMixtureFlow, MixtureNaturalGradient, StratifiedELBO, fit

from .real_models import _agg, _fmt, _machine, evaluate, truth_of
from .real_targets import RealTarget, eight_schools, synthetic
from .runner import run_jobs, save_report
from .targets import build_target

__all__ = ["GUIDES", "TARGETS", "main", "run_job"]

#: Steps and Adam learning rate of every SVI row (``fit()`` keeps its own learning rate).
STEPS, LR = 2000, 5e-3
#: Guide draws scored per run; exact draws for the reference mode masses.
NUM_EVAL, NUM_TRUTH = 4096, 100_000


def _bench(name: str) -> Callable[[], RealTarget]:
    return lambda: RealTarget(name, build_target(name).target, "exact")


#: name -> builder: two 2-D suite targets, the 5-D three-mode correlated target, the 20-D mirror
#: target and eight schools (a funnel, unimodal).
TARGETS: dict[str, Callable[[], RealTarget]] = {
    "grid9": _bench("grid9"),
    "signreg": _bench("signreg"),
    "synth5": lambda: synthetic(5, (0.6, 0.3, 0.1), seed=5),
    "synth20": lambda: synthetic(20, (0.5, 0.5), seed=20, mirror=True),
    "eight_schools": eight_schools,
}


def _svi(elbo: Callable, guide_kwargs: dict | None = None, natural: bool = False) -> Callable:
    def train(model, args, kwargs, steps):
        if guide_kwargs is None:
            guide = AutoNormal(model)
        else:
            guide = AutoMixtureFlow(model, **guide_kwargs)
        optim = Adam({"lr": LR})
        if natural:
            optim = MixtureNaturalGradient(guide, optim)
        svi = SVI(model, guide, optim, elbo())
        for _ in range(steps):
            svi.step(*args, **kwargs)
        return guide

    return train


def _fit(model, args, kwargs, steps):
    return fit(model, *args, model_kwargs=kwargs, num_steps=steps, progress=False).guide


PRIOR = {"init_spread": "prior"}
#: row label -> ``train(model, args, kwargs, steps) -> guide``.
GUIDES: dict[str, Callable] = {
    "AutoNormal": _svi(Trace_ELBO),
    "AMF + Trace_ELBO": _svi(Trace_ELBO, {}),
    "AMF + StratifiedELBO": _svi(StratifiedELBO, {}),
    "AMF prior + StratifiedELBO": _svi(StratifiedELBO, PRIOR),
    "AMF prior + NG + StratifiedELBO": _svi(StratifiedELBO, PRIOR, natural=True),
    "AMF prior + NG + Trace_ELBO": _svi(Trace_ELBO, PRIOR, natural=True),
    "fit()": _fit,
}


@functools.cache
def _truth(name: str, num_truth: int = NUM_TRUTH):
    return truth_of(TARGETS[name](), num_truth)


def run_job(job: dict) -> dict:
    """Train one row on one target from one seed and score it (in a worker process)."""
    torch.set_num_threads(1)
    logging.getLogger("pyro").setLevel(logging.WARNING)
    bench, truth, bins = _truth(job["target"], job["num_truth"])
    t = bench.target
    pyro.clear_param_store()
    pyro.set_rng_seed(job["seed"])
    out = dict(job)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            guide = GUIDES[job["guide"]](t.model, t.args, t.kwargs, job["steps"])
            out["fit_seconds"] = time.perf_counter() - start
        out["warnings"] = len(caught)
        out["warning_messages"] = sorted({str(w.message)[:160] for w in caught})[:3]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["metrics"] = evaluate(guide, bench, truth, bins, job["num_eval"])
    except Exception as e:  # a diverged fit is a result, not a crash
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    return out


_KEYS = ("modes_covered", "mass_tv", "reverse_kl", "elbo", "mean_err")


def summarise(runs: list) -> dict:
    """target -> row -> each metric's mean and worst seed, warnings and failures."""
    out: dict = {}
    for run in runs:
        out.setdefault(run["target"], {}).setdefault(run["guide"], []).append(run)
    for per in out.values():
        for guide, rs in per.items():
            ok = [r for r in rs if "metrics" in r]
            cell = {
                key: _agg(
                    [r["metrics"].get(key) for r in ok],
                    "min" if key in ("elbo", "modes_covered") else "max",
                )
                for key in _KEYS
            }
            cell["num_modes"] = ok[0]["metrics"].get("num_modes") if ok else None
            cell["warnings"] = sum(r.get("warnings", 0) for r in rs)
            cell["failed"] = [r["error"] for r in rs if "error" in r]
            cell["fit_seconds"] = _agg([r["fit_seconds"] for r in ok], "max")
            per[guide] = cell
    return out


def _ratio(cell: dict, anchor: dict) -> str:
    """The row's mean reverse KL over AutoNormal's (below 1: better than the anchor)."""
    a, b = cell.get("reverse_kl"), anchor.get("reverse_kl") if anchor else None
    if a is None or b is None or not math.isfinite(a["mean"]) or b["mean"] <= 0:
        return "-"
    return f"{a['mean'] / b['mean']:.2f}"


def markdown(summary: dict, meta: dict) -> str:
    """One table: rows x targets, with modes, TV, reverse KL and its ratio to AutoNormal."""
    lines = [
        "# The plain SVI loop",
        "",
        f"{meta['date']}, {meta['machine']}. Command: `{meta['command']}` ({meta['seeds']} "
        f"seed(s), {meta['steps']} steps, Adam lr {LR} for every SVI row; fit() with its own "
        f"lr and the same steps; {meta['num_eval']} draws scored).",
        "",
        "Each cell: mean over seeds (worst seed). modes = modes covered, TV = mode-mass total "
        "variation, rKL = reverse KL, x AN = rKL / AutoNormal's rKL, warn = warnings while "
        "training.",
    ]
    for name, per in summary.items():
        lines += ["", f"## {name}: {TARGETS[name]().description}", ""]
        head = ["row", "modes", "TV", "rKL", "x AN", "mean err", "warn", "s", "failed"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        anchor = per.get("AutoNormal")
        for guide, cell in per.items():
            m = cell.get("num_modes")
            modes = "-" if m is None else _fmt(cell, "modes_covered", 1) + f"/{m}"
            lines.append(
                "| "
                + " | ".join(
                    [
                        guide,
                        modes,
                        _fmt(cell, "mass_tv"),
                        _fmt(cell, "reverse_kl"),
                        _ratio(cell, anchor),
                        _fmt(cell, "mean_err", 2),
                        str(cell["warnings"]),
                        _fmt(cell, "fit_seconds", 0).split(" ")[0],
                        str(len(cell["failed"])),
                    ]
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point; returns the JSON document it writes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS))
    parser.add_argument("--guides", nargs="+", choices=list(GUIDES))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--num-eval", type=int, default=NUM_EVAL)
    parser.add_argument("--num-truth", type=int, default=NUM_TRUTH)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--out", default=None, help="output folder")
    args = parser.parse_args(argv)
    if min(args.seeds, args.steps, args.jobs, args.num_eval, args.num_truth) < 1:
        parser.error("--seeds, --steps, --jobs, --num-eval and --num-truth must be >= 1")
    torch.set_num_threads(1)
    targets = tuple(args.targets or TARGETS)
    guides = tuple(args.guides or GUIDES)
    command = "python -m benchmarks.plain_loop " + " ".join(sys.argv[1:] if argv is None else argv)
    work = [
        {
            "target": t,
            "guide": g,
            "seed": s,
            "steps": args.steps,
            "num_eval": args.num_eval,
            "num_truth": args.num_truth,
        }
        for s in range(args.seeds)
        for t in targets
        for g in guides
    ]
    start = time.perf_counter()
    runs = run_jobs(run_job, work, args.jobs, "plain loop")
    runs.sort(key=lambda r: (targets.index(r["target"]), guides.index(r["guide"]), r["seed"]))
    summary = summarise(runs)
    summary = {t: {g: summary[t][g] for g in guides if g in summary[t]} for t in targets}
    meta = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": _machine(),
        "command": command,
        "seeds": args.seeds,
        "steps": args.steps,
        "num_eval": args.num_eval,
        "wall_seconds": time.perf_counter() - start,
    }
    text = markdown(summary, meta)
    doc = {"meta": meta, "summary": summary, "runs": runs}
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", "plain_loop"
    )
    save_report(doc, text, out, "plain_loop")
    print(text)
    return doc


if __name__ == "__main__":
    main()
