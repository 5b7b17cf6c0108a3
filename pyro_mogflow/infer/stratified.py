r"""StratifiedELBO: the evidence lower bound with the expectation over mixture components exact.

For a guide whose base is a mixture, :math:`q(z) = \sum_k \pi_k q_k(z)`, the ELBO splits into one
expectation per component,

.. math::
    \mathcal{L} = \sum_{k=1}^K \pi_k\, \mathbb{E}_{\epsilon}\Big[\log p(x, z_k(\epsilon))
        - \log q(z_k(\epsilon))\Big], \qquad z_k(\epsilon) = f(\mu_k + \sigma_k \odot \epsilon),

so the discrete choice of component never has to be sampled: the sum over :math:`k` is taken
exactly and only the Gaussian noise :math:`\epsilon` is drawn (Morningstar et al. 2021). The
gradient wrt the weights flows through :math:`\pi_k` and through :math:`\log q`, with no
relaxation and no score function.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuide, AutoGuideList
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape, warn_if_nan

from ..autoguide import AutoMixtureFlow

__all__ = ["StratifiedELBO", "StratifiedParticles"]

_PARTICLE_PLATE = "_stratified_particles"


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


class StratifiedELBO(ELBO):
    r"""The ELBO of an :class:`~pyro_mogflow.AutoMixtureFlow` with the sum over components exact.

    With :math:`n` = ``num_particles`` Gaussian draws per component,

    .. math::
        \widehat{\mathcal{L}} = \sum_{k=1}^K \pi_k\, \frac{1}{n} \sum_{t=1}^n
            \log \frac{p(x, z_{kt})}{q(z_{kt})}, \qquad
        z_{kt} = f(\mu_k + \sigma_k \odot \epsilon_{kt}),\ \epsilon_{kt} \sim \mathcal{N}(0, I),

    an unbiased estimate of the ELBO whose gradient wrt the logits, means, scales and flow is
    unbiased too (the sum over :math:`k` is exact; only :math:`\epsilon` is sampled). Here
    :math:`\log q` is the guide's full density, the mixture log-density of the base point minus
    the flow's log-determinant, plus the Jacobians of the constraints of constrained sites.

    With ``importance_weighted=True`` it is the stratified importance-weighted bound (SIWAE),

    .. math::
        \widehat{\mathcal{L}}_{\mathrm{SIWAE}} = \log \frac{1}{n} \sum_{t=1}^n \sum_{k=1}^K
            \pi_k\, \frac{p(x, z_{kt})}{q(z_{kt})}
            \ \ge\ \widehat{\mathcal{L}} \quad\text{(draw by draw, by Jensen)},

    whose expectation lies between the ELBO and :math:`\log p(x)` and tightens as :math:`n`
    grows.

    All :math:`K n` draws are evaluated at once: the guide and the model run inside one
    ``pyro.plate`` of size :math:`K n` at dimension ``-(max_plate_nesting + 1)``, as Pyro's
    ``vectorize_particles=True`` does, so the model must be vectorizable (its batch dimensions
    declared with ``pyro.plate``). Plates, constrained sites, observed data and
    ``poutine.scale`` (e.g. :class:`~pyro_mogflow.TemperedModel`) work as in
    :class:`~pyro.infer.Trace_ELBO`.

    Usage::

        guide = AutoMixtureFlow(model, num_components=8, estimator="stratified")
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), StratifiedELBO())

    The guide must be an :class:`~pyro_mogflow.AutoMixtureFlow` built with
    ``estimator="stratified"`` and passed as it is (not inside an ``AutoGuideList`` nor wrapped
    in a handler). Outside this ELBO such a guide samples the exact mixture (e.g. in
    ``Predictive``); under another ELBO it is the unbiased ``"implicit"`` estimator and warns.

    Local latents: the guide may instead be a function that samples one site from an
    :class:`~pyro_mogflow.AmortizedMixtureFlow` built with ``estimator="stratified"``, inside
    the data plate (subsampled or not). Each data point :math:`b` then has its own weights
    :math:`\pi_{bk}`, and the ELBO is stratified point by point,

    .. math::
        \widehat{\mathcal{L}} = \sum_b \sum_{k=1}^K \pi_{bk}\, \frac{1}{n} \sum_{t=1}^n
            \log \frac{p(x_b, z_{bkt})}{q(z_{bkt} \mid x_b)} + \widehat{G},

    where :math:`\widehat{G}` averages the terms of sites outside the data plate (global
    latents sampled by other guide sites) over the :math:`K n` draws. Any distribution with a
    ``num_components`` attribute and a ``stratified_rsample(num_particles, particle_dim)``
    method is stratified this way (see
    :meth:`~pyro_mogflow.amortized.MixtureFlowPosterior.stratified_rsample`). With
    ``importance_weighted=True`` the bound is SIWAE per data point, which needs every latent
    outside the data plate to be fixed across draws. :meth:`particles` serves
    ``AutoMixtureFlow`` guides only.

    :param int num_particles: ``n``, Gaussian draws per component (default 1), so each step
        runs the model on ``K * n`` points.
    :param bool importance_weighted: use the SIWAE bound instead of the ELBO (default False).
    :param int max_plate_nesting: the model's number of nested plates, not counting the plate
        this ELBO adds. By default it is found by running the model once at the guide's
        initial values (static model structure assumed), as Pyro does.
    :param bool retain_graph: passed to ``backward`` in :meth:`loss_and_grads`.

    References:

    * W. Morningstar, S. Vikram, C. Ham, A. Gallagher, J. Dillon, *Automatic Differentiation
      Variational Inference with Mixtures*, AISTATS 2021 (the stratified ELBO and SIWAE).
    * Y. Burda, R. Grosse, R. Salakhutdinov, *Importance Weighted Autoencoders*, ICLR 2016.
    """

    def __init__(
        self,
        num_particles: int = 1,
        importance_weighted: bool = False,
        max_plate_nesting: int | float = float("inf"),
        retain_graph: bool | None = None,
    ):
        if isinstance(num_particles, bool) or not isinstance(num_particles, numbers.Integral):
            raise TypeError(f"num_particles must be an int, got {type(num_particles).__name__}")
        if num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        if not isinstance(importance_weighted, bool):
            raise TypeError(
                f"importance_weighted must be a bool, got {type(importance_weighted).__name__}"
            )
        if max_plate_nesting != float("inf"):
            if isinstance(max_plate_nesting, bool) or not isinstance(
                max_plate_nesting, numbers.Integral
            ):
                raise TypeError(
                    "max_plate_nesting must be an int (or float('inf') to infer it), got "
                    f"{max_plate_nesting!r}"
                )
            if max_plate_nesting < 0:
                raise ValueError(f"max_plate_nesting must be >= 0, got {max_plate_nesting}")
            max_plate_nesting = int(max_plate_nesting)
        if retain_graph is not None and not isinstance(retain_graph, bool):
            raise TypeError(f"retain_graph must be a bool or None, got {retain_graph!r}")
        super().__init__(
            num_particles=int(num_particles),
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=False,
            retain_graph=retain_graph,
        )
        self.importance_weighted = importance_weighted
        self._nesting_checked = False

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_guide(guide) -> None:
        if isinstance(guide, AutoGuideList):
            raise TypeError(
                "StratifiedELBO cannot stratify an AutoGuideList: the sum over components is "
                "exact only when one AutoMixtureFlow guides every latent site. Guide the whole "
                "model with AutoMixtureFlow(model, estimator='stratified') (it handles "
                "constrained sites and plates of fixed size), or keep the AutoGuideList, give "
                "its AutoMixtureFlow estimator='implicit' and train with pyro.infer.Trace_ELBO "
                "(unbiased, not stratified)."
            )
        if not isinstance(guide, AutoMixtureFlow):
            raise TypeError(
                "StratifiedELBO needs the AutoMixtureFlow guide itself, built with "
                f"estimator='stratified'; got {type(guide).__name__}. For other guides (or a "
                "guide wrapped in a handler) use pyro.infer.Trace_ELBO."
            )
        if guide.estimator != "stratified":
            raise ValueError(
                "StratifiedELBO needs AutoMixtureFlow(..., estimator='stratified'), got a guide "
                f"with estimator={guide.estimator!r}. Rebuild the guide with "
                "estimator='stratified', or train this one with pyro.infer.Trace_ELBO."
            )

    def _guess_max_plate_nesting(self, model, guide, args, kwargs) -> None:
        """Set :attr:`max_plate_nesting` from one run of the model at the guide's prototype."""
        self.max_plate_nesting = self._model_plate_nesting(model, guide, args, kwargs)

    @staticmethod
    def _model_plate_nesting(model, guide, args, kwargs) -> int:
        """How many plates the model nests, from one run at the guide's prototype values."""
        with poutine.block():
            trace = poutine.trace(poutine.replay(model, trace=guide.prototype_trace)).get_trace(
                *args, **kwargs
            )
        dims = [
            frame.dim
            for site in trace.nodes.values()
            if site["type"] == "sample"
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        ]
        return -min(dims) if dims else 0

    # ------------------------------------------------------------------ traces
    def _get_trace(self, model, guide, args, kwargs):
        """One vectorized run of the guide (stratified) and the model replayed against it.

        :return: ``(model_trace, guide_trace, draw)``, log-probs computed; ``draw`` is the
            guide's :class:`~pyro_mogflow.autoguide.StratifiedDraw`.
        """
        self._check_guide(guide)
        guide.setup(*args, **kwargs)  # outside the particle plate; a no-op once set up
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        elif not self._nesting_checked:
            needed = self._model_plate_nesting(model, guide, args, kwargs)
            if self.max_plate_nesting < needed:
                raise ValueError(
                    f"max_plate_nesting={self.max_plate_nesting}, but the model nests {needed} "
                    "plate(s) (found by running it at the guide's initial values). Pass "
                    f"max_plate_nesting >= {needed}, or leave it out to have it inferred."
                )
            self._nesting_checked = True
        nesting = self.max_plate_nesting + 1
        size = guide.num_components * self.num_particles
        with guide.stratified(self.num_particles, particle_dim=-nesting) as draw:
            particles = pyro.plate(_PARTICLE_PLATE, size, dim=-nesting)
            guide_trace = poutine.trace(particles(guide)).get_trace(*args, **kwargs)
        particles = pyro.plate(_PARTICLE_PLATE, size, dim=-nesting)
        model_trace = poutine.trace(poutine.replay(particles(model), trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, nesting)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        if is_validation_enabled():
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        check_site_shape(site, nesting)
        return model_trace, guide_trace, draw

    def particles(self, model, guide, *args, **kwargs) -> StratifiedParticles:
        """Run the guide and the model once and return the per-draw log importance ratios.

        The ELBO estimate is ``(log_weights.exp() * log_ratio.mean(-1)).sum()``; the tensors
        stay attached to the autograd graph.

        :param model: the Pyro model.
        :param guide: an :class:`~pyro_mogflow.AutoMixtureFlow` with ``estimator="stratified"``.
        :return: a :class:`StratifiedParticles` with shapes ``(K, n)``, ``(K,)``, ``(K, n, D)``.
        """
        model_trace, guide_trace, draw = self._get_trace(model, guide, args, kwargs)
        k, n = guide.num_components, self.num_particles
        dim = -(self.max_plate_nesting + 1)
        log_ratio = 0.0
        for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
            for name, site in trace.nodes.items():
                if site["type"] == "sample":
                    log_ratio = log_ratio + sign * _per_particle(
                        site["log_prob"], dim, k * n, name, draw.log_weights
                    )
        return StratifiedParticles(log_ratio.reshape(k, n), draw.log_weights, draw.latent)

    def _objective(self, model, guide, args, kwargs) -> torch.Tensor:
        if _is_local_guide(guide):  # a user's guide with an amortized site (see below)
            return _local_objective(self, model, guide, args, kwargs)
        log_ratio, log_weights, _ = self.particles(model, guide, *args, **kwargs)
        if self.importance_weighted:
            joint = log_weights.unsqueeze(-1) + log_ratio
            return torch.logsumexp(joint.reshape(-1), dim=0) - math.log(log_ratio.shape[-1])
        return (log_weights.exp() * log_ratio.mean(-1)).sum()

    # ------------------------------------------------------------- Pyro ELBO API
    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of the negative ELBO (negative SIWAE bound if ``importance_weighted``).

        :rtype: float
        """
        with torch.no_grad():
            loss = -torch_item(self._objective(model, guide, args, kwargs))
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative ELBO (or SIWAE bound) as a scalar tensor that autograd can differentiate.

        :rtype: torch.Tensor
        """
        loss = -self._objective(model, guide, args, kwargs)
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Estimate the negative ELBO and backpropagate it into the parameters' ``.grad``.

        :rtype: float
        """
        loss = -self._objective(model, guide, args, kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        value = torch_item(loss)
        warn_if_nan(value, "loss")
        return value


def _per_particle(
    log_prob, particle_dim: int, size: int, name: str, like: torch.Tensor
) -> torch.Tensor:
    """Sum a site's log-density over all dimensions but the particle plate; shape ``(size,)``."""
    if not isinstance(log_prob, torch.Tensor):
        log_prob = torch.as_tensor(log_prob, dtype=like.dtype, device=like.device)
    nesting = -particle_dim
    if log_prob.dim() < nesting:  # the site does not vary across draws
        return log_prob.sum().expand(size)
    if log_prob.dim() > nesting:
        raise ValueError(
            f"site {name!r} has log_prob shape {tuple(log_prob.shape)}, with dimensions left of "
            f"the particle plate at dim {particle_dim}. Declare every batch dimension of the model "
            "with pyro.plate (or move it into the event with .to_event()), or raise "
            "max_plate_nesting."
        )
    return log_prob.reshape(log_prob.shape[0], -1).sum(-1).expand(size)


# ---------------------------------------------------------- local latents (amortized guides)
# A user's guide that samples a local latent from a distribution with ``num_components`` and a
# ``stratified_rsample(num_particles, particle_dim) -> (value, log_q, log_weights)`` method (e.g.
# pyro_mogflow.AmortizedMixtureFlow(..., estimator="stratified")) is stratified per data point:
#
#     L = sum_b sum_k pi_bk (1/n) sum_t [log p(x_b, z_bkt) - log q(z_bkt | x_b)] + E[global terms]
#
# where b runs over the elements of the site's plates. Terms of sites outside those plates
# (global latents) are averaged over all K * n draws.


def _is_local_guide(guide) -> bool:
    """A user's guide (not an autoguide): its stratifiable site is found by running it."""
    return not isinstance(guide, (AutoMixtureFlow, AutoGuide))


class _StratifyLocalSite(Messenger):
    """Replace the draw at the one guide site whose distribution offers ``stratified_rsample``.

    Entered outside the particle plate, it sees the site's distribution after every plate has
    expanded it; the site becomes a ``Delta`` at the ``K * n`` draws carrying their exact log q.
    """

    def __init__(self, num_particles: int, particle_dim: int):
        super().__init__()
        self.num_particles = num_particles
        self.particle_dim = particle_dim
        self.site = None  # (name, log_weights (K, *rest), cond_indep_stack)

    def _pyro_sample(self, msg) -> None:
        hook = getattr(msg["fn"], "stratified_rsample", None)
        if msg["is_observed"] or msg["done"] or not callable(hook):
            return
        if self.site is not None:
            raise ValueError(
                f"StratifiedELBO stratifies one amortized site per guide, found {self.site[0]!r} "
                f"and {msg['name']!r}. Give the other ones estimator='implicit', or train with "
                "pyro.infer.Trace_ELBO."
            )
        value, log_q, log_weights = hook(self.num_particles, self.particle_dim)
        event_dim = len(msg["fn"].event_shape)
        msg["fn"] = pyro.distributions.Delta(value, log_density=log_q, event_dim=event_dim)
        msg["value"] = value
        msg["done"] = True
        self.site = (msg["name"], log_weights, msg["cond_indep_stack"])


def _probe_local_guide(model, guide, args, kwargs) -> tuple[int, int]:
    """One run of guide and model: ``(K, plates nested)``; raises if nothing can be stratified."""
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    sites = [
        site
        for site in guide_trace.nodes.values()
        if site["type"] == "sample"
        and not site["is_observed"]
        and callable(getattr(site["fn"], "stratified_rsample", None))
    ]
    if not sites:
        raise TypeError(
            "StratifiedELBO needs the AutoMixtureFlow guide itself (estimator='stratified'), or a "
            "guide that samples a local latent from AmortizedMixtureFlow(..., "
            f"estimator='stratified'); got {type(guide).__name__} with no such site. For other "
            "guides use pyro.infer.Trace_ELBO."
        )
    if len(sites) > 1:
        raise ValueError(
            "StratifiedELBO stratifies one amortized site per guide, found "
            f"{[site['name'] for site in sites]}"
        )
    dims = [
        frame.dim
        for trace in (model_trace, guide_trace)
        for site in prune_subsample_sites(trace).nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return int(sites[0]["fn"].num_components), (-min(dims) if dims else 0)


def _local_objective(elbo: StratifiedELBO, model, guide, args, kwargs) -> torch.Tensor:
    """The stratified ELBO (or SIWAE) of a guide with one amortized mixture site."""
    if getattr(elbo, "_local_components", None) is None:
        k, needed = _probe_local_guide(model, guide, args, kwargs)
        if elbo.max_plate_nesting == float("inf"):
            elbo.max_plate_nesting = needed
        elif elbo.max_plate_nesting < needed:
            raise ValueError(
                f"max_plate_nesting={elbo.max_plate_nesting}, but the model nests {needed} "
                f"plate(s). Pass max_plate_nesting >= {needed}, or leave it out to infer it."
            )
        elbo._local_components = k
    k, n = elbo._local_components, elbo.num_particles
    nesting = elbo.max_plate_nesting + 1
    stratify = _StratifyLocalSite(n, -nesting)
    with stratify:
        particles = pyro.plate(_PARTICLE_PLATE, k * n, dim=-nesting)
        guide_trace = poutine.trace(particles(guide)).get_trace(*args, **kwargs)
    if stratify.site is None:
        raise ValueError("the guide sampled no stratifiable site in this step")
    particles = pyro.plate(_PARTICLE_PLATE, k * n, dim=-nesting)
    model_trace = poutine.trace(poutine.replay(particles(model), trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    if is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, nesting)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    _, log_weights, frames = stratify.site
    local = {f.name: f.dim for f in frames if f.vectorized and f.name != _PARTICLE_PLATE}
    rest = log_weights.shape[1:]
    local_sum = log_weights.new_zeros((k * n,) + rest)
    global_sum = log_weights.new_zeros((k * n,))
    global_varies = False
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if is_validation_enabled():
                check_site_shape(site, nesting)
            lp = torch.as_tensor(site["log_prob"], dtype=local_sum.dtype, device=local_sum.device)
            if lp.dim() > nesting:
                raise ValueError(
                    f"site {name!r} has log_prob shape {tuple(lp.shape)}, with dimensions left "
                    f"of the particle plate at dim {-nesting}. Declare every batch dimension "
                    "with pyro.plate (or move it into the event with .to_event())."
                )
            lp = lp.reshape((1,) * (nesting - lp.dim()) + lp.shape)
            names = {
                f.name
                for f in site["cond_indep_stack"]
                if f.vectorized and f.name != _PARTICLE_PLATE
            }
            if set(local) <= names:
                keep = {0} | {nesting + d for d in local.values()}
                drop = [i for i in range(nesting) if i not in keep]
                local_sum = local_sum + sign * (lp.sum(drop, keepdim=True) if drop else lp)
            elif not set(local) & names:
                global_varies = global_varies or lp.shape[0] > 1
                global_sum = global_sum + sign * lp.reshape(lp.shape[0], -1).sum(-1)
            else:
                raise ValueError(
                    f"site {name!r} lies in some but not all of the plates {sorted(local)} of "
                    "the stratified site; its terms cannot be assigned to data points"
                )
    log_ratio = local_sum.reshape((k, n) + rest)
    if elbo.importance_weighted:
        if global_varies:
            raise ValueError(
                "importance_weighted=True with an amortized site needs every latent outside its "
                "plates to be fixed across draws; use the ELBO (importance_weighted=False)"
            )
        joint = (log_weights.unsqueeze(1) + log_ratio).reshape((k * n,) + rest)
        bound = torch.logsumexp(joint, dim=0) - math.log(n)
        return bound.sum() + global_sum.mean()
    return (log_weights.exp() * log_ratio.mean(1)).sum() + global_sum.mean()
