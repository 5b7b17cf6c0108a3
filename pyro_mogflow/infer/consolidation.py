r"""One component per mode, accepted by measurement: the step of ``fit(covariance="full")``.

With diagonal components, a fit covers a correlated mode with many components (a tiling);
each step then pays one model evaluation per tile. Once :math:`\beta` reaches 1 and the guide
has full covariances (:meth:`~pyro_mogflow.AutoMixtureFlow.to_full_covariance`), the tiles of
one mode can become a single Gaussian: :func:`consolidate_modes` groups the components that
sit on one mode (``group_components``: means within 3 combined scales), replaces each
group by one moment-matched component, whose covariance

.. math:: \Sigma_g = \sum_{k \in g} \frac{\pi_k}{\pi_g}
    \bigl(\Sigma_k + (\mu_k - \mu_g)(\mu_k - \mu_g)^\top\bigr)

takes the correlation the tiles spell out by where they sit, and keeps the result only if the
ELBO does not drop: both mixtures are scored with ``num_particles`` stratified draws per
component and the merge is undone when the new estimate is below the old one by more than
``z`` standard errors of the difference. A group that links two modes (a bridge) loses far
more than that and is refused; a merge the full-covariance steps can refine is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._validation import check_int, check_real
from ..guides.covariance import component_scales, is_full, replace_mixture_params
from ..guides.pruning import prune_and_merge
from ..guides.summaries import group_components
from .memory import DEFAULT_MEMORY_BUDGET
from .stratified import StratifiedELBO
from .stratified_chunks import run_shares

__all__ = ["ElboEstimate", "consolidate_modes", "estimate_elbo"]


@dataclass(frozen=True)
class ElboEstimate:
    """A stratified ELBO estimate :math:`\\sum_k \\pi_k \\bar h_k` and its standard error
    :math:`(\\sum_k \\pi_k^2 s_k^2 / n)^{1/2}` (:math:`s_k^2`: the sample variance of
    component :math:`k`'s log ratios)."""

    value: float
    se: float


def estimate_elbo(
    model, guide, args=(), kwargs=None, num_particles: int = 32, memory_budget=None
) -> ElboEstimate:
    """The ELBO of a stratified :class:`~pyro_mogflow.AutoMixtureFlow` and its standard error.

    :param model: the Pyro model (e.g. a :class:`~pyro_mogflow.TemperedModel`).
    :param guide: a set-up stratified ``AutoMixtureFlow``.
    :param args: the model's positional arguments; ``kwargs`` its keyword arguments.
    :param int num_particles: draws per component (at least 2).
    :param memory_budget: bytes per evaluated chunk (default 1 GiB).
    :return: an :class:`ElboEstimate`.
    """
    num_particles = check_int("num_particles", num_particles, 2)
    kwargs = dict(kwargs or {})
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    elbo = StratifiedELBO(num_particles=num_particles, memory_budget=budget)
    k = guide.num_components
    with torch.no_grad():

        def share(comps, _):
            log_ratio, log_pi = elbo.particles(model, guide, *args, **kwargs)[:2]
            return comps, log_ratio.double(), log_pi.double()

        parts = run_shares(elbo, model, guide, args, kwargs, share)
    total = torch.zeros(k, dtype=torch.float64)
    square = torch.zeros(k, dtype=torch.float64)
    count = torch.zeros(k, dtype=torch.float64)
    log_pi = torch.zeros(k, dtype=torch.float64)
    for comps, ratio, lp in parts:
        idx = torch.arange(k) if comps is None else torch.as_tensor(comps).reshape(-1).cpu()
        ratio, lp = ratio.cpu(), lp.cpu()
        total.index_add_(0, idx, ratio.sum(-1))
        square.index_add_(0, idx, ratio.pow(2).sum(-1))
        count.index_add_(
            0, idx, torch.full((idx.numel(),), float(ratio.shape[-1]), dtype=torch.float64)
        )
        log_pi[idx] = lp
    mean = total / count
    var = (square - count * mean.pow(2)).clamp(min=0) / (count - 1)
    pi = log_pi.exp()
    value = float((pi * mean).sum())
    se = float(((pi.pow(2) * var / count).sum()).sqrt())
    return ElboEstimate(value, se)


def _snapshot(guide) -> dict:
    names = ("locs", "scale_tril" if is_full(guide) else "scales", "logits")
    return {name: getattr(guide, name).detach().clone() for name in names}


def _restore(guide, saved: dict) -> None:
    replace_mixture_params(
        guide,
        saved["logits"],
        saved["locs"],
        scales=saved.get("scales"),
        scale_tril=saved.get("scale_tril"),
    )


def consolidate_modes(
    model,
    guide,
    args=(),
    kwargs=None,
    num_particles: int = 32,
    z: float = 2.0,
    memory_budget=None,
) -> dict:
    r"""Merge the components on each mode into one, and keep that only if the ELBO holds.

    See the module docstring. The guide is changed in place (new ``locs``, ``logits`` and
    ``scale_tril``/``scales`` parameters with fewer rows: an optimiser must forget the old
    ones' state) or, when the merge is refused or fails, left exactly as it was.

    :param model: the Pyro model the guide is trained on.
    :param guide: a set-up stratified :class:`~pyro_mogflow.AutoMixtureFlow`.
    :param int num_particles: draws per component for each ELBO estimate (2 estimates).
    :param float z: standard errors of the difference the ELBO may drop by.
    :return: ``{"accepted": bool, "before": K, "after": K', "elbo_before": ElboEstimate,
        "elbo_after": ElboEstimate or None}``; ``after == before`` when nothing was merged.
    """
    num_particles = check_int("num_particles", num_particles, 2)
    z = check_real("z", z, minimum=0.0)
    k = guide.num_components
    weights = torch.softmax(guide.logits.detach().double(), -1)
    groups = group_components(guide.locs.detach(), component_scales(guide), weights)
    report = {"accepted": False, "before": k, "after": k, "elbo_before": None}
    report["elbo_after"] = None
    if len(groups) == k:
        return report
    before = estimate_elbo(model, guide, args, kwargs, num_particles, memory_budget)
    report["elbo_before"] = before
    saved = _snapshot(guide)
    try:
        prune_and_merge(guide, [sorted(g["components"]) for g in groups])
    except ValueError:
        return report  # prune_and_merge leaves the guide as it was
    after = estimate_elbo(model, guide, args, kwargs, num_particles, memory_budget)
    report["elbo_after"] = after
    drop = before.value - after.value
    allowed = z * math.hypot(before.se, after.se)
    if not math.isfinite(after.value) or drop > allowed:
        _restore(guide, saved)
        return report
    report.update(accepted=True, after=guide.num_components)
    return report
