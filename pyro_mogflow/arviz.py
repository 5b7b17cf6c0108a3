r"""ArviZ export of variational fits (:func:`to_inference_data`) and PSIS-LOO for VI.

``az.from_pyro`` accepts only MCMC results, and ArviZ >= 1 has no Pyro converter at all. This
module builds the groups from draws of *any* Pyro guide (every
:class:`~pyro.infer.autoguide.AutoGuide`, an :class:`~pyro_mogflow.AutoMixtureFlow`, or a guide
function) and the model:

* ``posterior`` -- latent and ``pyro.deterministic`` sites in the constrained space, the guide's
  auxiliary sites removed and padding dimensions squeezed;
* ``posterior_predictive`` -- fresh draws of every observed site given each posterior draw;
* ``log_likelihood`` -- pointwise :math:`\log p(y_i \mid z)` per observed site (unscaled, masked
  elements set to 0);
* ``observed_data``;
* ``sample_stats`` -- ``lp`` :math:`= \log p(x, z)`, ``lp_approx`` :math:`= \log q(z)` and
  ``log_weight`` = ``lp - lp_approx`` (the importance weight of each draw), plus ``component``,
  the mixture component each :class:`~pyro_mogflow.AutoMixtureFlow` draw came from;
* ``log_prior`` (optional) -- :math:`\log p(z)` per latent site.

Independent fits become chains, so ArviZ's :math:`\hat R` compares runs (see
:func:`~pyro_mogflow.fit_independent` and :func:`~pyro_mogflow.vi_diagnostics`). ArviZ itself is
imported only inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_factor, site_is_subsample
from scipy.special import logsumexp
from torch.distributions import biject_to

from ._validation import check_bool, check_int
from ._version import __version__
from .autoguide import AutoMixtureFlow
from .diagnostics import _group, good_k_threshold, psis
from .distributions import mixture_log_prob

__all__ = ["to_inference_data", "vi_loo"]

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


def _dim_plan(site: _Site, dims_override) -> list:
    """For each axis of the site's natural shape: its dim name, or None to squeeze it."""
    plan = []
    auto = 0
    n = len(site.shape)
    for j, size in enumerate(site.shape):
        plate = site.plates.get(j - site.batch_ndim) if j < site.batch_ndim else None
        if plate is not None and plate[1] == size:
            plan.append(plate[0])
        elif j < site.batch_ndim and size == 1:
            plan.append(None)
        else:
            plan.append(f"{site.name}_dim_{auto}")
            auto += 1
    if dims_override is not None:
        kept = [j for j in range(n) if plan[j] is not None]
        if len(dims_override) != len(kept):
            shape = tuple(site.shape[j] for j in kept)
            raise ValueError(
                f"dims[{site.name!r}] must name {len(kept)} dimension(s) for a value of shape "
                f"{shape}, got {list(dims_override)}"
            )
        for j, name in zip(kept, dims_override):
            plan[j] = str(name)
    return plan


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
    scales = guide.scales.detach()
    component = torch.distributions.Categorical(logits=logits).sample((n,))
    eps = torch.randn((n, locs.shape[-1]), dtype=locs.dtype, device=locs.device)
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
    return values, log_q


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


def _draw_batch(guide, model, args, kwargs, n, sites, mpn, want):
    """``n`` draws of one guide with everything the groups need (``mpn=None``: unbatched)."""
    latent_names = [s.name for s in sites.values() if s.kind == "latent"]
    observed = [s.name for s in sites.values() if s.kind == "observed"]
    component = None
    if isinstance(guide, AutoMixtureFlow):
        values, log_q, component = _mixture_flow_draws(guide, n, mpn)
    else:
        values, log_q = _guide_draws(guide, n, mpn, args, kwargs)
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


def _draw_chain(guide, model, args, kwargs, num_samples, batch_size, sites, mpn, want):
    parts = []
    batched_mpn = None if batch_size == 1 else mpn
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        parts.append(_draw_batch(guide, model, args, kwargs, n, sites, batched_mpn, want))
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
    observed_values = {}
    for name, info in sites.items():
        if info.kind == "observed":
            value = model_trace.nodes[name]["value"]
            observed_values[name] = _numpy(torch.broadcast_to(value, info.shape))
    params = frozenset(n for n, s in guide_trace.nodes.items() if s["type"] == "param")
    return _Prototype(sites, mpn, params, observed_values)


