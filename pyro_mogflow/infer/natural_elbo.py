r""":class:`NaturalStratifiedELBO`: :func:`~pyro_mogflow.fit`'s natural-gradient component steps
as an ELBO for a plain ``SVI`` loop.

:func:`~pyro_mogflow.fit` moves the means and scales of an
:class:`~pyro_mogflow.AutoMixtureFlow` by the iBLR (variational online Newton) step of
:mod:`~pyro_mogflow.infer.component_steps`, each component in its own natural coordinates, so
that a component started at a prior draw far from every mode travels to one at a pace set by
its own scale and not by its weight or by Adam's memory. That step needs the gradient of the
ELBO's integrand wrt each *draw*, which an optimiser never sees (``SVI`` hands it parameter
gradients only), so it is taken here, in the ELBO's ``loss_and_grads``:

1. every component draws antithetic pairs :math:`u_\pm = m_k \pm \sigma_k \odot \epsilon`
   (:class:`~pyro_mogflow.StratifiedELBO` with ``antithetic=True``), chunked under the memory
   budget;
2. :math:`g = \nabla_u h(u)` by autograd at every draw, and the stratified loss is
   backpropagated as usual, so the logits, a flow and any parameter of the model get their
   ordinary gradients;
3. the iBLR step of every component is applied to its mean and scale (or Cholesky factor,
   after :meth:`~pyro_mogflow.AutoMixtureFlow.to_full_covariance`), and their ``.grad`` is
   cleared, so the optimiser ``SVI`` calls next leaves them alone and moves every other
   parameter.

With :class:`~pyro_mogflow.MixtureNaturalGradient` as the optimiser the weights take
:func:`~pyro_mogflow.fit`'s natural-gradient steps too, and with
:class:`~pyro_mogflow.TemperedModel` the loop anneals as ``fit`` does; calling
:meth:`~pyro_mogflow.AutoMixtureFlow.to_full_covariance` once :math:`\beta` reaches 1 gives the
components the shape of correlated modes. README ("What each path gives") has the loop and
what it measured.

A step whose component update is not finite (the model's log density or its gradient is not
finite at some draw) raises ``RuntimeError`` naming the components, with every parameter as it
was and no gradient left behind.

References:

* W. Lin, M. Schmidt, M. E. Khan, *Handling the Positive-Definite Constraint in the Bayesian
  Learning Rule*, ICML 2020 (iBLR).
* M. E. Khan, H. Rue, *The Bayesian Learning Rule*, JMLR 2023.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from pyro import poutine
from pyro.util import warn_if_nan

from ..guides import AutoMixtureFlow
from .component_steps import _unconstrained, base_gradients, natural_component_deltas
from .memory import DEFAULT_MEMORY_BUDGET
from .stratified import StratifiedELBO
from .stratified_chunks import run_shares

__all__ = ["NaturalStratifiedELBO", "by_component", "component_shares"]


def component_shares(
    elbo: StratifiedELBO, model, guide, args, kwargs, natural: bool, backward: Callable[[], bool]
) -> list:
    """Evaluate the stratified ELBO chunk by chunk (``stratified_chunks.run_shares``), each
    chunk's share of the loss backpropagated at once when ``backward()`` says so.

    :return: per chunk ``(loss, components, sums, log_pi, base, grads)``: its share of the
        negative ELBO (detached), its component indices (``None``: all), the sum over its
        draws of each component's log ratio, the log weights, and with ``natural`` the base
        draws and :math:`\\nabla_u h` there, shapes ``(m, n, D)`` (else ``None``).
    """
    n = elbo.num_particles

    def share(comps, _):
        log_ratio, log_pi = elbo.particles(model, guide, *args, **kwargs)[:2]
        base = grads = None
        do_backward = backward()
        if natural:  # the draws' gradients wrt the base points, q's parameters fixed
            base = elbo.last_sample.base
            grads = base_gradients(log_ratio, base, retain_graph=do_backward)
            base = base.detach().reshape(grads.shape)
        sums = log_ratio.sum(-1)  # this chunk's part of n L_k
        loss = -(log_pi.exp() * sums).sum() / n
        if do_backward:
            loss.backward()
        return loss.detach(), comps, sums.detach(), log_pi.detach(), base, grads

    return run_shares(elbo, model, guide, args, kwargs, share)


def by_component(parts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The base draws and their gradients of every component, ``(K, n, D)`` each, put together
    from chunks of components (``parts[i][1]`` their indices, None for all) or of draws."""
    if len(parts) == 1:
        return parts[0][4], parts[0][5]
    rows: dict = {}
    for part in parts:
        for j, c in enumerate(part[1].tolist()):
            rows.setdefault(c, []).append((part[4][j], part[5][j]))
    order = sorted(rows)
    base = torch.stack([torch.cat([b for b, _ in rows[c]]) for c in order])
    grads = torch.stack([torch.cat([g for _, g in rows[c]]) for c in order])
    return base, grads


