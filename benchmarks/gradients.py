r"""Bias, standard error and cost of the gradient estimators through a Gaussian mixture.

Run ``python -m benchmarks.gradients`` (``--quick`` for a smoke run). For every case and
estimator it draws ``R`` independent gradient estimates of the ELBO of a fixed target,

.. math::
    \mathcal{L}(\theta) = \mathbb{E}_{z_0 \sim q_\theta}\big[\log p(T(z_0))
        + \log\lvert\det \partial T / \partial z_0\rvert - \log q_\theta(z_0)\big],

wrt the mixture's ``logits``, ``locs`` and ``scales`` (``T`` is the identity except in case c),
each estimate from ``P`` particles, and compares their mean with an exact reference:

* cases a and b (``D = 2``): Gauss–Hermite product quadrature inside each component, summed over
  components with the exact weights; the quadrature error is estimated by a second rule with
  more nodes and written to the JSON;
* case c (``D = 100`` under a flow): a large stratified sample (many draws per component, summed
  with the exact weights), whose own standard error enters the z-scores;
* case d (``D = 1000``, float32): no reference; only whether the gradients are finite.

The bias of each gradient entry is reported as a z-score, ``|mean - exact| / SE``, with the SE
from the spread of the ``R`` estimates (and of the reference). The table shows the largest
z-score of each parameter group; with ``m`` entries the largest of ``m`` unbiased z-scores
exceeds 3 by chance, so the verdict uses the Bonferroni-corrected threshold with the same
0.27% false-alarm rate as ``|z| < 3`` for a single entry. Cost is the median wall time of one
gradient with ``P`` particles (one thread); "SE at equal time" is the standard deviation of one
gradient estimate times ``sqrt(time per gradient / 1 s)``, the SE one second of compute buys.

Estimators: ``relaxed`` (Gumbel-softmax at tau = 1, 0.5, 0.1, exact mixture density),
``relaxed-nested`` (the design note's nested density, tau = 0.5, 32 inner draws), ``pathwise``
(Pyro's :class:`~pyro.distributions.MixtureOfDiagNormals`), ``implicit``
(:class:`~pyro_mogflow.DiagNormalMixture`) and ``stratified`` (``P / K`` reparameterized draws
from every component, summed with the weights: the exact expectation over the discrete choice).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import affine_autoregressive
from scipy import stats
from tqdm.auto import tqdm

from pyro_mogflow import mixture_log_prob
from pyro_mogflow.distributions import DiagNormalMixture, RelaxedMixtureOfDiagNormals

from .runner import save_report

__all__ = ["ESTIMATORS", "Case", "build_cases", "run_case", "main"]

#: label -> (kind, options). The labels are the rows of the table.
ESTIMATORS: dict[str, tuple[str, dict]] = {
    "relaxed tau=1": ("relaxed", {"temperature": 1.0}),
    "relaxed tau=0.5": ("relaxed", {"temperature": 0.5}),
    "relaxed tau=0.1": ("relaxed", {"temperature": 0.1}),
    "relaxed-nested tau=0.5": ("relaxed-nested", {"temperature": 0.5, "num_nested": 32}),
    "pathwise (Pyro)": ("pathwise", {}),
    "implicit": ("implicit", {}),
    "stratified": ("stratified", {}),
}
GROUPS = ("logits", "locs", "scales")
#: Two-sided false-alarm rate of |z| < 3 for one entry; the verdict keeps it over all entries.
ALPHA = 2 * stats.norm.sf(3.0)


@dataclasses.dataclass
class Case:
    """One benchmark case: a mixture ``q`` (float64 parameters), a target and a reference.

    :param name: short key. :param title: one line for the table.
    :param logits: ``(K,)``; :param locs: ``(K, D)``; :param scales: ``(K, D)``.
    :param log_target: ``x -> log p(x)``, shape ``(..., D) -> (...)``, any dtype.
    :param flow: optional transform ``T`` (a Pyro transform) applied to base draws.
    :param dtype: dtype the estimators run in.
    :param particles: ``P``, particles per gradient. :param reps: ``R``, gradients drawn.
    :param reference: ``"quadrature"``, ``"stratified"`` or ``"none"``.
    :param reference_size: nodes per axis (quadrature) or draws per component (stratified).
    """

    name: str
    title: str
    logits: torch.Tensor
    locs: torch.Tensor
    scales: torch.Tensor
    log_target: Callable[[torch.Tensor], torch.Tensor]
    flow: object | None
    dtype: torch.dtype
    particles: int
    reps: int
    reference: str
    reference_size: int

    @property
    def k(self) -> int:
        return self.logits.shape[-1]

    @property
    def d(self) -> int:
        return self.locs.shape[-1]


# ------------------------------------------------------------------------------------- targets
def _gaussian_mixture_target(weights, means, scale) -> Callable[[torch.Tensor], torch.Tensor]:
    """``log p`` of an isotropic Gaussian mixture; ``means`` ``(J, D)``."""
    log_w = torch.log(torch.as_tensor(weights, dtype=torch.float64))
    means = torch.as_tensor(means, dtype=torch.float64)

    def log_p(x: torch.Tensor) -> torch.Tensor:
        lw, mu = log_w.to(x), means.to(x)
        sq = (x.unsqueeze(-2) - mu).pow(2).sum(-1) / scale**2
        norm = mu.shape[-1] * (math.log(scale) + 0.5 * math.log(2 * math.pi))
        return torch.logsumexp(lw - 0.5 * sq - norm, dim=-1)

    return log_p


def _correlated_gaussian_target(rho: float, scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``log p`` of a centred 2-D Gaussian with correlation ``rho``: it has a ``z1 z2`` term."""
    cov = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64) * scale**2
    prec = torch.linalg.inv(cov)
    log_norm = -0.5 * torch.logdet(cov).item() - math.log(2 * math.pi)

    def log_p(x: torch.Tensor) -> torch.Tensor:
        return log_norm - 0.5 * torch.einsum("...i,ij,...j->...", x, prec.to(x), x)

    return log_p