@contextmanager
def _seeded(seed):
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ------------------------------------------------------------------------ validation
def _collect_guides(guide, guides) -> list:
    if guides is not None and guide is not None:
        raise ValueError(
            "pass either guide (one guide, or a sequence of independently fitted guides) or "
            "guides=[...], not both"
        )
    if guides is None:
        if guide is None:
            raise ValueError("guide is required (or guides=[g1, g2, ...]), got None")
        guides = guide if _is_guide_sequence(guide) else [guide]
    elif not _is_guide_sequence(guides):
        raise TypeError(
            f"guides must be a sequence of guides (e.g. a list), got {type(guides).__name__}"
        )
    guides = list(guides)
    if not guides:
        raise ValueError("guides must hold at least one guide, got an empty sequence")
    for i, g in enumerate(guides):
        if not callable(g):
            raise TypeError(f"guides[{i}] must be a callable Pyro guide, got {type(g).__name__}")
        if getattr(g, "prototype_trace", "") is None:
            raise ValueError(
                f"guides[{i}] ({type(g).__name__}) has not been run yet, so it has no fitted "
                "parameters: train it with SVI (or call it once) before exporting"
            )
    return guides


def _is_guide_sequence(obj) -> bool:
    return isinstance(obj, Sequence) and not isinstance(obj, (str, torch.nn.Module))


def _check_coords_dims(coords, dims):
    if coords is not None:
        if not isinstance(coords, Mapping):
            raise TypeError(f"coords must be a dict dim -> values, got {type(coords).__name__}")
    if dims is not None:
        if not isinstance(dims, Mapping):
            raise TypeError(f"dims must be a dict variable -> list of dims, got {type(dims)}")
        for var, names in dims.items():
            if isinstance(names, str) or not isinstance(names, Sequence):
                raise TypeError(
                    f"dims[{var!r}] must be a list of dimension names, got {type(names).__name__}"
                )


# --------------------------------------------------------------------------- groups
def _attrs(guides: list) -> dict:
    return {
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "inference_library": "pyro",
        "inference_library_version": str(pyro.__version__),
        "creation_library": "pyro_mogflow",
        "creation_library_version": str(__version__),
        "posterior_approximation": "variational",
        "posterior_note": (
            "draws from a variational approximation q, not from the posterior; "
            "sample_stats.log_weight = lp - lp_approx are the importance weights p/q"
        ),
        "guide": ", ".join(type(g).__name__ for g in guides),
        "num_runs": len(guides),
    }