class NaturalStratifiedELBO(StratifiedELBO):
    r"""The stratified ELBO of an :class:`~pyro_mogflow.AutoMixtureFlow` whose ``loss_and_grads``
    also takes :func:`~pyro_mogflow.fit`'s natural-gradient (iBLR) step for every component's
    mean and scale; the optimiser moves every other parameter (see
    :mod:`~pyro_mogflow.infer.natural_elbo`).

    Per step and component :math:`k` (diagonal case; full covariance in
    :mod:`~pyro_mogflow.infer.component_steps`), from antithetic draws
    :math:`u_\pm = m_k \pm \sigma_k \odot \epsilon` and :math:`g_\pm = \nabla_u h(u_\pm)`,
    :math:`h = \log p(x, z) - \log q(z)` pulled back to the base,

    .. math::
        \bar g_k = \tfrac12 (g_+ + g_-), \quad
        G_k = -\tfrac12 (g_+ - g_-) \odot \epsilon / \sigma_k, \quad
        s_k \leftarrow s_k + b_k G_k + \tfrac{b_k^2}{2} G_k^2 / s_k, \quad
        m_k \leftarrow m_k + b_k \bar g_k / s_k,

    with :math:`s_k = \sigma_k^{-2}` and :math:`b_k \le 0.1` bounding the step's KL divergence
    by 1 nat. ``loss`` and ``differentiable_loss`` are those of
    :class:`~pyro_mogflow.StratifiedELBO` (no step).

    Usage (the loop of README's "What each path gives", ``fit``'s mode finding by hand)::

        guide = AutoMixtureFlow(model, init_spread="prior")
        tempered = TemperedModel(model, exponential_schedule(0.01, 1.0, 1500))
        optim = MixtureNaturalGradient(guide, pyro.optim.Adam({"lr": 0.005}))
        svi = SVI(tempered, guide, optim, NaturalStratifiedELBO())
        for step in range(3000):
            if step == 1500:
                guide.to_full_covariance()   # beta = 1 from here: correlated modes
            svi.step(data)
            tempered.advance()

    :param int num_particles: draws per component, an even number (antithetic pairs; default
        2, one pair, as :func:`~pyro_mogflow.fit`), so a step runs the model on ``K *
        num_particles`` points.
    :param int max_plate_nesting: as :class:`~pyro_mogflow.StratifiedELBO`.
    :param bool retain_graph: as :class:`~pyro_mogflow.StratifiedELBO` (the graph is needed
        twice per chunk here, and kept until its backward pass).
    :param memory_budget: as :class:`~pyro_mogflow.StratifiedELBO` (default 1 GiB).
    :raises TypeError: in ``loss_and_grads``, for a guide that is not an
        :class:`~pyro_mogflow.AutoMixtureFlow` with ``estimator="stratified"``.
    :raises RuntimeError: in ``loss_and_grads``, when a component's step is not finite (nothing
        is changed).
    """

    def __init__(
        self,
        num_particles: int = 2,
        max_plate_nesting: int | float = float("inf"),
        retain_graph: bool | None = None,
        memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    ):
        if isinstance(num_particles, bool) or not isinstance(num_particles, numbers.Integral):
            raise TypeError(f"num_particles must be an int, got {type(num_particles).__name__}")
        if num_particles < 2 or num_particles % 2:
            raise ValueError(
                "num_particles must be an even number >= 2 (the natural step draws antithetic "
                f"pairs), got {num_particles}"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            retain_graph=retain_graph,
            memory_budget=memory_budget,
            antithetic=True,
        )

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Estimate the negative ELBO, backpropagate it, and step every component of ``guide``
        by its natural gradient (their means and scales are left without ``.grad``).

        :rtype: float
        """
        if not isinstance(guide, AutoMixtureFlow) or guide.estimator != "stratified":
            raise TypeError(
                "NaturalStratifiedELBO steps the components of an AutoMixtureFlow with "
                f"estimator='stratified'; got {type(guide).__name__}"
                + (f" (estimator={guide.estimator!r})" if hasattr(guide, "estimator") else "")
                + ". Use StratifiedELBO for other guides."
            )
        with poutine.trace(param_only=True) as capture:
            parts = component_shares(self, model, guide, args, kwargs, True, lambda: True)
        touched = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
        loss = float(sum(p[0] for p in parts))
        base, grads = by_component(parts)
        deltas = natural_component_deltas(guide, base, grads)
        bad = set()
        for delta in deltas.values():
            flat = delta.reshape(delta.shape[0], -1)
            bad |= set(torch.nonzero(~torch.isfinite(flat).all(-1)).flatten().tolist())
        if bad:
            for p in touched:  # leave no gradient behind: the step did not happen
                p.grad = None
            raise RuntimeError(
                f"NaturalStratifiedELBO: the natural-gradient step of component(s) "
                f"{sorted(bad)[:10]} is not finite (the model's log density or its gradient "
                "is not finite at their draws; loss "
                f"{loss:.6g}). Nothing was changed; check the model's support and data, or "
                "lower init_scale."
            )
        with torch.no_grad():
            for name, delta in deltas.items():
                leaf = _unconstrained(getattr(guide, name))
                leaf.add_(delta)
                leaf.grad = None  # the step is taken: the optimiser must not move them again
        warn_if_nan(loss, "loss")
        return loss
