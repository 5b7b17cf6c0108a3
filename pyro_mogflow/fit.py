r"""``fit``: train a guide with the package's mode-discovery defaults, in one call.

A mixture guide can only find modes that its training lets it reach. :func:`fit` bundles what
the multimodal benchmark (``python -m benchmarks.multimodal``) showed is needed, so that
``fit(model, *args)`` finds the modes of a posterior without tuning:

1. **Components start over the prior.** The default guide, ``AutoMixtureFlow(model)``, places
   its ``K = 64`` component means at independent draws of the model's prior
   (``init_spread="prior"``).
2. **Tempering.** The model is trained as :class:`~pyro_mogflow.TemperedModel` with the
   likelihood raised to a power :math:`\beta` that grows geometrically from ``beta_start`` to 1
   over the first ``beta_fraction`` of the steps (:func:`default_beta_schedule`): the components
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
   :meth:`StratifiedELBO.particles <pyro_mogflow.StratifiedELBO.particles>`.
5. **Balanced weights.** After the last step, :func:`balance_weights` sets the weights once
   more from ``balance_particles`` draws per component.

A flow on the mixture (``AutoMixtureFlow(flow=...)``) is held fixed while :math:`\beta < 1` and
then trained at ``flow_lr`` (``lr / 10``): in the benchmark a flow trained from the start, or at
``lr``, pulled the components off the modes they had found.

Usage::

    from pyro_mogflow import fit

    guide, losses = fit(model, x, y)          # AutoMixtureFlow with every default
    print(guide.components(x, y)["weights"])

Any other Pyro guide can be passed as ``guide=``; it is trained with ``Trace_ELBO`` under the
same tempering (items 3-5 apply to stratified mixtures only).

References:

* W. Morningstar, S. Vikram, C. Ham, A. Gallagher, J. Dillon, *Automatic Differentiation
  Variational Inference with Mixtures*, AISTATS 2021 (the stratified ELBO).
* S. Amari, *Natural Gradient Works Efficiently in Learning*, Neural Computation 1998.
* O. Cappé, R. Douc, A. Guillin, J.-M. Marin, C. Robert, *Adaptive importance sampling in
  general mixture classes*, Statistics and Computing 2008 (importance-sampling weight updates).
* R. Neal, *Annealed importance sampling*, Statistics and Computing 2001 (tempering paths).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.util import zero_grads

from ._validation import check_int, check_real
from .autoguide import AutoMixtureFlow
from .distributions.density import component_log_prob
from .infer.anneal import Schedule, TemperedModel, exponential_schedule
from .infer.stratified import StratifiedELBO

__all__ = ["FitResult", "balance_weights", "default_beta_schedule", "fit"]

#: Smallest mixture weight the natural-gradient update leaves a component (relative to one), so a
#: component that moved to a new mode can win its weight back.
MIN_WEIGHT = 1e-6
_WEIGHT_OBJECTIVES = ("elbo", "forward")


class FitResult(NamedTuple):
    r"""What :func:`fit` returns; unpacks as ``guide, losses = fit(...)``.

    :ivar guide: the fitted guide.
    :ivar numpy.ndarray losses: shape ``(num_steps,)``, the loss of every step: the negative
        ELBO of the tempered model at that step's :math:`\beta`.
    """

    guide: object
    losses: np.ndarray


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
    num_steps = _check_int("num_steps", num_steps, 1)
    beta_start = _check_unit("beta_start", beta_start)
    beta_fraction = _check_unit("beta_fraction", beta_fraction)
    return exponential_schedule(beta_start, 1.0, max(1, round(beta_fraction * num_steps)))


# ------------------------------------------------------------------------------- checks
def _check_int(name: str, value, minimum: int) -> int:
    return check_int(name, value, minimum)


def _check_positive(name: str, value, allow_zero: bool = False) -> float:
    return check_real(name, value, minimum=0.0, strict=not allow_zero)


def _check_unit(name: str, value) -> float:
    value = _check_positive(name, value)
    if value > 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


# ------------------------------------------------------------------- stratified helpers
class _RecordingELBO(StratifiedELBO):
    """A :class:`StratifiedELBO` that keeps the guide's last stratified draw (base points)."""

    last_draw = None

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace, draw = super()._get_trace(model, guide, args, kwargs)
        self.last_draw = draw
        return model_trace, guide_trace, draw


