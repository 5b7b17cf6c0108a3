"""The pieces of :class:`~pyro_mogflow.StratifiedELBO` that handle one site at a time: finding
the stratified site, drawing it, and summing every site's log-density per draw."""

from __future__ import annotations

from typing import NamedTuple

import pyro
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.util import check_site_shape

from ..distributions.mixture_flow import StratifiedSample

__all__: list = []

#: The name of the plate that holds the ``K * n`` stratified draws.
PARTICLE_PLATE = "_stratified_particles"

_VECTORIZE_ADVICE = (
    "StratifiedELBO evaluates every draw in one run of the model: each latent arrives with a "
    "particle dimension of size K*n at dim {dim} (a vector w of shape (D,) arrives as "
    "(K*n, 1, D) in a model with one plate), and the model must broadcast over it. Code such as "
    "`X @ w` or `w.reshape(-1)` does not: write it with broadcasting, e.g. `(X * w).sum(-1)` "
    "(or `w @ X.T`, checking where the result's dimensions land), and index with `...` "
    "(`w[..., 0]`, not `w[0]`). Or train with Trace_ELBO and a sampling estimator "
    "(AutoMixtureFlow(model, estimator='implicit')), which runs the model one draw at a time."
)


class _Accumulator:
    """Sums the log-densities of a trace's sites into per-draw local and global terms."""

    def __init__(self, local: dict, nesting: int, zeros: torch.Tensor):
        self.plates = local
        self.nesting = nesting
        self.zeros = zeros
        self.reset()

    def reset(self) -> None:
        self.local = self.zeros.clone()
        self.global_ = self.zeros.new_zeros(self.zeros.shape[:1])
        self.global_varies = False

    def add_trace(self, trace, sign: float) -> None:
        nesting, local = self.nesting, self.plates
        for site_name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if is_validation_enabled():
                check_site_shape(site, nesting)
            lp = torch.as_tensor(site["log_prob"], dtype=self.zeros.dtype, device=self.zeros.device)
            if lp.dim() > nesting:
                raise ValueError(
                    f"site {site_name!r} has log_prob shape {tuple(lp.shape)}, with dimensions "
                    f"left of the particle plate at dim {-nesting}. If the model's plates are "
                    "all declared, the model does not vectorize over particles: a latent drawn "
                    "under the particle plate moved its particle dimension elsewhere.\n"
                    f"{_VECTORIZE_ADVICE.format(dim=-nesting)}\nOtherwise declare every batch "
                    "dimension of the model with pyro.plate (or move it into the event with "
                    ".to_event()), or raise max_plate_nesting."
                )
            lp = lp.reshape((1,) * (nesting - lp.dim()) + lp.shape)
            names = {
                f.name
                for f in site["cond_indep_stack"]
                if f.vectorized and f.name != PARTICLE_PLATE
            }
            if set(local) <= names:
                keep = {0} | {nesting + d for d in local.values()}
                drop = [i for i in range(nesting) if i not in keep]
                self.local = self.local + sign * (lp.sum(drop, keepdim=True) if drop else lp)
            elif not set(local) & names:
                self.global_varies = self.global_varies or lp.shape[0] > 1
                self.global_ = self.global_ + sign * lp.reshape(lp.shape[0], -1).sum(-1)
            else:
                raise ValueError(
                    f"site {site_name!r} lies in some but not all of the plates "
                    f"{sorted(local)} of the stratified site; its terms cannot be assigned "
                    "to data points"
                )


