r"""The ArviZ groups of a variational export: built from draws, packaged, and read back.

:func:`~pyro_mogflow.diagnostics.to_inference_data` draws chains (see :mod:`.draws`); this
module lays them out as ``xarray.Dataset`` groups (``posterior``, ``posterior_predictive``,
``log_likelihood``, ``log_prior``, ``sample_stats``, ``observed_data``) with named dims,
packages them for the installed ArviZ (``arviz.InferenceData`` for ArviZ < 1, an
``xarray.DataTree`` for ArviZ >= 1), and reads a group back from either container.

ArviZ and xarray are imported only inside the functions that need them.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

import numpy as np
import pyro

from .._version import __version__
from ..guides import AutoMixtureFlow

if TYPE_CHECKING:
    from .draws import _Prototype, _Site

__all__: list[str] = []


def _arviz_major() -> int:
    """The major version of the installed ArviZ (imports it)."""
    import arviz as az

    return int(str(az.__version__).split(".")[0])


# ----------------------------------------------------------------------- data access
def _is_inference_data(data) -> bool:
    return callable(getattr(data, "groups", None)) and hasattr(data, "_groups")


def _is_datatree(data) -> bool:
    return hasattr(data, "children") and hasattr(data, "to_dataset")


def _group(data, name: str):
    """The ``name`` group of an InferenceData or DataTree as an ``xarray.Dataset``, or None."""
    if _is_inference_data(data):
        return getattr(data, name) if name in data.groups() else None
    if _is_datatree(data):
        return data[name].to_dataset() if name in data.children else None
    raise TypeError(
        "data must be an arviz.InferenceData or an xarray.DataTree made by "
        f"pyro_mogflow.to_inference_data, got {type(data).__name__}"
    )


# ------------------------------------------------------------------------ dims
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


#: ``constant_data[site + MASK_SUFFIX]``: False where a mask hides an observation of ``site``.
MASK_SUFFIX = "_obs_mask"


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
    if proto.observed_masks:
        # Which observations a mask (Pyro's obs_mask, poutine.mask) hides: their log-likelihood
        # is recorded as 0 and they are not data points (vi_loo skips them).
        mask_vars = {}
        for n, array in proto.observed_masks.items():
            plan = plans[n][: array.ndim]
            squeeze = tuple(j for j, d in enumerate(plan) if d is None)
            array = np.squeeze(array, axis=squeeze) if squeeze else array
            mask_vars[f"{n}{MASK_SUFFIX}"] = (
                tuple(d for d in plan if d is not None),
                np.array(array, copy=True),
            )
        groups["constant_data"] = dataset(mask_vars, sample_dims=False)
    return groups


def _as_datatree(groups: dict):
    """Package the groups as an ``xarray.DataTree`` (the ArviZ >= 1 container)."""
    import xarray as xr

    return xr.DataTree.from_dict({f"/{name}": ds for name, ds in groups.items()})


def _as_inference_data(groups: dict):
    import arviz as az

    return az.InferenceData(**groups)