def _unconstrained(value: torch.Tensor) -> torch.Tensor:
    """The leaf tensor the optimiser updates for a constrained Pyro parameter value."""
    unconstrained = getattr(value, "unconstrained", None)
    return unconstrained() if callable(unconstrained) else value


def _logits_param(guide: AutoMixtureFlow) -> torch.Tensor:
    """The leaf tensor the optimiser would update for the guide's logits."""
    return _unconstrained(guide.logits)


def _natural_weight_step(logits: torch.Tensor, terms: torch.Tensor, step: float) -> None:
    """In place: ``log pi <- log_softmax(log pi + step * (L - pi . L))``, floored at MIN_WEIGHT."""
    with torch.no_grad():
        log_pi = torch.log_softmax(logits, -1)
        finite = torch.isfinite(terms)
        terms = torch.where(finite, terms, terms.new_tensor(-1e30))
        mean = (log_pi.exp() * torch.where(finite, terms, terms.new_zeros(()))).sum()
        delta = (terms - mean).clamp(min=-1e3 / step, max=1e3 / step)
        new = torch.log_softmax(log_pi + step * delta, -1).clamp(min=math.log(MIN_WEIGHT))
        logits.copy_(torch.log_softmax(new, -1))


@torch.no_grad()
def balance_weights(
    model: Callable,
    guide: AutoMixtureFlow,
    *args,
    num_particles: int = 256,
    num_iters: int = 200,
    objective: str = "elbo",
    **kwargs,
) -> torch.Tensor:
    r"""Set a stratified :class:`~pyro_mogflow.AutoMixtureFlow`'s weights to their optimum for its
    current components, from ``num_particles`` draws per component.

    With the components (means, scales, flow) fixed, one stratified draw
    :math:`z_{kt} = f(b_{kt})`, :math:`b_{kt} = \mu_k + \sigma_k \odot \epsilon_{kt}`, scores any
    weights :math:`\pi` exactly: :math:`\log q_\pi(z_{kt}) = \log \sum_j \pi_j
    \mathcal{N}(b_{kt}; \mu_j, \sigma_j) - \log|\det \partial f / \partial b|`, and the model
    is evaluated once. Then

    * ``objective="elbo"``: the weights maximising the ELBO
      :math:`\sum_k \pi_k \frac1n \sum_t [\log p(x, z_{kt}) - \log q_\pi(z_{kt})]`, a concave
      function of :math:`\pi`, by ``num_iters`` natural-gradient (mirror-ascent) steps with
      :math:`\eta = 1/2`;
    * ``objective="forward"``: the weights maximising :math:`\mathbb{E}_p[\log q_\pi]` (the
      forward KL, mass-covering), by the EM fixed point :math:`\pi_j \leftarrow
      \mathbb{E}_p[r_j(z)]`, with responsibilities :math:`r_j` and the posterior expectation
      estimated by self-normalised importance sampling from the stratified draws
      (population Monte Carlo, Cappé et al. 2008).

    :param callable model: the Pyro model (untempered: the weights are those of the posterior).
    :param AutoMixtureFlow guide: a set-up guide with ``estimator="stratified"``.
    :param args: the model's arguments.
    :param int num_particles: ``n``, draws per component (the model runs on ``K n`` points).
    :param int num_iters: fixed-point iterations.
    :param str objective: ``"elbo"`` (default) or ``"forward"``.
    :param kwargs: the model's keyword arguments.
    :return: the new weights, shape ``(K,)``; the guide's logits are set to their logarithm.
    """
    if not isinstance(guide, AutoMixtureFlow) or guide.estimator != "stratified":
        raise TypeError(
            "guide must be an AutoMixtureFlow with estimator='stratified', got "
            f"{type(guide).__name__}"
            + (f"(estimator={guide.estimator!r})" if isinstance(guide, AutoMixtureFlow) else "")
        )
    num_particles = _check_int("num_particles", num_particles, 1)
    num_iters = _check_int("num_iters", num_iters, 1)
    if objective not in _WEIGHT_OBJECTIVES:
        raise ValueError(f"objective must be one of {_WEIGHT_OBJECTIVES}, got {objective!r}")
    guide.setup(*args, **kwargs)
    elbo = _RecordingELBO(num_particles=num_particles)
    log_ratio, log_pi = elbo.particles(model, guide, *args, **kwargs)[:2]
    base = elbo.last_draw.base  # (K, n, D)
    locs, scales = guide.locs.detach(), guide.scales.detach()
    k = base.shape[0]
    comp = torch.stack([component_log_prob(base[i], locs, scales) for i in range(k)])  # (K,n,K)
    log_pi = log_pi.detach()
    # log p(x, z) + log|det| does not depend on the weights:
    fixed = log_ratio.detach() + torch.logsumexp(log_pi + comp, -1)
    ok = torch.isfinite(fixed)
    fixed = torch.where(ok, fixed, fixed.new_tensor(-math.inf))
    for _ in range(num_iters):
        log_q = torch.logsumexp(log_pi + comp, -1)  # (K, n)
        log_w = fixed - log_q
        if objective == "elbo":
            terms = torch.where(ok, log_w, log_w.new_zeros(())).sum(-1) / ok.sum(-1).clamp(min=1)
            terms = torch.where(ok.any(-1), terms, terms.new_tensor(-math.inf))
            logits = log_pi.clone()
            _natural_weight_step(logits, terms, 0.5)
            log_pi = logits
        else:
            resp = log_pi + comp - log_q.unsqueeze(-1)  # log r_j(z_kt)
            joint = (log_pi.unsqueeze(-1) + log_w).unsqueeze(-1) + resp  # (K, n, K)
            new = torch.logsumexp(joint.reshape(-1, k), 0)
            log_pi = torch.log_softmax(new, -1).clamp(min=math.log(MIN_WEIGHT))
            log_pi = torch.log_softmax(log_pi, -1)
    _logits_param(guide).copy_(log_pi.to(guide.logits.dtype))
    return log_pi.exp()


