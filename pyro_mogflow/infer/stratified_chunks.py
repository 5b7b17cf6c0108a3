r"""The evaluations of :class:`~pyro_mogflow.StratifiedELBO` run in chunks of components, so
their working memory stays under the ELBO's ``memory_budget``.

The stratified ELBO is a sum over components, :math:`\mathcal{L} = \sum_k \pi_k L_k`, so a
partition of the components into chunks :math:`S_1, \dots, S_c` splits it into shares
(:meth:`~pyro_mogflow.StratifiedELBO.only_components`) whose values and gradients add up to the
whole: the loss sums the shares, and training backpropagates each share as soon as it is
evaluated, so only one chunk's autograd graph is alive at a time. The chunk size is measured on
the first evaluation (:class:`~pyro_mogflow.infer.memory.ChunkPlanner`).

The importance-weighted bound :math:`\log \frac1n \sum_{kt} \pi_k w_{kt}` does not split, but its
gradient does: :math:`\nabla \log \sum_i e^{a_i} = \sum_i \operatorname{softmax}(a)_i \nabla a_i`.
A first pass without gradients evaluates every :math:`a_i = \log \pi_k + \log w_{kt}` chunk by
chunk (recording the random state before each chunk); a second pass evaluates each chunk again
with the same random state and backpropagates :math:`\sum_{i \in S} \operatorname{sg}
(\operatorname{softmax}(a)_i)\, a_i`. The gradient is exactly that of the unchunked bound, at
twice the model evaluations.
"""

from __future__ import annotations

import contextlib
import math

import torch
from pyro import poutine
from torch.utils.checkpoint import checkpoint

from ..distributions.mixture_flow import check_components
from .memory import shapes_key
from .stratified_sites import _ComponentsChanged

__all__: list = []


def _rng_state():
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if cuda else None)


@contextlib.contextmanager
def _replayed(state):
    """Run with the random state ``state`` (then put the current one back)."""
    cpu, cuda = state
    devices = list(range(len(cuda))) if cuda is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        yield


def _forked():
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else [])


def _param_leaves(run) -> tuple:
    """``run()`` and the leaf tensors of the parameters it read that require gradients."""
    with poutine.trace(param_only=True) as capture:
        out = run()
    leaves = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
    return out, [p for p in leaves if p.requires_grad]


def _with_chunk(elbo, comps, fn, draws: int | None = None):
    """``fn()`` with ``elbo`` set to evaluate the components ``comps`` (``None``: all), each with
    ``draws`` of its ``n`` draws (``None``: all); such a piece's objective is scaled by
    ``draws / n``, its share of the components' terms."""
    previous = elbo._components, elbo.num_particles, elbo._draw_fraction
    elbo._components = comps
    if draws is not None and draws != elbo.num_particles:
        elbo._draw_fraction = previous[2] * draws / elbo.num_particles
        elbo.num_particles = draws
    try:
        return fn()
    finally:
        elbo._components, elbo.num_particles, elbo._draw_fraction = previous


