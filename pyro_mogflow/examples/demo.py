r"""The main job, ``python -m pyro_mogflow demo``: two guides on a posterior with two modes.

The model is :func:`pyro_mogflow.examples.sign_regression`: a regression
:math:`y_i \sim \mathcal{N}(|\theta|\, x_i, \sigma^2)` whose likelihood cannot tell the sign of
:math:`\theta`, so the posterior has two mirror modes of equal mass near
:math:`\theta = \pm\theta^\star`, and a positive site :math:`\sigma`. Its evidence
:math:`\log Z` and the exact posterior mass near each mode are known by quadrature.

The demo fits it with Pyro's :class:`~pyro.infer.autoguide.AutoNormal` and with
:class:`~pyro_mogflow.AutoMixtureFlow`, then reports for each guide

* the guide's mass near each mode (:func:`~pyro_mogflow.examples.mode_masses`): the
  fraction of its samples with :math:`|\theta - m_j| < |\theta^\star| / 2` (half the gap
  between the modes), and the number
  of *modes found*, i.e. modes holding at least :data:`MODE_THRESHOLD` of the samples (the
  exact posterior holds 0.5 near each);
* the ELBO, :math:`\mathbb{E}_q[\log p(y, \theta, \sigma) - \log q(\theta, \sigma)]`, from
  :data:`NUM_EVAL_SAMPLES` draws, with its standard error, and
  :math:`\log Z - \text{ELBO} = \mathrm{KL}(q \,\|\, p(\cdot \mid y)) \ge 0`. A guide that
  fits one of the two modes perfectly and ignores the other has :math:`\mathrm{KL} = \log 2`;
* the wall-clock time of the fit;

prints them as a table and saves a plot of both posteriors (``posteriors.png``) and the numbers
(``results.json``) in the output folder.

AutoMixtureFlow is built with every default and trained by :func:`pyro_mogflow.fit` (prior
initialisation of the components, tempering, :class:`~pyro_mogflow.StratifiedELBO`,
natural-gradient weight steps), exactly what a user gets from ``fit(model, *data)``. AutoNormal is
trained as Pyro users train it (Adam, ``Trace_ELBO``), starting at :math:`\theta = 0`
(``init_to_feasible``), the centre of the symmetry.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_feasible
from pyro.infer.importance import vectorized_importance_weights
from tqdm.auto import tqdm

from pyro_mogflow import AutoMixtureFlow
from pyro_mogflow import fit as fit_mixture
from pyro_mogflow._validation import check_int, check_seed

from .demo_plot import plot_posteriors
from .regression import sign_regression
from .targets import Target

__all__ = [
    "DEFAULT_STEPS",
    "DEFAULT_SEED",
    "DEFAULT_OUT",
    "LEARNING_RATE",
    "MODE_THRESHOLD",
    "NUM_EVAL_SAMPLES",
    "GuideReport",
    "DemoResult",
    "DemoInterrupted",
    "demo_target",
    "make_guides",
    "fit_guide",
    "evaluate_guide",
    "format_table",
    "plot_posteriors",
    "run_demo",
]

#: Optimisation steps per guide (Adam, :data:`LEARNING_RATE`).
DEFAULT_STEPS = 1500
#: Seed of the data and of the fits.
DEFAULT_SEED = 0
#: Default output folder.
DEFAULT_OUT = "mogflow-demo"
#: Adam learning rate, the same for both guides.
LEARNING_RATE = 0.02
#: A mode is *found* when the guide puts at least this fraction of its samples near it.
MODE_THRESHOLD = 0.1
#: Guide draws used for the ELBO, the mode masses and the plot.
NUM_EVAL_SAMPLES = 4000


@dataclasses.dataclass
class GuideReport:
    """What one guide found.

    :param str name: the guide's name.
    :param list mode_masses: fraction of the guide's samples near each mode, length ``M``.
    :param int modes_found: modes holding at least :data:`MODE_THRESHOLD` of the samples.
    :param float elbo: ELBO estimate (nats).
    :param float elbo_se: its Monte Carlo standard error.
    :param float fit_seconds: wall-clock time of the fit.
    :param dict samples: site name -> CPU tensor ``(NUM_EVAL_SAMPLES, *site_shape)``.
    :param list losses: the SVI loss at every step.
    """

    name: str
    mode_masses: list
    modes_found: int
    elbo: float
    elbo_se: float
    fit_seconds: float
    samples: dict
    losses: list


class DemoInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`run_demo` after some guides were fitted; their results were
    written to the output folder (``results.json`` says ``"interrupted": true``)."""


