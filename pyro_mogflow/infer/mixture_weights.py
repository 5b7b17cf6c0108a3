r"""The mixture weights of an :class:`~pyro_mogflow.AutoMixtureFlow`: natural-gradient steps and
a final re-balancing.

Write the ELBO as :math:`\mathcal{L} = \sum_k \pi_k L_k` with
:math:`L_k = \mathbb{E}_{q_k}[\log p(x, z) - \log q(z)]`. Along the simplex
:math:`\partial \mathcal{L} / \partial \pi_k = L_k - 1`, and the natural gradient (the Fisher
metric of the categorical) is the multiplicative update

.. math:: \log \pi_k \leftarrow \log \pi_k + \eta\,\Big(L_k - \sum_j \pi_j L_j\Big)
    \quad (\text{renormalised}).

References:

* S. Amari, *Natural Gradient Works Efficiently in Learning*, Neural Computation 1998.
* O. Cappé, R. Douc, A. Guillin, J.-M. Marin, C. Robert, *Adaptive importance sampling in
  general mixture classes*, Statistics and Computing 2008.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro import poutine
from pyro.infer.util import zero_grads

from .._validation import check_int
from ..distributions.density import component_log_prob, full_component_log_prob
from ..guides import AutoMixtureFlow
from ..guides.covariance import is_full
from .budget import _drop_stale_optimizer_state
from .component_steps import _unconstrained, natural_component_deltas
from .memory import DEFAULT_MEMORY_BUDGET
from .natural_elbo import by_component, component_shares
from .stratified import StratifiedELBO
from .stratified_chunks import particles_and_base
from .subsampling import subsampled_plates

__all__ = ["MIN_WEIGHT", "WEIGHT_OBJECTIVES", "balance_weights", "natural_gradient_stepper"]

#: Smallest mixture weight the natural-gradient update leaves a component (relative to one), so a
#: component that moved to a new mode can win its weight back.
MIN_WEIGHT = 1e-6
#: What :func:`balance_weights` can optimise.
WEIGHT_OBJECTIVES = ("elbo", "forward")


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
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
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
      (population Monte Carlo, Cappé et al. 2008). When those weights would lower the ELBO
      (estimated on the same draws) by more than 1 nat plus three standard errors, the
      importance weights were dominated by a few draws and the guide keeps its weights.

    :param callable model: the Pyro model (untempered: the weights are those of the posterior).
    :param AutoMixtureFlow guide: a set-up guide with ``estimator="stratified"``.
    :param args: the model's arguments.
    :param int num_particles: ``n``, draws per component (the model runs on ``K n`` points).
    :param int num_iters: the most fixed-point iterations (the loop stops once no log-weight
        moves by more than 1e-7).
    :param str objective: ``"elbo"`` (default) or ``"forward"``.
    :param memory_budget: bytes of working memory for the model's evaluation (default 1 GiB;
        ``None``: no limit): the components are evaluated in chunks, as in
        :class:`~pyro_mogflow.StratifiedELBO`, and a component whose ``n`` draws do not fit
        in pieces of its draws (the ``K n`` results, a few numbers per draw, are kept).
    :param kwargs: the model's keyword arguments.
    :return: the new weights, shape ``(K,)``; the guide's logits are set to their logarithm.
    :raises ValueError: if the model subsamples a plate (the weights need the full data).
    """
    if not isinstance(guide, AutoMixtureFlow) or guide.estimator != "stratified":
        raise TypeError(
            "guide must be an AutoMixtureFlow with estimator='stratified', got "
            f"{type(guide).__name__}"
            + (f"(estimator={guide.estimator!r})" if isinstance(guide, AutoMixtureFlow) else "")
        )
    num_particles = check_int("num_particles", num_particles, 1)
    num_iters = check_int("num_iters", num_iters, 1)
    if objective not in WEIGHT_OBJECTIVES:
        raise ValueError(f"objective must be one of {WEIGHT_OBJECTIVES}, got {objective!r}")
    guide.setup(*args, **kwargs)
    plates = subsampled_plates(model, guide, args, kwargs)
    if plates:
        raise ValueError(
            f"balance_weights needs the full data, but the model subsamples plate(s) {plates}: "
            "the importance weights of an N/b-scaled subsampled likelihood are biased. Pass "
            "arguments that run the model on all of its data (e.g. subsample_size=None)."
        )
    elbo = StratifiedELBO(num_particles=num_particles, memory_budget=memory_budget)
    (log_ratio, log_pi, _), base = particles_and_base(elbo, model, guide, args, kwargs)
    # The fixed-point loop runs in float64 on the (K n, K) table of component densities, held
    # in exp space relative to each point's largest entry, so that one iteration is two
    # matrix-vector products instead of logsumexps over a (K, n, K) tensor.
    f64 = torch.float64
    locs = guide.locs.detach().to(f64)
    k, n = log_ratio.shape
    base = base.reshape(k * n, -1).to(f64)  # (K n, D)
    if is_full(guide):  # (K n, K): log N(b_kt; mu_j, L_j L_j^T)
        comp = full_component_log_prob(base, locs, guide.scale_tril.detach().to(f64).tril())
    else:  # (K n, K): log N(b_kt; mu_j, sigma_j)
        comp = component_log_prob(base, locs, guide.scales.detach().to(f64))
    top = comp.max(-1, keepdim=True).values  # (K n, 1)
    dens = (comp - top).exp()  # (K n, K), each row's largest entry is 1
    top = top.squeeze(-1)
    log_pi = log_pi.detach().to(f64)

    def log_q_of(log_pi):  # (K n,): log sum_j pi_j N(b; mu_j, sigma_j)
        return top + (dens @ log_pi.exp()).log()

    # log p(x, z) + log|det| does not depend on the weights:
    fixed = log_ratio.detach().to(f64).reshape(-1) + log_q_of(log_pi)
    ok = torch.isfinite(fixed)
    fixed = torch.where(ok, fixed, fixed.new_tensor(-math.inf))
    ok_k = ok.reshape(k, n)
    floor = math.log(MIN_WEIGHT)
    start = log_pi
    for _ in range(num_iters):
        log_q = log_q_of(log_pi)
        log_w = fixed - log_q  # (K n,)
        if objective == "elbo":
            terms = torch.where(ok, log_w, log_w.new_zeros(())).reshape(k, n).sum(-1)
            terms = terms / ok_k.sum(-1).clamp(min=1)
            terms = torch.where(ok_k.any(-1), terms, terms.new_tensor(-math.inf))
            new = log_pi.clone()
            _natural_weight_step(new, terms, 0.5)
        else:
            # pi_j <- sum_kt pi_k w_kt r_j(z_kt) / sum(...), r_j = pi_j N_j / q:
            # log pi_j + log sum_kt exp(log pi_k + log w_kt - log q_kt + top_kt) dens_ktj
            a = log_pi.repeat_interleave(n) + log_w - log_q + top
            m = a.max()
            if not torch.isfinite(m):
                break
            new = log_pi + ((a - m).exp() @ dens).log() + m
            new = torch.log_softmax(new, -1).clamp(min=floor)
            new = torch.log_softmax(new, -1)
        done = bool((new - log_pi).abs().max() < 1e-7)
        log_pi = new
        if done:
            break
    if objective == "forward":
        # The importance weights behind the forward objective can be dominated by a few draws
        # (a component at a boundary of the support, say); then the fixed point moves the mass
        # onto that component and the ELBO falls by many nats (one-factor factor analysis: 33).
        # Keep the trained weights when the forward ones lower the ELBO by more than 1 nat plus
        # three standard errors, estimated on the same draws.
        before, se_before = _elbo_and_se(fixed, log_q_of(start), start, ok_k, k, n)
        after, se_after = _elbo_and_se(fixed, log_q_of(log_pi), log_pi, ok_k, k, n)
        if after < before - 1.0 - 3.0 * math.hypot(se_before, se_after):
            log_pi = start
    log_pi = log_pi.to(guide.logits.dtype)
    _logits_param(guide).copy_(log_pi)
    return log_pi.exp()