# ---------------------------------------------------------------------------------- fit
def fit(
    model: Callable,
    *args,
    guide=None,
    num_steps: int = 2000,
    lr: float = 0.02,
    flow_lr: float | None = None,
    optim=None,
    num_particles: int = 1,
    beta="auto",
    beta_start: float = 0.01,
    beta_fraction: float = 0.5,
    observed_only: bool = True,
    weight_step: float | None = 0.05,
    balance: str | None = "forward",
    balance_particles: int = 256,
    freeze_flow: bool = True,
    progress: bool = True,
    desc: str = "fit",
    model_kwargs: Mapping | None = None,
) -> FitResult:
    r"""Fit a guide to ``model`` by SVI with the package's mode-discovery defaults.

    See the module docstring for what each step does and why. With every default this is

    .. code-block:: python

        guide = AutoMixtureFlow(model)                     # K = 64, stratified, prior init
        tempered = TemperedModel(model, default_beta_schedule(2000), observed_only=True)
        # 2000 Adam steps (lr 0.02) of StratifiedELBO on the tempered model, the logits moved
        # by natural-gradient steps (eta 0.05), then balance_weights(..., objective="forward").

    :param callable model: the Pyro model.
    :param args: the model's positional arguments (its data).
    :param guide: the guide to train; default a fresh :class:`~pyro_mogflow.AutoMixtureFlow`
        with all its defaults. Any :class:`~pyro.infer.autoguide.AutoGuide` (or callable guide
        with parameters) works; a mixture with ``estimator="stratified"`` is trained with
        :class:`~pyro_mogflow.StratifiedELBO`, anything else with ``Trace_ELBO``.
    :param int num_steps: optimisation steps (default 2000).
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
    :param dict model_kwargs: the model's keyword arguments.
    :return: a :class:`FitResult` ``(guide, losses)``.
    :raises RuntimeError: if the loss becomes NaN or infinite (the step is named).
    """
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
    num_steps = _check_int("num_steps", num_steps, 1)
    lr = _check_positive("lr", lr)
    flow_lr = lr / 10 if flow_lr is None else _check_positive("flow_lr", flow_lr)
    num_particles = _check_int("num_particles", num_particles, 1)
    beta_start = _check_unit("beta_start", beta_start)
    beta_fraction = _check_unit("beta_fraction", beta_fraction)
    if not isinstance(observed_only, bool):
        raise TypeError(f"observed_only must be a bool, got {type(observed_only).__name__}")
    if weight_step is not None:
        weight_step = _check_positive("weight_step", weight_step)
    if balance is not None and balance not in _WEIGHT_OBJECTIVES:
        raise ValueError(f"balance must be None or one of {_WEIGHT_OBJECTIVES}, got {balance!r}")
    balance_particles = _check_int("balance_particles", balance_particles, 1)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    if model_kwargs is None:
        model_kwargs = {}
    if not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
    kwargs = dict(model_kwargs)
    if beta == "auto":
        schedule = default_beta_schedule(num_steps, beta_start, beta_fraction)
    elif beta is None or callable(beta):
        schedule = beta
    else:
        schedule = _check_unit("beta", beta)
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
    stratified = isinstance(guide, AutoMixtureFlow) and guide.estimator == "stratified"
    if isinstance(guide, AutoMixtureFlow):
        guide.setup(*args, **kwargs)  # before the optimiser, which needs the flow's names
    if optim is None:
        optim = pyro.optim.Adam(_learning_rates(guide, lr, flow_lr))
    if stratified:
        elbo = StratifiedELBO(num_particles=num_particles)

        def freeze():
            return freeze_flow and isinstance(target, TemperedModel) and target.beta < 1

        step_fn = _stratified_stepper(target, guide, optim, elbo, weight_step, freeze)
    else:
        loss = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)
        svi = SVI(target, guide, optim, loss)

        def step_fn():
            return svi.step(*args, **kwargs)

    losses = np.zeros(num_steps)
    betas = np.ones(num_steps)
    from tqdm.auto import tqdm

    bar = tqdm(range(num_steps), desc=desc, disable=not progress, file=sys.stderr, mininterval=0.5)
    for step in bar:
        if isinstance(target, TemperedModel):
            betas[step] = target.beta
        value = float(step_fn(*args, **kwargs)) if stratified else float(step_fn())
        if not math.isfinite(value):
            bar.close()
            raise RuntimeError(
                f"fit: the loss became {value} at step {step} (beta {betas[step]:.3g}); lower "
                "lr or check the model"
            )
        losses[step] = value
        if isinstance(target, TemperedModel):
            target.advance()
        if step % 50 == 0 or step == num_steps - 1:
            bar.set_postfix(loss=f"{value:.3g}", beta=f"{betas[step]:.3g}", refresh=False)
    bar.close()
    if stratified and balance is not None:
        balance_weights(
            model,
            guide,
            *args,
            num_particles=balance_particles,
            objective=balance,
            **kwargs,
        )
    return FitResult(guide, losses)