@dataclasses.dataclass
class DemoResult:
    """The demo's outcome: the target, one :class:`GuideReport` per guide, the files written."""

    target: Target
    reports: list
    table: str
    png: Path
    json: Path

    def report(self, name: str) -> GuideReport:
        """The report of the guide called ``name``."""
        for r in self.reports:
            if r.name == name:
                return r
        raise KeyError(f"no guide named {name!r}; have {[r.name for r in self.reports]}")


# ----------------------------------------------------------------------------- checks
def _check_steps(steps) -> int:
    return check_int("steps", steps, 1)


def _check_seed(seed) -> int:
    # the fits use seed and seed + 1
    return check_seed("seed", seed, offset=1)


def _check_device(device) -> torch.device:
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be 'cpu' or 'cuda', got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was asked for, but CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); use device='cpu'"
        )
    return dev


def _check_out(out) -> Path:
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a folder path, got {type(out).__name__}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out must be a folder, but {str(path)!r} exists and is not a folder")
    _check_writable(path)
    return path


def _check_writable(path: Path) -> None:
    """Raise ``ValueError`` unless files can be written in the folder ``path`` (created if
    missing), before any work is done; leaves the file system as it found it."""
    created = []
    missing = path.absolute()
    while not missing.exists():
        created.append(missing)
        missing = missing.parent
    if not missing.is_dir():
        raise ValueError(
            f"out must be a folder, but {str(missing)!r} (above {str(path)!r}) is a file, so "
            "no folder can be made under it"
        )
    try:
        for folder in reversed(created):
            folder.mkdir()
        probe = path / f".mogflow-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"out must be a folder the demo can write to, but writing in {str(path)!r} failed: "
            f"{e.strerror or e}; choose another --out"
        ) from e
    finally:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                pass


# ------------------------------------------------------------------------------ parts
def demo_target(seed: int = DEFAULT_SEED, device: str | torch.device = "cpu") -> Target:
    """The demo's model and data: :func:`~pyro_mogflow.examples.sign_regression`."""
    return sign_regression(seed=_check_seed(seed), device=_check_device(device))


def make_guides(target: Target) -> dict[str, Callable]:
    """The two guides the demo compares, keyed by name (see the module docstring for the choices).

    :return: ``{"AutoNormal": ..., "AutoMixtureFlow": ...}``.
    """
    return {
        "AutoNormal": AutoNormal(target.model, init_loc_fn=init_to_feasible),
        "AutoMixtureFlow": AutoMixtureFlow(target.model),
    }


def fit_guide(
    target: Target,
    guide: Callable,
    steps: int,
    lr: float = LEARNING_RATE,
    desc: str = "",
    progress: bool = True,
) -> tuple[float, list]:
    """Fit one ``guide`` to ``target``, with a tqdm progress bar: an AutoMixtureFlow by
    :func:`pyro_mogflow.fit` with its defaults, any other guide by SVI (Adam, ``Trace_ELBO``).

    (Not :func:`pyro_mogflow.fit`, the mode-finding recipe: this is the demo's training of each
    guide it compares; the old name ``pyro_mogflow.demo.fit`` is a deprecated alias.)

    :param Target target: the model and its data.
    :param guide: a Pyro guide for ``target.model``.
    :param int steps: optimisation steps (``>= 1``).
    :param float lr: Adam learning rate.
    :param str desc: label of the progress bar and of errors.
    :param bool progress: show the progress bar (on stderr).
    :return: ``(seconds, losses)``: the wall-clock time of the fit and one SVI loss per step
        (a list of length ``steps``).
    :raises RuntimeError: if the loss becomes NaN or infinite (the step is named).
    """
    steps = _check_steps(steps)
    if isinstance(guide, AutoMixtureFlow):
        start = time.perf_counter()
        _, losses = fit_mixture(
            target.model,
            *target.args,
            guide=guide,
            num_steps=steps,
            lr=lr,
            progress=progress,
            desc=desc or "fit",
            model_kwargs=target.kwargs,
        )
        return time.perf_counter() - start, list(losses)
    svi = SVI(
        target.model,
        guide,
        pyro.optim.Adam({"lr": lr}),
        Trace_ELBO(max_plate_nesting=target.max_plate_nesting),
    )
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, file=sys.stderr, mininterval=0.5)
    start = time.perf_counter()
    for step in bar:
        loss = svi.step(*target.args, **target.kwargs)
        if not math.isfinite(loss):
            raise RuntimeError(f"{desc or 'fit'}: the loss became {loss} at step {step}")
        losses.append(loss)
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss:.2f}", refresh=False)
    seconds = time.perf_counter() - start
    bar.close()
    return seconds, losses


