r"""How long :func:`~pyro_mogflow.fit` runs and how many components it pays for.

With ``num_steps="auto"`` (the default) a fit

1. anneals :math:`\beta` geometrically from ``beta_start`` to 1 in at most ``anneal_steps``
   steps (a schedule that does not depend on the fit's unknown length). With
   ``anneal="adaptive"`` (the default) :math:`\beta` climbs a ladder of :data:`ANNEAL_RUNGS`
   rungs (:func:`ladder_beta_schedule`) and a rung ends as soon as a
   :class:`~pyro_mogflow.infer.convergence.PlateauTest` (windows of :data:`RUNG_WINDOW`
   steps, one pass) finds its tempered ELBO flat and the mode masses settled: on one rung the
   target is fixed, so the test compares like with like, and where the components have
   nothing left to do at that temperature the fit moves on instead of waiting out the rung.
   ``anneal="fixed"`` is the smooth geometric schedule over all ``anneal_steps``
   (:func:`auto_beta_schedule`); README, "A budget that follows the problem", compares them.
2. then, every ``window`` steps at :math:`\beta = 1`, prunes the components of negligible
   weight and merges the components that found the same mode
   (:func:`reduce_components`, with ``prune=True``), so later steps evaluate only the
   components that matter;
3. stops when :class:`~pyro_mogflow.infer.convergence.PlateauTest` says the ELBO and the
   component masses have stopped moving, or at ``max_steps``; with held weights
   (``hold_weights``) also at the release when one component is left.

:class:`StepBudget` holds that state for the loop of :func:`~pyro_mogflow.fit`.
"""

from __future__ import annotations

import torch

from .._validation import check_int, check_real
from ..guides import AutoMixtureFlow
from ..guides.covariance import component_scales
from ..guides.pruning import mergeable_groups, prune_and_merge
from ..guides.summaries import group_components
from .convergence import PlateauTest
from .tempering import Schedule, exponential_schedule

__all__ = [
    "ANNEAL_RUNGS",
    "LadderSchedule",
    "PRUNE_MASS",
    "RUNG_WINDOW",
    "StepBudget",
    "auto_beta_schedule",
    "default_beta_schedule",
    "ladder_beta_schedule",
    "reduce_components",
]

#: Rungs of the adaptive anneal below beta = 1 (:func:`ladder_beta_schedule`).
ANNEAL_RUNGS = 10
#: Window of the plateau test that ends a rung early (two windows at least per rung).
RUNG_WINDOW = 25

#: Most weight :func:`reduce_components` prunes at once; each pruned component weighs at most
#: this divided by the number of components.
PRUNE_MASS = 1e-3


def auto_beta_schedule(anneal_steps: int, beta_start: float = 0.01) -> Schedule:
    r""":math:`\beta_t = \beta_0^{1 - \min(t / A, 1)}`: geometric from ``beta_start`` to 1 over
    ``anneal_steps`` (:math:`A`) steps, then 1 (the schedule of ``fit(num_steps="auto")``)."""
    return exponential_schedule(beta_start, 1.0, anneal_steps)