def build_cases(quick: bool = False, seed: int = 0) -> list[Case]:
    """The benchmark cases a-d (smaller sizes and fewer repetitions with ``quick``)."""
    f64 = torch.float64
    g = torch.Generator().manual_seed(seed)
    p2, r2 = (64, 40) if quick else (256, 1000)
    quad = 24 if quick else 64
    cases = []
    for sep in (4.0, 1.5):
        locs = torch.tensor([[-sep, -sep], [sep, sep]], dtype=f64)
        cases.append(
            Case(
                name=f"a{sep:g}",
                title=f"(a) K=2, D=2, means ±{sep:g}",
                logits=torch.tensor([0.4, -0.4], dtype=f64),
                locs=locs,
                scales=torch.tensor([[1.0, 0.8], [0.9, 1.2]], dtype=f64),
                log_target=_gaussian_mixture_target(
                    [0.3, 0.7], locs + torch.tensor([[0.5, -0.5], [-0.5, 0.5]], dtype=f64), 1.2
                ),
                flow=None,
                dtype=f64,
                particles=p2,
                reps=r2,
                reference="quadrature",
                reference_size=quad,
            )
        )
    cases.append(
        Case(
            name="b",
            title="(b) K=2, D=2, target with a z1·z2 term (correlation 0.8)",
            logits=torch.tensor([0.3, -0.3], dtype=f64),
            locs=torch.tensor([[-1.5, 1.0], [1.5, -0.5]], dtype=f64),
            scales=torch.tensor([[1.0, 0.7], [0.8, 1.1]], dtype=f64),
            log_target=_correlated_gaussian_target(0.8, 2.0),
            flow=None,
            dtype=f64,
            particles=p2,
            reps=r2,
            reference="quadrature",
            reference_size=quad,
        )
    )
    k, d = (4, 10) if quick else (16, 100)
    torch.manual_seed(seed)  # the flow's weights
    flow = affine_autoregressive(d, hidden_dims=[2 * d]).to(f64)
    for p in flow.parameters():
        p.requires_grad_(False)
    sign = torch.ones(d, dtype=f64)
    cases.append(
        Case(
            name="c",
            title=f"(c) K={k}, D={d}, one affine_autoregressive layer",
            logits=0.5 * torch.randn(k, generator=g, dtype=f64),
            locs=1.5 * torch.randn(k, d, generator=g, dtype=f64),
            scales=0.5 + 0.5 * torch.rand(k, d, generator=g, dtype=f64),
            log_target=_gaussian_mixture_target([0.5, 0.5], torch.stack([sign, -sign]), 1.5),
            flow=flow,
            dtype=f64,
            particles=64 if quick else 256,
            reps=20 if quick else 400,
            reference="stratified",
            reference_size=256 if quick else 32768,
        )
    )
    k, d = (4, 50) if quick else (32, 1000)
    for scale in (0.1, 1.0):
        cases.append(
            Case(
                name=f"d{scale:g}",
                title=f"(d) K={k}, D={d}, float32, scales {scale:g}",
                logits=torch.randn(k, generator=g, dtype=f64),
                locs=torch.randn(k, d, generator=g, dtype=f64),
                scales=torch.full((k, d), scale, dtype=f64),
                log_target=lambda x: -0.5 * x.pow(2).sum(-1),
                flow=None,
                dtype=torch.float32,
                particles=8,
                reps=2 if quick else 5,
                reference="none",
                reference_size=0,
            )
        )
    return cases


