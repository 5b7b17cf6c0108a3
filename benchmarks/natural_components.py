r"""Prototype benchmark: natural-gradient Gaussian-mixture component updates against ``fit()``.

Question (issue 10, item 1): do natural-gradient (variational online Newton / iBLR) updates of
each component's mean and precision find the modes of 20-100-D posteriors and take the shape of
a correlated mode, where ``fit()`` (Adam on means and diagonal scales) does not?

Run ``python -m benchmarks.natural_components`` (every target and row, about 15 minutes on one
thread), or e.g. ``--targets synth20 --rows fit,full``. It prints one table and writes
``natural_components.{md,json}`` to ``--out`` (default ``benchmarks/results/``).

The rows are standalone float64 mixtures of ``K = 64`` Gaussians trained on the target's
log-joint (single unconstrained site only; no flow), started like ``fit()``: means at draws of
the target's :math:`\mathcal N(0, s_0^2 I)` prior, precision :math:`s_0^{-2} I`, equal weights,
likelihood tempered geometrically from :math:`\beta = 0.01` to 1 over the first half of the
steps. Each step draws one antithetic pair :math:`\pm\epsilon` per component,
:math:`z = m_k + U_k^{-\top}\epsilon` (:math:`S_k = U_k U_k^\top` the precision), takes
:math:`g = \nabla_z[\log p_\beta(z) - \log q(z)]` (``q`` the whole mixture) and

.. math::
    \bar g_k = \tfrac12\textstyle\sum_\pm g, \quad
    G_k = -\operatorname{sym}\big(\tfrac12\textstyle\sum_\pm g\,(U_k\epsilon)^\top\big)
    \ (\text{Stein/Price: } -\mathbb E_{q_k}[\nabla^2 f]),

    S_k \leftarrow S_k + b_k G_k + \tfrac{b_k^2}{2} G_k S_k^{-1} G_k, \qquad
    m_k \leftarrow m_k + b_k S_k^{-1} \bar g_k,

the iBLR update (Lin, Schmidt, Khan 2020), positive definite by construction, with the step
:math:`b_k = \min(b, \sqrt{\varepsilon / (\lVert U_k^{-1} G_k U_k^{-\top}\rVert_F^2/4
+ \bar g_k^\top S_k^{-1} \bar g_k / 2)})` (a second-order bound on the KL between successive
components, :math:`\varepsilon = 1`, :math:`b = 0.1`); without it the quadratic term blew the
precisions up to :math:`10^{16}` in 20-D. The antithetic pair makes both estimates exact for a
quadratic :math:`f`. The weights take ``fit()``'s natural-gradient step (:math:`\eta = 0.05`).

* ``fit()``: ``pyro_mogflow.fit`` with every default (2000 steps), scored like
  ``benchmarks.real_models``;
* ``diag``: the update with diagonal precisions (Stein diagonal);
* ``full``: the update with full precisions;
* ``hybrid``: ``diag`` while tempering, then ``full`` at :math:`\beta = 1`.

References: W. Lin, M. Schmidt, M. E. Khan, *Handling the Positive-Definite Constraint in the
Bayesian Learning Rule*, ICML 2020; O. Arenz, P. Dahlinger, Z. Ye, M. Volpp, G. Neumann, *A
Unified Perspective on Natural Gradient Variational Inference with Gaussian Mixture Models*,
TMLR 2023.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import time

import pyro
import pyro.distributions as dist
import torch

from pyro_mogflow import fit
from pyro_mogflow.examples import gaussian_mixture_target, mode_masses

from .metrics import COVER_FRACTION
from .real_models import evaluate as evaluate_guide
from .real_targets import RealTarget, build_real_target, synthetic
from .runner import save_report

__all__ = ["ROWS", "TARGETS", "main", "natural_gradient_mixture"]

TARGETS = ("grid9", "synth5", "synth20", "synth50", "synth100", "gmm40_50d")
ROWS = ("fit", "diag", "full", "hybrid")
K, STEPS, STEP, KL_BOUND, WEIGHT_STEP = 64, 500, 0.1, 1.0, 0.05
NUM_EVAL, NUM_TRUTH = 4096, 100_000


def _target(name: str) -> RealTarget:
    if name == "synth5":
        return synthetic(5, (0.6, 0.3, 0.1), seed=5)
    if name == "grid9":
        locs = torch.tensor([[x, y] for x in (-4.0, 0.0, 4.0) for y in (-4.0, 0.0, 4.0)])
        return RealTarget("grid9", gaussian_mixture_target(locs, scales=0.5, radius=2.0))
    return build_real_target(name)


def _component_log_prob(z, m, prec, full: bool) -> torch.Tensor:
    """(N, K): log N(z; m_k, S_k^{-1}); ``prec`` is U (K, D, D) if full else s (K, D)."""
    d = z.shape[-1]
    diff = z.unsqueeze(-2) - m
    if full:
        y = (prec.transpose(-1, -2) @ diff.unsqueeze(-1)).squeeze(-1)
        half_logdet = torch.log(torch.diagonal(prec, dim1=-2, dim2=-1)).sum(-1)
        quad = y.pow(2).sum(-1)
    else:
        half_logdet = 0.5 * prec.log().sum(-1)
        quad = (diff.pow(2) * prec).sum(-1)
    return -0.5 * quad + half_logdet - 0.5 * d * math.log(2 * math.pi)


def _log_q(z, logw, m, prec, full: bool) -> torch.Tensor:
    return torch.logsumexp(logw + _component_log_prob(z, m, prec, full), -1)


def _weight_step(logw, terms, ok):
    pi = logw.exp()
    mean = (pi * torch.where(ok, terms, torch.zeros(()))).sum()
    delta = torch.where(ok, terms - mean, torch.full_like(terms, -1e3))
    delta = delta.clamp(-1e3 / WEIGHT_STEP, 1e3 / WEIGHT_STEP)
    new = torch.log_softmax(logw + WEIGHT_STEP * delta, -1).clamp(min=math.log(1e-6))
    return torch.log_softmax(new, -1)


def natural_gradient_mixture(
    log_p, log_prior, m, prec, steps: int, full: bool, logw=None, temper: bool = True
):
    """Train a Gaussian mixture by the iBLR component update (see the module docstring).

    :param log_p: ``(N, D) -> (N,)``, the log-joint. :param log_prior: the same for the prior.
    :param m: initial means ``(K, D)``. :param prec: initial precision, a float or ``(K, D)``.
    :return: ``(logw, m, U or s)``.
    """
    k, d = m.shape
    m = m.clone()
    logw = torch.full((k,), -math.log(k), dtype=m.dtype) if logw is None else logw
    if not torch.is_tensor(prec):
        prec = torch.full((k, d), float(prec), dtype=m.dtype)
    if full:
        big_s = torch.diag_embed(prec)
        u = torch.linalg.cholesky(big_s)
    else:
        s = prec.clone()
    anneal = max(1, steps // 2)
    for t in range(steps):
        beta = 0.01 ** (1 - min(t / anneal, 1)) if temper else 1.0
        eps = torch.randn(k, 1, d, dtype=m.dtype)
        eps = torch.cat([eps, -eps], 1)  # (K, 2, D) antithetic pair
        if full:
            x = torch.linalg.solve_triangular(
                u.transpose(-1, -2), eps.transpose(-1, -2), upper=True
            ).transpose(-1, -2)
        else:
            x = eps / s.sqrt().unsqueeze(1)
        z = (m.unsqueeze(1) + x).reshape(-1, d).detach().requires_grad_(True)
        prior = log_prior(z)
        f = prior + beta * (log_p(z) - prior) - _log_q(z, logw, m, u if full else s, full)
        (g,) = torch.autograd.grad(f.sum(), z)
        f, g = f.detach().reshape(k, 2), g.reshape(k, 2, d)
        ok = torch.isfinite(f).all(-1) & torch.isfinite(g).all(-1).all(-1)
        g = torch.where(ok[:, None, None], g, g.new_zeros(()))
        gbar = g.mean(1)
        logw = _weight_step(logw, f.mean(1), ok)
        if full:
            ue = (u.unsqueeze(1) @ eps.unsqueeze(-1)).squeeze(-1)
            h = torch.einsum("kni,knj->kij", g, ue) / 2
            big_g = -0.5 * (h + h.transpose(-1, -2))
            a = torch.linalg.solve_triangular(u, big_g, upper=False)
            a = torch.linalg.solve_triangular(u, a.transpose(-1, -2), upper=False)
            newton = torch.cholesky_solve(gbar.unsqueeze(-1), u).squeeze(-1)
            size = a.pow(2).sum((-1, -2)) / 4 + (gbar * newton).sum(-1) / 2
            b = torch.nan_to_num((KL_BOUND / size).sqrt().clamp(max=STEP), nan=0.0)
            b3 = b[:, None, None]
            new_s = big_s + b3 * big_g + 0.5 * b3**2 * big_g @ torch.cholesky_solve(big_g, u)
            new_s = 0.5 * (new_s + new_s.transpose(-1, -2))
            new_u, info = torch.linalg.cholesky_ex(new_s)
            good = ok & (info == 0)
            big_s = torch.where(good[:, None, None], new_s, big_s)
            u = torch.where(good[:, None, None], new_u, u)
            step = torch.cholesky_solve(gbar.unsqueeze(-1), u).squeeze(-1)
            m = torch.where(good[:, None], m + b[:, None] * step, m)
        else:
            big_g = -(g * eps).mean(1) * s.sqrt()
            size = (big_g / s).pow(2).sum(-1) / 4 + (gbar.pow(2) / s).sum(-1) / 2
            b = torch.nan_to_num((KL_BOUND / size).sqrt().clamp(max=STEP), nan=0.0)[:, None]
            new_s = s + b * big_g + 0.5 * b**2 * big_g.pow(2) / s
            good = ok & (new_s > 0).all(-1)
            s = torch.where(good[:, None], new_s, s)
            m = torch.where(good[:, None], m + b * gbar / s, m)
    return logw, m, (u if full else s)


def _score(bench: RealTarget, params, full: bool, bins) -> dict:
    t = bench.target
    logw, m, prec = params
    idx = torch.multinomial(logw.exp(), NUM_EVAL, True)
    eps = torch.randn(NUM_EVAL, m.shape[-1])
    if full:
        x = torch.linalg.solve_triangular(
            prec[idx].transpose(-1, -2), eps.unsqueeze(-1), upper=True
        ).squeeze(-1)
    else:
        x = eps / prec[idx].sqrt()
    z = m[idx] + x
    log_w = t.log_joint_batch({t.site: z.float()}).double() - _log_q(z, logw, m, prec, full)
    q = mode_masses(z, t.modes.double(), t.radius, elsewhere=True)
    num = t.num_modes
    return {
        "modes_covered": int((q[:num] > COVER_FRACTION * bins[:num]).sum()),
        "num_modes": num,
        "reverse_kl": t.log_z - float(log_w.mean()),
        "abs_log_z_error": abs(float(torch.logsumexp(log_w, 0)) - math.log(NUM_EVAL) - t.log_z),
        "mass_tv": float(0.5 * (q - bins).abs().sum()),
    }


def _log_density(t):
    """A float64 log-joint for the targets here (their model is a Gaussian mixture factor)."""
    logits, locs, scales = (a.double() for a in t.args)
    if scales.dim() == locs.dim() + 1:
        comp = dist.MultivariateNormal(locs, scale_tril=scales)
    else:
        comp = dist.Normal(locs, scales).to_event(1)
    log_pi = torch.log_softmax(logits, -1)
    return lambda z: torch.logsumexp(log_pi + comp.log_prob(z.unsqueeze(-2)), -1) + t.log_z


def run_one(name: str, row: str, seed: int) -> dict:
    bench = _target(name)
    t = bench.target
    truth = t.sample_exact(NUM_TRUTH, torch.Generator().manual_seed(12345))[t.site].double()
    bins = mode_masses(truth, t.modes.double(), t.radius, elsewhere=True)
    prior_scale = float(t.kwargs.get("prior_scale", 10.0))
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    if row == "fit":
        guide = fit(t.model, *t.args, model_kwargs=t.kwargs, progress=False).guide
        seconds = time.perf_counter() - start
        with torch.no_grad():
            out = evaluate_guide(guide, bench, {t.site: truth.float()}, bins, NUM_EVAL)
        out = {key: out[key] for key in ("modes_covered", "num_modes", "reverse_kl")} | {
            "abs_log_z_error": out["abs_log_z_error"],
            "mass_tv": out["mass_tv"],
        }
    else:
        d = truth.shape[-1]
        torch.set_default_dtype(torch.float64)
        try:
            log_p = _log_density(t)

            def log_prior(z):
                return dist.Normal(0.0, prior_scale).log_prob(z).sum(-1)

            m0 = prior_scale * torch.randn(K, d)
            prec0 = 1.0 / prior_scale**2
            if row == "hybrid":
                logw, m, s = natural_gradient_mixture(
                    log_p, log_prior, m0, prec0, STEPS // 2, full=False
                )
                # continue at beta = 1 (the diag stage annealed over its own steps)
                params = natural_gradient_mixture(
                    log_p, log_prior, m, s, STEPS - STEPS // 2, True, logw, temper=False
                )
            else:
                params = natural_gradient_mixture(
                    log_p, log_prior, m0, prec0, STEPS, full=row == "full"
                )
            seconds = time.perf_counter() - start
            with torch.no_grad():
                out = _score(bench, params, row != "diag", bins)
        finally:
            torch.set_default_dtype(torch.float32)
    return {"target": name, "row": row, "seed": seed, "seconds": seconds, **out}


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = []
    lines = [
        "| target | row | modes | reverse KL | mass TV | abs dlogZ | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.targets.split(","):
        for row in args.rows.split(","):
            r = run_one(name, row, args.seed)
            runs.append(r)
            line = (
                f"| {name} | {row} | {r['modes_covered']}/{r['num_modes']} | "
                f"{r['reverse_kl']:.3g} | {r['mass_tv']:.3f} | {r['abs_log_z_error']:.3g} | "
                f"{r['seconds']:.1f} |"
            )
            lines.append(line)
            print(line, flush=True)
    meta = f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, "
    meta += f"{datetime.date.today()}, seed {args.seed}, one thread"
    text = "\n".join(["# Natural-gradient component updates", "", meta, "", *lines, ""])
    save_report({"runs": runs, "meta": meta}, text, args.out, "natural_components")
    return runs


if __name__ == "__main__":
    main()