@torch.no_grad()
def evaluate_guide(target: Target, guide: Callable, num_samples: int = NUM_EVAL_SAMPLES) -> dict:
    r"""ELBO, standard error, samples and mode masses of a fitted guide.

    Draws ``num_samples`` vectorized samples from the guide and computes the log weights
    :math:`w_n = \log p(y, z_n) - \log q(z_n)`; the ELBO is their mean, its standard error
    their standard deviation over :math:`\sqrt{N}`. The mode masses are
    :meth:`Target.mode_masses <pyro_mogflow.examples.targets.Target.mode_masses>` of the draws of
    ``target.site``; a mode is found when it holds at least :data:`MODE_THRESHOLD` of them.

    :param Target target: the model and its data.
    :param guide: a fitted Pyro guide for ``target.model``.
    :param int num_samples: ``N``, guide draws.
    :return: dict with ``"elbo"``, ``"elbo_se"``, ``"samples"`` (site -> CPU tensor
        ``(num_samples, *site_shape)``), ``"mode_masses"`` (list, length ``M``) and
        ``"modes_found"``.
    """
    log_w, _, guide_trace = vectorized_importance_weights(
        target.model,
        guide,
        *target.args,
        num_samples=num_samples,
        max_plate_nesting=target.max_plate_nesting,
        **target.kwargs,
    )
    if not bool(torch.isfinite(log_w).all()):
        raise RuntimeError("the guide gave non-finite log weights; the fit has diverged")
    prototype = pyro.poutine.trace(target.model).get_trace(*target.args, **target.kwargs)
    samples = {}
    for name, site in prototype.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and name in guide_trace.nodes:
            value = guide_trace.nodes[name]["value"]
            samples[name] = value.reshape((num_samples,) + site["value"].shape).cpu()
    masses = target.mode_masses(samples[target.site])
    return {
        "elbo": float(log_w.mean()),
        "elbo_se": float(log_w.std() / math.sqrt(num_samples)),
        "samples": samples,
        "mode_masses": [float(m) for m in masses],
        "modes_found": int((masses >= MODE_THRESHOLD).sum()),
    }


def _mode_label(target: Target, j: int) -> str:
    mode = target.modes[j]
    if mode.numel() == 1:
        return f"mass near {target.site}={float(mode):+g}"
    return f"mass near mode {j + 1}"


def format_table(target: Target, reports: list[GuideReport]) -> str:
    """The demo's table: one row for the exact posterior, one per guide.

    Columns: the mass near each mode, modes found, ELBO and its standard error, the gap
    :math:`\\log Z - \\text{ELBO}` (the KL divergence from the guide to the posterior), fit time.
    """
    heads = ["guide"] + [_mode_label(target, j) for j in range(target.num_modes)]
    heads += ["modes found", "ELBO +- se", "log Z - ELBO", "fit time"]
    m = target.num_modes
    rows = []
    if target.reference_masses is not None:
        ref = target.reference_masses.tolist()
        found = sum(r >= MODE_THRESHOLD for r in ref)
        lz = "-" if target.log_z is None else f"log Z = {target.log_z:.3f}"
        rows.append(
            ["exact posterior"] + [f"{r:.3f}" for r in ref] + [f"{found}/{m}", lz, "0", "-"]
        )
    for r in reports:
        gap = "-" if target.log_z is None else f"{target.log_z - r.elbo:.3f}"
        rows.append(
            [r.name]
            + [f"{x:.3f}" for x in r.mode_masses]
            + [f"{r.modes_found}/{m}", f"{r.elbo:.3f} +- {r.elbo_se:.3f}", gap]
            + [f"{r.fit_seconds:.1f} s"]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(heads), sep] + [line(row) for row in rows])


def _verdict(target: Target, report: GuideReport) -> str:
    m = target.num_modes
    if report.modes_found == m:
        return f"{report.name} found {'both' if m == 2 else f'all {m}'} modes."
    found = f"{report.name} found {report.modes_found} of {m} modes"
    if report.name == "AutoNormal":
        return f"{found}: a single Gaussian can cover only one."
    return (
        f"{found} at this seed and step count, NOT all of them (a mode counts when it holds at "
        f"least {MODE_THRESHOLD:g} of the guide's samples); try more --steps or another --seed."
    )