# ---------------------------------------------------------------------------------- objective
def _push(case: Case, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T(z0), log|det dT/dz0|)``; the identity when the case has no flow."""
    if case.flow is None:
        return z0, torch.zeros(z0.shape[:-1], dtype=z0.dtype, device=z0.device)
    flow = case.flow.to(z0.dtype)
    x = flow(z0)
    return x, flow.log_abs_det_jacobian(z0, x)


def elbo_estimate(case: Case, kind: str, options: dict, params, particles: int) -> torch.Tensor:
    """One Monte Carlo ELBO estimate per batch row, differentiable wrt ``params``.

    :param params: ``(logits, locs, scales)`` with a leading batch dim ``R``: ``(R, K)``,
        ``(R, K, D)``, ``(R, K, D)``; each row is an independent replicate.
    :return: shape ``(R,)``.
    """
    logits, locs, scales = params
    if kind == "stratified":
        k = logits.shape[-1]
        per = max(1, particles // k)
        eps = torch.randn((per,) + locs.shape, dtype=locs.dtype, device=locs.device)
        z0 = (locs + scales * eps).transpose(-2, -3)  # (per, K, R, D)
        x, ladj = _push(case, z0)
        h = case.log_target(x) + ladj - mixture_log_prob(z0, logits, locs, scales)
        return (torch.softmax(logits, -1) * h.mean(0).transpose(0, 1)).sum(-1)
    if kind in ("relaxed", "relaxed-nested"):
        q = RelaxedMixtureOfDiagNormals(
            logits,
            locs,
            scales,
            options["temperature"],
            density="exact" if kind == "relaxed" else "nested",
            num_nested=options.get("num_nested", 32),
        )
    elif kind == "pathwise":
        # Pyro's batch mode takes no sample shape: put the particles in the batch instead.
        lead = (particles,) + logits.shape[:-1]
        q = dist.MixtureOfDiagNormals(
            locs.expand(lead + locs.shape[-2:]),
            scales.expand(lead + scales.shape[-2:]),
            logits.expand(lead + logits.shape[-1:]),
        )
        z0 = q.rsample()
        x, ladj = _push(case, z0)
        return (case.log_target(x) + ladj - q.log_prob(z0)).mean(0)
    elif kind == "implicit":
        q = DiagNormalMixture(logits, locs, scales)
    else:
        raise ValueError(f"unknown estimator kind {kind!r}")
    z0 = q.rsample((particles,))
    x, ladj = _push(case, z0)
    return (case.log_target(x) + ladj - q.log_prob(z0)).mean(0)


def _replicated_params(case: Case, reps: int, dtype: torch.dtype):
    return [
        t.to(dtype).expand((reps,) + t.shape).clone().requires_grad_()
        for t in (case.logits, case.locs, case.scales)
    ]


def draw_gradients(case: Case, kind: str, options: dict, reps: int, particles: int):
    """``reps`` independent gradient estimates, as float64 arrays ``(reps, *param_shape)``."""
    params = _replicated_params(case, reps, case.dtype)
    est = elbo_estimate(case, kind, options, params, particles)
    grads = torch.autograd.grad(est.sum(), params)
    return [g.detach().double() for g in grads]


def time_gradient(case: Case, kind: str, options: dict, repeats: int) -> float:
    """Median wall time (s) of one gradient with ``case.particles`` particles, unbatched."""
    times = []
    for i in range(repeats + 2):
        params = _replicated_params(case, 1, case.dtype)
        start = time.perf_counter()
        est = elbo_estimate(case, kind, options, params, case.particles)
        torch.autograd.grad(est.sum(), params)
        if i >= 2:  # two warm-up calls
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------- references
def _quadrature_gradient(case: Case, nodes: int) -> list[torch.Tensor]:
    """Exact ELBO gradient (D = 2, no flow) by Gauss–Hermite quadrature in each component."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    x = torch.as_tensor(x, dtype=torch.float64)
    w = torch.as_tensor(w / math.sqrt(2 * math.pi), dtype=torch.float64)
    if case.d != 2 or case.flow is not None:
        raise ValueError("quadrature reference needs D = 2 and no flow")
    eps = torch.stack(torch.meshgrid(x, x, indexing="ij"), -1).reshape(-1, 2)  # (n^2, 2)
    weights = (w[:, None] * w[None, :]).reshape(-1)
    params = [t.clone().requires_grad_() for t in (case.logits, case.locs, case.scales)]
    logits, locs, scales = params
    z = locs + scales * eps[:, None, :]  # (n^2, K, 2)
    h = case.log_target(z) - mixture_log_prob(z, logits, locs, scales)  # (n^2, K)
    elbo = (torch.softmax(logits, -1) * (weights[:, None] * h).sum(0)).sum()
    return list(torch.autograd.grad(elbo, params))


