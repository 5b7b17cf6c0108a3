r"""Cost at scale: ``fit()`` defaults against AutoNormal as the data grow (issue 11, item 3).

Run ``python -m benchmarks.scaling`` (``--max-n 10000`` on a small machine, ``--device cuda``
on a GPU, ``--min-n`` to start the logistic rows at a larger ``N``; ``--parts`` picks the
tables, ``--anneal fixed`` times ``fit(anneal="fixed")``). It
prints, and writes to ``--out`` (default ``benchmarks/results/scaling``: ``scaling.md``,
``scaling.json`` and the plot ``scaling.png``):

1. **Time to converge**, logistic regression with ``D = 20`` weights written the vectorized way
   (``(X * w).sum(-1)``), ``N`` = 1e3 ... ``--max-n``: the wall time until the ELBO is within
   0.1 nats of its final value, for ``fit(model, X, y)`` with every default and for
   AutoNormal (1 particle, Adam at ``fit``'s learning rate, stopped by the same
   :class:`~pyro_mogflow.infer.convergence.PlateauTest`). **The tracked ELBO** is a low-noise
   estimate taken every :data:`EVAL_EVERY` steps, off the clock: the mean of
   :math:`\log p(x, z) - \log q(z)` over :data:`EVAL_DRAWS` independent draws of the guide
   (its standard error is reported). The *final value* is
   the last estimate (after ``fit``'s weight balancing); the time to converge is the clock at
   the first estimate from which every later one lies within 0.1 nats of it.
2. **All modes, big data**: a sign-symmetric regression :math:`y \sim \mathcal N(|x^\top w|,
   0.5^2)` (posterior modes at :math:`\pm w`), ``N = min(1e5, --max-n)``: ``fit()``'s wall
   time and whether it holds both modes (each with mass >= 0.1 of its draws), against
   AutoNormal's time to converge (which finds one).
3. **Time per step**, ``N = 1000``: AutoNormal, ``AutoNormalizingFlow`` with two affine
   autoregressive layers and ``AutoMixtureFlow`` with the same flow (``K`` = 1, 8, 64).
4. **Growth of cost** (the plot): ms per ``StratifiedELBO`` step of ``AutoMixtureFlow`` against
   ``D`` (10 ... 1000, ``K = 8``) and against ``K`` (1 ... 128, ``D = 20``), ``N = 1000``.

The models broadcast over a leading batch of ``w`` (``(x * w).sum(-1)``), so
:class:`~pyro_mogflow.StratifiedELBO` evaluates all ``K`` components in one model run; a model
that does not is evaluated draw by draw (``K`` runs a step, 8x slower here), which the
benchmark refuses to time (the warning is turned into an error).

Everything runs on ``--device`` (the data are created there; the model's tensors follow) in
one thread on CPU; the machine and date are printed with the table.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, AutoNormalizingFlow

from pyro_mogflow import AutoMixtureFlow, StratifiedELBO, fit
from pyro_mogflow.infer.convergence import PlateauTest

from .runner import save_report

__all__ = ["logistic_model", "main", "sign_model"]

#: Steps between two ELBO estimates, and guide draws per estimate.
EVAL_EVERY, EVAL_DRAWS = 50, 256
#: Nats from the final ELBO that count as converged.
TOLERANCE = 0.1
#: Learning rate of every guide: fit's default.
LR = 0.02
#: The tables of one run (``--parts``).
PARTS = ("logistic", "sign", "per-step", "growth")
#: Steps timed per guide in the time-per-step table and the growth plot.
TIMING_STEPS = 20


def logistic_model(x: torch.Tensor, y: torch.Tensor) -> None:
    """Bayesian logistic regression, ``w ~ N(0, I_D)``, ``y ~ Bernoulli(logits = x . w)``.

    Written to broadcast: a ``w`` of shape ``(..., 1, D)`` (the particle plate of
    ``StratifiedELBO`` left of the data plate) gives logits of shape ``(..., N)``.
    """
    d = x.shape[-1]
    w = pyro.sample("w", dist.Normal(x.new_zeros(d), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1)), obs=y)


def sign_model(x: torch.Tensor, y: torch.Tensor) -> None:
    """Sign-symmetric regression: ``w ~ N(0, I)``, ``y ~ N(|x . w|, 0.5^2)``; modes at +-w."""
    d = x.shape[-1]
    w = pyro.sample("w", dist.Normal(x.new_zeros(d), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1).abs(), 0.5), obs=y)


def _data(kind: str, n: int, d: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) / math.sqrt(d)
    w = torch.randn(d, generator=g) * 2
    eta = x @ w
    if kind == "logistic":
        y = torch.bernoulli(torch.sigmoid(eta), generator=g)
    else:
        y = eta.abs() + 0.5 * torch.randn(n, generator=g)
    return x.to(device), y.to(device), w


@torch.no_grad()
def _elbo(model, guide, args) -> tuple[float, float]:
    log_w = []
    for _ in range(EVAL_DRAWS):  # draw by draw: the model vectorizes over w's batch, not plates
        guide_trace = poutine.trace(guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
        log_w.append(float(model_trace.log_prob_sum() - guide_trace.log_prob_sum()))
    log_w = torch.tensor(log_w, dtype=torch.float64)
    return float(log_w.mean()), float(log_w.std() / math.sqrt(EVAL_DRAWS))


class _Clock:
    """Wall time with the ELBO estimates taken off the clock."""

    def __init__(self, model, guide, args):
        self.model, self.guide, self.args = model, guide, args
        self.start, self.paused, self.trace = time.perf_counter(), 0.0, []

    def record(self, step: int) -> None:
        t0 = time.perf_counter()
        value, se = _elbo(self.model, self.guide, self.args)
        self.trace.append((t0 - self.start - self.paused, step, value, se))
        self.paused += time.perf_counter() - t0

    def converged_after(self) -> tuple[float, float, float]:
        """(seconds to within TOLERANCE of the final value, final value, its SE)."""
        final, se = self.trace[-1][2], self.trace[-1][3]
        seconds = self.trace[-1][0]
        for t, _, value, _ in reversed(self.trace):
            if abs(value - final) > TOLERANCE:
                break
            seconds = t
        return seconds, final, se


def _run_autonormal(model, args, max_steps: int) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), Trace_ELBO())
    svi.step(*args)  # set-up, on the clock of nobody
    test, clock = PlateauTest(), _Clock(model, guide, args)
    for step in range(1, max_steps):
        loss = svi.step(*args)
        if step % EVAL_EVERY == 0:
            clock.record(step)
        if test.update(step, loss):
            break
    clock.record(step)
    seconds, final, se = clock.converged_after()
    return {"seconds": seconds, "elbo": final, "se": se, "steps": step + 1, "guide": guide}


def _run_fit(model, args, max_steps: int, **options) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoMixtureFlow(model).setup(*args)
    clock = _Clock(model, guide, args)

    def callback(step, loss, beta):
        if step % EVAL_EVERY == 0 and step:
            clock.record(step)

    result = fit(
        model, *args, guide=guide, max_steps=max_steps, progress=False, callback=callback, **options
    )
    clock.record(result.next_step)
    seconds, final, se = clock.converged_after()
    return {
        "seconds": seconds,
        "total_seconds": clock.trace[-1][0],
        "elbo": final,
        "se": se,
        "steps": result.next_step,
        "reason": result.reason,
        "num_components": guide.num_components,
        "guide": guide,
    }


def _both_signs(guide, args, w_true: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        if isinstance(guide, AutoMixtureFlow):  # w is real, so latent = w
            w = guide.get_posterior(*args).sample((4000,)).cpu()
        else:
            w = guide.median(*args)["w"].cpu().unsqueeze(0)
    proj = w @ (w_true / w_true.norm())
    return float((proj > 0).double().mean()), float((proj < 0).double().mean())


def _ms_per_step(model, guide, loss, args, steps: int = TIMING_STEPS) -> float:
    pyro.clear_param_store()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss)
    svi.step(*args)
    start = time.perf_counter()
    for _ in range(steps):
        svi.step(*args)
    return 1000 * (time.perf_counter() - start) / steps


def _flow(dim: int, device: str = "cpu"):
    from pyro.distributions.transforms import affine_autoregressive, iterated

    return iterated(2, affine_autoregressive, dim).to(device)  # AutoNormalizingFlow won't move it


def _time_per_step(device: str) -> dict:
    x, y, _ = _data("logistic", 1000, 20, device)
    args = (x, y)
    rows = {
        "AutoNormal": _ms_per_step(logistic_model, AutoNormal(logistic_model), Trace_ELBO(), args),
        "AutoNormalizingFlow (2 affine AR)": _ms_per_step(
            logistic_model,
            AutoNormalizingFlow(logistic_model, lambda dim: _flow(dim, device)),
            Trace_ELBO(),
            args,
        ),
    }
    for k in (1, 8, 64):
        guide = AutoMixtureFlow(
            logistic_model, num_components=k, flow="affine_autoregressive", num_flows=2
        )
        rows[f"AutoMixtureFlow (same flow, K={k})"] = _ms_per_step(
            logistic_model, guide, StratifiedELBO(), args
        )
    return rows


def _growth(device: str, dims, ks) -> dict:
    out = {"D": {}, "K": {}}
    for d in dims:
        args = _data("logistic", 1000, d, device)[:2]
        guide = AutoMixtureFlow(logistic_model, num_components=8)
        out["D"][d] = _ms_per_step(logistic_model, guide, StratifiedELBO(), args)
    args = _data("logistic", 1000, 20, device)[:2]
    for k in ks:
        guide = AutoMixtureFlow(logistic_model, num_components=k)
        out["K"][k] = _ms_per_step(logistic_model, guide, StratifiedELBO(), args)
    return out


def _plot(growth: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in zip(axes, ("D", "K"), ("latent dimension D (K = 8)", "K (D = 20)")):
        xs = sorted(growth[key])
        ax.loglog(xs, [growth[key][x] for x in xs], "o-")
        ax.set_xlabel(label)
        ax.set_ylabel("ms per StratifiedELBO step")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("AutoMixtureFlow cost per step, logistic regression N = 1000")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine(device: str) -> str:
    where = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor()
    return (
        f"{platform.machine()} {platform.system()} ({where or 'cpu'}), {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, pyro {pyro.__version__}"
    )


def _markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}; date {results['date']}; device {results['device']}; "
        f"fit options {results.get('fit_options') or 'defaults'}.",
        "",
    ]
    if results["logistic"]:
        lines += _logistic_rows(results)
    if "sign" in results:
        lines += _sign_rows(results["sign"])
    if "time_per_step" in results:
        lines += ["| guide (logistic regression, N = 1000, D = 20) | ms per step |", "|---|---|"]
        lines += [f"| {name} | {ms:.1f} |" for name, ms in results["time_per_step"].items()]
    if "growth" in results:
        g = results["growth"]
        lines += [
            "",
            "ms per StratifiedELBO step: "
            + ", ".join(f"D={d}: {v:.1f}" for d, v in g["D"].items())
            + " (K = 8); "
            + ", ".join(f"K={k}: {v:.1f}" for k, v in g["K"].items())
            + " (D = 20).",
            "",
        ]
    return "\n".join(lines)


def _logistic_rows(results: dict) -> list[str]:
    lines = [
        "| N | AutoNormal s to converge (steps) | `fit()` s to converge (steps, reason, K at "
        "end) | ratio | ELBO AutoNormal / fit (SE) |",
        "|---|---|---|---|---|",
    ]
    for row in results["logistic"]:
        a, f = row["autonormal"], row["fit"]
        lines.append(
            f"| {row['n']:,} | {a['seconds']:.1f} ({a['steps']}) | {f['seconds']:.1f} "
            f"({f['steps']}, {f['reason']}, K={f['num_components']}) | "
            f"{f['seconds'] / a['seconds']:.1f}x | {a['elbo']:.2f} / {f['elbo']:.2f} "
            f"({max(a['se'], f['se']):.2f}) |"
        )
    return lines + [""]


def _sign_rows(s: dict) -> list[str]:
    # Two modes held well: the ELBO is about log 2 above a fit on one mode (AutoNormal's). Mass
    # on both sides alone does not say so: one wide component on the saddle w = 0 has it too.
    gain = s["fit_elbo"] - s["autonormal_elbo"]
    both = min(s["fit_masses"]) >= 0.1 and gain > math.log(2) - 0.35
    return [
        f"Sign-symmetric regression, N = {s['n']:,}: AutoNormal {s['autonormal_seconds']:.1f} s "
        f"(mass on +w / -w: {s['autonormal_masses'][0]:.2f} / {s['autonormal_masses'][1]:.2f}, "
        f"ELBO {s['autonormal_elbo']:.2f}); "
        f"`fit()` {s['fit_seconds']:.1f} s in total, {s['fit_steps']} steps ({s['fit_reason']}), "
        f"masses {s['fit_masses'][0]:.2f} / {s['fit_masses'][1]:.2f}, ELBO {s['fit_elbo']:.2f} "
        f"({gain:+.2f} nats; log 2 = 0.69 for two modes): "
        f"{'both modes' if both else 'NOT both modes'}, "
        f"{s['fit_seconds'] / s['autonormal_seconds']:.1f}x AutoNormal's time (goal <= 10x).",
        "",
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-n", type=float, default=1e3, help="smallest N (default 1e3)")
    parser.add_argument("--max-n", type=float, default=1e6, help="largest N (default 1e6)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--max-steps", type=int, default=10000, help="cap of every fit")
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 30, 100, 300, 1000])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64, 128])
    parser.add_argument("--out", default="benchmarks/results/scaling")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="which tables to measure (default all)",
    )
    parser.add_argument(
        "--anneal", choices=["fixed", "adaptive"], default=None, help="fit(anneal=...)"
    )
    opts = parser.parse_args(argv)
    if not 1 <= opts.min_n <= opts.max_n:
        parser.error("--min-n must be at least 1 and at most --max-n")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if not opts.device.startswith("cuda"):
        torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    # ... but never time a model that fell back to one run per draw (it did, unseen, before)
    warnings.filterwarnings("error", message="StratifiedELBO: the model does not vectorize")
    results: dict = {
        "machine": _machine(opts.device),
        "date": datetime.date.today().isoformat(),
        "device": opts.device,
        "logistic": [],
    }
    print(results["machine"], results["date"], file=sys.stderr)
    fit_options = {} if opts.anneal is None else {"anneal": opts.anneal}
    results["fit_options"] = fit_options
    n = int(opts.min_n)
    while "logistic" in opts.parts and n <= opts.max_n:
        args = _data("logistic", n, 20, opts.device)[:2]
        a = _run_autonormal(logistic_model, args, opts.max_steps)
        f = _run_fit(logistic_model, args, opts.max_steps, **fit_options)
        a.pop("guide"), f.pop("guide")
        results["logistic"].append({"n": n, "autonormal": a, "fit": f})
        print(f"N={n}: AutoNormal {a}\n       fit {f}", file=sys.stderr)
        n *= 10
    if "sign" in opts.parts:
        n = int(min(1e5, opts.max_n))
        x, y, w = _data("sign", n, 20, opts.device)
        a = _run_autonormal(sign_model, (x, y), opts.max_steps)
        f = _run_fit(sign_model, (x, y), opts.max_steps, **fit_options)
        results["sign"] = {
            "n": n,
            "autonormal_seconds": a["seconds"],
            "autonormal_masses": _both_signs(a["guide"], (x, y), w),
            "fit_seconds": f["total_seconds"],
            "fit_steps": f["steps"],
            "fit_reason": f["reason"],
            "fit_masses": _both_signs(f["guide"], (x, y), w),
            "autonormal_elbo": a["elbo"],
            "fit_elbo": f["elbo"],
        }
        print(f"sign: {results['sign']}", file=sys.stderr)
    if "per-step" in opts.parts:
        results["time_per_step"] = _time_per_step(opts.device)
    if "growth" in opts.parts:
        results["growth"] = _growth(opts.device, opts.dims, opts.ks)
    os.makedirs(opts.out, exist_ok=True)
    if "growth" in results:
        _plot(results["growth"], os.path.join(opts.out, "scaling.png"))
    text = _markdown(results)
    save_report(results, text, opts.out, "scaling")
    print(text)
    return results


if __name__ == "__main__":
    main()