class LadderSchedule:
    r"""Geometric steps of :math:`\beta` from ``beta_start`` to 1, held ``anneal_steps / rungs``
    steps each: :math:`\beta_t = \beta_0^{1 - r/R}` on rung :math:`r = \lfloor t R / A
    \rfloor < R`, then 1 (:math:`A` = ``anneal_steps``, :math:`R` = ``rungs``).

    The schedule of ``fit(num_steps="auto", anneal="adaptive")``: every rung holds one
    :math:`\beta`, so the tempered ELBO on a rung is one objective and a plateau test on it
    is valid; :class:`StepBudget` then jumps to the next rung (:meth:`next_rung`). A rung
    never lasts longer than in the fixed schedule.
    """

    def __init__(self, anneal_steps: int, beta_start: float = 0.01, rungs: int = ANNEAL_RUNGS):
        self.anneal_steps = check_int("anneal_steps", anneal_steps, 1)
        self.beta_start = _check_unit("beta_start", beta_start)
        self.rungs = check_int("rungs", rungs, 1)

    def rung(self, step: int) -> int:
        """The rung of ``step`` (``rungs`` from ``anneal_steps`` on: beta = 1)."""
        return min(step * self.rungs // self.anneal_steps, self.rungs)

    def next_rung(self, step: int) -> int:
        """The first step of the rung after the one of ``step``."""
        return -(-(self.rung(step) + 1) * self.anneal_steps // self.rungs)

    def __call__(self, step: int) -> float:
        return self.beta_start ** (1 - self.rung(step) / self.rungs)

    def __repr__(self) -> str:
        return (
            f"LadderSchedule(anneal_steps={self.anneal_steps}, "
            f"beta_start={self.beta_start}, rungs={self.rungs})"
        )


def ladder_beta_schedule(
    anneal_steps: int, beta_start: float = 0.01, rungs: int = ANNEAL_RUNGS
) -> LadderSchedule:
    """The :class:`LadderSchedule` of ``fit(num_steps="auto", anneal="adaptive")``."""
    return LadderSchedule(anneal_steps, beta_start, rungs)


def default_beta_schedule(
    num_steps: int, beta_start: float = 0.01, beta_fraction: float = 0.5
) -> Schedule:
    r"""The default tempering: :math:`\beta` geometric from ``beta_start`` to 1.

    .. math:: \beta_t = \beta_0^{\,1 - \min(t / (f T), 1)}

    with :math:`T` = ``num_steps`` and :math:`f` = ``beta_fraction``; :math:`\beta = 1` for
    the last :math:`(1 - f) T` steps.

    :param int num_steps: ``T``, the total number of steps of the fit.
    :param float beta_start: :math:`\beta_0 \in (0, 1]`.
    :param float beta_fraction: :math:`f \in (0, 1]`, the fraction of the steps spent annealing.
    :return: a :class:`~pyro_mogflow.Schedule`.
    """
    num_steps = check_int("num_steps", num_steps, 1)
    beta_start = _check_unit("beta_start", beta_start)
    beta_fraction = _check_unit("beta_fraction", beta_fraction)
    return exponential_schedule(beta_start, 1.0, max(1, round(beta_fraction * num_steps)))


def _check_unit(name: str, value) -> float:
    value = check_real(name, value, minimum=0.0, strict=True)
    if value > 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


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
    :param target: the :class:`~pyro_mogflow.TemperedModel` being trained, or ``None``; when
        its schedule is a :class:`LadderSchedule`, a rung ends as soon as a
        ``PlateauTest(window=RUNG_WINDOW, patience=1)`` on its losses (and mode masses)
        passes: the adaptive anneal.
    :param bool hold_weights: hold the mixture weights (``holding``) while
        :math:`\beta < 1` and then, at :math:`\beta = 1`, until the ELBO stops improving
        (``PlateauTest(window, patience=1)`` on the loss alone); pruning and the stopping test
        wait for the release. A component's ELBO term measures how far it has come, not the
        mass of its mode, while it is still travelling: in 50-100 dimensions the weight steps
        of the first steps gave all the weight to the one component that started nearest a
        mode, and the others were pruned before they arrived (measured: README, "Third
        session: full covariance by default, weights that wait, one component per mode").
    :param on_release: called with no arguments when the weights are released (``fit`` sets
        them to their optimum for the components there and consolidates the modes).
    :param on_arrival: called with no arguments once, after the first ``window`` steps at
        :math:`\beta = 1` while the weights are held (``fit`` consolidates the components
        that have already reached one mode there, so the rest of the hold pays only for the
        modes and the travellers: on a unimodal posterior the hold then runs on one component
        instead of 64).
    :ivar bool holding: whether the weights sit out the next step.
    """

    def __init__(
        self,
        num_steps,
        max_steps: int,
        convergence,
        prune: bool,
        guide,
        optim,
        target=None,
        hold_weights: bool = False,
        on_release=None,
        on_arrival=None,
    ):
        self.auto = num_steps == "auto"
        self.total = max_steps if self.auto else num_steps
        self.test = convergence if self.auto else None
        self.prune = prune and isinstance(guide, AutoMixtureFlow)
        self.window = convergence.window if convergence is not None else PlateauTest().window
        self.guide, self.optim = guide, optim
        self.at_one = 0
        self.reduced: list[dict] = []
        self.reason: str | None = None
        ladder = getattr(target, "schedule", None)
        self.ladder = target if isinstance(ladder, LadderSchedule) else None
        self.rung_test = PlateauTest(window=RUNG_WINDOW, patience=1)
        self.rungs_cut: list[int] = []
        self.hold = bool(hold_weights)
        self.holding = self.hold
        self.hold_test = PlateauTest(window=self.window, patience=1)
        self.released_at: int | None = None
        self.on_release = on_release
        self.on_arrival = on_arrival

    def _rung_done(self, step: int, loss: float, weights, groups) -> None:
        """Feed a step at beta < 1 to the rung's plateau test; jump to the next rung on a pass."""
        target, schedule = self.ladder, self.ladder.schedule
        if schedule.rung(target.step) != schedule.rung(target.step - 1):
            self.rung_test.reset()  # the step just taken was the last of its rung
            return
        if self.rung_test.update(step, loss, 1.0, weights, groups):
            target.step = schedule.next_rung(target.step)
            self.rungs_cut.append(step)
            self.rung_test = PlateauTest(window=RUNG_WINDOW, patience=1)

    def after_step(self, step: int, loss: float, beta: float) -> bool:
        """Record a finished step; return True when the fit should stop (see ``reason``)."""
        self.at_one = self.at_one + 1 if beta >= 1 else 0
        if self.hold and beta < 1:
            self.holding = True
        if self.holding:
            if self.ladder is not None and beta < 1:
                self._rung_done(step, loss, None, None)
            if self.at_one == self.window and self.on_arrival is not None:
                self.on_arrival()
            if self.hold_test.update(step, loss, beta):  # a step at beta < 1 restarts it
                self.holding = False  # the components have arrived: weights and pruning go
                self.released_at = step
                if self.on_release is not None:
                    self.on_release()
                if self.test is not None and getattr(self.guide, "num_components", 0) == 1:
                    # one component: no mass left to move, and the ELBO has just passed
                    self.test.converged_at = step
                    self.reason = self.test.reason
                    return True
                self.at_one = 0
                self.hold_test = PlateauTest(window=self.window, patience=1)
                if self.test is not None:
                    self.test.reset()
            return False
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
        guide = self.guide
        weights = groups = None
        if isinstance(guide, AutoMixtureFlow) and guide.prototype_trace is not None:

            def weights():
                return torch.softmax(guide.logits.detach(), -1)

            def groups():  # the modes, as components(...)["groups"] finds them
                scales = component_scales(guide)
                found = group_components(guide.locs.detach(), scales, weights())
                return [g["components"] for g in found]

        if self.ladder is not None and beta < 1:
            self._rung_done(step, loss, weights, groups)
        if self.test is not None:
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