def exact_reference(case: Case) -> dict:
    """The reference gradient of ``case`` with its uncertainty.

    :return: dict with ``grads`` (float64 tensors), ``se`` (tensors; zeros for quadrature),
        ``method`` (str) and ``error`` (estimated quadrature error, or None).
    """
    if case.reference == "quadrature":
        fine = _quadrature_gradient(case, case.reference_size)
        finer = _quadrature_gradient(case, case.reference_size + 32)
        err = max(float((a - b).abs().max()) for a, b in zip(fine, finer))
        return {
            "grads": finer,
            "se": [torch.zeros_like(g) for g in finer],
            "method": f"Gauss–Hermite {case.reference_size + 32}² nodes per component",
            "error": err,
        }
    if case.reference == "stratified":
        per_chunk = 64  # keeps every intermediate tensor small (no allocator churn)
        chunks = max(2, case.reference_size // per_chunk)
        draws = []
        for _ in range(chunks):
            params = _replicated_params(case, 1, torch.float64)
            est = elbo_estimate(case, "stratified", {}, params, per_chunk * case.k)
            draws.append([g[0].double() for g in torch.autograd.grad(est.sum(), params)])
        stacked = [torch.stack(col) for col in zip(*draws)]
        return {
            "grads": [s.mean(0) for s in stacked],
            "se": [s.std(0) / math.sqrt(chunks) for s in stacked],
            "method": f"stratified, {chunks * per_chunk} draws per component (SE included)",
            "error": None,
        }
    return {"grads": None, "se": None, "method": "none (finiteness only)", "error": None}


# ------------------------------------------------------------------------------------- summary
def _summarise(case: Case, grads, reference: dict, seconds: float) -> dict:
    finite_rows = torch.stack([torch.isfinite(g).flatten(1).all(1) for g in grads]).all(0)
    n_finite = int(finite_rows.sum())
    out = {
        "finite": f"{n_finite}/{case.reps}",
        "all_finite": n_finite == case.reps,
        "seconds_per_gradient": seconds,
        "groups": {},
    }
    for name, g, i in zip(GROUPS, grads, range(3)):
        g = g[finite_rows]
        entry = {"entries": int(g[0].numel()) if len(g) else 0}
        if len(g) >= 2:
            sd = g.std(0)
            entry["mean"] = g.mean(0).flatten().tolist()
            entry["sd_one_gradient"] = sd.flatten().tolist()
            entry["rms_sd_one_gradient"] = float(sd.pow(2).mean().sqrt())
            entry["se_at_1s"] = entry["rms_sd_one_gradient"] * math.sqrt(seconds)
            if reference["grads"] is not None:
                ref, ref_se = reference["grads"][i], reference["se"][i]
                se = (sd.pow(2) / len(g) + ref_se.pow(2)).sqrt()
                # entries with zero spread (e.g. a gradient that is identically zero) only
                # count when they are off the reference
                z = torch.where(
                    se > 0, (g.mean(0) - ref).abs() / se.clamp(min=1e-300), (g.mean(0) != ref) * 1e9
                )
                m = entry["entries"]
                entry["exact"] = ref.flatten().tolist()
                entry["z"] = z.flatten().tolist()
                entry["max_z"] = float(z.max())
                # Student t with R - 1 degrees of freedom: the SE is itself estimated
                entry["threshold"] = float(stats.t.isf(ALPHA / (2 * m), df=len(g) - 1))
                entry["unbiased"] = entry["max_z"] < entry["threshold"]
        out["groups"][name] = entry
    checks = [e.get("unbiased") for e in out["groups"].values()]
    out["unbiased"] = None if None in checks else all(checks)
    return out


def run_case(case: Case, timing_repeats: int, progress=None) -> dict:
    """Reference, gradient draws and timings of every estimator on ``case``."""
    if progress is not None:
        progress.set_postfix_str(f"{case.name}: reference")
    reference = exact_reference(case)
    rows = {}
    for label, (kind, options) in ESTIMATORS.items():
        if progress is not None:
            progress.set_postfix_str(f"{case.name}: {label}")
        grads = _draw_in_chunks(case, kind, options)
        seconds = time_gradient(case, kind, options, timing_repeats)
        rows[label] = _summarise(case, grads, reference, seconds)
        if progress is not None:
            progress.update(1)
    return {
        "title": case.title,
        "K": case.k,
        "D": case.d,
        "dtype": str(case.dtype).replace("torch.", ""),
        "particles": case.particles,
        "reps": case.reps,
        "reference": reference["method"],
        "reference_error": reference["error"],
        "estimators": rows,
    }


def _draw_in_chunks(case: Case, kind: str, options: dict, budget: int = 1 << 20):
    """Batch the ``R`` replicates so that each pass holds about ``budget`` sample values."""
    per_rep = case.particles * case.d * case.k
    if kind == "pathwise":  # Pyro's backward holds (particles, K, K, D) tensors
        per_rep *= case.k
    chunk = max(1, min(case.reps, budget // per_rep))
    parts = []
    for start in range(0, case.reps, chunk):
        n = min(chunk, case.reps - start)
        parts.append(draw_gradients(case, kind, options, n, case.particles))
    return [torch.cat(col) for col in zip(*parts)]


# ---------------------------------------------------------------------------------------- report
def _fmt(x, digits=2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
            return f"{x:.{digits}e}"
        return f"{x:.{digits}f}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def markdown(results: dict) -> str:
    """The tables and the goal checks as markdown."""
    meta = results["meta"]
    lines = [
        "# Gradient estimators through the mixture",
        "",
        f"Objective: {meta['objective']}. Machine: {meta['machine']}; {meta['date']}; "
        f"torch {meta['torch']}, 1 thread; seed {meta['seed']}"
        + (" (quick run)." if meta["quick"] else "."),
        "",
        "`max|z|`: largest |mean − exact| / SE over the entries of a parameter group (SE from the "
        "R estimates and the reference); `unbiased`: every group below its threshold, the "
        "Student-t (R − 1 dof) quantile with the false-alarm rate of |z| < 3 for one entry, "
        "Bonferroni-corrected over the group's entries (listed under each table). `SD`: standard "
        "deviation of one gradient estimate of the logits (RMS over entries); `SE@1s`: SD × "
        "sqrt(seconds per gradient), the SE that one second of compute buys; `vs pathwise`: "
        "SE@1s ratio.",
        "",
    ]
    for case in results["cases"].values():
        lines += [
            f"## {case['title']}",
            "",
            f"{case['dtype']}, P = {case['particles']} particles per gradient, R = "
            f"{case['reps']} gradients; reference: {case['reference']}"
            + (
                f" (quadrature error ≤ {_fmt(case['reference_error'])})"
                if case["reference_error"] is not None
                else ""
            )
            + ".",
            "",
            "| estimator | finite | max\\|z\\| logits | max\\|z\\| locs | max\\|z\\| scales "
            "| unbiased | SD logits | SE@1s logits | vs pathwise | ms/grad |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        path = case["estimators"]["pathwise (Pyro)"]["groups"]["logits"].get("se_at_1s")
        for label, row in case["estimators"].items():
            gl = row["groups"]["logits"]
            eff = gl.get("se_at_1s")
            ratio = eff / path if (eff is not None and path and math.isfinite(path)) else None
            verdict = {True: "yes", False: "**no**", None: "—"}[row["unbiased"]]
            lines.append(
                "| "
                + " | ".join(
                    [
                        label,
                        row["finite"],
                        *(_fmt(row["groups"][g].get("max_z"), 1) for g in GROUPS),
                        verdict,
                        _fmt(gl.get("rms_sd_one_gradient"), 3),
                        _fmt(eff, 4),
                        _fmt(ratio, 3),
                        _fmt(1e3 * row["seconds_per_gradient"], 2),
                    ]
                )
                + " |"
            )
        groups = case["estimators"]["implicit"]["groups"]
        if "threshold" in groups["logits"]:
            lines += [
                "",
                "Thresholds: "
                + ", ".join(
                    f"{g} {groups[g]['threshold']:.2f} ({groups[g]['entries']} entries)"
                    for g in GROUPS
                )
                + ".",
            ]
        lines.append("")
    lines += ["## Goals", ""] + [f"- {g}" for g in results["goals"]] + [""]
    return "\n".join(lines)


def goals(results: dict) -> list[str]:
    """The issue's goals, checked against the measurements."""
    out = []
    cases = results["cases"]
    for label in ("implicit", "stratified"):
        verdicts = {
            name: c["estimators"][label]["unbiased"]
            for name, c in cases.items()
            if c["estimators"][label]["unbiased"] is not None
        }
        worst = max(
            (
                (c["estimators"][label]["groups"][g]["max_z"], name, g)
                for name, c in cases.items()
                for g in GROUPS
                if "max_z" in c["estimators"][label]["groups"][g]
            ),
            default=None,
        )
        met = all(verdicts.values())
        out.append(
            f"{label} unbiased in every case with a reference: {'met' if met else 'MISSED'} "
            f"({', '.join(f'{k}: {v}' for k, v in verdicts.items())}; largest z "
            f"{_fmt(worst[0], 2)} in {worst[1]}/{worst[2]})"
        )
    a4 = next((c for n, c in cases.items() if n.startswith("a4")), None)
    if a4 is not None:
        path = a4["estimators"]["pathwise (Pyro)"]["groups"]["logits"]["se_at_1s"]
        for label in ("implicit", "stratified"):
            ratio = a4["estimators"][label]["groups"]["logits"]["se_at_1s"] / path
            out.append(
                f"SE at equal wall time on (a) ±4, logits, {label} / pathwise = {_fmt(ratio, 3)} "
                f"(goal ≤ 0.1: {'met' if ratio <= 0.1 else 'MISSED'})"
            )
    for name, c in cases.items():
        if not name.startswith("d"):
            continue
        fin = {k: v["finite"] for k, v in c["estimators"].items()}
        listed = ", ".join(f"{k} {v}" for k, v in fin.items())
        out.append(f"{c['title']}: finite gradients {listed}")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default=None, help="comma-separated case names (default all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    cases = build_cases(quick=args.quick, seed=args.seed)
    if args.cases:
        wanted = set(args.cases.split(","))
        unknown = wanted - {c.name for c in cases}
        if unknown:
            parser.error(f"unknown cases {sorted(unknown)}; known: {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in wanted]
    results = {
        "meta": {
            "objective": "ELBO E_q[log p(T(z0)) + log|det dT/dz0| - log q(z0)] of a fixed target "
            "(T = identity except case c), gradient wrt the mixture logits, locs, scales",
            "machine": " ".join(
                x
                for x in (platform.machine(), platform.processor(), f"{os.cpu_count()} cores")
                if x
            ),
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "seed": args.seed,
            "quick": args.quick,
        },
        "cases": {},
    }
    with tqdm(total=len(cases) * len(ESTIMATORS), desc="gradients") as progress:
        for case in cases:
            torch.manual_seed(args.seed)
            results["cases"][case.name] = run_case(case, 3 if args.quick else 15, progress)
    results["goals"] = goals(results)
    text = markdown(results)
    print(text)
    save_report(results, text, args.out, "gradients")
    return results


if __name__ == "__main__":
    main()
