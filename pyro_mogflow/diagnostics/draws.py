r"""Drawing from fitted guides and scoring each draw under the model, for the ArviZ export.

For one guide (one chain), ``_draw_chain`` draws :math:`z_s \sim q` in an outer ``pyro.plate``
over draws (or one at a time, unbatched, with ``batch_size=1``), runs the model conditioned on
the draws in batches that fit a memory budget and returns, per draw: the latent and deterministic
values, ``lp`` :math:`= \log p(x, z_s)`, :math:`\log q(z_s)` of the constrained draw, pointwise
log-likelihoods and log-priors, and fresh posterior-predictive draws of the observed sites.

An :class:`~pyro_mogflow.AutoMixtureFlow` is drawn from its exact mixture (component, base
point, flow, constraints), whatever estimator trained it; any other guide is traced under the
outer plate and :math:`\log q` is the guide trace's log density. ``_prototype`` reads the
model's sites, shapes and plates from one unbatched run.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_factor, site_is_subsample
from torch.distributions import biject_to

from ..distributions import full_mixture_log_prob, mixture_log_prob
from ..guides import AutoMixtureFlow

__all__: list[str] = []

_DRAWS_PLATE = "_pyro_mogflow_draws"


# ---------------------------------------------------------------------------- sites
@dataclasses.dataclass(frozen=True)
class _Site:
    """Shape facts about one model site, from an unbatched run of the model.

    ``shape`` is the site's value shape without any draws dimension; ``batch_ndim`` how many of
    its leading dimensions are batch (plate) dimensions; ``plates`` maps a plate's dim (a
    negative int) to ``(name, size)``.
    """

    name: str
    kind: str  # "latent" | "observed" | "deterministic" | "factor"
    shape: tuple
    batch_ndim: int
    plates: dict

    @property
    def batch_shape(self) -> tuple:
        return self.shape[: self.batch_ndim]


def _sites_of(trace, max_plate_nesting: int) -> dict[str, _Site]:
    sites = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        plates = {}
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None:
                plates[frame.dim] = (frame.name, frame.size)
        infer = site["infer"] or {}
        if infer.get("_deterministic"):
            kind, shape = "deterministic", tuple(site["value"].shape)
            batch_ndim = min(len(shape), max_plate_nesting)
        elif site_is_factor(site) or (site["is_observed"] and infer.get("is_auxiliary")):
            kind, shape, batch_ndim = "factor", (), 0
        elif site["is_observed"]:
            fn = site["fn"]
            kind, shape = "observed", tuple(fn.batch_shape + fn.event_shape)
            batch_ndim = len(fn.batch_shape)
        else:
            kind, shape = "latent", tuple(site["value"].shape)
            batch_ndim = len(shape) - site["fn"].event_dim
        sites[name] = _Site(name, kind, shape, max(batch_ndim, 0), plates)
    return sites


def _max_plate_nesting(trace) -> int:
    dims = [
        -frame.dim
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return max(dims, default=0)


def _check_no_subsampling(trace) -> None:
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.size != frame.full_size:
                raise ValueError(
                    f"site {name!r} lies in plate {frame.name!r} subsampled to {frame.size} of "
                    f"{frame.full_size}; importance weights and pointwise log-likelihoods need "
                    "the full data. Call the model without subsample_size for the export."
                )


# ------------------------------------------------------------------------ drawing
class _ResampleObserved(Messenger):
    """Draws fresh values at the named observed sites instead of using the data."""

    def __init__(self, names):
        super().__init__()
        self.names = frozenset(names)

    def _pyro_sample(self, msg):
        if msg["name"] in self.names and msg["is_observed"]:
            msg["is_observed"] = False
            msg["value"] = None
            msg["done"] = False


def _per_draw(t, n: int, max_plate_nesting: int | None) -> torch.Tensor:
    """Sum a log-density term to one value per draw, shape ``(n,)``.

    Under the outer draws plate (``max_plate_nesting`` an int) a term that depends on the draw
    has at least ``max_plate_nesting + 1`` dims and the draws dim first; without it (``None``,
    one unbatched draw) the whole term belongs to the single draw.
    """
    if not torch.is_tensor(t):
        return torch.full((n,), float(t))
    if max_plate_nesting is None:
        return t.sum().reshape(1)
    if t.dim() < max_plate_nesting + 1:  # does not depend on the draw
        return t.sum().expand(n)
    return t.reshape(t.shape[0], -1).sum(-1).expand(n)


def _to_draws(value: torch.Tensor, shape: tuple, n: int, name: str) -> torch.Tensor:
    """A batched value laid out as ``(n, 1, ..., 1, *shape)`` -> ``(n, *shape)``."""
    numel = math.prod(shape)
    vs = tuple(value.shape)
    trailing_ok = len(shape) == 0 or vs[len(vs) - len(shape) :] == shape
    middle = vs[1 : len(vs) - len(shape)] if len(vs) > len(shape) else None
    if middle is not None and vs[0] == n and trailing_ok and all(m == 1 for m in middle):
        return value.reshape((n,) + shape)
    if n == 1 and value.numel() == numel:
        return value.reshape((1,) + shape)
    if vs == shape:  # constant across draws
        return value.unsqueeze(0).expand((n,) + shape)
    raise ValueError(
        f"site {name!r}: a batch of {n} draws has shape {vs}, which is not {n} x {shape} "
        "with padding dims; the model may not vectorize over an outer plate (e.g. it stacks "
        "tensors along dim 0 or reads .item()). Pass batch_size=1 to draw one at a time."
    )


def _numpy(t: torch.Tensor) -> np.ndarray:
    return np.array(t.detach().cpu().numpy(), copy=True)


def _mixture_flow_draws(guide: AutoMixtureFlow, n: int, max_plate_nesting: int | None):
    """Exact draws of an AutoMixtureFlow: component, base point, flow, constraints; and log q.

    ``max_plate_nesting=None`` draws one point laid out unbatched (the model's own shapes).
    """
    logits = guide.logits.detach()
    locs = guide.locs.detach()
    component = torch.distributions.Categorical(logits=logits).sample((n,))
    eps = torch.randn((n, locs.shape[-1]), dtype=locs.dtype, device=locs.device)
    if guide.covariance == "full":
        tril = guide.scale_tril.detach().tril()
        z0 = locs[component] + (tril[component] @ eps.unsqueeze(-1)).squeeze(-1)
        log_q = full_mixture_log_prob(z0, logits, locs, tril)
    else:
        scales = guide.scales.detach()
        z0 = locs[component] + scales[component] * eps
        log_q = mixture_log_prob(z0, logits, locs, scales)
    z = z0
    if guide.flow is not None:
        z = guide.flow(z0)
        log_q = log_q - guide.flow.log_abs_det_jacobian(z0, z)
    if max_plate_nesting is None:
        latent = z.reshape(z.shape[-1])
    else:
        latent = z.reshape((n,) + (1,) * max_plate_nesting + (z.shape[-1],))
    values = {}
    for site, unconstrained in guide._unpack_latent(latent):
        transform = biject_to(site["fn"].support)
        value = transform(unconstrained)
        log_q = log_q - _per_draw(
            transform.log_abs_det_jacobian(unconstrained, value), n, max_plate_nesting
        )
        values[site["name"]] = value
    return values, log_q, component


def _guide_draws(guide, n, max_plate_nesting, args, kwargs):
    """Draws of any guide under an outer plate, with log q = the guide trace's log density."""
    with _vectorized(n, max_plate_nesting):
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    log_q = None
    values = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if (site["infer"] or {}).get("_deterministic"):
            continue
        term = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        term = _per_draw(scale_and_mask(term, site["scale"], site["mask"]), n, max_plate_nesting)
        log_q = term if log_q is None else log_q + term
        values[name] = site["value"]
    if log_q is None:
        raise ValueError("the guide drew no sample site; it has nothing to export")
    _check_has_density(guide, trace)
    return values, log_q


def _is_point_mass(fn) -> bool:
    while not isinstance(fn, dist.Delta) and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


def _check_has_density(guide, trace) -> None:
    """Refuse a guide that puts point masses on the latent sites (``AutoDelta``, an unfitted
    ``AutoLaplaceApproximation``): its "log q" is 0, so k-hat, ESS and the ELBO would be
    meaningless. Pyro's autoguides also draw sites as ``Delta`` when they are a deterministic
    function of an auxiliary site (``AutoNormal``, ``AutoMultivariateNormal``); those carry
    the density of that site and pass."""
    sites = [
        (name, site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]
    if any(not _is_point_mass(site["fn"]) for _, site in sites):
        return
    names = [name for name, _ in sites]
    raise ValueError(
        f"the guide {type(guide).__name__} has no density: it puts a point mass (Delta) on "
        f"every latent site ({', '.join(map(repr, names[:5]))}{', ...' if len(names) > 5 else ''}"
        "), so log q is undefined and importance diagnostics (Pareto k-hat, ESS, ELBO, "
        "evidence) would be meaningless. Use a guide with a density (AutoNormal, "
        "AutoMultivariateNormal, AutoMixtureFlow), or for AutoLaplaceApproximation its "
        "laplace_approximation()."
    )


@dataclasses.dataclass
class _Chain:
    values: dict
    log_lik: dict
    log_prior: dict
    predictive: dict
    lp: np.ndarray
    lp_approx: np.ndarray
    component: np.ndarray | None


@contextmanager
def _vectorized(n: int, mpn: int | None):
    """The outer plate over draws; ``mpn=None`` runs one draw with no plate at all."""
    if mpn is None:
        yield
        return
    try:
        with pyro.plate(_DRAWS_PLATE, n, dim=-(mpn + 1)):
            yield
    except (RuntimeError, ValueError, IndexError) as e:
        raise RuntimeError(
            f"running the model or guide on a batch of {n} draws in an outer plate failed: "
            f"{e}\nIf the model does not vectorize (e.g. it computes x @ w on a latent site or "
            "calls .item()), pass batch_size=1 to draw one at a time without a plate."
        ) from e


def _draw_guide(guide, n, mpn, args, kwargs) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
    """``n`` draws of one guide: ``(values, log q, component or None)`` (``mpn=None``: one
    draw, unbatched)."""
    if isinstance(guide, AutoMixtureFlow):
        return _mixture_flow_draws(guide, n, mpn)
    return (*_guide_draws(guide, n, mpn, args, kwargs), None)


def _slice_draws(drawn, n: int, mpn: int, start: int, stop: int):
    """Draws ``start:stop`` of the ``n`` batched guide draws ``drawn`` (values whose first dim
    is not the draws dim are constant across draws and kept whole)."""
    values, log_q, component = drawn

    def cut(v):
        return v[start:stop] if v.dim() > mpn and v.shape[0] == n else v

    return (
        {k: cut(v) for k, v in values.items()},
        log_q[start:stop],
        None if component is None else component[start:stop],
    )


def _draw_batch(model, args, kwargs, drawn, n, sites, mpn, want):
    """Everything the groups need from ``n`` guide draws ``drawn`` (``mpn=None``: unbatched)."""
    latent_names = [s.name for s in sites.values() if s.kind == "latent"]
    observed = [s.name for s in sites.values() if s.kind == "observed"]
    values, log_q, component = drawn
    data = {k: v for k, v in values.items() if k in sites and sites[k].kind == "latent"}
    with _vectorized(n, mpn):
        trace = poutine.trace(poutine.condition(model, data=data)).get_trace(*args, **kwargs)
    lp = torch.zeros(n, dtype=log_q.dtype, device=log_q.device)
    out = {"values": {}, "log_lik": {}, "log_prior": {}, "predictive": {}}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or name not in sites:
            continue
        info = sites[name]
        if info.kind == "deterministic":
            out["values"][name] = _to_draws(site["value"], info.shape, n, name)
            continue
        term = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        lp = lp + _per_draw(scale_and_mask(term, site["scale"], site["mask"]), n, mpn)
        if info.kind == "latent":
            out["values"][name] = _to_draws(site["value"], info.shape, n, name)
            if name not in data:  # not guided: drawn from its prior, which is then part of q
                log_q = log_q + _per_draw(scale_and_mask(term, site["scale"], site["mask"]), n, mpn)
            if want["log_prior"]:
                masked = scale_and_mask(term, 1.0, site["mask"])
                masked = masked.expand(torch.broadcast_shapes(masked.shape, term.shape))
                out["log_prior"][name] = _to_draws(masked, info.batch_shape, n, name)
        elif info.kind == "observed" and want["log_likelihood"]:
            masked = scale_and_mask(term, 1.0, site["mask"])
            masked = masked.expand(torch.broadcast_shapes(masked.shape, term.shape))
            out["log_lik"][name] = _to_draws(masked, info.batch_shape, n, name)
    if want["posterior_predictive"] and observed:
        fixed = {k: trace.nodes[k]["value"] for k in latent_names if k in trace.nodes}
        resampled = _ResampleObserved(observed)(poutine.condition(model, data=fixed))
        with _vectorized(n, mpn):
            ptrace = poutine.trace(resampled).get_trace(*args, **kwargs)
        for name in observed:
            out["predictive"][name] = _to_draws(
                ptrace.nodes[name]["value"], sites[name].shape, n, name
            )
    return _Chain(
        values={k: _numpy(v) for k, v in out["values"].items()},
        log_lik={k: _numpy(v) for k, v in out["log_lik"].items()},
        log_prior={k: _numpy(v) for k, v in out["log_prior"].items()},
        predictive={k: _numpy(v) for k, v in out["predictive"].items()},
        lp=_numpy(lp),
        lp_approx=_numpy(log_q),
        component=None if component is None else _numpy(component),
    )


def _draw_chain(guide, model, args, kwargs, num_samples, batch_size, sites, mpn, want, planner):
    """One chain of ``num_samples`` draws. The guide is drawn once for all of them (its draws
    are the ``posterior`` group's size); the model then runs ``batch_size`` draws at a time,
    or, with ``batch_size=None``, in batches that ``planner`` (a
    :class:`~pyro_mogflow.infer.memory.ChunkPlanner`) sizes to its memory budget from the
    measured cost of one and two draws. The model's evaluation of a draw takes no random
    numbers (except the posterior predictive and latent sites the guide leaves out), so the
    batch size does not change the draws, ``lp``, ``lp_approx`` or the log-likelihoods."""
    if batch_size == 1:  # each draw alone, unbatched
        parts = [
            _draw_batch(
                model, args, kwargs, _draw_guide(guide, 1, None, args, kwargs), 1, sites, None, want
            )
            for _ in range(num_samples)
        ]
    else:
        drawn = _draw_guide(guide, num_samples, mpn, args, kwargs)

        def evaluate(start: int, stop: int):
            piece = _slice_draws(drawn, num_samples, mpn, start, stop)
            return _draw_batch(model, args, kwargs, piece, stop - start, sites, mpn, want)

        if batch_size is None:
            parts = planner.run("chain", num_samples, evaluate)
        else:
            parts = [
                evaluate(a, min(num_samples, a + batch_size))
                for a in range(0, num_samples, batch_size)
            ]
        del drawn
    if len(parts) == 1:
        return parts[0]

    def cat(attr):
        first = getattr(parts[0], attr)
        if first is None:
            return None
        if isinstance(first, dict):
            return {k: np.concatenate([getattr(p, attr)[k] for p in parts]) for k in first}
        return np.concatenate([getattr(p, attr) for p in parts])

    return _Chain(*(cat(f.name) for f in dataclasses.fields(_Chain)))


# ----------------------------------------------------------------------- prototypes
@dataclasses.dataclass
class _Prototype:
    sites: dict
    max_plate_nesting: int
    param_names: frozenset
    observed_values: dict
    #: observed site -> bool array of its batch shape, False where ``obs_mask`` / ``poutine.mask``
    #: hides an observation (only sites with such a mask)
    observed_masks: dict = dataclasses.field(default_factory=dict)


def _prototype(guide, model, args, kwargs, max_plate_nesting) -> _Prototype:
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    _check_no_subsampling(model_trace)
    mpn = _max_plate_nesting(model_trace)
    if max_plate_nesting is not None:
        if max_plate_nesting < mpn:
            raise ValueError(
                f"max_plate_nesting={max_plate_nesting} is smaller than the model's plate nesting "
                f"({mpn}); pass None to use the model's"
            )
        mpn = max_plate_nesting
    sites = _sites_of(model_trace, mpn)
    latent = [s for s in sites.values() if s.kind == "latent"]
    if not latent:
        raise ValueError("the model has no latent sample site; there is no posterior to export")
    observed_values, observed_masks = {}, {}
    for name, info in sites.items():
        if info.kind == "observed":
            value = model_trace.nodes[name]["value"]
            observed_values[name] = _numpy(torch.broadcast_to(value, info.shape))
            mask = model_trace.nodes[name]["mask"]
            if mask is not None and mask is not True:
                mask = torch.as_tensor(mask, dtype=torch.bool, device=value.device)
                observed_masks[name] = _numpy(torch.broadcast_to(mask, info.batch_shape))
    params = frozenset(n for n, s in guide_trace.nodes.items() if s["type"] == "param")
    return _Prototype(sites, mpn, params, observed_values, observed_masks)


@contextmanager
def _seeded(seed):
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