def _build_groups(chains, proto: _Prototype, coords, dims, guides, want) -> dict:
    """The groups as ``xarray.Dataset`` s: the part shared by every ArviZ version."""
    import xarray as xr

    coords = dict(coords or {})
    dims = dict(dims or {})
    runs, draws = len(chains), chains[0].lp.shape[0]
    base_coords = {"chain": np.arange(runs), "draw": np.arange(draws)}
    attrs = _attrs(guides)
    plans = {name: _dim_plan(info, dims.get(name)) for name, info in proto.sites.items()}

    def variable(name, arrays, shape_axes):
        """Stack per-chain arrays, drop squeezed axes, return (dims, array)."""
        plan = plans[name][:shape_axes]
        stacked = np.stack(arrays)  # (chain, draw, *shape): a fresh copy
        squeeze = tuple(2 + j for j, d in enumerate(plan) if d is None)
        stacked = np.squeeze(stacked, axis=squeeze) if squeeze else stacked
        return ("chain", "draw", *[d for d in plan if d is not None]), stacked

    def dataset(variables: dict, sample_dims=True):
        used = {d for dims_, _ in variables.values() for d in dims_}
        ds_coords = dict(base_coords) if sample_dims else {}
        for dim, values in coords.items():
            if dim in used:
                ds_coords[dim] = values
        for dim in used:
            sizes = {
                a.shape[i] for d_, a in variables.values() for i, d in enumerate(d_) if d == dim
            }
            if len(sizes) > 1:
                raise ValueError(
                    f"dimension {dim!r} has different sizes {sorted(sizes)} in different "
                    "variables; rename one through dims="
                )
            if dim in ds_coords and len(ds_coords[dim]) != sizes.pop():
                raise ValueError(
                    f"coords[{dim!r}] has {len(ds_coords[dim])} values, but the dimension has "
                    f"size {[a.shape for _, a in variables.values()]}"
                )
        return xr.Dataset(
            {k: (list(d), a) for k, (d, a) in variables.items()}, coords=ds_coords, attrs=attrs
        )

    groups = {}
    posterior = {}
    for name, info in proto.sites.items():
        if info.kind in ("latent", "deterministic"):
            posterior[name] = variable(name, [c.values[name] for c in chains], len(info.shape))
    groups["posterior"] = dataset(posterior)
    observed = [name for name, info in proto.sites.items() if info.kind == "observed"]
    if want["posterior_predictive"] and observed:
        groups["posterior_predictive"] = dataset(
            {
                n: variable(n, [c.predictive[n] for c in chains], len(proto.sites[n].shape))
                for n in observed
            }
        )
    if want["log_likelihood"] and observed:
        groups["log_likelihood"] = dataset(
            {
                n: variable(n, [c.log_lik[n] for c in chains], proto.sites[n].batch_ndim)
                for n in observed
            }
        )
    if want["log_prior"]:
        groups["log_prior"] = dataset(
            {
                n: variable(n, [c.log_prior[n] for c in chains], proto.sites[n].batch_ndim)
                for n, info in proto.sites.items()
                if info.kind == "latent"
            }
        )
    stats = {
        "lp": (("chain", "draw"), np.stack([c.lp for c in chains])),
        "lp_approx": (("chain", "draw"), np.stack([c.lp_approx for c in chains])),
    }
    stats["log_weight"] = (("chain", "draw"), stats["lp"][1] - stats["lp_approx"][1])
    if all(c.component is not None for c in chains):
        stats["component"] = (("chain", "draw"), np.stack([c.component for c in chains]))
    groups["sample_stats"] = dataset(stats)
    components = [g.num_components for g in guides if isinstance(g, AutoMixtureFlow)]
    if "component" in stats and components:
        groups["sample_stats"].attrs["num_components"] = int(max(components))
    if observed:
        obs_vars = {}
        for n in observed:
            plan = plans[n]
            array = proto.observed_values[n]
            squeeze = tuple(j for j, d in enumerate(plan) if d is None)
            array = np.squeeze(array, axis=squeeze) if squeeze else array
            obs_vars[n] = (tuple(d for d in plan if d is not None), np.array(array, copy=True))
        groups["observed_data"] = dataset(obs_vars, sample_dims=False)
    return groups


def _as_datatree(groups: dict):
    """Package the groups as an ``xarray.DataTree`` (the ArviZ >= 1 container)."""
    import xarray as xr

    return xr.DataTree.from_dict({f"/{name}": ds for name, ds in groups.items()})


def _as_inference_data(groups: dict):
    import arviz as az

    return az.InferenceData(**groups)