def run_demo(
    steps: int = DEFAULT_STEPS,
    seed: int = DEFAULT_SEED,
    device: str | torch.device = "cpu",
    out: str | os.PathLike = DEFAULT_OUT,
    progress: bool = True,
    stream: TextIO | None = None,
) -> DemoResult:
    """Run the demo: fit both guides, print the table, save ``posteriors.png`` and
    ``results.json`` in ``out``.

    :param int steps: SVI steps per guide (``>= 1``).
    :param int seed: seed of the data and of both fits (``>= 0``).
    :param device: ``"cpu"`` or ``"cuda"``; the data, hence the model and the guides, live there.
    :param out: output folder (created if missing).
    :param bool progress: show tqdm progress bars (on stderr).
    :param stream: where the table goes (default ``sys.stdout``).
    :raises ValueError, TypeError: on a bad argument, before any work (an ``out`` that cannot
        be written to included).
    :raises KeyboardInterrupt: on Ctrl-C; a :class:`DemoInterrupted` (a ``KeyboardInterrupt``)
        when some guides were fitted before it: their table is printed and their results are
        written to ``out`` first.
    """
    steps = _check_steps(steps)
    seed = _check_seed(seed)
    dev = _check_device(device)
    out = _check_out(out)
    stream = sys.stdout if stream is None else stream

    target = demo_target(seed, dev)
    print(f"model: {target.description}; exact log Z = {target.log_z:.3f}", file=stream)
    pyro.clear_param_store()
    reports = []
    guides = make_guides(target)
    interrupted = False
    try:
        for name, guide in guides.items():
            # each guide's random initialisation and fit depend on the seed only, not on the order
            pyro.set_rng_seed(seed)
            seconds, losses = fit_guide(target, guide, steps, desc=name, progress=progress)
            pyro.set_rng_seed(seed + 1)
            ev = evaluate_guide(target, guide)
            reports.append(
                GuideReport(
                    name=name,
                    mode_masses=ev["mode_masses"],
                    modes_found=ev["modes_found"],
                    elbo=ev["elbo"],
                    elbo_se=ev["elbo_se"],
                    fit_seconds=seconds,
                    samples=ev["samples"],
                    losses=losses,
                )
            )
    except KeyboardInterrupt:
        # Ctrl-C: keep what was finished (the guides already fitted), then stop.
        interrupted = True
        if not reports:
            raise
    table = format_table(target, reports)
    print(table, file=stream)
    print(
        f"A mode counts as found when the guide puts >= {MODE_THRESHOLD:g} of its samples within "
        f"{target.radius:g} of it. log Z - ELBO = KL(q || posterior); covering one of the two "
        f"equal modes perfectly gives log 2 = {math.log(2):.3f}.",
        file=stream,
    )
    for r in reports:
        print(_verdict(target, r), file=stream)

    out.mkdir(parents=True, exist_ok=True)
    png = plot_posteriors(target, reports, out / "posteriors.png")
    summary = {
        "model": target.description,
        "steps": steps,
        "seed": seed,
        "device": str(dev),
        "log_z": target.log_z,
        "mode_threshold": MODE_THRESHOLD,
        "mode_radius": target.radius,
        "modes": target.modes.cpu().tolist(),
        "reference_masses": None
        if target.reference_masses is None
        else target.reference_masses.cpu().tolist(),
        "guides": {
            r.name: {
                "mode_masses": r.mode_masses,
                "modes_found": r.modes_found,
                "elbo": r.elbo,
                "elbo_se": r.elbo_se,
                "fit_seconds": r.fit_seconds,
                "final_loss": r.losses[-1],
            }
            for r in reports
        },
    }
    if interrupted:
        summary["interrupted"] = True
        summary["not_fitted"] = [name for name in guides if name not in summary["guides"]]
    json_path = out / "results.json"
    json_path.write_text(json.dumps(summary, indent=2))
    print(f"saved {png} and {json_path}", file=stream)
    if interrupted:
        raise DemoInterrupted(
            f"interrupted; the guides fitted before it ({', '.join(r.name for r in reports)}) "
            f"are saved in {png} and {json_path}"
        )
    return DemoResult(target=target, reports=reports, table=table, png=png, json=json_path)