def _learning_rates(guide, lr: float, flow_lr: float) -> Callable[[str], dict]:
    """Adam's per-parameter arguments: ``flow_lr`` for an AutoMixtureFlow's flow, else ``lr``."""
    prefix = None
    if isinstance(guide, AutoMixtureFlow) and guide.flow is not None:
        prefix = f"{guide.name}.flow."

    def args(name: str) -> dict:
        return {"lr": flow_lr if prefix is not None and name.startswith(prefix) else lr}

    return args


def _stratified_stepper(model, guide, optim, elbo: StratifiedELBO, weight_step, freeze_flow):
    """One optimisation step of StratifiedELBO; the logits move by natural-gradient steps.

    ``freeze_flow()`` says whether the flow's parameters sit out this step.
    """

    def step(*args, **kwargs) -> float:
        with poutine.trace(param_only=True) as capture:
            log_ratio, log_pi = elbo.particles(model, guide, *args, **kwargs)[:2]
            terms = log_ratio.mean(-1)
            loss = -(log_pi.exp() * terms).sum()
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        loss.backward()
        if weight_step is not None:
            # Component k's parameters get pi_k times the gradient of its own term L_k: divide
            # it out (the Fisher metric of the mixture scales each component's block by pi_k),
            # so a component whose weight has collapsed still moves toward a mode at full speed
            # instead of stalling under Adam's long memory of its earlier, larger gradients.
            pi = log_pi.detach().exp().unsqueeze(-1)
            for name in ("locs", "scales"):
                leaf = _unconstrained(getattr(guide, name))
                if leaf.grad is not None:
                    leaf.grad.div_(pi)
            logits = _logits_param(guide)
            params.discard(logits)
            logits.grad = None
            _natural_weight_step(logits, terms.detach(), weight_step)
        if guide.flow is not None and freeze_flow():
            frozen = {id(p) for p in guide.flow.parameters()}
            zero_grads({p for p in params if id(p) in frozen})
            params = {p for p in params if id(p) not in frozen}
        optim(params)
        zero_grads(params)
        return float(loss.detach())

    return step