# ----------------------------------------------------------------------- public API
def to_inference_data(
    guide=None,
    model=None,
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    num_samples: int = 1000,
    guides=None,
    posterior_predictive: bool = True,
    log_likelihood: bool = True,
    log_prior: bool = False,
    coords: dict | None = None,
    dims: dict | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    max_plate_nesting: int | None = None,
):
    r"""Draw from fitted Pyro guides and return ArviZ groups for a variational posterior.

    Each guide (one independent fit) becomes one chain of ``num_samples`` draws
    :math:`z_s \sim q`. The model is run conditioned on each draw, giving

    .. math::
        \texttt{lp} = \log p(x, z_s), \qquad \texttt{lp\_approx} = \log q(z_s), \qquad
        \texttt{log\_weight} = \texttt{lp} - \texttt{lp\_approx},

    where :math:`\log q` is the density of the *constrained* draw, the parameterisation of
    :math:`\log p`: for an AutoGuide it is the guide trace's log density, which counts the
    auxiliary (unconstrained) site and the Jacobian of every constraining transform, so
    ``exp(log_weight)`` is the importance weight :math:`p(x, z)/q(z)` and its average estimates
    the evidence :math:`p(x)`. Latent sites the guide leaves out are drawn from their prior,
    which then counts in both ``lp`` and ``lp_approx``. ``lp`` and ``lp_approx`` include any
    ``poutine.scale`` factors, as Pyro's ELBO does; ``log_likelihood`` does not.

    For an :class:`~pyro_mogflow.AutoMixtureFlow` the draws come from the exact mixture,
    whatever estimator trained it (a relaxed sample is a training device, not the
    approximation): component :math:`k \sim \operatorname{Cat}(\operatorname{softmax}
    (\text{logits}))`, :math:`z_0 = \mu_k + \sigma_k \odot \epsilon`, pushed through the flow
    and the constraints; ``sample_stats.component`` records :math:`k`.

    Draws are evaluated ``batch_size`` at a time in an outer ``pyro.plate`` (as
    ``Predictive(parallel=True)`` does), so the model must annotate its batch dims with plates;
    with ``batch_size=1`` each draw runs alone, without that plate, in the model's own shapes
    (slower, but any model works).

    Shapes: ``posterior`` variables are ``(chain, draw, *site_shape)`` with padding dims of
    size 1 (those that are no plate of the site) squeezed; dims are named after plates, others
    ``{site}_dim_{i}``. ``log_likelihood`` and ``log_prior`` variables are
    ``(chain, draw, *batch_shape)``. ``sample_stats`` variables are ``(chain, draw)``.
    Every array is a fresh copy: nothing refers to model data or guide parameters.

    :param guide: a fitted Pyro guide, or a sequence of independently fitted guides of the
        same model (an :class:`~pyro_mogflow.IndependentFits` is one).
    :param callable model: the Pyro model the guide(s) were fitted to.
    :param tuple model_args: positional arguments for the model and guide.
    :param dict model_kwargs: keyword arguments for the model and guide.
    :param int num_samples: draws per chain (default 1000).
    :param guides: alternatively, the sequence of guides; each becomes a chain.
    :param bool posterior_predictive: add ``posterior_predictive`` (default True).
    :param bool log_likelihood: add pointwise ``log_likelihood`` (default True).
    :param bool log_prior: add ``log_prior`` per latent site (default False).
    :param dict coords: ``{dim: values}`` coordinates for named dims.
    :param dict dims: ``{variable: [dim names]}`` for the kept (non-squeezed) dims of a site.
    :param seed: seed for the draws (``None``: the global random state). A seed does not
        change the global random state.
    :param batch_size: draws per model evaluation (default: all at once); 1 runs each draw
        alone, without an outer plate, for models that do not vectorize.
    :param max_plate_nesting: the model's plate nesting (default: read from one run).
    :return: ``arviz.InferenceData`` with ArviZ < 1; an ``xarray.DataTree`` with ArviZ >= 1.
        Attributes mark it as a variational approximation (``posterior_approximation``).

    Example::

        idata = to_inference_data(guide, model, model_args=(x, y), num_samples=2000, seed=0)
        az.plot_pair(idata); print(vi_diagnostics(idata))
    """
    guides_list = _collect_guides(guide, guides)
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
    if not isinstance(model_args, (tuple, list)):
        raise TypeError(f"model_args must be a tuple, got {type(model_args).__name__}")
    if model_kwargs is None:
        model_kwargs = {}
    if not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
    num_samples = check_int("num_samples", num_samples, 1)
    batch_size = check_int("batch_size", batch_size, 1, allow_none=True) or num_samples
    max_plate_nesting = check_int("max_plate_nesting", max_plate_nesting, 0, allow_none=True)
    if seed is not None:
        check_int("seed", seed, 0)
    want = {
        "posterior_predictive": check_bool("posterior_predictive", posterior_predictive),
        "log_likelihood": check_bool("log_likelihood", log_likelihood),
        "log_prior": check_bool("log_prior", log_prior),
    }
    _check_coords_dims(coords, dims)
    try:
        import arviz  # noqa: F401
    except ImportError as e:  # pragma: no cover - arviz is a dependency
        raise ImportError("to_inference_data needs arviz: pip install arviz") from e

    args, kwargs = tuple(model_args), dict(model_kwargs)
    _check_distinct_names(guides_list)
    with torch.no_grad(), _seeded(seed):
        protos = [_prototype(g, model, args, kwargs, max_plate_nesting) for g in guides_list]
        _check_same_model(protos)
        _check_disjoint_params(guides_list, protos)
        proto = protos[0]
        chains = [
            _draw_chain(
                g,
                model,
                args,
                kwargs,
                num_samples,
                batch_size,
                proto.sites,
                proto.max_plate_nesting,
                want,
            )
            for g in guides_list
        ]
    groups = _build_groups(chains, proto, coords, dims, guides_list, want)
    if _arviz_major() >= 1:
        return _as_datatree(groups)
    return _as_inference_data(groups)


