r"""Full-covariance components for an :class:`~pyro_mogflow.AutoMixtureFlow`: the upgrade.

A set-up guide has diagonal components, :math:`\mathcal N(\mu_k, \operatorname{diag}
\sigma_k^2)`, parameters ``locs`` ``(K, D)`` and ``scales`` ``(K, D)``.
:func:`to_full_covariance` replaces ``scales`` by ``scale_tril`` ``(K, D, D)``, the Cholesky
factors :math:`L_k` of full covariances :math:`\Sigma_k = L_k L_k^\top` (constraint
``softplus_lower_cholesky``: lower-triangular, positive diagonal), initialised at
:math:`L_k = \operatorname{diag} \sigma_k`, so the guide's density does not change. The
components can then take the shape of correlated modes; :func:`~pyro_mogflow.fit` with
``covariance="full"`` upgrades the guide once the tempering reaches :math:`\beta = 1`, after
the diagonal stage has placed the components (full covariance from the first step diverged in
50-D in the prototype), and continues with the full natural-gradient steps of
:mod:`pyro_mogflow.infer.component_steps`.

What works with a full-covariance guide: ``log_prob``, exact ``sample``,
:class:`~pyro_mogflow.StratifiedELBO`, :func:`~pyro_mogflow.fit`, ``balance_weights``,
``components()``, ``quantiles`` (via the exact marginals), diagnostics (exact draws), pruning and
moment-matching merges (full second moments). What does not: the single-draw reparameterized
sampler of ``Trace_ELBO`` (it raises; see
:mod:`pyro_mogflow.distributions.full_mixture`).
"""

from __future__ import annotations

import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam
from pyro.poutine.runtime import _PYRO_PARAM_STORE

from ..distributions.density import marginal_scales

__all__ = [
    "COVARIANCES",
    "FULL_COVARIANCE_MAX_DIM",
    "component_scales",
    "is_full",
    "resolve_covariance",
    "to_full_covariance",
]

#: The choices of ``fit(covariance=...)``: ``"auto"`` resolves to one of the other two.
COVARIANCES = ("auto", "diag", "full")
#: Largest latent dimension at which ``covariance="auto"`` gives full-covariance components
#: (each costs :math:`O(D^3)` per step and :math:`D^2` numbers).
FULL_COVARIANCE_MAX_DIM = 200


def resolve_covariance(covariance: str, natural: bool, latent_dim: int) -> str:
    """What ``covariance="auto"`` means for a stratified guide: ``"full"`` when its components
    take natural-gradient steps and ``latent_dim <= FULL_COVARIANCE_MAX_DIM``, else ``"diag"``;
    ``"diag"``/``"full"`` are returned as given."""
    if covariance != "auto":
        return covariance
    return "full" if natural and latent_dim <= FULL_COVARIANCE_MAX_DIM else "diag"


def check_covariance(covariance) -> str:
    """``covariance`` if it is one of :data:`COVARIANCES`, else a ValueError."""
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    return covariance


def is_full(guide) -> bool:
    """Whether a set-up guide has full-covariance components (a ``scale_tril`` parameter)."""
    return "scale_tril" in getattr(guide, "_pyro_params", {})


def component_scales(guide) -> torch.Tensor:
    r"""Each component's per-coordinate (marginal) standard deviation, shape ``(K, D)``,
    detached: ``scales`` for diagonal components, :math:`\sqrt{\operatorname{diag} L_k
    L_k^\top}` for full ones."""
    if is_full(guide):
        return marginal_scales(guide.scale_tril.detach())
    return guide.scales.detach()


def replace_mixture_params(guide, logits, locs, scales=None, scale_tril=None) -> None:
    """Recreate the mixture parameters: ``locs`` (K', D), ``logits`` (K',) and either ``scales``
    (K', D) or ``scale_tril`` (K', D, D). The old ones (``scales`` and ``scale_tril`` included)
    are dropped from the module and from Pyro's param store, so a Pyro optimiser gives the new
    ones fresh state."""
    used = guide._pyro_context.used  # else the guide never registered in the param store
    for name in ("locs", "scales", "scale_tril", "logits"):
        if name not in guide._pyro_params:
            continue
        fullname = guide._pyro_get_fullname(name) if used else None
        delattr(guide, name)
        if fullname is not None and fullname in _PYRO_PARAM_STORE:
            del _PYRO_PARAM_STORE[fullname]
    guide.locs = PyroParam(locs.clone(), event_dim=2)
    if scale_tril is None:
        guide.scales = PyroParam(
            scales.clone(), constraint=constraints.softplus_positive, event_dim=2
        )
    else:
        guide.scale_tril = PyroParam(
            scale_tril.tril().clone(), constraint=constraints.softplus_lower_cholesky, event_dim=3
        )
    guide.logits = PyroParam(logits.clone(), event_dim=1)
    guide.num_components = locs.shape[0]


def set_full_params(guide, locs, scale_tril, logits) -> None:
    """:func:`replace_mixture_params` with full-covariance factors ``scale_tril``."""
    replace_mixture_params(guide, logits, locs, scale_tril=scale_tril)


@torch.no_grad()
def to_full_covariance(guide) -> bool:
    r"""Give a set-up :class:`~pyro_mogflow.AutoMixtureFlow` full-covariance components, in
    place, with :math:`L_k = \operatorname{diag}\sigma_k` (the density is unchanged).

    :param guide: a set-up ``AutoMixtureFlow`` with ``estimator="stratified"`` or
        ``"implicit"``.
    :return: ``True`` if the guide was upgraded, ``False`` if it already was full.
    :raises RuntimeError: if the guide is not set up; ``ValueError`` for another estimator.
    """
    from .auto import AutoMixtureFlow

    if not isinstance(guide, AutoMixtureFlow):
        raise TypeError(f"guide must be an AutoMixtureFlow, got {type(guide).__name__}")
    if guide.prototype_trace is None:
        raise RuntimeError(
            "the guide is not set up yet, so it has no components to upgrade; call "
            "guide.setup(*model_args) first"
        )
    if guide.estimator not in ("stratified", "implicit"):
        raise ValueError(
            "full-covariance components need estimator='stratified' (or 'implicit'), got "
            f"estimator={guide.estimator!r}"
        )
    if is_full(guide):
        return False
    scales = guide.scales.detach()
    tril = torch.diag_embed(scales)
    set_full_params(guide, guide.locs.detach(), tril, guide.logits.detach())
    return True
