r"""ArviZ export of variational fits: :func:`to_inference_data`.

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
* ``constant_data`` (only for masked observed sites) -- ``{site}_obs_mask``, False where
  Pyro's ``obs_mask`` or ``poutine.mask`` hides an observation; :func:`~pyro_mogflow.vi_loo`
  does not count those as data points;
* ``sample_stats`` -- ``lp`` :math:`= \log p(x, z)`, ``lp_approx`` :math:`= \log q(z)` and
  ``log_weight`` = ``lp - lp_approx`` (the importance weight of each draw), plus ``component``,
  the mixture component each :class:`~pyro_mogflow.AutoMixtureFlow` draw came from;
* ``log_prior`` (optional) -- :math:`\log p(z)` per latent site.

Independent fits become chains, so ArviZ's :math:`\hat R` compares runs (see
:func:`~pyro_mogflow.fit_independent` and :func:`~pyro_mogflow.vi_diagnostics`). ArviZ itself is
imported only inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import pyro
import torch

from .._validation import check_bool, check_int, check_seed
from ..infer.memory import DEFAULT_MEMORY_BUDGET, ChunkPlanner, check_memory_budget
from .draws import _draw_chain, _prototype, _seeded
from .groups import _arviz_major, _as_datatree, _as_inference_data, _build_groups

__all__ = ["to_inference_data"]

if TYPE_CHECKING:
    from arviz import InferenceData
    from xarray import DataTree


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


def _check_model_args(model_args, model_kwargs) -> tuple[tuple, dict]:
    """The model's arguments as a fresh ``(tuple, dict)``; ``model_kwargs=None`` means ``{}``."""
    if not isinstance(model_args, (tuple, list)):
        raise TypeError(f"model_args must be a tuple, got {type(model_args).__name__}")
    if model_kwargs is None:
        model_kwargs = {}
    if not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
    return tuple(model_args), dict(model_kwargs)


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


# ----------------------------------------------------------------------- public API
def to_inference_data(
    guide: Callable | Sequence[Callable] | None = None,
    model: Callable | None = None,
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    num_samples: int = 1000,
    guides: Sequence[Callable] | None = None,
    posterior_predictive: bool = True,
    log_likelihood: bool = True,
    log_prior: bool = False,
    coords: dict | None = None,
    dims: dict | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    max_plate_nesting: int | None = None,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
) -> InferenceData | DataTree:
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

    Draws are evaluated in batches in an outer ``pyro.plate`` (as ``Predictive(parallel=True)``
    does), so the model must annotate its batch dims with plates; with ``batch_size=1`` each
    draw runs alone, without that plate, in the model's own shapes (slower, but any model
    works). By default a batch holds as many draws as fit ``memory_budget``: the working memory
    of the model's evaluation (a model with :math:`N` data points holds :math:`S N` terms, and
    a likelihood written ``(X * w).sum(-1)`` an :math:`S N D` product, for a batch of
    :math:`S` draws) is measured on batches of one and two draws, and the rest of each chain
    runs in batches that fit (:class:`~pyro_mogflow.infer.memory.ChunkPlanner`). The guide is
    drawn once per chain, before the batches, and the model takes no random numbers to score a
    draw, so the batch size changes neither the draws nor ``lp``, ``lp_approx``,
    ``log_likelihood`` or ``log_prior`` (given ``seed``); only the random numbers of
    ``posterior_predictive`` (and of latent sites the guide leaves out, drawn from their prior)
    depend on it.

    The budget bounds the working memory, not the result: ``log_likelihood`` and
    ``posterior_predictive`` hold ``chains x num_samples x N`` values per observed site (4 bytes
    each in float32, 8 GB for 1000 draws of 2,000,000 points), and the ``posterior`` of a model
    with local latents grows with :math:`N` too. Leave out what you do not need
    (``log_likelihood=False``, ``posterior_predictive=False``) for big data.

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
    :param batch_size: draws per model evaluation (default ``None``: sized to fit
        ``memory_budget``); 1 runs each draw alone, without an outer plate, for models that do
        not vectorize.
    :param max_plate_nesting: the model's plate nesting (default: read from one run).
    :param memory_budget: bytes of working memory one batch of draws may take when
        ``batch_size`` is ``None`` (default ``DEFAULT_MEMORY_BUDGET``, 1 GiB; ``None``: every
        draw at once).
    :return: ``arviz.InferenceData`` with ArviZ < 1; an ``xarray.DataTree`` with ArviZ >= 1.
        Attributes mark it as a variational approximation (``posterior_approximation``).

    Example::

        idata = to_inference_data(guide, model, model_args=(x, y), num_samples=2000, seed=0)
        az.plot_pair(idata); print(vi_diagnostics(idata))
    """
    guides_list = _collect_guides(guide, guides)
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
    args, kwargs = _check_model_args(model_args, model_kwargs)
    num_samples = check_int("num_samples", num_samples, 1)
    batch_size = check_int("batch_size", batch_size, 1, allow_none=True)
    if num_samples == 1:
        batch_size = 1  # one draw runs unbatched, in the model's own shapes
    planner = ChunkPlanner(check_memory_budget(memory_budget), "draw")
    max_plate_nesting = check_int("max_plate_nesting", max_plate_nesting, 0, allow_none=True)
    seed = check_seed("seed", seed, allow_none=True)
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
                planner,
            )
            for g in guides_list
        ]
    groups = _build_groups(chains, proto, coords, dims, guides_list, want)
    if _arviz_major() >= 1:
        return _as_datatree(groups)
    return _as_inference_data(groups)


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