def _arviz_major() -> int:
    from .diagnostics import _arviz_major as major

    return major()


def _check_same_model(protos) -> None:
    first = {n: (s.kind, s.shape) for n, s in protos[0].sites.items()}
    for i, p in enumerate(protos[1:], start=1):
        other = {n: (s.kind, s.shape) for n, s in p.sites.items()}
        if other != first:
            raise ValueError(
                f"guides[{i}] sees different model sites than guides[0] ({sorted(other)} vs "
                f"{sorted(first)}); every chain must come from a fit of the same model and data"
            )


_SHARED_PARAMS_ADVICE = (
    "so they are one fit, not independent runs. Fit each run with "
    "pyro_mogflow.fit_independent (which gives each guide its own names) or use "
    "AutoMixtureFlow (which claims a free name); guides fitted under "
    "pyro.settings.context(module_local_params=True) can be exported under that setting too."
)


def _check_distinct_names(guides) -> None:
    """Before any guide runs: two PyroModule guides with one name share the param store."""
    if len(guides) < 2 or pyro.settings.get("module_local_params"):
        return
    seen: dict[str, int] = {}
    for i, g in enumerate(guides):
        name = getattr(g, "_pyro_name", None) if isinstance(g, torch.nn.Module) else None
        if not name:
            continue
        if name in seen and guides[seen[name]] is not g:
            raise ValueError(
                f"guides[{seen[name]}] and guides[{i}] are both named {name!r} in Pyro's global "
                f"param store, {_SHARED_PARAMS_ADVICE}"
            )
        if name in seen:
            raise ValueError(f"guides[{seen[name]}] and guides[{i}] are the same guide")
        seen[name] = i


def _check_disjoint_params(guides, protos) -> None:
    """After one run of each guide: no parameter read by two guides (function guides too)."""
    if len(guides) < 2 or pyro.settings.get("module_local_params"):
        return
    seen: dict[str, int] = {}
    for i, p in enumerate(protos):
        for name in p.param_names:
            if name in seen:
                raise ValueError(
                    f"guides[{seen[name]}] and guides[{i}] both read parameter {name!r} from "
                    f"Pyro's global param store, {_SHARED_PARAMS_ADVICE}"
                )
            seen[name] = i


def vi_loo(data, *, var_name: str | None = None, pointwise: bool = True):
    r"""PSIS-LOO for a variational fit, with the approximate-posterior correction.

    The draws come from :math:`q`, not from the posterior, so the leave-one-out importance
    ratios carry the correction :math:`p/q` (Magnusson et al. 2019):

    .. math::
        r_{is} \propto \frac{p(z_s \mid y_{-i})}{q(z_s)} \propto
        \frac{p(y, z_s)}{q(z_s)\, p(y_i \mid z_s)}, \qquad
        \widehat{\mathrm{elpd}}_i = \log \sum_s \tilde w_{is}\, p(y_i \mid z_s),

    with :math:`\tilde w_{i\cdot}` the Pareto-smoothed normalised ratios of observation
    :math:`i`. Each :math:`\hat k_i` then also reflects how well :math:`q` matches the
    posterior. ``p_loo`` is :math:`\sum_i \log \sum_s \tilde w_s p(y_i \mid z_s) -
    \widehat{\mathrm{elpd}}`, with :math:`\tilde w` the smoothed full-data weights
    :math:`p/q`. All chains are pooled (each draw weighted by its own run's :math:`p/q`).

    Do not call ``az.loo`` on a variational export: it would treat the draws of :math:`q` as
    posterior draws.

    :param data: the ``InferenceData`` / ``DataTree`` of :func:`to_inference_data` (it needs
        ``log_likelihood`` and ``sample_stats``).
    :param str var_name: the observed site to use when the model has several.
    :param bool pointwise: keep ``loo_i`` and ``pareto_k`` per observation (default True;
        needed by ``az.plot_khat`` and ``az.compare``).
    :return: ArviZ's ``ELPDData`` (kind ``loo``), usable with ``az.compare`` and
        ``az.plot_khat``.

    Reference: M. Magnusson, M. Riis Andersen, J. Jonasson, A. Vehtari, *Bayesian Leave-One-Out
    Cross-Validation for Large Data*, ICML 2019.
    """
    if var_name is not None and not isinstance(var_name, str):
        raise TypeError(f"var_name must be a str or None, got {type(var_name).__name__}")
    check_bool("pointwise", pointwise)
    log_lik_group = _group(data, "log_likelihood")
    stats = _group(data, "sample_stats")
    if log_lik_group is None or not len(log_lik_group.data_vars):
        raise ValueError(
            "data has no log_likelihood group; export with to_inference_data(..., "
            "log_likelihood=True) from a model with observed sites"
        )
    if stats is None or "lp" not in stats or "lp_approx" not in stats:
        raise ValueError(
            "data has no sample_stats.lp / lp_approx; make it with pyro_mogflow.to_inference_data"
        )
    names = list(log_lik_group.data_vars)
    if var_name is None:
        if len(names) > 1:
            raise ValueError(
                f"the model has several observed sites {names}; choose one with var_name="
            )
        var_name = names[0]
    elif var_name not in names:
        raise ValueError(f"var_name={var_name!r} is not an observed site; choose from {names}")
    if _arviz_major() >= 1:  # pragma: no cover - ArviZ >= 1 needs Python >= 3.12
        from arviz_stats import loo_approximate_posterior

        return loo_approximate_posterior(
            data,
            log_p=stats["lp"],
            log_q=stats["lp_approx"],
            pointwise=pointwise,
            var_name=var_name,
        )
    return _vi_loo_arviz0(log_lik_group[var_name], stats, pointwise)