def _elbo_and_se(fixed, log_q, log_pi, ok_k, k: int, n: int) -> tuple[float, float]:
    """The stratified ELBO ``sum_k pi_k mean_t [log p - log q_pi]`` and its standard error."""
    terms = (fixed - log_q).reshape(k, n)
    terms = torch.where(ok_k, terms, terms.new_zeros(()))
    count = ok_k.sum(-1).clamp(min=1)
    mean = terms.sum(-1) / count
    var = ((terms - mean.unsqueeze(-1)).pow(2) * ok_k).sum(-1) / (count - 1).clamp(min=1)
    pi = log_pi.exp()
    value = float((pi * torch.where(ok_k.any(-1), mean, mean.new_zeros(()))).sum())
    se = float((pi.pow(2) * var / count).sum().sqrt())
    return value, se


def _backward_needed(trace, guide, natural: bool, weight_step, freeze_flow) -> bool:
    """Whether a step's backward pass feeds any parameter: not when the means and scales take
    natural steps, the logits natural weight steps, the flow (if any) is frozen and the
    model has no parameters of its own. Skipping it then saves one pass through the model
    (a quarter of a step's time on a 1000-point logistic regression)."""
    if not natural or weight_step is None:
        return True
    names = ("locs", "scale_tril" if is_full(guide) else "scales", "logits")
    own = {id(_unconstrained(getattr(guide, name))) for name in names}
    if guide.flow is not None and freeze_flow():
        own |= {id(p) for p in guide.flow.parameters()}
    for site in trace.nodes.values():
        if site["type"] == "param" and id(site["value"].unconstrained()) not in own:
            return True
    return False


