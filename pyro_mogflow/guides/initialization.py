"""Where the components of an :class:`~pyro_mogflow.AutoMixtureFlow` start."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable

import pyro
import torch
from pyro.infer.autoguide.initialization import init_to_median
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

__all__ = [
    "INIT_SPREADS",
    "check_init_spread",
    "init_to_median_or_zero",
    "init_to_prior_mean",
    "init_to_zero",
    "prior_locs",
    "resolve_init_spread",
    "spread_locs",
]

#: The named ways to place the components (a float is the third way, see ``AutoMixtureFlow``).
INIT_SPREADS = ("auto", "prior")

#: The initial component scale when ``init_scale`` is not given.
DEFAULT_INIT_SCALE = 0.1


def check_init_spread(init_spread: object, num_components: int = 1) -> float | str:
    """Return ``init_spread`` (``"auto"``, ``"prior"`` or a finite float ``>= 0``), raising
    before any work.

    :raises TypeError: for anything but one of :data:`INIT_SPREADS` or a real number.
    :raises ValueError: for another string or a negative, NaN or infinite value. (``0`` puts
        every mean on the initial location; :class:`~pyro_mogflow.StratifiedELBO` separates
        them by drawing each component's own noise.)
    """
    if isinstance(init_spread, str):
        if init_spread not in INIT_SPREADS:
            raise ValueError(
                f"init_spread must be 'auto', 'prior' or a finite float >= 0, got {init_spread!r}"
            )
        return init_spread
    if isinstance(init_spread, bool) or not isinstance(init_spread, numbers.Real):
        raise TypeError(
            f"init_spread must be 'auto', 'prior' or a float, got {type(init_spread).__name__}"
        )
    if not math.isfinite(init_spread) or init_spread < 0:
        raise ValueError(
            f"init_spread must be 'auto', 'prior' or a finite float >= 0, got {init_spread}"
        )
    return float(init_spread)


def init_to_median_or_zero(site: dict | None = None):
    """The default ``init_loc_fn``: Pyro's ``init_to_median``, and for a site whose
    distribution cannot be sampled (e.g. ``ImproperUniform``) the point that is zero in the
    unconstrained space (Pyro's own fallback, ``init_to_feasible``, samples too and fails)."""
    if site is None:
        return init_to_median_or_zero
    try:
        return init_to_median(site)
    except NotImplementedError:
        return init_to_zero(site)


def init_to_zero(site: dict | None = None):
    """The default ``init_loc_fn`` of a one-point start: the point that is zero in the
    unconstrained space (the start of Pyro's ``AutoNormal``, whose ``init_to_feasible`` puts
    it there); for a site that cannot be sampled (e.g. ``ImproperUniform``) found from the
    distribution's shapes, and for a support with no unconstrained space (a sphere, reached
    by a reparameterizer) Pyro's ``init_to_median``."""
    if site is None:
        return init_to_zero
    fn = site["fn"]
    if fn.support.is_discrete:  # no unconstrained space: the guide names the site
        return fn.sample().detach()
    try:
        transform = biject_to(fn.support)
    except NotImplementedError:  # e.g. a sphere: Pyro's median start, as before
        return init_to_median(site)
    shape = transform.inverse_shape(fn.batch_shape + fn.event_shape)
    inner = fn  # dtype and device from the parameters, without a draw (no random numbers)
    while not any(isinstance(t, torch.Tensor) for t in vars(inner).values()) and hasattr(
        inner, "base_dist"
    ):
        inner = inner.base_dist
    like = next((t for t in vars(inner).values() if isinstance(t, torch.Tensor)), None)
    if like is None:
        try:  # a draw gives them (as Pyro's init_to_feasible)
            like = transform.inv(fn.sample().detach())
        except NotImplementedError:
            like = torch.zeros(())
    return transform(like.new_zeros(shape)).detach()


def init_to_prior_mean(site: dict | None = None):
    r"""An ``init_loc_fn``: the mean of the site's prior (given the values upstream)
    when it is finite and in the support, else its exact median where the distribution has an
    ``icdf``, else :func:`init_to_median_or_zero`.

    Unlike Pyro's ``init_to_median`` (the median of 15 prior draws) it does not move with the
    random seed (the default one-point start, :func:`init_to_zero`, does not either).
    """
    if site is None:
        return init_to_prior_mean
    fn = site["fn"]
    for center in (lambda: fn.mean, lambda: fn.icdf(torch.full_like(fn.mean, 0.5))):
        try:  # the mean, else the exact median (e.g. HalfCauchy, whose mean is infinite)
            value = center().detach()
            if bool(torch.isfinite(value).all()) and bool(fn.support.check(value).all()):
                return value
        except (NotImplementedError, ValueError, AttributeError, RuntimeError):
            pass
    return init_to_median_or_zero(site)


def resolve_init_spread(
    init_spread: float | str, estimator: str = "stratified", init_scale: float | None = None
) -> float | str:
    """What ``init_spread="auto"`` means when the guide sets itself up (its first call, as in a
    plain ``SVI`` loop): ``0.0``, every component mean at the initial location.

    Identical components are one Gaussian of scale ``init_scale``, as Pyro's ``AutoNormal``
    starts. Under ``Trace_ELBO`` every component then gets the same gradient and they stay one
    Gaussian: a start with small offsets was measured worse than ``AutoNormal`` there, because
    the single draw's implicit gradients push nearby components apart until each learns only
    from the rare steps that draw it. Under :class:`~pyro_mogflow.StratifiedELBO` each component
    gets its own draws, so they separate and can settle on different modes or shape one.
    (:func:`~pyro_mogflow.fit` sets an ``"auto"`` guide given neither ``init_loc_fn`` nor
    ``init_scale`` up at ``"prior"`` instead.) The exception is ``estimator="pathwise"``, whose
    Pyro sampler is NaN when two means coincide: there the means are offset by ``init_scale``
    (default :data:`DEFAULT_INIT_SCALE`) times antithetic normal draws.
    """
    if init_spread != "auto":
        return init_spread
    if estimator == "pathwise":
        return DEFAULT_INIT_SCALE if init_scale is None else init_scale
    return 0.0


def spread_locs(
    loc: torch.Tensor, num_components: int, init_spread: float, symmetric: bool = False
) -> torch.Tensor:
    r"""``K`` means at ``loc`` plus ``init_spread`` times standard normal offsets, ``(K, D)``.

    With ``symmetric`` the offsets come in antithetic pairs :math:`\pm\epsilon` (and one zero
    offset when ``K`` is odd), so a mixture with equal weights and scales on these means is
    symmetric about ``loc``: its mean and every coordinate's median start exactly at ``loc``.
    """
    if init_spread == 0:
        return loc.expand(num_components, loc.shape[-1]).clone()
    if not symmetric:
        noise = torch.randn(num_components, loc.shape[-1], dtype=loc.dtype, device=loc.device)
        return loc + noise * init_spread
    half = num_components // 2
    noise = torch.randn(half, loc.shape[-1], dtype=loc.dtype, device=loc.device)
    parts = [noise, -noise]
    if num_components % 2:
        parts.append(torch.zeros_like(loc).unsqueeze(0))
    return loc + torch.cat(parts) * init_spread


class _PriorDraw(Messenger):
    """Sets every latent site to ``draw(msg)``, overriding the guide's init strategy (which
    wraps the model from inside), so a run of the model is an ancestral draw of its prior."""

    def __init__(self, draw: Callable[[dict], torch.Tensor]):
        super().__init__()
        self.draw = draw

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or site_is_subsample(msg):
            return
        msg["value"] = self.draw(msg)


@torch.no_grad()
def prior_locs(
    model: Callable, prototype_trace, loc: torch.Tensor, num_components: int, *args, **kwargs
) -> torch.Tensor:
    """``K`` ancestral draws of the model's prior, packed and unconstrained, shape ``(K, D)``.

    Sites are packed in the order of ``prototype_trace`` (as ``AutoContinuous`` packs them). A
    site whose distribution cannot be sampled gets its prototype value plus standard normal
    noise (in the unconstrained space) instead, and a warning names it.

    :param model: the Pyro model.
    :param prototype_trace: the guide's prototype trace.
    :param torch.Tensor loc: the initial location, shape ``(D,)`` (sets dtype and device).
    :param int num_components: ``K``.
    """
    unsampleable: set = set()

    def draw(site):
        try:
            value = site["fn"].sample().detach()
            if bool(torch.isfinite(value).all()):
                return value
        except NotImplementedError:
            pass
        unsampleable.add(site["name"])
        proto = prototype_trace.nodes[site["name"]]["value"].detach()
        transform = biject_to(site["fn"].support)
        u = transform.inv(proto)
        return transform(u + torch.randn_like(u))

    rows = []
    for _ in range(num_components):
        with pyro.poutine.block():
            trace = pyro.poutine.trace(_PriorDraw(draw)(model)).get_trace(*args, **kwargs)
        parts = []
        for name, site in prototype_trace.iter_stochastic_nodes():
            value = trace.nodes[name]["value"].detach()
            u = biject_to(site["fn"].support).inv(value)
            parts.append(u.reshape(-1))
        rows.append(torch.cat(parts).to(dtype=loc.dtype, device=loc.device))
    if unsampleable:
        warnings.warn(
            "AutoMixtureFlow(init_spread='prior'): the prior of site(s) "
            f"{sorted(unsampleable)} cannot be sampled, so those coordinates of the "
            "component means start at the initial location plus N(0, 1) noise",
            UserWarning,
            stacklevel=5,
        )
    return torch.stack(rows)
