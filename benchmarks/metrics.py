r"""Metrics of the multimodal benchmark: how close a fitted guide :math:`q` is to the posterior.

With :math:`S` draws :math:`\theta_s \sim q` and log weights
:math:`\log w_s = \log p(x, \theta_s) - \log q(\theta_s)`, and :math:`S'` exact posterior draws
:math:`\theta'_s \sim p(\cdot \mid x)`:

* reverse KL :math:`\mathrm{KL}(q \| p) = \log Z - \frac1S \sum_s \log w_s` (:math:`\log Z`
  known), with its standard error;
* forward KL :math:`\mathrm{KL}(p \| q) = \frac1{S'} \sum_s [\log p(x, \theta'_s) - \log Z -
  \log q(\theta'_s)]`: the negative log-likelihood of true draws up to a constant; it needs
  :math:`q`'s density at points :math:`q` did not draw, so the guide must be invertible
  (every guide of the benchmark is);
* mode masses (:func:`pyro_mogflow.examples.mode_masses`, the metric the demo and the
  tutorials use): the fraction of draws nearest to each mode and within the target's capture
  radius of it, plus an "elsewhere" bin; a mode is *covered* when :math:`q`
  puts more than 20% of its true mass there, and the *mass TV* is the total-variation distance
  between the bins of :math:`q` and of the posterior (:math:`\tfrac12 \sum_j |q_j - p_j|`);
* the importance-sampling evidence :math:`\log \hat Z = \log \frac1S \sum_s w_s` minus the
  true :math:`\log Z`, Pareto :math:`\hat k` of the weights (PSIS) and the relative importance
  ESS :math:`1 / (S \sum_s \bar w_s^2)` of the smoothed normalised weights.

Relaxed (Gumbel-softmax) guides are scored as the exact mixture their parameters define: their
relaxed samples have no tractable density.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from pyro.infer.autoguide import AutoContinuous, AutoNormal
from pyro.infer.importance import vectorized_importance_weights
from torch.distributions import biject_to

from pyro_mogflow import AutoMixtureFlow
from pyro_mogflow.diagnostics import psis
from pyro_mogflow.examples import mode_masses

from .targets import BenchTarget

__all__ = ["COVER_FRACTION", "evaluate", "exact_mixture", "guide_log_density"]

#: A mode is covered when q puts more than this fraction of the mode's true mass near it.
COVER_FRACTION = 0.2


@contextlib.contextmanager
def exact_mixture(guide):
    """Within this context a relaxed :class:`AutoMixtureFlow` is the exact mixture it defines."""
    if isinstance(guide, AutoMixtureFlow) and guide.estimator in ("relaxed", "relaxed-nested"):
        saved = guide.estimator
        guide.estimator = "implicit"
        try:
            yield guide
        finally:
            guide.estimator = saved
    else:
        yield guide


@torch.no_grad()
def guide_log_density(guide, values: dict, *args, **kwargs) -> torch.Tensor:
    r"""The guide's log-density :math:`\log q(\theta)` at given points of the constrained space.

    .. math:: \log q(\theta) = \log q_u(u) - \log\left|\det \frac{\partial \theta}{\partial u}
        \right|, \qquad u = T^{-1}(\theta)

    where :math:`T` maps each site's unconstrained values to its support.

    :param guide: a set-up :class:`~pyro.infer.autoguide.AutoContinuous` guide (any flow with an
        inverse) or :class:`~pyro.infer.autoguide.AutoNormal`.
    :param dict values: site name -> tensor ``(B, *site_shape)`` for every latent site.
    :return: shape ``(B,)``.
    """
    parts, log_det, batch = [], 0.0, None
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        value = values[name]
        batch = value.shape[0]
        transform = biject_to(site["fn"].support)
        u = transform.inv(value)
        log_det = log_det + transform.log_abs_det_jacobian(u, value).reshape(batch, -1).sum(-1)
        if isinstance(guide, AutoNormal):
            loc, scale = guide._get_loc_and_scale(name)
            lp = torch.distributions.Normal(loc, scale).log_prob(u)
            parts.append(lp.reshape(batch, -1).sum(-1))
        else:
            parts.append(u.reshape(batch, -1))
    if isinstance(guide, AutoNormal):
        return sum(parts) - log_det
    if not isinstance(guide, AutoContinuous):
        raise TypeError(f"cannot score points under a {type(guide).__name__}")
    latent = torch.cat(parts, -1)
    return guide.get_posterior(*args, **kwargs).log_prob(latent) - log_det


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


@torch.no_grad()
def evaluate(
    guide,
    bench: BenchTarget,
    true_samples: dict,
    true_bins: torch.Tensor | None,
    num_samples: int = 16384,
    num_plot: int = 0,
) -> dict:
    """Score a fitted guide on a benchmark target (see the module docstring).

    :param guide: the fitted guide (already run once on the target).
    :param BenchTarget bench: the target.
    :param dict true_samples: exact posterior draws, site -> ``(S', *site_shape)``.
    :param true_bins: mode masses of a large exact sample, with the "elsewhere" bin last
        (:func:`pyro_mogflow.examples.mode_masses` with ``elsewhere=True``), or ``None`` if
        unimodal.
    :param int num_samples: ``S``, draws of the guide.
    :param int num_plot: how many guide draws of the plotted sites to return (for 2-D plots).
    :return: a dict of floats (and lists), JSON-ready.
    """
    target = bench.target
    with exact_mixture(guide):
        log_w, _, guide_trace = vectorized_importance_weights(
            target.model,
            guide,
            *target.args,
            num_samples=num_samples,
            max_plate_nesting=target.max_plate_nesting,
            **target.kwargs,
        )
        log_q_true = guide_log_density(guide, true_samples, *target.args, **target.kwargs)
    log_w = log_w.double().cpu().numpy()
    out: dict = {"num_samples": num_samples}
    finite = np.isfinite(log_w)
    out["finite_fraction"] = float(finite.mean())
    if not finite.all():
        log_w = np.where(np.isnan(log_w), -np.inf, log_w)
    elbo, elbo_se = _mean_se(log_w) if finite.all() else (float("-inf"), float("nan"))
    log_z = float(target.log_z)
    out["reverse_kl"], out["reverse_kl_se"] = log_z - elbo, elbo_se
    log_p_true = target.log_joint_batch(true_samples).double().cpu().numpy()
    forward = log_p_true - log_z - log_q_true.double().cpu().numpy()
    forward = np.where(np.isnan(forward), np.inf, forward)
    out["forward_kl"], out["forward_kl_se"] = (
        _mean_se(forward) if np.isfinite(forward).all() else (float("inf"), float("nan"))
    )
    if np.isposinf(log_w).any() or not np.isfinite(log_w).any():
        out.update(log_z_error=float("nan"), khat=float("nan"), ess=float("nan"))
    else:
        m = log_w.max()
        out["log_z_error"] = float(m + np.log(np.mean(np.exp(log_w - m))) - log_z)
        smoothed, khat = psis(log_w[None])
        out["khat"] = float(khat[0])
        out["ess"] = float(1.0 / np.exp(2 * smoothed[0]).sum() / log_w.size)
    values = {
        name: site["value"].reshape((num_samples,) + target_shape)
        for name, site, target_shape in _latent_sites(guide_trace, true_samples)
    }
    if bench.multimodal:
        bins = mode_masses(
            values[target.site].double(), target.modes, bench.capture_radius, elsewhere=True
        )
        ref = true_bins.to(bins)
        m = target.num_modes
        covered = bins[:m] > COVER_FRACTION * ref[:m]
        out["modes_covered"] = int(covered.sum())
        out["num_modes"] = m
        out["mass_tv"] = float(0.5 * (bins - ref).abs().sum())
        out["mode_masses"] = [round(float(b), 5) for b in bins]
    if num_plot and bench.plot is not None:
        xs, xi, ys, yi = bench.plot[:4]
        x = values[xs][:num_plot] if xi is None else values[xs][:num_plot, xi]
        y = values[ys][:num_plot] if yi is None else values[ys][:num_plot, yi]
        out["plot_samples"] = torch.stack([x, y], -1).double().cpu().round(decimals=3).tolist()
    return out


def _latent_sites(guide_trace, like: dict):
    """``(name, site, site_shape)`` of the guide trace's sites that the target's draws name."""
    for name, draws in like.items():
        site = guide_trace.nodes[name]
        yield name, site, tuple(draws.shape[1:])