def natural_gradient_stepper(
    model,
    guide,
    optim,
    elbo: StratifiedELBO,
    weight_step,
    freeze_flow,
    check=None,
    component_step: str = "adam",
    go_full=None,
    on_full=None,
    hold_weights=None,
):
    """One optimisation step of StratifiedELBO; the logits move by natural-gradient steps.

    ``hold_weights()``, if given, says whether the weights sit out this step (they keep their
    values; :class:`~pyro_mogflow.infer.budget.StepBudget` holds them while the components
    travel).

    With ``component_step="natural"`` (``elbo`` drawing antithetic pairs) the means and scales
    take the iBLR step of :mod:`pyro_mogflow.infer.component_steps` instead of ``optim``'s;
    the proposed change is put in their ``.grad`` before ``check``, so a non-finite one is
    refused like a non-finite gradient.

    The components are evaluated in chunks that fit ``elbo.memory_budget``, each chunk's
    share backpropagated at once; the per-component terms :math:`L_k` are gathered chunk by
    chunk. ``freeze_flow()`` says whether the flow's parameters sit out this step.
    ``go_full()``, if given, says whether the guide should have full-covariance components
    from this step on: the first time it says so the guide is upgraded in place
    (:meth:`~pyro_mogflow.AutoMixtureFlow.to_full_covariance`, the density unchanged) before
    the step, ``on_full(*args, **kwargs)`` (if given) runs next (e.g.
    :func:`~pyro_mogflow.infer.consolidation.consolidate_modes`, which may replace the mixture's
    parameters), and ``optim`` forgets the state of the removed ones. ``check(loss,
    named)``, if given, is called after the backward pass and before anything moves, with
    ``named`` mapping param-store names to the tensors the step would update; raising there
    leaves every parameter (and the optimiser's state) as it was.
    """

    natural = component_step == "natural"

    def step(*args, **kwargs) -> float:
        if go_full is not None and not is_full(guide) and go_full():
            guide.to_full_covariance()
            if on_full is not None:
                on_full(*args, **kwargs)
            _drop_stale_optimizer_state(optim, guide)
        n = elbo.num_particles
        with poutine.trace(param_only=True) as capture:
            parts = component_shares(
                elbo,
                model,
                guide,
                args,
                kwargs,
                natural,
                lambda: _backward_needed(capture.trace, guide, natural, weight_step, freeze_flow),
            )
        loss = sum(p[0] for p in parts)
        if len(parts) == 1:
            terms, log_pi = parts[0][2] / n, parts[0][3]
        else:
            index = torch.cat([p[1] for p in parts]).to(parts[0][2].device)
            k = int(index.max()) + 1
            terms = parts[0][2].new_zeros(k).index_add_(0, index, torch.cat([p[2] for p in parts]))
            terms = terms / n
            log_pi = (
                parts[0][3].new_zeros(k).index_copy_(0, index, torch.cat([p[3] for p in parts]))
            )
        named = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
        params = set(named.values())
        moved = {}
        if natural:
            base, grads = by_component(parts)
            for name, delta in natural_component_deltas(guide, base, grads).items():
                leaf = _unconstrained(getattr(guide, name))
                leaf.grad = -delta  # so that check() sees a non-finite step; never to optim
                moved[name] = leaf
        if check is not None:
            check(loss, named)
        if moved:
            with torch.no_grad():
                for leaf in moved.values():
                    leaf.sub_(leaf.grad)
                    leaf.grad = None
                    params.discard(leaf)
        if weight_step is not None:
            # Component k's parameters get pi_k times the gradient of its own term L_k: divide
            # it out (the Fisher metric of the mixture scales each component's block by pi_k),
            # so a component whose weight has collapsed still moves toward a mode at full speed
            # instead of stalling under Adam's long memory of its earlier, larger gradients.
            pi = log_pi.detach().exp()
            for name in ("locs", "scale_tril" if is_full(guide) else "scales"):
                leaf = _unconstrained(getattr(guide, name))
                if leaf.grad is not None and name not in moved:
                    leaf.grad.div_(pi.reshape(pi.shape + (1,) * (leaf.dim() - 1)))
            logits = _logits_param(guide)
            params.discard(logits)
            logits.grad = None
            if hold_weights is None or not hold_weights():
                _natural_weight_step(logits, terms, weight_step)
        if guide.flow is not None and freeze_flow():
            frozen = {id(p) for p in guide.flow.parameters()}
            zero_grads({p for p in params if id(p) in frozen})
            params = {p for p in params if id(p) not in frozen}
        optim(params)
        zero_grads(params)
        return float(loss)

    return step