def chunk_plan(elbo, model, guide, args, kwargs, items, total, objective) -> tuple[int, int]:
    """``(components, draws)`` per chunk, measured once per model, guide, data shapes and
    gradient mode by evaluating ``objective()`` on 1 and 2 draws (antithetic pairs, with
    ``antithetic=True``) of one component (and
    backpropagating it when gradients are on), without touching ``.grad`` or the random
    stream. ``draws < n`` means one component at a time, its draws in pieces."""
    grad = torch.is_grad_enabled()
    first = torch.arange(1) if items is None else items[:1]

    unit = 2 if getattr(elbo, "antithetic", False) else 1  # antithetic draws come in pairs

    def probe(m: int) -> None:  # m units of draws (pairs when antithetic)
        with _forked():
            out, leaves = _param_leaves(lambda: _with_chunk(elbo, first, objective, m * unit))
            if grad and out.requires_grad and leaves:
                torch.autograd.grad(out.sum(), leaves, allow_unused=True)

    n = elbo.num_particles
    key = (id(model), id(guide), n, total, grad, shapes_key(args, kwargs))
    if items is not None:
        key = key + (tuple(items.tolist()),)
    if elbo.importance_weighted:
        key = key + ("siwae",)
    size, draws = elbo._planner.split(key, total, n // unit, probe)
    return size, draws * unit


def _chunks(items, total: int, size: int, draws: int, n: int) -> list:
    """``[(components or None, draws)]``: the chunks covering ``total`` components (``items``,
    or ``0..total-1``), component by component and, within a component, draw by draw."""
    if size >= total and draws >= n:
        return [(items, n)]
    ids = torch.arange(total) if items is None else items
    if draws >= n:
        return [(ids[a : a + size], n) for a in range(0, total, size)]
    return [(ids[i : i + 1], min(draws, n - t)) for i in range(total) for t in range(0, n, draws)]


def run_shares(elbo, model, guide, args, kwargs, evaluate) -> list:
    """``evaluate(comps, whole)`` for each chunk of the components under evaluation (all ``K``, or
    those of an enclosing ``only_components``), with ``elbo`` set to evaluate that chunk;
    ``whole`` says one chunk holds them all (``comps`` is then the enclosing selection). A
    chunk may hold some of one component's draws: ``elbo.num_particles`` is then that many
    during ``evaluate``, and :meth:`~pyro_mogflow.StratifiedELBO._objective` is scaled to the
    piece's share.
    """
    _, k = elbo._probe(model, guide, args, kwargs)
    outer = elbo._components
    items = None if outer is None else check_components(outer, k)
    total = k if items is None else items.numel()
    elbo._chunking = True
    try:
        size, draws = chunk_plan(
            elbo,
            model,
            guide,
            args,
            kwargs,
            items,
            total,
            lambda: elbo._objective(model, guide, args, kwargs),
        )
        chunks = _chunks(items, total, size, draws, elbo.num_particles)
        if len(chunks) == 1:
            return [evaluate(outer, True)]
        return [
            _with_chunk(elbo, comps, lambda c=comps: evaluate(c, False), m) for comps, m in chunks
        ]
    except _ComponentsChanged:  # raised by a guide run before any backward: K changed
        elbo._probed.pop((id(model), id(guide)), None)
    finally:
        elbo._chunking = False
    return run_shares(elbo, model, guide, args, kwargs, evaluate)


def loss(elbo, model, guide, args, kwargs) -> torch.Tensor:
    """The objective (ELBO or SIWAE bound), without gradients, chunk by chunk."""
    with torch.no_grad():
        if elbo.importance_weighted:
            return _siwae(elbo, model, guide, args, kwargs, backward=False)[0]
        parts = run_shares(
            elbo,
            model,
            guide,
            args,
            kwargs,
            lambda *_: elbo._objective(model, guide, args, kwargs),
        )
    return sum(parts[1:], parts[0])


def loss_and_grads(elbo, model, guide, args, kwargs) -> torch.Tensor:
    """The objective; each chunk's share is backpropagated (negated) as soon as it is built."""
    if elbo.importance_weighted:
        return _siwae(elbo, model, guide, args, kwargs, backward=True)[0]

    def evaluate(*_):
        share = elbo._objective(model, guide, args, kwargs)
        if share.requires_grad:
            (-share).backward(retain_graph=elbo.retain_graph)
        return share.detach()

    parts = run_shares(elbo, model, guide, args, kwargs, evaluate)
    return sum(parts[1:], parts[0])


def differentiable_loss(elbo, model, guide, args, kwargs) -> torch.Tensor:
    """The objective as a differentiable tensor; when chunked, each chunk's share is
    recomputed in the backward pass (``torch.utils.checkpoint``), with its random state."""
    if elbo.importance_weighted:
        value, surrogate = _siwae(elbo, model, guide, args, kwargs, backward=False, graph=True)
        return value + (surrogate - surrogate.detach())

    def evaluate(comps, whole):
        if whole or not torch.is_grad_enabled():
            return elbo._objective(model, guide, args, kwargs)
        return _checkpointed(elbo, comps, elbo.num_particles, model, guide, args, kwargs)

    parts = run_shares(elbo, model, guide, args, kwargs, evaluate)
    return sum(parts[1:], parts[0])


def _checkpointed(elbo, comps, draws, model, guide, args, kwargs) -> torch.Tensor:
    state = {}

    def objective():
        if "rng" not in state:
            state["rng"] = _rng_state()
            return elbo._objective(model, guide, args, kwargs)
        with _replayed(state["rng"]):
            return elbo._objective(model, guide, args, kwargs)

    def share(_):
        return _with_chunk(elbo, comps, objective, draws)

    dummy = torch.zeros((), requires_grad=True)
    return checkpoint(share, dummy, use_reentrant=False, preserve_rng_state=False)


def _siwae_terms(elbo, model, guide, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's ``a = log pi_k + log w_kt``, shape ``(m * n, *rest)``, and global share."""
    terms = elbo._terms(model, guide, args, kwargs)
    if terms.global_varies:
        raise ValueError(
            "importance_weighted=True with an amortized site needs every latent outside "
            "its plates to be fixed across draws; use the ELBO (importance_weighted=False)"
        )
    log_weights = terms.sample.log_weights
    m, n = terms.local.shape[:2]
    joint = (log_weights.unsqueeze(1) + terms.local).reshape((m * n,) + log_weights.shape[1:])
    return joint, elbo._draw_fraction * terms.global_.sum() / terms.total


def _siwae(elbo, model, guide, args, kwargs, backward: bool, graph: bool = False):
    """``(bound, surrogate)``: the SIWAE bound's value and, with ``backward`` or ``graph``, a
    term whose gradient is the bound's (backpropagated chunk by chunk when ``backward``)."""
    _, k = elbo._probe(model, guide, args, kwargs)
    n = elbo.num_particles
    grad = backward or graph

    def terms():
        return _siwae_terms(elbo, model, guide, args, kwargs)

    def objective():
        joint, share = terms()
        return joint.sum() + share

    elbo._chunking = True
    try:
        with torch.set_grad_enabled(grad):
            size, draws = chunk_plan(elbo, model, guide, args, kwargs, None, k, objective)
        chunks = _chunks(None, k, size, draws, n)
        states, joints, global_ = [], [], 0.0
        with torch.no_grad():
            for comps, m in chunks:
                states.append(_rng_state())
                joint, share = _with_chunk(elbo, comps, terms, m)
                joints.append(joint)
                global_ = global_ + share
        joint = torch.cat(joints, 0)
        bound = (torch.logsumexp(joint, 0) - math.log(n)).sum() + global_
        if not grad:
            return bound, None
        weights = torch.softmax(joint, 0).split([j.shape[0] for j in joints], 0)
        surrogate = bound.new_zeros(())
        for (comps, m), state, w in zip(chunks, states, weights):
            with _replayed(state):
                joint_c, share = _with_chunk(elbo, comps, terms, m)
            part = (w * joint_c).sum() + share
            if backward:
                if part.requires_grad:
                    (-part).backward(retain_graph=elbo.retain_graph)
                part = part.detach()
            surrogate = surrogate + part
        return bound, surrogate
    finally:
        elbo._chunking = False


def particles_and_base(elbo, model, guide, args, kwargs):
    """:meth:`~pyro_mogflow.StratifiedELBO.particles` without gradients, chunk by chunk (whole
    components, or pieces of one component's draws joined along ``n``), and the base points of
    the draws, shape ``(K, n, D)``."""
    from .stratified import StratifiedParticles

    def evaluate(*_):
        out = elbo._particles_once(model, guide, args, kwargs)
        return out, elbo.last_sample.base.reshape(out.latent.shape)

    n = elbo.num_particles
    with torch.no_grad():
        parts = run_shares(elbo, model, guide, args, kwargs, evaluate)
    rows, pending = [], []  # pending: pieces of one component's draws, joined along dim 1
    for part in parts:
        if part[0].log_ratio.shape[1] == n:
            rows.append(part)
            continue
        pending.append(part)
        if sum(p[0].log_ratio.shape[1] for p in pending) == n:
            log_ratio, latent, base = (
                torch.cat([p[0].log_ratio for p in pending], 1),
                torch.cat([p[0].latent for p in pending], 1),
                torch.cat([p[1] for p in pending], 1),
            )
            rows.append(((log_ratio, pending[0][0].log_weights, latent), base))
            pending = []
    cat = [torch.cat([r[0][i] for r in rows], 0) for i in range(3)]
    return StratifiedParticles(*cat), torch.cat([r[1] for r in rows], 0)