def _vi_loo_arviz0(log_lik, stats, pointwise: bool):
    import xarray as xr
    from arviz.stats.stats_utils import ELPDData

    obs_dims = [d for d in log_lik.dims if d not in ("chain", "draw")]
    ll = log_lik.stack(__sample__=("chain", "draw")).transpose(*obs_dims, "__sample__")
    ll_values = np.asarray(ll.values, dtype=np.float64)
    n_samples = ll_values.shape[-1]
    log_w = np.asarray(
        (stats["lp"] - stats["lp_approx"]).stack(__sample__=("chain", "draw")).values,
        dtype=np.float64,
    )
    if not (np.isfinite(ll_values).all() and np.isfinite(log_w).all()):
        raise ValueError(
            "log_likelihood or the log weights hold non-finite values; PSIS-LOO needs finite "
            "log densities at every draw"
        )
    smoothed, pareto_k = psis(log_w - ll_values)
    elpd_i = logsumexp(smoothed + ll_values, axis=-1)
    full_weights, _ = psis(log_w)
    lpd_i = logsumexp(full_weights + ll_values, axis=-1)
    n_points = int(elpd_i.size)
    elpd = float(elpd_i.sum())
    se = float(math.sqrt(n_points * np.var(elpd_i)))
    p_loo = float(lpd_i.sum() - elpd)
    good_k = good_k_threshold(n_samples)
    warn_high = bool(np.any(pareto_k > good_k))
    if warn_high:
        warnings.warn(
            f"Pareto k-hat above {good_k:.2f} for {int(np.sum(pareto_k > good_k))} "
            "observation(s): the leave-one-out estimate for them is unreliable (the guide may "
            "also be far from the posterior there). Inspect them with az.plot_khat.",
            UserWarning,
            stacklevel=3,
        )
    if not pointwise:
        return ELPDData(
            data=[elpd, se, p_loo, n_samples, n_points, warn_high, "log", good_k],
            index=[
                "elpd_loo",
                "se",
                "p_loo",
                "n_samples",
                "n_data_points",
                "warning",
                "scale",
                "good_k",
            ],
        )
    obs_coords = {d: log_lik.coords[d] for d in obs_dims if d in log_lik.coords}
    loo_i = xr.DataArray(np.reshape(elpd_i, ll.shape[:-1]), dims=obs_dims, coords=obs_coords)
    khat = xr.DataArray(np.reshape(pareto_k, ll.shape[:-1]), dims=obs_dims, coords=obs_coords)
    return ELPDData(
        data=[
            elpd,
            se,
            p_loo,
            n_samples,
            n_points,
            warn_high,
            loo_i.rename("loo_i"),
            khat.rename("pareto_shape"),
            "log",
            good_k,
        ],
        index=[
            "elpd_loo",
            "se",
            "p_loo",
            "n_samples",
            "n_data_points",
            "warning",
            "loo_i",
            "pareto_k",
            "scale",
            "good_k",
        ],
    )
