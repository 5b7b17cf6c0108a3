r"""Maximum-entropy flow networks on a mixture base: :func:`fit_max_entropy`.

Given a statistic :math:`T: \mathcal{X} \to \mathbb{R}^M` and a target :math:`b \in
\mathbb{R}^M`, find the distribution of greatest differential entropy that meets the moment
constraints,

.. math::
    p^\star = \arg\max_q\ H(q) \quad \text{s.t.} \quad \mathbb{E}_q[T(x)] = b,
    \qquad H(q) = -\mathbb{E}_q[\log q(x)].

The solution is the exponential family :math:`p^\star(x) \propto \exp(\eta^\top T(x))` with the
:math:`\eta` that matches the moments, but neither :math:`\eta` nor its normaliser is usually
available. A maximum-entropy flow network (MEFN; Loaiza-Ganem, Gao and Cunningham 2017) instead
fits a flow :math:`q_\theta` directly, which needs both reparameterized samples (for the
gradient of the constraints) and the exact :math:`\log q_\theta` at its own samples (for the
entropy). A mixture flow (:class:`~pyro_mogflow.MixtureFlow`) provides both, and its mixture base
can hold the several modes a maximum-entropy solution may have.

**Support.** The flow lives on :math:`\mathbb{R}^{d'}`; a point of the support is
:math:`x = g(y)` with :math:`g` = ``biject_to(support)``. Its density is

.. math:: \log p(x) = \log q_\theta(y) - \log\lvert\det \partial g / \partial y\rvert,

with respect to Lebesgue measure on the support's own coordinates. For the simplex
(``constraints.simplex``, :math:`g` the stick-breaking map
:math:`\mathbb{R}^{d-1} \to \Delta^{d-1} \subset \mathbb{R}^d`) that is Lebesgue measure on the
first :math:`d - 1` coordinates, the measure under which
:meth:`torch.distributions.Dirichlet.entropy` is computed; ``dim`` is :math:`d`, the length of the
points the statistic receives.

**Augmented Lagrangian** (MEFN's Algorithm 1). With the scaled residual
:math:`R(\theta) = (\mathbb{E}_{q_\theta}[T] - b) / s` (:math:`s_i = \max(|b_i|, 1)`, so that
constraints of different magnitude weigh alike), each outer iteration :math:`j` minimises

.. math::
    \mathcal{L}_j(\theta) = -H(q_\theta) + \lambda_j^\top R(\theta)
        + \frac{c_j}{2}\,\lVert R(\theta)\rVert^2

by ``num_inner`` Adam steps and then sets

.. math::
    \lambda_{j+1} = \lambda_j + c_j \hat R, \qquad
    c_{j+1} = \begin{cases} \gamma\, c_j & \lVert \hat R\rVert >
    \rho \lVert \hat R_{\text{prev}}\rVert \\ c_j & \text{otherwise,}\end{cases}

with :math:`\hat R` from fresh samples (``num_check`` of them; :math:`c` is not raised once
:math:`\lVert \hat R\rVert` is within three standard errors of zero, where it cannot drop further).
Each Adam step uses two independent batches :math:`A, B`: the squared norm is estimated without
bias by :math:`\hat R_A^\top \hat R_B` (the product of two independent means has the product of
the means as its expectation, where :math:`\lVert \hat R_A\rVert^2` would add the variance),
the linear term and the entropy by the average of the two batches. The entropy term is
:math:`\mathbb{E}[\log p(x)]` with the flow's exact log-density at its own samples.

**Estimators.** The ``estimator`` decides how the batches are drawn and how gradients reach the
mixture weights (see :mod:`pyro_mogflow.distributions.estimators`). With ``"stratified"`` (the
default) each batch holds ``num_samples / K`` draws from *every* component and expectations are
sums over components weighted by :math:`\pi_k`, so the expectation over the discrete choice is
exact:

.. math:: \mathbb{E}_q[f(x)] = \sum_{k=1}^K \pi_k\, \mathbb{E}_{u \sim q_k}[f(g(f_\theta(u)))].

By default (``qmc=True``) the Gaussian draws of each component in a stratified batch are
randomized quasi-Monte Carlo points (a freshly scrambled Sobol' sequence through the normal
quantile; Owen 1997): every batch is still an unbiased estimate, the two batches are still
independent, and for the smooth, low-dimensional integrands of moment constraints the variance is
far lower than with i.i.d. draws, which is what lets the constraints be met to :math:`10^{-2}` and
the entropy to :math:`10^{-2}` nats with a few hundred draws per step. ``qmc=False`` uses the
core's i.i.d. :meth:`~pyro_mogflow.MixtureFlow.stratified_rsample`.

The returned distribution is always the exact mixture flow (the relaxed estimators are a
training device; their relaxed draws are not the mixture's law), and the reported entropy,
moments and violation are estimated from its exact draws.

Usage::

    import torch
    from torch.distributions import constraints
    from pyro_mogflow import fit_max_entropy

    alpha = torch.tensor([1.0, 2.0, 3.0])
    b = torch.digamma(alpha) - torch.digamma(alpha.sum())       # E[log x] of Dirichlet(alpha)
    res = fit_max_entropy(torch.log, b, dim=3, support=constraints.simplex)
    res.entropy, res.entropy_se, res.violation     # ~ -1.244 (Dirichlet(alpha).entropy())
    x = res.distribution.sample((1000,))           # (1000, 3) points on the simplex

References:

* G. Loaiza-Ganem, Y. Gao, J. P. Cunningham, *Maximum Entropy Flow Networks*, ICLR 2017.
* J. Nocedal, S. Wright, *Numerical Optimization*, 2nd ed., Springer 2006, ch. 17
  (augmented Lagrangian methods).
* E. T. Jaynes, *Information Theory and Statistical Mechanics*, Phys. Rev. 106, 1957.
* W. Morningstar et al., *Automatic Differentiation Variational Inference with Mixtures*,
  AISTATS 2021 (stratified draws).
* A. B. Owen, *Scrambled net variance for integrals of smooth functions*, Annals of Statistics
  25, 1997 (randomized QMC).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from tqdm.auto import tqdm

from .._validation import check_bool, check_int, check_real
from ..distributions.estimators import check_estimator, check_temperature
from .max_entropy_parts import (
    _build_flow,
    _check_flow,
    _check_target,
    _draw,
    _MaxEntFlow,
    _natural_weight_step,
    _rqmc_estimates,
    _support_transform,
)

__all__ = ["MaxEntropyResult", "fit_max_entropy"]


@dataclasses.dataclass
class MaxEntropyResult:
    r"""What :func:`fit_max_entropy` returns.

    :ivar distribution: the fitted maximum-entropy distribution on the support: a
        :class:`~pyro_mogflow.MixtureFlow` for ``constraints.real``, otherwise a
        :class:`~pyro.distributions.TransformedDistribution` of one by ``biject_to(support)``.
        Event shape ``(dim,)``; ``sample`` and ``log_prob`` (exact) as for any distribution.
    :ivar float entropy: :math:`H(q) = -\mathbb{E}_q[\log q(x)]` (nats), estimated from
        ``num_eval`` fresh draws of the fitted law by randomized QMC (stratified over
        components, scrambled Sobol' within each).
    :ivar float entropy_se: its standard error (spread of 8 independent scramblings).
    :ivar float violation: the largest relative constraint error
        :math:`\max_i |\hat m_i - b_i| / \max(|b_i|, 1)`, from the same draws.
    :ivar torch.Tensor moments: :math:`\hat m = \hat{\mathbb{E}}_q[T(x)]`, shape ``(M,)``.
    :ivar torch.Tensor moments_se: standard errors of ``moments``, shape ``(M,)``.
    :ivar torch.Tensor target: :math:`b`, shape ``(M,)``.
    :ivar torch.Tensor multipliers: the final Lagrange multipliers :math:`\lambda`, shape
        ``(M,)``, for the scaled constraints; :math:`-\lambda_i / s_i` estimates the natural
        parameter :math:`\eta_i` of :math:`p^\star \propto \exp(\eta^\top T)`.
    :ivar float penalty: the final penalty coefficient :math:`c`.
    :ivar list history: one dict per outer iteration (``step``, ``entropy``, ``violation``,
        ``penalty``, ``multipliers``), measured before the multiplier update.
    :ivar list losses: the augmented-Lagrangian objective at every Adam step.
    :ivar torch.nn.Module module: the trained parameters (mixture and flow), frozen.
    """

    distribution: TorchDistribution
    entropy: float
    entropy_se: float
    violation: float
    moments: torch.Tensor
    moments_se: torch.Tensor
    target: torch.Tensor
    multipliers: torch.Tensor
    penalty: float
    history: list[dict[str, Any]]
    losses: list[float]
    module: torch.nn.Module


def fit_max_entropy(
    statistic: Callable[[torch.Tensor], torch.Tensor],
    target: torch.Tensor,
    dim: int,
    support: constraints.Constraint = constraints.real,
    *,
    num_components: int = 8,
    flow: str | Callable | None = "spline_autoregressive",
    num_flows: int = 2,
    hidden_dims: list[int] | None = None,
    estimator: str = "stratified",
    num_outer: int = 10,
    num_inner: int = 200,
    num_samples: int = 512,
    lr: float = 1e-2,
    lr_decay: float = 0.8,
    penalty: float = 10.0,
    penalty_growth: float = 4.0,
    penalty_max: float = 1e3,
    violation_decrease: float = 0.25,
    average_fraction: float = 0.5,
    qmc: bool = True,
    init_spread: float = 1.0,
    init_sobol: bool = False,
    weight_step: float | None = None,
    temperature: float = 0.5,
    num_nested: int = 32,
    num_check: int = 16384,
    num_eval: int = 100_000,
    seed: int | None = None,
    progress: bool = True,
    **flow_kwargs: Any,
) -> MaxEntropyResult:
    r"""Fit the maximum-entropy distribution under moment constraints with a mixture flow.

    Solves :math:`\max_q H(q)` subject to :math:`\mathbb{E}_q[T(x)] = b` over mixture flows on
    ``support`` by MEFN's augmented-Lagrangian scheme (see
    :mod:`pyro_mogflow.infer.max_entropy` for the objective, the multiplier and penalty updates
    and the unbiased two-batch estimate of the squared constraint):

    .. math::
        \min_\theta\ -H(q_\theta) + \lambda^\top R(\theta) + \frac{c}{2}\lVert R(\theta)\rVert^2,
        \qquad R(\theta) = \frac{\mathbb{E}_{q_\theta}[T(x)] - b}{\max(|b|, 1)}.

    :param statistic: :math:`T`, maps points of shape ``(N, dim)`` on the support to
        ``(N, M)``; must be differentiable in torch (e.g. ``torch.log``,
        ``lambda x: torch.cat([x, x**2], -1)``).
    :param target: :math:`b`, shape ``(M,)``. Its dtype (float32 or float64) is the dtype of
        the whole fit; a non-tensor is converted in the default dtype.
    :param int dim: the length of the points the statistic receives (3 for the 3-part simplex).
    :param support: a torch constraint mapped from real space by ``biject_to``: ``real``
        (default), ``positive``, ``greater_than(a)``, ``interval(a, b)``, ``simplex``, ....
        Entropy is measured w.r.t. Lebesgue measure on the support's coordinates (the first
        ``dim - 1`` for the simplex, as :meth:`torch.distributions.Dirichlet.entropy`).
    :param int num_components: :math:`K`, mixture components of the base (1: a flow on a
        Gaussian base).
    :param flow: a registered invertible flow name, a callable ``latent_dim -> Transform``, or
        ``None`` for the bare mixture (default ``"spline_autoregressive"``).
    :param int num_flows: flow layers (default 2).
    :param hidden_dims: hidden sizes of the flow's networks (``None``: Pyro's default).
    :param str estimator: how gradients pass the discrete choice: ``"stratified"`` (default,
        exact expectation over components), ``"implicit"``, ``"relaxed"``,
        ``"relaxed-nested"`` (the design note's method) or ``"pathwise"``.
    :param int num_outer: augmented-Lagrangian iterations (default 10).
    :param int num_inner: Adam steps per iteration (default 200).
    :param int num_samples: draws per batch (two batches per step; for ``"stratified"``
        ``num_samples // K`` per component), default 512.
    :param float lr: Adam learning rate of the first iteration (default 0.01).
    :param float lr_decay: factor applied to the learning rate after each iteration (0.8).
    :param float penalty: initial penalty coefficient :math:`c_0` (default 10).
    :param float penalty_growth: :math:`\gamma`, factor by which :math:`c` grows (default 4).
    :param float penalty_max: cap on :math:`c` (default 1000).
    :param float violation_decrease: :math:`\rho`; :math:`c` grows unless the residual norm
        fell below :math:`\rho` times its previous value (default 0.25).
    :param float average_fraction: each iteration ends at the average of its last
        ``average_fraction * num_inner`` iterates (Polyak-Ruppert averaging; default 0.5; 0
        keeps the last iterate).
    :param bool qmc: with ``estimator="stratified"``, draw each component's Gaussian noise by
        randomized QMC (scrambled Sobol'; default True) instead of i.i.d.
    :param float init_spread: standard deviation of the initial component means (default 1).
        For well-separated modes spread them over the solution's range (e.g. the RMS
        :math:`\sqrt{\mathbb{E}[x^2]}` implied by the constraints) so that components start in
        different modes.
    :param bool init_sobol: draw the initial means as ``init_spread`` times a scrambled Sobol'
        sequence through the normal quantile (even coverage: with :math:`K = 2^m` each half of
        every coordinate gets :math:`K/2` means) instead of i.i.d. normal (default False).
    :param weight_step: if given (and ``estimator="stratified"``, ``K > 1``), the mixture
        weights take natural-gradient (mirror-descent) steps of this size instead of Adam's:
        :math:`\log\pi_k \leftarrow \log\pi_k - \eta\,(g_k - \pi^\top g)` with
        :math:`g_k = \partial\mathcal{L} / \partial\pi_k`, renormalised and floored at
        ``1e-6``; :math:`\eta` decays with ``lr_decay``. Default ``None``: Adam on the logits.
    :param float temperature: Gumbel-softmax temperature (relaxed estimators only).
    :param int num_nested: inner draws of the ``"relaxed-nested"`` density.
    :param int num_check: fresh exact draws behind each multiplier update (default 16384).
    :param int num_eval: fresh exact draws behind the reported estimates (default 100000).
    :param seed: if given, seeds torch (and Pyro) before anything random happens.
    :param bool progress: show a tqdm progress bar (default True).
    :param flow_kwargs: passed to the flow builder (e.g. ``count_bins``, ``bound``).
    :return: a :class:`MaxEntropyResult`.
    :raises TypeError: for an argument of the wrong kind (a non-callable ``statistic``, a
        ``support`` that is not a constraint, a non-integer count, ...).
    :raises ValueError: for a bad value (``target`` not of shape ``(M,)``, a statistic whose
        output on a probe draw is not ``(N, M)`` and finite, an unknown estimator or flow, an
        unsupported support), all before any training.
    :raises RuntimeError: if the objective stays non-finite (the parameters are never updated
        by a non-finite step).
    """
    if not callable(statistic):
        raise TypeError(
            f"statistic must be callable, mapping points (N, dim) to (N, M), got "
            f"{type(statistic).__name__}"
        )
    target = _check_target(target)
    dtype, device = target.dtype, target.device
    dim = check_int("dim", dim, 1)
    transform, free_dim = _support_transform(support, dim)
    num_components = check_int("num_components", num_components, 1)
    _check_flow(flow)
    num_flows = check_int("num_flows", num_flows, 0)
    check_estimator(estimator)
    num_outer = check_int("num_outer", num_outer, 1)
    num_inner = check_int("num_inner", num_inner, 1)
    num_samples = check_int("num_samples", num_samples, 2)
    lr = check_real("lr", lr, minimum=0.0, strict=True)
    lr_decay = check_real("lr_decay", lr_decay, minimum=0.0, strict=True)
    penalty = check_real("penalty", penalty, minimum=0.0, strict=True)
    penalty_growth = check_real("penalty_growth", penalty_growth, minimum=1.0)
    penalty_max = check_real("penalty_max", penalty_max, minimum=penalty)
    violation_decrease = check_real("violation_decrease", violation_decrease, minimum=0.0)
    average_fraction = check_real("average_fraction", average_fraction, minimum=0.0)
    if average_fraction > 1:
        raise ValueError(f"average_fraction must be in [0, 1], got {average_fraction}")
    init_spread = check_real("init_spread", init_spread, minimum=0.0)
    if weight_step is not None:
        weight_step = check_real("weight_step", weight_step, minimum=0.0, strict=True)
    temperature = check_temperature(temperature)
    if callable(temperature):
        raise TypeError("temperature must be a positive float here (no schedule)")
    num_nested = check_int("num_nested", num_nested, 1)
    num_check = check_int("num_check", num_check, 2)
    num_eval = check_int("num_eval", num_eval, 2)
    seed = check_int("seed", seed, allow_none=True)
    check_bool("progress", progress)
    check_bool("qmc", qmc)
    check_bool("init_sobol", init_sobol)

    if seed is not None:
        pyro.set_rng_seed(seed)
    # Probe the statistic on a few points of the support before any training.
    m = target.numel()
    with torch.no_grad():
        probe = transform(torch.randn(4, free_dim, dtype=dtype, device=device))
        try:
            out = statistic(probe)
        except Exception as e:  # noqa: BLE001 - re-raised with the argument's name
            raise ValueError(
                f"statistic raised {type(e).__name__} on a probe draw of shape (4, {dim}) "
                f"from the support: {e}"
            ) from e
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (4, m):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"statistic must map points of shape (N, {dim}) to (N, M) = (N, {m}) (M = "
            f"target's length), but on a probe of shape (4, {dim}) it returned {shape}"
        )
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            f"statistic returned non-finite values on a probe draw from the support: {out.tolist()}"
        )

    flow_module = _build_flow(flow, free_dim, num_flows, hidden_dims, flow_kwargs)
    module = _MaxEntFlow(num_components, free_dim, flow_module, init_spread, dtype, init_sobol).to(
        device
    )
    scale = target.abs().clamp(min=1.0)
    multipliers = torch.zeros_like(target)
    c = penalty
    # Natural-gradient (mirror-descent) steps for the weights of a stratified mixture; Adam
    # for everything else (and for the logits otherwise).
    natural = weight_step is not None and estimator == "stratified" and num_components > 1
    adam_params = [p for p in module.parameters() if not (natural and p is module.logits)]
    optimizer = torch.optim.Adam(adam_params, lr=lr)
    eta = weight_step
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    previous = math.inf
    failures = 0
    tail = int(average_fraction * num_inner)

    def residual(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ((w.unsqueeze(-1) * statistic(x)).sum(0) - target) / scale

    def draw() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _draw(module, estimator, num_samples, transform, temperature, num_nested, qmc)

    bar = tqdm(
        total=num_outer * num_inner,
        desc="max-entropy",
        disable=not progress,
        file=sys.stderr,
        mininterval=0.5,
    )
    try:
        params = list(module.parameters())
        for outer in range(num_outer):
            average = [torch.zeros_like(p) for p in params]
            averaged = 0
            for step in range(num_inner):
                xa, lpa, wa = draw()
                xb, lpb, wb = draw()  # independent of batch a
                ra, rb = residual(xa, wa), residual(xb, wb)
                neg_entropy = 0.5 * ((wa * lpa).sum() + (wb * lpb).sum())
                loss = neg_entropy + multipliers @ (0.5 * (ra + rb)) + 0.5 * c * (ra @ rb)
                optimizer.zero_grad()
                if not bool(torch.isfinite(loss)):
                    failures += 1
                    if failures > max(10, num_inner // 10):
                        raise RuntimeError(
                            f"the max-entropy objective was non-finite in {failures} steps; "
                            "lower lr or penalty, or check that the statistic is finite on the "
                            "whole support"
                        )
                    bar.update(1)
                    continue
                loss.backward()
                grads = [p.grad for p in module.parameters() if p.grad is not None]
                if not all(bool(torch.isfinite(g).all()) for g in grads):
                    failures += 1
                    optimizer.zero_grad()
                    bar.update(1)
                    continue
                optimizer.step()
                if natural:
                    _natural_weight_step(module.logits, eta)
                losses.append(float(loss.detach()))
                bar.update(1)
                if step >= num_inner - tail:
                    with torch.no_grad():
                        for a, p in zip(average, params):
                            a.add_(p)
                    averaged += 1
            if averaged:
                # Polyak-Ruppert: the mean of the last iterates is far less noisy than the last.
                with torch.no_grad():
                    for a, p in zip(average, params):
                        p.copy_(a / averaged)
            q = module.mixture_flow("implicit", temperature, num_nested)
            mean, se, h, _ = _rqmc_estimates(q, transform, statistic, num_check)
            r = (mean - target) / scale
            r_norm = float(r.norm())
            noise = float((se / scale).norm())
            history.append(
                dict(
                    step=(outer + 1) * num_inner,
                    entropy=h,
                    violation=float(r.abs().max()),
                    penalty=c,
                    multipliers=multipliers.clone(),
                )
            )
            bar.set_postfix(H=f"{h:.4f}", viol=f"{float(r.abs().max()):.2e}", c=f"{c:.3g}")
            if outer == num_outer - 1:
                break
            multipliers = multipliers + c * r
            if r_norm > violation_decrease * previous and r_norm > 3 * noise:
                c = min(c * penalty_growth, penalty_max)
            previous = r_norm
            for group in optimizer.param_groups:
                group["lr"] *= lr_decay
            if natural:
                eta *= lr_decay
    finally:
        bar.close()

    module.requires_grad_(False)
    q = module.mixture_flow("implicit", temperature, num_nested)
    mean, se, h, h_se = _rqmc_estimates(q, transform, statistic, num_eval)
    violation = float(((mean - target).abs() / scale).max())
    if support is constraints.real or support is constraints.real_vector:
        distribution: TorchDistribution = q
    else:
        distribution = dist.TransformedDistribution(q, [transform])
    return MaxEntropyResult(
        distribution=distribution,
        entropy=h,
        entropy_se=h_se,
        violation=violation,
        moments=mean,
        moments_se=se,
        target=target,
        multipliers=multipliers,
        penalty=c,
        history=history,
        losses=losses,
        module=module,
    )