def _stratified_site(guide, trace) -> tuple[str, int]:
    """The one guide site that can be stratified: ``(name, K)``; raises if none or several."""
    hooks = [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample"
        and not site["is_observed"]
        and callable(getattr(site["fn"], "stratified_rsample", None))
    ]
    if not hooks:
        raise TypeError(
            "StratifiedELBO needs a guide that samples a mixture flow with "
            "estimator='stratified': AutoMixtureFlow(model), or a guide of your own that samples "
            "a site from AmortizedMixtureFlow(..., estimator='stratified'); got "
            f"{type(guide).__name__} with no such site. For other guides use "
            "pyro.infer.Trace_ELBO."
        )
    sites = [s for s in hooks if getattr(s["fn"], "estimator", "stratified") == "stratified"]
    if not sites:
        estimator = getattr(hooks[0]["fn"], "estimator", None)
        raise ValueError(
            "StratifiedELBO needs a mixture flow built with estimator='stratified', got "
            f"estimator={estimator!r} at site {hooks[0]['name']!r}. Rebuild the guide "
            "(AutoMixtureFlow or AmortizedMixtureFlow) with estimator='stratified', or train "
            "this one with pyro.infer.Trace_ELBO."
        )
    if len(sites) > 1:
        raise ValueError(
            "StratifiedELBO stratifies one amortized site per guide, found "
            f"{[site['name'] for site in sites]}. Give the other ones estimator='implicit', or "
            "train with pyro.infer.Trace_ELBO."
        )
    return sites[0]["name"], int(sites[0]["fn"].num_components)


class _ComponentsChanged(Exception):
    """The stratified site's number of components changed since it was probed (e.g. pruned)."""


class _Stratify(Messenger):
    """Replace the draw at guide site ``name`` by a stratified draw from its mixture flow.

    Entered outside the particle plate, it sees the site's distribution after every plate has
    expanded it; the site becomes a ``Delta`` at the ``K * n`` draws carrying their exact log q.
    """

    def __init__(
        self,
        name: str,
        num_particles: int,
        particle_dim: int,
        num_components: int,
        components: torch.Tensor | None = None,
        antithetic: bool = False,
    ):
        super().__init__()
        self.antithetic = antithetic
        self.name = name
        self.num_particles = num_particles
        self.particle_dim = particle_dim
        self.num_components = num_components
        self.components = components
        self.sample: StratifiedSample | None = None
        self.frames: tuple = ()

    def _pyro_sample(self, msg) -> None:
        if msg["name"] != self.name or msg["is_observed"] or msg["done"]:
            return
        if int(msg["fn"].num_components) != self.num_components:
            raise _ComponentsChanged(int(msg["fn"].num_components))
        sample = msg["fn"].stratified_rsample(
            self.num_particles,
            self.particle_dim,
            components=self.components,
            **({"antithetic": True} if self.antithetic else {}),
        )
        event_dim = len(msg["fn"].event_shape)
        msg["fn"] = pyro.distributions.Delta(
            sample.value, log_density=sample.log_q, event_dim=event_dim
        )
        msg["value"] = sample.value
        msg["done"] = True
        self.sample = sample
        self.frames = tuple(f for f in msg["cond_indep_stack"] if f.name != PARTICLE_PLATE)


class StratifiedParticles(NamedTuple):
    """The per-draw quantities behind one evaluation of :class:`StratifiedELBO`.

    :ivar torch.Tensor log_ratio: :math:`\\log p(x, z_{kt}) - \\log q(z_{kt})`, shape ``(K, n)``;
        row ``k`` holds the ``n`` draws from component ``k``.
    :ivar torch.Tensor log_weights: the mixture's :math:`\\log \\pi_k`, shape ``(K,)``.
    :ivar torch.Tensor latent: the unconstrained draws :math:`z_{kt}`, shape ``(K, n, D)``.
    """

    log_ratio: torch.Tensor
    log_weights: torch.Tensor
    latent: torch.Tensor


class _Terms(NamedTuple):
    """One evaluation: per-draw local terms, global terms and the stratified draw."""

    local: torch.Tensor  # (K, n, *rest): terms of sites in every plate of the stratified site
    global_: torch.Tensor  # (K * n,): terms of sites outside those plates
    global_varies: bool
    sample: StratifiedSample
    total: int  # K * n: the number of draws of the full stratified evaluation
