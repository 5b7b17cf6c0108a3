r"""The multimodal benchmark: does a guide find every mode, with the right masses, untuned?

Run ``python -m benchmarks.multimodal --suite quick`` (a few minutes on 2 cores) or
``--suite full --jobs N`` (every target, every guide, 5 seeds; parallel over ``N`` processes,
one thread each). It writes into ``--out`` (default ``benchmarks/results/``, and
``benchmarks/results/quick/`` for the quick suite):

* ``multimodal.md``: per target, a table of every guide (mean over seeds, and the number of
  seeds in which all modes were covered with mode-mass TV <= 0.05), the timing table and the
  verdict on each goal of issue 4;
* ``multimodal.json``: every run's metrics, the summaries, the goals and the machine;
* ``multimodal_<target>.png`` for the 2-D targets: the target's density contours and 1000
  draws of each guide (seed 0).

Targets are in :mod:`benchmarks.targets`, guides and how they are trained in
:mod:`benchmarks.guides`, metrics in :mod:`benchmarks.metrics`. All guides get the same
optimiser, learning rate, number of steps and number of model evaluations per step
(``K`` = AutoMixtureFlow's default number of components).

Time per step is measured apart from the fits, in one process before the pool starts (the
parallel fits share the machine): :data:`TIMING_STEPS` steps of each guide on ``funnel10``
with the flow of :data:`benchmarks.guides.FLOW`, AutoMixtureFlow included (its default
flow may differ), so the comparison is at the same flow and the same model evaluations.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import inspect
import json
import logging
import math
import os
import platform
import sys
import time
import warnings

import numpy as np
import pyro
import torch

from pyro_mogflow import AutoMixtureFlow, fit
from pyro_mogflow.examples import mode_masses

from .guides import FLOW, GUIDES
from .metrics import evaluate
from .runner import run_jobs
from .targets import TARGETS, build_target

__all__ = ["SUITES", "Suite", "main", "run_job", "summarise", "check_goals"]

#: Components of every mixture guide, and particles of every other guide: the default ``K``.
K_DEFAULT = inspect.signature(AutoMixtureFlow).parameters["num_components"].default
#: Learning rate of every guide: the default of :func:`pyro_mogflow.fit`.
LR_DEFAULT = inspect.signature(fit).parameters["lr"].default
#: Steps of each guide in the timing table.
TIMING_STEPS = 100
#: Exact posterior draws for the forward KL, and for the reference mode masses.
NUM_TRUE, NUM_TRUE_BINS = 4096, 200_000
#: Goal thresholds of issue 4.
GOAL_TV, GOAL_GMM40, GOAL_SAMPLING_TIME, GOAL_STRATIFIED_TIME = 0.05, 36, 1.2, 1.3
MULTIMODAL_GOAL_TARGETS = ("grid9", "ring8", "signreg", "mix10")


@dataclasses.dataclass(frozen=True)
class Suite:
    """What one run of the benchmark covers."""

    targets: tuple
    guides: tuple
    seeds: int
    steps: int


SUITES = {
    "quick": Suite(
        targets=("grid9", "signreg"),
        guides=(
            "AutoNormal",
            "AutoNormalizingFlow",
            "Pyro mixture+IAF",
            "design note",
            "AMF defaults",
        ),
        seeds=2,
        steps=1000,
    ),
    "full": Suite(targets=tuple(TARGETS), guides=tuple(GUIDES), seeds=5, steps=2000),
}


# ------------------------------------------------------------------------------ one run
@functools.cache
def _truth(name: str):
    """The target, exact draws for the forward KL and the reference mode bins (cached)."""
    bench = build_target(name)
    gen = torch.Generator().manual_seed(12345)
    true_samples = bench.sample(NUM_TRUE, gen)
    bins = None
    if bench.multimodal:
        big = bench.sample(NUM_TRUE_BINS, gen)[bench.target.site]
        bins = mode_masses(big.double(), bench.target.modes, bench.capture_radius, elsewhere=True)
    return bench, true_samples, bins


def run_job(job: dict) -> dict:
    """Fit one guide to one target from one seed and score it (runs in a worker process).

    :param dict job: ``target``, ``guide``, ``seed``, ``steps``, ``num_plot``.
    :return: the job with ``metrics`` (see :func:`benchmarks.metrics.evaluate`), ``fit_seconds``
        and ``seconds_per_step``, or with ``error`` if the fit failed.
    """
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pyro").setLevel(logging.WARNING)  # "Guessed max_plate_nesting" notes
    bench, true_samples, bins = _truth(job["target"])
    spec = GUIDES[job["guide"]]
    model, args, kwargs = bench.target.model, bench.target.args, bench.target.kwargs
    pyro.clear_param_store()
    pyro.set_rng_seed(job["seed"])
    out = dict(job)
    try:
        k = job.get("K", K_DEFAULT)
        guide = spec.build(model, k)
        if guide is None and k != K_DEFAULT:  # "AMF defaults" with another K
            guide = AutoMixtureFlow(model, num_components=k)
        particles = 1 if spec.stratified else k
        start = time.perf_counter()
        result = fit(
            model,
            *args,
            guide=guide,
            num_steps=job["steps"],
            lr=LR_DEFAULT,
            num_particles=particles,
            progress=False,
            model_kwargs=kwargs,
            **spec.fit_kwargs,
        )
        seconds = time.perf_counter() - start
        out["fit_seconds"] = seconds
        out["seconds_per_step"] = seconds / job["steps"]
        out["final_loss"] = float(np.mean(result.losses[-max(1, job["steps"] // 20) :]))
        out["metrics"] = evaluate(
            result.guide, bench, true_samples, bins, num_plot=job.get("num_plot", 0)
        )
    except Exception as e:  # a diverged fit is a result of the benchmark, not a crash
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    return out


def time_per_step(guides, steps: int = TIMING_STEPS) -> dict:
    """Seconds per step of each guide on ``funnel10``, one thread, same flow and particles.

    AutoMixtureFlow rows are built with the flow of :data:`benchmarks.guides.FLOW` here.
    """
    torch.set_num_threads(1)
    logging.getLogger("pyro").setLevel(logging.WARNING)
    bench = build_target("funnel10")
    model, args, kwargs = bench.target.model, bench.target.args, bench.target.kwargs
    name, layers = FLOW
    out = {}
    for label in guides:
        spec = GUIDES[label]
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = spec.build(model, K_DEFAULT)
        if label == "AMF defaults" or isinstance(guide, AutoMixtureFlow):
            estimator = "stratified" if guide is None else guide.estimator
            guide = AutoMixtureFlow(
                model, num_components=K_DEFAULT, flow=name, num_flows=layers, estimator=estimator
            )
        particles = 1 if spec.stratified else K_DEFAULT
        common = dict(num_particles=particles, progress=False, model_kwargs=kwargs, lr=LR_DEFAULT)
        common.update(spec.fit_kwargs)
        common.update(balance=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit(model, *args, guide=guide, num_steps=5, **common)  # warm-up, set-up
            start = time.perf_counter()
            fit(model, *args, guide=guide, num_steps=steps, **common)
        out[label] = (time.perf_counter() - start) / steps
    return out


# ---------------------------------------------------------------------------- summaries
def _agg(values):
    arr = np.array([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return None
    return {
        "mean": float(np.mean(arr)),
        "sd": float(np.std(arr)),
        "min": float(np.min(arr)),
        "max": float(np.max(arr)),
        "median": float(np.median(arr)),
    }


def summarise(runs: list) -> dict:
    """Per target and guide: each metric aggregated over seeds, and the per-seed verdicts."""
    table: dict = {}
    for run in runs:
        cell = table.setdefault(run["target"], {}).setdefault(run["guide"], {"runs": []})
        cell["runs"].append(run)
    for per_target in table.values():
        for cell in per_target.values():
            ok = [r for r in cell.pop("runs") if "metrics" in r]
            cell["seeds"] = len(ok)
            for key in (
                "reverse_kl",
                "forward_kl",
                "log_z_error",
                "khat",
                "ess",
                "mass_tv",
                "modes_covered",
            ):
                cell[key] = _agg([r["metrics"].get(key) for r in ok])
            cell["abs_log_z_error"] = _agg([abs(r["metrics"]["log_z_error"]) for r in ok])
            cell["fit_seconds"] = _agg([r["fit_seconds"] for r in ok])
            cell["seconds_per_step"] = _agg([r["seconds_per_step"] for r in ok])
            if ok and "num_modes" in ok[0]["metrics"]:
                m = ok[0]["metrics"]["num_modes"]
                cell["num_modes"] = m
                cell["seeds_all_modes_tv"] = sum(
                    r["metrics"]["modes_covered"] == m and r["metrics"]["mass_tv"] <= GOAL_TV
                    for r in ok
                )
    for run in runs:
        if "error" in run:
            table[run["target"]][run["guide"]].setdefault("failed", []).append(
                {"seed": run["seed"], "error": run["error"]}
            )
    return table


def check_goals(summary: dict, timing: dict) -> list:
    """The goals of issue 4 for ``AMF defaults``: each as ``{goal, met, figure}``."""
    goals = []
    for name in MULTIMODAL_GOAL_TARGETS:
        cell = summary.get(name, {}).get("AMF defaults")
        if cell is None or not cell["seeds"]:
            continue
        seeds = cell["seeds"]
        need = math.ceil(0.8 * seeds)
        got = cell.get("seeds_all_modes_tv", 0)
        goals.append(
            {
                "goal": f"{name}: all modes covered and mode-mass TV <= {GOAL_TV} in >= {need} of "
                f"{seeds} seeds",
                "met": got >= need,
                "figure": f"{got}/{cell['seeds']} seeds; TV mean {cell['mass_tv']['mean']:.3f}, "
                f"max {cell['mass_tv']['max']:.3f}; modes covered min "
                f"{cell['modes_covered']['min']:.0f}/{cell['num_modes']}",
            }
        )
    cell = summary.get("gmm40", {}).get("AMF defaults")
    if cell is not None:
        cov = cell["modes_covered"]
        goals.append(
            {
                "goal": f"gmm40: >= {GOAL_GMM40} of 40 modes covered (every seed)",
                "met": cov["min"] >= GOAL_GMM40,
                "figure": f"covered min {cov['min']:.0f}, mean {cov['mean']:.1f}, "
                f"max {cov['max']:.0f}",
            }
        )
    for name, per_target in summary.items():
        ours = per_target.get("AMF defaults")
        if ours is None or ours["reverse_kl"] is None:
            continue
        others = {
            g: c["reverse_kl"]["mean"]
            for g, c in per_target.items()
            if g != "AMF defaults"
            and GUIDES[g].family != "ablation"
            and c.get("reverse_kl") is not None
        }
        ablations = {
            g: c["reverse_kl"]["mean"]
            for g, c in per_target.items()
            if GUIDES[g].family == "ablation" and c.get("reverse_kl") is not None
        }
        note = "".join(f"; {g} {v:.3f}" for g, v in ablations.items())
        if name == "funnel10":
            ref = others.get("AutoMultivariateNormal")
            if ref is None:
                continue
            se = ours["reverse_kl"]["sd"] / math.sqrt(max(ours["seeds"], 1))
            goals.append(
                {
                    "goal": "funnel10: reverse KL no worse than AutoMultivariateNormal",
                    "met": ours["reverse_kl"]["mean"] <= ref + 2 * se,
                    "figure": f"{ours['reverse_kl']['mean']:.3f} vs {ref:.3f}",
                }
            )
            continue
        if not others:
            continue
        best_other = min(others, key=others.get)
        goals.append(
            {
                "goal": f"{name}: reverse KL lower than every other guide",
                "met": ours["reverse_kl"]["mean"] < others[best_other],
                "figure": f"{ours['reverse_kl']['mean']:.3f} vs best other {best_other} "
                f"{others[best_other]:.3f} (ablations{note or ': none run'})",
            }
        )
    ref = timing.get("AutoNormalizingFlow")
    if ref:
        for label, sec in timing.items():
            if not label.startswith("AMF ") or GUIDES[label].family == "ablation":
                continue
            stratified = GUIDES[label].stratified
            limit = GOAL_STRATIFIED_TIME if stratified else GOAL_SAMPLING_TIME
            goals.append(
                {
                    "goal": f"time per step of {label} <= {limit}x AutoNormalizingFlow (same flow, "
                    "same model evaluations)",
                    "met": sec <= limit * ref,
                    "figure": f"{sec * 1e3:.2f} ms vs {ref * 1e3:.2f} ms ({sec / ref:.2f}x)",
                }
            )
    return goals


# ------------------------------------------------------------------------------ reports
def _fmt(cell, key, digits=3, stat="mean"):
    value = cell.get(key)
    if value is None:
        return "-"
    v = value[stat]
    if not math.isfinite(v):
        return "inf" if v > 0 else "nan"
    return f"{v:.{digits}f}"


def markdown(summary: dict, timing: dict, goals: list, meta: dict) -> str:
    """The report: one table per target, the timing table and the goals."""
    lines = [
        "# Multimodal benchmark",
        "",
        f"{meta['date']}, {meta['machine']}; suite `{meta['suite']}`: {meta['steps']} steps, "
        f"up to {meta['seeds']} seeds, K = {meta['K']} (components of every mixture, particles of "
        f"every other guide), Adam lr {meta['lr']}. Command: `{meta['command']}`.",
        "",
        "Means over seeds. rKL = KL(q||p), fKL = KL(p||q) (from exact draws), covered = modes "
        f"with q mass > 20% of the true mass (mean, min), TV = total variation of the mode "
        f"masses, ok = seeds with every mode covered and TV <= {GOAL_TV}, |dlogZ| = error of "
        "the importance-sampling evidence, k = PSIS k-hat (median), ESS = relative importance "
        "ESS (median), s = fit time in seconds (parallel runs share the machine).",
    ]
    for name, per_target in summary.items():
        bench = build_target(name)
        lines += ["", f"## {name}: {bench.description}", ""]
        multimodal = bench.multimodal
        head = ["guide", "rKL", "fKL"]
        if multimodal:
            head += ["covered", "TV", "ok"]
        head += ["|dlogZ|", "k", "ESS", "s", "failed"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for guide, cell in per_target.items():
            row = [guide, _fmt(cell, "reverse_kl"), _fmt(cell, "forward_kl")]
            if multimodal:
                cov = cell.get("modes_covered")
                row.append(
                    "-"
                    if cov is None
                    else f"{cov['mean']:.1f} ({cov['min']:.0f})/{cell['num_modes']}"
                )
                row += [
                    _fmt(cell, "mass_tv"),
                    f"{cell.get('seeds_all_modes_tv', 0)}/{cell['seeds']}",
                ]
            row += [
                _fmt(cell, "abs_log_z_error"),
                _fmt(cell, "khat", 2, "median"),
                _fmt(cell, "ess", 3, "median"),
                _fmt(cell, "fit_seconds", 0),
                str(len(cell.get("failed", []))),
            ]
            lines.append("| " + " | ".join(row) + " |")
    if timing:
        ref = timing.get("AutoNormalizingFlow")
        lines += [
            "",
            f"## Time per step (funnel10, {TIMING_STEPS} steps, one thread, flow {FLOW[0]} x "
            f"{FLOW[1]} for every flow guide, K = {meta['K']} model evaluations per step)",
            "",
            "| guide | ms / step | vs AutoNormalizingFlow |",
            "|---|---|---|",
        ]
        for label, sec in timing.items():
            rel = f"{sec / ref:.2f}x" if ref else "-"
            lines.append(f"| {label} | {sec * 1e3:.2f} | {rel} |")
    if goals:
        lines += ["", "## Goals (AutoMixtureFlow with defaults)", ""]
        for g in goals:
            lines.append(f"- [{'x' if g['met'] else ' '}] {g['goal']}: {g['figure']}")
    return "\n".join(lines) + "\n"


def plot(name: str, runs: list, path: str) -> None:
    """Target contours and each guide's draws (the first seed that has them) for a 2-D target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench = build_target(name)
    xs, xi, ys, yi, (x0, x1), (y0, y1) = bench.plot
    gx, gy = torch.meshgrid(torch.linspace(x0, x1, 200), torch.linspace(y0, y1, 200), indexing="xy")
    if xs == ys:
        values = {xs: torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)}
    else:
        values = {xs: gx.reshape(-1), ys: gy.reshape(-1)}
    with torch.no_grad():
        logp = bench.target.log_joint_batch(values).reshape(gx.shape)
    by_guide = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        if "metrics" in run and "plot_samples" in run["metrics"]:
            by_guide.setdefault(run["guide"], run)
    if not by_guide:
        return
    n = len(by_guide)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    levels = np.linspace(float(logp.max()) - 12, float(logp.max()), 7)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (guide, run) in zip(axes.flat, by_guide.items()):
        ax.contour(
            gx.numpy(), gy.numpy(), logp.numpy(), levels=levels, colors="0.6", linewidths=0.6
        )
        pts = np.array(run["metrics"]["plot_samples"])
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4, color="C3")
        m = run["metrics"]
        title = f"{guide}\nrKL {m['reverse_kl']:.2f}"
        if "modes_covered" in m:
            title += f", {m['modes_covered']}/{m['num_modes']} modes"
        ax.set_title(title, fontsize=8)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.tick_params(labelsize=6)
    fig.suptitle(
        f"{name}: {bench.description} (seed {min(r['seed'] for r in by_guide.values())})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------- main
def _machine() -> str:
    return (
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, pyro {pyro.__version__}"
    )


def _one_or_all(values: list):
    return values[0] if len(values) == 1 else values


def _run_all(targets, guides, seeds: int, steps: int, jobs: int, k: int = K_DEFAULT) -> list:
    """Every (target, guide, seed) job, over ``jobs`` worker processes, with a progress bar."""
    work = [
        {
            "target": t,
            "guide": g,
            "seed": s,
            "steps": steps,
            "K": k,
            "num_plot": 1000 if s == 0 and build_target(t).plot is not None else 0,
        }
        for t in targets
        for s in range(seeds)
        for g in guides
    ]
    return run_jobs(run_job, work, jobs, "multimodal")


def main(argv=None) -> dict:
    """Command-line entry point; returns the JSON document it writes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), help="override")
    parser.add_argument("--guides", nargs="+", choices=list(GUIDES), help="override")
    parser.add_argument("--seeds", type=int, help="override the number of seeds")
    parser.add_argument("--steps", type=int, help="override the number of steps")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--num-components",
        type=int,
        default=K_DEFAULT,
        help="K of every mixture and particles of every other guide (default: the guide's K)",
    )
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table")
    parser.add_argument("--timing-only", action="store_true", help="only the timing table")
    parser.add_argument("--machine", default=None, help="describe the machine in the report")
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default benchmarks/results, benchmarks/results/quick for --suite "
        "quick)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="do not run: merge the runs and timings of earlier multimodal.json files",
    )
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    targets = tuple(args.targets or suite.targets)
    guides = tuple(args.guides or suite.guides)
    seeds = args.seeds or suite.seeds
    steps = args.steps or suite.steps
    if seeds < 1 or steps < 1 or args.jobs < 1 or args.num_components < 1:
        parser.error("--seeds, --steps, --jobs and --num-components must be >= 1")
    if args.out is None:
        results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        args.out = results if args.suite == "full" else os.path.join(results, args.suite)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    command = "python -m benchmarks.multimodal " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.merge:
        runs, timing, steps_seen, commands = [], {}, set(), []
        for path in args.merge:
            with open(path) as fh:
                part = json.load(fh)
            runs += part["runs"]
            timing.update(part["timing"])
            if part["runs"]:
                steps_seen.add(part["meta"]["steps"])
            commands.append(part["meta"]["command"])
        targets = tuple(t for t in TARGETS if any(r["target"] == t for r in runs))
        guides = tuple(g for g in GUIDES if any(r["guide"] == g for r in runs))
        steps = steps_seen.pop() if len(steps_seen) == 1 else sorted(steps_seen)
        seeds = max(r["seed"] for r in runs) + 1
        command = " && ".join(commands) + " && " + command
    else:
        timing = (
            {}
            if args.no_timing
            else time_per_step(
                [g for g in guides if g == "AutoNormalizingFlow" or GUIDES[g].family == "amf"]
            )
        )
        runs = (
            []
            if args.timing_only
            else _run_all(targets, guides, seeds, steps, args.jobs, args.num_components)
        )
    runs.sort(key=lambda r: (targets.index(r["target"]), guides.index(r["guide"]), r["seed"]))
    summary = summarise(runs)
    summary = {
        t: {g: summary[t][g] for g in guides if g in summary[t]} for t in targets if t in summary
    }
    goals = check_goals(summary, timing)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": args.machine or _machine(),
        "suite": "merged" if args.merge else args.suite,
        "targets": targets,
        "guides": guides,
        "seeds": seeds,
        "steps": steps,
        "K": _one_or_all(sorted({r.get("K", K_DEFAULT) for r in runs}))
        if args.merge
        else args.num_components,
        "lr": LR_DEFAULT,
        "command": command,
    }
    for name in targets:
        if build_target(name).plot is not None:
            plot(
                name,
                [r for r in runs if r["target"] == name],
                os.path.join(args.out, f"multimodal_{name}.png"),
            )
    doc = {"meta": meta, "summary": summary, "timing": timing, "goals": goals, "runs": runs}
    report = markdown(summary, timing, goals, meta)
    with open(os.path.join(args.out, "multimodal.json"), "w") as fh:
        json.dump(doc, fh, indent=1, default=float)
    with open(os.path.join(args.out, "multimodal.md"), "w") as fh:
        fh.write(report)
    print(report)
    return doc


if __name__ == "__main__":
    main()
