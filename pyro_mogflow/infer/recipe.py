r"""``fit``: train a guide with the package's mode-discovery defaults, in one call.

A mixture guide can only find modes that its training lets it reach. :func:`fit` bundles what
the multimodal benchmark (``python -m benchmarks.multimodal``) showed is needed, so that
``fit(model, *args)`` finds the modes of a posterior without tuning:

1. **Components start over the prior.** ``fit`` sets the default guide,
   ``AutoMixtureFlow(model)``, up with its ``K = 64`` component means at independent draws of
   the model's prior (``init_spread="prior"``); so it does any ``AutoMixtureFlow`` passed as
   ``guide=`` that was left at ``init_spread="auto"`` with neither ``init_loc_fn`` nor
   ``init_scale``, and is not set up yet or still holds the start a set-up gives it (in a
   plain ``SVI`` loop such a guide starts as one Gaussian where ``AutoNormal`` starts, zero in
   the unconstrained space, every component on one point: its means are then redrawn at
   prior draws, since from one point a model with a sign symmetry keeps every component on
   its saddle). In a plain loop
   the same mode finding comes from ``AutoMixtureFlow(model, init_spread="prior")`` on a
   :class:`~pyro_mogflow.TemperedModel`, trained with
   :class:`~pyro_mogflow.NaturalStratifiedELBO` (item 4's component steps) and
   :class:`~pyro_mogflow.MixtureNaturalGradient` (its weight steps, as an optimiser).
2. **Tempering.** The model is trained as :class:`~pyro_mogflow.TemperedModel` with the
   likelihood raised to a power :math:`\beta` that grows geometrically from ``beta_start`` to 1
   in at most ``anneal_steps`` steps, rung by rung, a rung ending early once the tempered ELBO
   on it is flat (``anneal="adaptive"``, :mod:`~pyro_mogflow.infer.budget`; with an int
   ``num_steps``: smoothly over its first ``beta_fraction``, :func:`default_beta_schedule`):
   the components
   first fit the broad prior and then follow the posterior as it sharpens, landing on every mode
   instead of the one nearest to their start.
3. **The exact expectation over components** (:class:`~pyro_mogflow.StratifiedELBO`) for an
   :class:`~pyro_mogflow.AutoMixtureFlow` with ``estimator="stratified"`` (the default).
4. **Natural gradients for the mixture.** Write the ELBO as
   :math:`\mathcal{L} = \sum_k \pi_k L_k` with
   :math:`L_k = \mathbb{E}_{q_k}[\log p(x, z) - \log q(z)]`. Along the simplex
   :math:`\partial \mathcal{L} / \partial \pi_k = L_k - 1`, and the natural gradient (the
   Fisher metric of the categorical) is the multiplicative update

   .. math:: \log \pi_k \leftarrow \log \pi_k + \eta\,\Big(L_k - \sum_j \pi_j L_j\Big)
       \quad (\text{renormalised; } \eta = \texttt{weight\_step}).

   For well separated components :math:`L_k \approx \log Z_k - \mathrm{KL}_k - \log \pi_k`, so
   the weights move toward :math:`\pi_k \propto Z_k e^{-\mathrm{KL}_k}` geometrically instead of
   drifting under Adam. The gradient wrt component :math:`k`'s mean and scale carries a factor
   :math:`\pi_k` (the Fisher block of a component scales with its weight); it is divided out, so
   a component whose weight has collapsed keeps moving toward a mode at full speed and wins its
   weight back when it finds one (under Adam alone it stalls: Adam remembers the component's
   earlier, much larger gradients). The per-component terms come from
   :meth:`StratifiedELBO.particles <pyro_mogflow.StratifiedELBO.particles>`. The means and
   scales themselves take natural-gradient steps too (``component_step="natural"``, the
   default for an ``AutoMixtureFlow``): each component's iBLR (variational online Newton) step
   from one antithetic pair of draws, :mod:`~pyro_mogflow.infer.component_steps`, so its moves
   follow its own scale and it reaches a mode from a prior draw far away in high dimension.
   The weights wait for the components: they are held while :math:`\beta < 1` and, at
   :math:`\beta = 1`, until the ELBO stops improving (a travelling component's :math:`L_k`
   measures how far it has come, not how heavy its mode is); then they are set to their
   optimum for the components (:func:`balance_weights`) and move by the step above.
   With ``covariance="auto"`` (the default, up to 200 latent dimensions) the components get
   full covariances once :math:`\beta = 1`, and the components on each mode become one where
   a measured ELBO allows it (:func:`~pyro_mogflow.infer.consolidation.consolidate_modes`):
   once after the first ``window`` steps at :math:`\beta = 1`, so that the rest of the hold
   pays only for the modes and the components still travelling, and again at the release.
5. **Balanced weights.** After the last step, :func:`balance_weights` sets the weights once
   more from ``balance_particles`` draws per component.
6. **A budget that follows the problem** (``num_steps="auto"``): at :math:`\beta = 1` the
   components of negligible weight are pruned and those on one mode merged, and the fit stops
   when the ELBO and the masses reach a plateau (:mod:`~pyro_mogflow.infer.budget`; an
   improvement below 0.01 nats per window counts as none), or at the release when a single
   component is left (its ELBO has just passed the plateau test and it has no mass to move).

7. **Rounds of fresh starts** (``rounds="auto"``). When a mode was reached by a single start
   (Good's estimate of the chance that another start finds a mode none found is the share
   of such modes, :mod:`~pyro_mogflow.infer.rounds`), ``fit`` runs the whole annealed fit
   again from ``K`` fresh prior draws, overdispersed (spread twice as wide about their
   median, so starts reach the modes in the prior's tails that the first round's draws
   rarely reach), joins its components to those found, sets the weights
   and consolidates the modes found twice, until two rounds in a row add no mode (at most
   :data:`~pyro_mogflow.infer.rounds.MAX_ROUNDS` rounds), then fits the joined mixture at
   :math:`\beta = 1`; where the last rounds added no mode, the mixture of before them is
   returned instead if its ELBO is higher (:func:`~pyro_mogflow.infer.rounds.better_of`).
   Where every mode was reached by two starts or more it costs nothing.

A flow on the mixture (``AutoMixtureFlow(flow=...)``) is held fixed while :math:`\beta < 1` and
then trained at ``flow_lr`` (``lr / 10``): in the benchmark a flow trained from the start, or at
``lr``, pulled the components off the modes they had found.

Usage::

    from pyro_mogflow import fit

    guide, losses = fit(model, x, y)          # AutoMixtureFlow with every default
    print(guide.components(x, y)["weights"])

The model's data can be passed by position or by keyword, as the model takes it:
``fit(model, x, y=y)``. Keyword arguments that are not options of :func:`fit` go to the model;
a model argument whose name clashes with an option of :func:`fit` (``guide``, ``lr``,
``beta``, ...) goes in ``model_kwargs={...}``.

Any other Pyro guide can be passed as ``guide=``; it is trained with ``Trace_ELBO`` under the
same tempering (items 3-5 apply to stratified mixtures only).

**Safe steps.** Every step checks the loss and the gradients before the optimiser moves
anything: a NaN or infinite value stops the fit with a ``RuntimeError`` that names the step,
:math:`\beta` and the sites or parameters that went non-finite, and the guide keeps the
parameters it had before that step.

**Stopping and resuming.** ``callback(step, loss, beta)`` is called after every step; when it
returns ``True`` the fit stops there (without the final :func:`balance_weights`). The result
carries what a resume needs, so a long fit can be checkpointed and continued on the same
tempering path::

    result = fit(model, x, num_steps=4000, callback=lambda step, loss, beta: step == 999)
    # ... save result.guide.state_dict(), come back later ...
    result = fit(model, x, guide=result.guide, optim=result.optim, num_steps=4000,
                 start_step=result.next_step)

Steps ``start_step, ..., num_steps - 1`` then run with the schedule of the whole fit; with the
same ``optim`` object (Adam's moments) and random state this equals the uninterrupted fit.

References:

* W. Morningstar, S. Vikram, C. Ham, A. Gallagher, J. Dillon, *Automatic Differentiation
  Variational Inference with Mixtures*, AISTATS 2021 (the stratified ELBO).
* S. Amari, *Natural Gradient Works Efficiently in Learning*, Neural Computation 1998.
* O. Cappé, R. Douc, A. Guillin, J.-M. Marin, C. Robert, *Adaptive importance sampling in
  general mixture classes*, Statistics and Computing 2008 (importance-sampling weight updates).
* R. Neal, *Annealed importance sampling*, Statistics and Computing 2001 (tempering paths).
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Callable, Mapping

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoGuide, AutoGuideList
from pyro.infer.util import zero_grads

from .._validation import check_int, check_real
from ..guides import AutoMixtureFlow
from ..guides.covariance import check_covariance, resolve_covariance
from .budget import (
    StepBudget,
    _check_unit,
    _drop_stale_optimizer_state,
    auto_beta_schedule,
    default_beta_schedule,
    ladder_beta_schedule,
)
from .component_steps import check_component_step, check_stratified_guide
from .consolidation import consolidate_modes
from .convergence import PlateauTest
from .fit_result import FitResult
from .memory import DEFAULT_MEMORY_BUDGET, check_memory_budget
from .mixture_weights import WEIGHT_OBJECTIVES, balance_weights, natural_gradient_stepper
from .recipe_checks import (
    _check_schedule,
    _check_step,
    _clear_grads,
    _learning_rates,
    _model_kwargs,
    _nonfinite_sites,
    _NonFiniteStep,
    _pathwise_hint,
)
from .rounds import MAX_ROUNDS, better_of, mode_counts, more_rounds
from .stratified import StratifiedELBO
from .subsampling import subsampled_plates, unless_subsampled
from .tempering import TemperedModel

__all__ = ["FitResult", "RELEASE_PARTICLES", "balance_weights", "default_beta_schedule", "fit"]

#: Draws per component for the weights and the consolidation when fit releases the weights.
RELEASE_PARTICLES = 32


def fit(
    model: Callable,
    *args,
    guide=None,
    num_steps: int | str = "auto",
    max_steps: int = 10000,
    anneal_steps: int = 1000,
    anneal: str = "adaptive",
    prune: bool | None = None,
    rounds: int | str = "auto",
    convergence: PlateauTest | None = None,
    lr: float = 0.02,
    flow_lr: float | None = None,
    optim=None,
    num_particles: int = 1,
    beta="auto",
    beta_start: float = 0.01,
    beta_fraction: float = 0.5,
    observed_only: bool = True,
    weight_step: float | None = 0.05,
    component_step: str = "auto",
    covariance: str = "auto",
    balance: str | None = "forward",
    balance_particles: int = 256,
    freeze_flow: bool = True,
    progress: bool = True,
    desc: str = "fit",
    callback: Callable[[int, float, float], bool | None] | None = None,
    start_step: int = 0,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    model_kwargs: Mapping | None = None,
    **model_keywords,
) -> FitResult:
    r"""Fit a guide to ``model`` by SVI with the package's mode-discovery defaults.

    See the module docstring for what each step does and why. With every default this is

    .. code-block:: python

        guide = AutoMixtureFlow(model)                     # K = 64, stratified, prior init
        tempered = TemperedModel(model, ladder_beta_schedule(1000), observed_only=True)
        # StratifiedELBO steps on the tempered model (antithetic pairs; a rung of beta ends
        # early when PlateauTest(window=25, patience=1) passes on it): the means and scales
        # moved by iBLR natural-gradient steps, the logits by natural-gradient steps (eta
        # 0.05) once released (held while beta < 1 and at beta = 1 until the ELBO is flat),
        # a flow by Adam (lr 0.02 / 10); at beta = 1 full covariances, the components on one
        # mode consolidated after 100 steps and at the release, then pruned and merged every
        # 100 steps, until PlateauTest() passes (at most 10000 steps), then
        # balance_weights(..., objective="forward").

    :param callable model: the Pyro model.
    :param args: the model's positional arguments (its data).
    :param guide: the guide to train; default a fresh :class:`~pyro_mogflow.AutoMixtureFlow`
        with all its defaults, set up at prior draws (item 1 above; so is an
        ``AutoMixtureFlow`` passed here with ``init_spread="auto"`` and neither
        ``init_loc_fn`` nor ``init_scale``, un-set-up or still at its one-point start).
        Any :class:`~pyro.infer.autoguide.AutoGuide` (or callable guide with parameters)
        works; a mixture with ``estimator="stratified"`` is trained with
        :class:`~pyro_mogflow.StratifiedELBO`, anything else with ``Trace_ELBO``.
    :param num_steps: ``"auto"`` (default): anneal over ``anneal_steps`` steps, then run at
        :math:`\beta = 1` until ``convergence`` says the ELBO and the component masses have
        stopped moving (:mod:`~pyro_mogflow.infer.convergence`), or until ``max_steps``; the
        progress bar and ``FitResult.reason`` say which. An int: exactly that many steps
        (the schedule anneals over ``beta_fraction`` of them; nothing pruned unless
        ``prune=True``), as before the automatic budget.
    :param int max_steps: the cap on the steps with ``num_steps="auto"`` (default 10000).
    :param int anneal_steps: most steps of the default tempering with ``num_steps="auto"``
        (1000).
    :param str anneal: the default tempering with ``num_steps="auto"``: ``"adaptive"``
        (default: :func:`~pyro_mogflow.infer.budget.ladder_beta_schedule`, 10 geometric rungs
        of :math:`\beta`, each ended as soon as a plateau test on its tempered ELBO and mode
        masses passes) or ``"fixed"`` (:func:`~pyro_mogflow.infer.budget.auto_beta_schedule`,
        smooth over all ``anneal_steps``). A fit resumed with ``start_step`` restarts the
        ladder at the rung of ``start_step``; use ``"fixed"`` for an exactly resumable path.
    :param prune: prune negligible components and merge components on one mode every
        ``convergence.window`` steps at :math:`\beta = 1`
        (:func:`~pyro_mogflow.infer.budget.reduce_components`), so later steps cost less.
        Default ``None``: on with ``num_steps="auto"``, off with an int.
    :param rounds: ``"auto"`` (default): up to
        :data:`~pyro_mogflow.infer.rounds.MAX_ROUNDS` rounds of fresh starts, a round more
        only while the last ones give evidence of missed modes (a mode reached by a single
        start after the first round; a new mode in one of the last two after that), for a
        default ``AutoMixtureFlow`` (no flow, more than one component) with ``num_steps="auto"``
        and tempering, not resumed (:mod:`~pyro_mogflow.infer.rounds`); an int ``r``: at most
        ``r`` rounds by the same rule (1: one round, as before). ``max_steps`` caps each
        round and the fit of the joined mixture; ``callback`` and the losses see their steps
        numbered on from the first round's (β climbs again in each round).
    :param convergence: the :class:`~pyro_mogflow.infer.convergence.PlateauTest` of
        ``num_steps="auto"`` (default ``PlateauTest()``: windows of 100 steps, 2 standard
        errors or at most 0.01 nats, masses within 0.01, 2 checks in a row).
    :param float lr: Adam's learning rate when ``optim`` is not given (default 0.02).
    :param flow_lr: Adam's learning rate for the flow of an
        :class:`~pyro_mogflow.AutoMixtureFlow` when ``optim`` is not given (default ``lr / 10``:
        at ``lr`` the shared flow pulled components off their modes in the benchmark).
    :param optim: a Pyro optimiser (default Adam with ``lr``, and ``flow_lr`` for the flow).
    :param int num_particles: draws per component for ``StratifiedELBO``; otherwise
        ``Trace_ELBO`` particles, vectorized when ``> 1`` (default 1).
    :param beta: ``"auto"`` (default: :func:`default_beta_schedule` with ``beta_start`` and
        ``beta_fraction``), ``None`` (no tempering), a float in ``(0, 1]`` or a callable
        ``step -> beta``.
    :param float beta_start: first :math:`\beta` of the default schedule (default 0.01).
    :param float beta_fraction: fraction of the steps the default schedule anneals (0.5).
    :param bool observed_only: temper only the observed sites (likelihood and factors), so the
        path runs from the prior to the posterior (default True); ``False`` tempers the joint.
    :param weight_step: :math:`\eta` of the natural-gradient update of the mixture weights
        (stratified mixtures only; default 0.05); ``None`` leaves the logits to ``optim``.
    :param str component_step: how the component means and scales of a stratified
        :class:`~pyro_mogflow.AutoMixtureFlow` move: ``"natural"``, the diagonal
        natural-gradient (iBLR, variational online Newton) step of
        :mod:`pyro_mogflow.infer.component_steps`, from ``num_particles`` antithetic pairs per
        component (twice the model evaluations per step), with a bound on each component's
        move; the flow, if any, is still trained by ``optim`` at ``flow_lr``; or ``"adam"``:
        ``optim``, with each component's gradient divided by its weight when ``weight_step``
        is set. ``"auto"`` (default): ``"natural"`` for a stratified ``AutoMixtureFlow``,
        ``"adam"`` for any other guide. Measured (README, "Natural-gradient component
        updates"): the same modes with a reverse KL 4-6 times lower on the quick multimodal
        suite, and far more modes in 50-100-D (GMM-40: 30 of 40 against 4).
    :param str covariance: ``"auto"`` (default), ``"diag"`` or ``"full"``. With ``"full"``, once
        :math:`\beta` reaches 1 the guide's components get full covariances
        (:meth:`~pyro_mogflow.AutoMixtureFlow.to_full_covariance`), the components on each
        mode are merged into one where a measured ELBO says that loses nothing
        (:func:`~pyro_mogflow.infer.consolidation.consolidate_modes`; only where ``prune``
        holds, so not with an explicit ``num_steps`` by default), and they take full
        steps (with ``component_step="natural"``: the full iBLR step), so a component takes
        the shape of a correlated mode. ``"auto"`` is ``"full"`` for a stratified
        ``AutoMixtureFlow`` with natural component steps and at most
        ``FULL_COVARIANCE_MAX_DIM = 200`` latent dimensions,
        else ``"diag"``. Measured (README, "Third session: full covariance by default, weights
        that wait, one component per mode").
    :param balance: after the last step, :func:`balance_weights` with this objective
        (``"forward"``, default: the posterior mass each component accounts for, which kept
        the mode masses right where the components' shapes do not match the modes';
        ``"elbo"``; or ``None`` to skip). Stratified mixtures only.
    :param int balance_particles: draws per component for :func:`balance_weights`.
    :param bool freeze_flow: keep the flow of a stratified mixture fixed while
        :math:`\beta < 1`, so the components find the modes before the flow bends their shapes
        (default True).
    :param bool progress: show a tqdm progress bar (default True).
    :param str desc: the progress bar's label (default ``"fit"``).
    :param callback: ``callback(step, loss, beta)``, called after every step (``beta`` is 1.0
        without tempering); returning ``True`` stops the fit after that step, without the final
        :func:`balance_weights`. Default ``None``.
    :param int start_step: the first step to run (default 0): resume a stopped fit with
        ``start_step=result.next_step`` and ``optim=result.optim`` (see the module docstring);
        the tempering schedule is that of the whole ``num_steps``.
    :param memory_budget: bytes of working memory one evaluation of the model at the
        stratified draws may take (default 1 GiB; ``None``: no limit): the components (or,
        when one does not fit, pieces of its draws) are evaluated in chunks measured to fit
        (see :class:`~pyro_mogflow.StratifiedELBO`), in training and in
        :func:`balance_weights`.
    :param dict model_kwargs: the model's keyword arguments whose names clash with an option of
        :func:`fit`; any other model keyword can be passed directly, ``fit(model, x, y=y)``.
    :param model_keywords: the model's keyword arguments (forwarded to every model and guide
        call); a name the model does not take is refused before any work.
    :return: a :class:`FitResult` ``(guide, losses)``, with ``optim``, ``next_step`` and
        ``stopped`` for resuming.
    :raises RuntimeError: if the loss or a gradient becomes NaN or infinite; the step, beta and
        the non-finite sites or parameters are named, and the step is not applied (the guide
        keeps its parameters from before it).
    :raises ValueError: if a ``beta`` schedule returns a value outside ``(0, 1]`` (the step
        is named), before any work.
    """
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
    if isinstance(num_steps, str) and num_steps != "auto":
        raise TypeError(f"num_steps must be 'auto' or an int >= 1, got {num_steps!r}")
    if num_steps != "auto":
        num_steps = check_int("num_steps", num_steps, 1)
    max_steps = check_int("max_steps", max_steps, 1)
    anneal_steps = check_int("anneal_steps", anneal_steps, 1)
    if anneal not in ("fixed", "adaptive"):
        raise ValueError(f"anneal must be 'fixed' or 'adaptive', got {anneal!r}")
    if prune is None:
        prune = num_steps == "auto"
    elif not isinstance(prune, bool):
        raise TypeError(f"prune must be None or a bool, got {type(prune).__name__}")
    if rounds == "auto":
        rounds = MAX_ROUNDS
    elif isinstance(rounds, str):
        raise ValueError(f"rounds must be 'auto' or an int >= 1, got {rounds!r}")
    else:
        rounds = check_int("rounds", rounds, 1)
    if convergence is None:
        convergence = PlateauTest()
    elif not isinstance(convergence, PlateauTest):
        raise TypeError(f"convergence must be a PlateauTest, got {type(convergence).__name__}")
    total = max_steps if num_steps == "auto" else num_steps
    lr = check_real("lr", lr, minimum=0.0, strict=True)
    flow_lr = (
        lr / 10 if flow_lr is None else check_real("flow_lr", flow_lr, minimum=0.0, strict=True)
    )
    num_particles = check_int("num_particles", num_particles, 1)
    beta_start = _check_unit("beta_start", beta_start)
    beta_fraction = _check_unit("beta_fraction", beta_fraction)
    if not isinstance(observed_only, bool):
        raise TypeError(f"observed_only must be a bool, got {type(observed_only).__name__}")
    if weight_step is not None:
        weight_step = check_real("weight_step", weight_step, minimum=0.0, strict=True)
    if balance is not None and balance not in WEIGHT_OBJECTIVES:
        raise ValueError(f"balance must be None or one of {WEIGHT_OBJECTIVES}, got {balance!r}")
    balance_particles = check_int("balance_particles", balance_particles, 1)
    component_step = check_component_step(component_step)
    covariance = check_covariance(covariance)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(
            f"callback must be None or callable (step, loss, beta) -> bool, got "
            f"{type(callback).__name__}"
        )
    start_step = check_int("start_step", start_step, 0)
    memory_budget = check_memory_budget(memory_budget)
    if start_step >= total:
        bound = "max_steps" if num_steps == "auto" else "num_steps"
        raise ValueError(
            f"start_step must be < {bound}={total} (the steps left to run are "
            f"start_step, ..., {bound} - 1), got {start_step}"
        )
    kwargs = _model_kwargs(model, model_kwargs, model_keywords)
    if beta == "auto" and num_steps == "auto":
        ladder = anneal == "adaptive"
        schedule = (ladder_beta_schedule if ladder else auto_beta_schedule)(
            anneal_steps, beta_start
        )
    elif beta == "auto":
        schedule = default_beta_schedule(num_steps, beta_start, beta_fraction)
    elif beta is None or callable(beta):
        schedule = beta
    else:
        schedule = _check_unit("beta", beta)
    if callable(schedule):
        _check_schedule(schedule, start_step, total)
    if optim is not None and not isinstance(optim, pyro.optim.PyroOptim):
        raise TypeError(
            f"optim must be a Pyro optimizer (pyro.optim.*), got {type(optim).__name__}"
        )
    if guide is None:
        guide = AutoMixtureFlow(model)
    elif not callable(guide):
        raise TypeError(f"guide must be a Pyro guide (callable), got {type(guide).__name__}")

    target = (
        model if schedule is None else TemperedModel(model, schedule, observed_only=observed_only)
    )
    if isinstance(target, TemperedModel):
        target.step = start_step
    # A global stratified mixture gets the natural-gradient weight steps; any other guide that
    # samples a stratified mixture flow (e.g. an AmortizedMixtureFlow site) gets StratifiedELBO.
    global_mixture = isinstance(guide, AutoMixtureFlow) and guide.estimator == "stratified"
    if component_step == "auto":
        component_step = "natural" if global_mixture else "adam"
    check_stratified_guide(guide, global_mixture, component_step, covariance)
    start = None
    if isinstance(guide, AutoMixtureFlow):
        # an "auto" start means prior draws under fit (item 1 above), also for a guide the user
        # set up that is still at its one-point start
        if guide.prototype_trace is not None:
            guide.check_model(model, *args, **kwargs)  # a guide set up for another model
            start = guide.locs.detach().clone()
        if not guide._start_at_prior(*args, **kwargs):
            start = None
        guide.setup(*args, **kwargs)  # before the optimiser, which needs the flow's names
    if optim is None:
        optim = pyro.optim.Adam(_learning_rates(guide, lr, flow_lr))
    # Gradients left on the parameters by an interrupted step (Ctrl-C between backward and the
    # optimiser) would otherwise be added into this fit's first step.
    _clear_grads(guide)
    if global_mixture:
        natural = component_step == "natural"
        elbo = StratifiedELBO(
            num_particles=2 * num_particles if natural else num_particles,
            memory_budget=memory_budget,
            antithetic=natural,
        )

        def freeze():
            return freeze_flow and isinstance(target, TemperedModel) and target.beta < 1

        covariance = resolve_covariance(covariance, natural, guide.latent_dim)
        num_starts = guide.num_components
        more = (
            rounds > 1
            and num_steps == "auto"
            and guide.flow is None
            and num_starts > 1
            and isinstance(target, TemperedModel)
            and start_step == 0
        )

        def go_full():
            return covariance == "full" and not (
                isinstance(target, TemperedModel) and target.beta < 1
            )

        starts = [torch.ones(guide.num_components, dtype=torch.float64)]  # per component
        release_counts: list[float] = []  # the starts that reached each mode, at the release

        def on_release():  # the components have arrived: best weights, then one per mode
            settle()
            if more:
                release_counts[:] = mode_counts(guide, starts[0])

        def settle():
            if not subsampled_plates(target, guide, args, kwargs):
                balance_weights(
                    target,
                    guide,
                    *args,
                    num_particles=RELEASE_PARTICLES,
                    objective="elbo",
                    memory_budget=memory_budget,
                    **kwargs,
                )
            consolidate()

        def settle_joined():  # after a round: the joined mixture's components, anew
            starts[0] = torch.ones(guide.num_components, dtype=torch.float64)
            settle()

        def consolidate():  # one component per mode where a measured ELBO allows it
            if not (prune and covariance == "full"):
                return
            report = consolidate_modes(
                target, guide, args, kwargs, RELEASE_PARTICLES, memory_budget=memory_budget
            )
            if report["accepted"]:
                starts[0] = torch.stack([starts[0][g].sum() for g in report["components"]])
                budget.reduced.append(
                    {
                        "consolidated": report["before"] - report["after"],
                        "step": target.step if isinstance(target, TemperedModel) else None,
                        "num_components": report["after"],
                    }
                )
                _drop_stale_optimizer_state(optim, guide)

        step_fn = natural_gradient_stepper(
            target,
            guide,
            optim,
            elbo,
            weight_step,
            freeze,
            _check_step,
            component_step,
            go_full,
            None,
            lambda: budget.holding,
        )
    else:
        # Only a guide of one's own (or a list of guides) can hold a stratified mixture-flow
        # site; Pyro's other autoguides are not probed (the probe is one more guide run).
        own = not isinstance(guide, AutoGuide) or isinstance(guide, AutoGuideList)
        if own and StratifiedELBO.stratifies(model, guide, *args, **kwargs):
            loss = StratifiedELBO(num_particles=num_particles, memory_budget=memory_budget)
        else:
            loss = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)

        def step_fn(*args, **kwargs):
            with poutine.trace(param_only=True) as capture:
                value = loss.loss_and_grads(target, guide, *args, **kwargs)
            named = {
                name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()
            }
            _check_step(value, named)
            params = set(named.values())
            optim(params)
            zero_grads(params)
            return value

    budget = StepBudget(
        num_steps,
        max_steps,
        convergence,
        prune and global_mixture,
        guide,
        optim,
        target,
        hold_weights=global_mixture and isinstance(target, TemperedModel),
        on_release=on_release if global_mixture else None,
        on_arrival=consolidate if global_mixture else None,
    )
    losses = []
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        initial=start_step,
        desc=desc,
        disable=not progress,
        file=sys.stderr,
        mininterval=0.5,
    )
    stopped = False
    step = start_step
    try:
        for step in range(start_step, total):
            beta_now = target.beta if isinstance(target, TemperedModel) else 1.0
            try:
                value = float(step_fn(*args, **kwargs))
            except _NonFiniteStep as e:
                if start is not None and step == start_step:  # undo the redrawn start too
                    guide._restore_start(start)
                where = e.where
                if e.what == "loss":
                    sites = _nonfinite_sites(target, guide, args, kwargs)
                    where = "; ".join(part for part in (sites, where) if part)
                hint = _pathwise_hint(guide)
                raise RuntimeError(
                    f"fit: the {e.what} became {e.value} at step {step} (beta {beta_now:.3g}); "
                    "the step was not applied, so the guide keeps its parameters from before "
                    f"it. Non-finite: {where or 'no single site or parameter identified'}. "
                    f"Lower lr or check the model{hint}"
                ) from None
            losses.append(value)
            if isinstance(target, TemperedModel):
                target.advance()
            bar.update()
            if step % 50 == 0 or step == total - 1:
                bar.set_postfix(loss=f"{value:.3g}", beta=f"{beta_now:.3g}", refresh=False)
            if callback is not None and callback(step, value, beta_now) is True:
                stopped = step < total - 1
                break
            if budget.after_step(step, value, beta_now):
                break
        next_step = step + 1
        reason = budget.finish(next_step, stopped)
        extra: list[dict] = []
        if global_mixture and more and release_counts and not stopped:
            done = [next_step]  # steps run so far, over all rounds
            begun = [1]  # rounds begun

            def fit_round(beta=beta):  # one more annealed fit (beta=None: at beta = 1 only)
                begun[0] += 1
                label = "final" if beta is None else f"round {begun[0]}"

                def shifted(step, loss, beta):
                    return callback(done[0] + step, loss, beta)

                sub = fit(
                    model,
                    *args,
                    guide=guide,
                    max_steps=max_steps,
                    anneal_steps=anneal_steps,
                    anneal=anneal,
                    prune=prune,
                    rounds=1,
                    convergence=_restarted(convergence),
                    lr=lr,
                    num_particles=num_particles,
                    beta=beta,
                    beta_start=beta_start,
                    observed_only=observed_only,
                    weight_step=weight_step,
                    component_step=component_step,
                    covariance=covariance,
                    balance=None,
                    freeze_flow=freeze_flow,
                    progress=progress,
                    desc=f"{desc} ({label})",
                    callback=None if callback is None else shifted,
                    memory_budget=memory_budget,
                    model_kwargs=kwargs,
                )
                done[0] += sub.next_step
                losses.extend(sub.losses.tolist())
                return sub

            extra, fallback = more_rounds(
                guide, args, kwargs, release_counts, num_starts, rounds, fit_round, settle_joined
            )
            last = extra[-1]["result"] if extra else None
            if last is not None and not last.stopped:
                last = fit_round(beta=None)  # the joined mixture at beta = 1, to convergence
                if fallback is not None:  # the mixture of before the empty rounds, if better
                    extra[-1]["fallback"] = better_of(
                        model, guide, fallback, args, kwargs, memory_budget=memory_budget
                    )
                    if extra[-1]["fallback"]["restored"]:
                        _drop_stale_optimizer_state(last.optim, guide)
            if last is not None:
                offset = done[0] - last.next_step  # the reason counts the steps of all rounds
                reason = re.sub(r"step (\d+)", lambda m: f"step {int(m[1]) + offset}", last.reason)
                next_step, stopped = done[0], last.stopped
                budget.reduced.extend(last.reductions)
                optim = last.optim
        if num_steps == "auto":
            k = f", K={guide.num_components}" if global_mixture else ""
            bar.set_description(f"{desc} ({reason}{k})")
        if global_mixture and balance is not None and not stopped:
            balance = unless_subsampled(model, guide, args, kwargs, balance)
        if global_mixture and balance is not None and not stopped:
            bar.set_description(f"{desc} (balancing weights)")
            bar.refresh()
            balance_weights(
                model,
                guide,
                *args,
                num_particles=balance_particles,
                objective=balance,
                memory_budget=memory_budget,
                **kwargs,
            )
    finally:
        bar.close()
        _clear_grads(guide)
    return FitResult(
        guide,
        np.asarray(losses, dtype=float),
        optim=optim,
        next_step=next_step,
        stopped=stopped,
        reason=reason,
        reductions=budget.reduced,
        rounds=[{k: v for k, v in r.items() if k != "result"} for r in extra] if extra else [],
    )


def _restarted(test: PlateauTest) -> PlateauTest:
    """A copy of ``test`` with the same options and nothing seen."""
    new = copy.copy(test)
    new.converged_at = None
    new.reset()
    return new
