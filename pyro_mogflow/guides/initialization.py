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
    "prior_locs",
    "resolve_init_spread",
    "spread_locs",
]

#: The named ways to place the components (a float is the third way, see ``AutoMixtureFlow``).
INIT_SPREADS = ("auto", "prior")

#: The initial component scale when ``init_scale`` is not given.
DEFAULT_INIT_SCALE = 0.1


def check_init_spread(init_spread: object, num_components: int) -> float | str:
    """Return ``init_spread`` (``"auto"``, ``"prior"`` or a finite float ``>= 0``), raising
    before any work.

    :raises TypeError: for anything but one of :data:`INIT_SPREADS` or a real number.
    :raises ValueError: for another string, a negative, NaN or infinite value, or ``0`` with
        ``K > 1`` (every component would start on one point and they could never separate).
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
    if num_components > 1 and init_spread == 0:
        raise ValueError(
            "init_spread must be > 0 when num_components > 1, or every component starts on "
            "the same point and they can never separate"
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
        fn = site["fn"]
        transform = biject_to(fn.support)
        shape = transform.inverse_shape(fn.batch_shape + fn.event_shape)
        like = next((t for t in vars(fn).values() if isinstance(t, torch.Tensor)), None)
        zero = torch.zeros(shape) if like is None else like.new_zeros(shape)
        return transform(zero).detach()


def resolve_init_spread(
    init_spread: float | str, init_loc_given: bool, init_scale: float | None
) -> float | str:
    """What ``init_spread="auto"`` means: ``"prior"`` unless the user passed ``init_loc_fn`` or
    ``init_scale``; then the components start around the initial location, offset by
    ``init_scale`` (or :data:`DEFAULT_INIT_SCALE`) times symmetric standard normal draws."""
    if init_spread != "auto":
        return init_spread
    if not init_loc_given and init_scale is None:
        return "prior"
    return DEFAULT_INIT_SCALE if init_scale is None else init_scale


def spread_locs(
    loc: torch.Tensor, num_components: int, init_spread: float, symmetric: bool = False
) -> torch.Tensor:
    r"""``K`` means at ``loc`` plus ``init_spread`` times standard normal offsets, ``(K, D)``.

    With ``symmetric`` the offsets come in antithetic pairs :math:`\pm\epsilon` (and one zero
    offset when ``K`` is odd), so a mixture with equal weights and scales on these means is
    symmetric about ``loc``: its mean and every coordinate's median start exactly at ``loc``.
    """
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
