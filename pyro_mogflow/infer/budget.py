r"""How long :func:`~pyro_mogflow.fit` runs and how many components it pays for.

With ``num_steps="auto"`` (the default) a fit

1. anneals :math:`\beta` geometrically from ``beta_start`` to 1 over ``anneal_steps`` steps
   (:func:`auto_beta_schedule`: a schedule that does not depend on the fit's unknown length);
2. then, every ``window`` steps at :math:`\beta = 1`, prunes the components of negligible
   weight and merges the components that found the same mode
   (:func:`reduce_components`, with ``prune=True``), so later steps evaluate only the
   components that matter;
3. stops when :class:`~pyro_mogflow.infer.convergence.PlateauTest` says the ELBO and the
   component masses have stopped moving, or at ``max_steps``.

:class:`StepBudget` holds that state for the loop of :func:`~pyro_mogflow.fit`.
"""

from __future__ import annotations

import torch

from ..guides import AutoMixtureFlow
from ..guides.covariance import component_scales
from ..guides.pruning import mergeable_groups, prune_and_merge
from ..guides.summaries import group_components
from .convergence import PlateauTest
from .tempering import Schedule, exponential_schedule

__all__ = ["PRUNE_MASS", "StepBudget", "auto_beta_schedule", "reduce_components"]

#: Most weight :func:`reduce_components` prunes at once; each pruned component weighs at most
#: this divided by the number of components.
PRUNE_MASS = 1e-3


def auto_beta_schedule(anneal_steps: int, beta_start: float = 0.01) -> Schedule:
    r""":math:`\beta_t = \beta_0^{1 - \min(t / A, 1)}`: geometric from ``beta_start`` to 1 over
    ``anneal_steps`` (:math:`A`) steps, then 1 (the schedule of ``fit(num_steps="auto")``)."""
    return exponential_schedule(beta_start, 1.0, anneal_steps)


@torch.no_grad()
def reduce_components(guide: AutoMixtureFlow, prune_mass: float = PRUNE_MASS) -> dict:
    r"""Prune the lightest components and merge those on one mode (a step of ``fit``).

    Components are pruned lightest first while each weighs at most ``prune_mass / K`` and
    together at most ``prune_mass``; the survivors are merged where
    :func:`~pyro_mogflow.guides.pruning.mergeable_groups` links them. One call of
    :func:`~pyro_mogflow.guides.pruning.prune_and_merge` does both.

    :return: ``{"pruned": n, "merged": n, "pruned_mass": m}`` (nothing changes when both are 0).
    """
    k = guide.num_components
    weights = torch.softmax(guide.logits.detach().double(), -1)
    order = torch.argsort(weights)
    cumulative = torch.cumsum(weights[order], 0)
    light = (weights[order] <= prune_mass / k) & (cumulative <= prune_mass)
    dropped = set(order[light].tolist()[: k - 1])  # never prune every component
    keep = [i for i in range(k) if i not in dropped]
    idx = torch.tensor(keep, device=guide.locs.device)
    groups = mergeable_groups(guide.locs.detach()[idx], component_scales(guide)[idx])
    groups = [[keep[i] for i in g] for g in groups]
    if len(groups) == k:
        return {"pruned": 0, "merged": 0, "pruned_mass": 0.0}
    mass = float(prune_and_merge(guide, groups))
    return {"pruned": len(dropped), "merged": len(keep) - len(groups), "pruned_mass": mass}


def _drop_stale_optimizer_state(optim, guide) -> None:
    """Forget the Pyro optimiser's state of parameters the guide no longer has."""
    live = {id(p) for p in guide.parameters()}
    for table in ("optim_objs", "grad_clip"):
        states = getattr(optim, table, None)
        if isinstance(states, dict):
            for p in [p for p in states if id(p) not in live]:
                del states[p]


class StepBudget:
    """The stopping rule and the component pruning of one :func:`~pyro_mogflow.fit` call.

    :param num_steps: an int (a fixed number of steps: never stops early, never prunes unless
        ``prune=True``) or ``"auto"``.
    :param int max_steps: the cap with ``"auto"``.
    :param convergence: a :class:`PlateauTest` (``"auto"`` only).
    :param bool prune: reduce the components at each window end at beta 1.
    :param guide: the guide (pruned only if a set-up stratified AutoMixtureFlow).
    :param optim: the Pyro optimiser (state of removed parameters is dropped).
    """

    def __init__(self, num_steps, max_steps: int, convergence, prune: bool, guide, optim):
        self.auto = num_steps == "auto"
        self.total = max_steps if self.auto else num_steps
        self.test = convergence if self.auto else None
        self.prune = prune and isinstance(guide, AutoMixtureFlow)
        self.window = convergence.window if convergence is not None else PlateauTest().window
        self.guide, self.optim = guide, optim
        self.at_one = 0
        self.reduced: list[dict] = []
        self.reason: str | None = None

    def after_step(self, step: int, loss: float, beta: float) -> bool:
        """Record a finished step; return True when the fit should stop (see ``reason``)."""
        self.at_one = self.at_one + 1 if beta >= 1 else 0
        if self.prune and self.at_one and self.at_one % self.window == 0:
            change = reduce_components(self.guide)
            if change["pruned"] or change["merged"]:
                change["step"] = step
                change["num_components"] = self.guide.num_components
                self.reduced.append(change)
                _drop_stale_optimizer_state(self.optim, self.guide)
                if self.test is not None:
                    self.test.reset()
                return False
        if self.test is not None:
            guide = self.guide
            weights = groups = None
            if isinstance(guide, AutoMixtureFlow) and guide.prototype_trace is not None:

                def weights():
                    return torch.softmax(guide.logits.detach(), -1)

                def groups():  # the modes, as components(...)["groups"] finds them
                    scales = component_scales(guide)
                    found = group_components(guide.locs.detach(), scales, weights())
                    return [g["components"] for g in found]

            if self.test.update(step, loss, beta, weights, groups):
                self.reason = self.test.reason
                return True
        return False

    def finish(self, next_step: int, stopped: bool) -> str:
        """The reason the loop ended, given the first step not run."""
        if stopped:
            self.reason = f"stopped by callback at step {next_step - 1}"
        elif self.reason is None:
            self.reason = f"reached max_steps={self.total}" if self.auto else "num_steps"
        return self.reason
