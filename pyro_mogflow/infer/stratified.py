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

import contextlib
import numbers
import sys
import warnings
from collections.abc import Iterator

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_model_guide_match, warn_if_nan

from ..distributions.mixture_flow import StratifiedSample, check_components
from . import stratified_chunks
from .memory import DEFAULT_MEMORY_BUDGET, ChunkPlanner, check_memory_budget
from .stratified_sites import (
    _VECTORIZE_ADVICE,
    PARTICLE_PLATE,
    StratifiedParticles,
    _Accumulator,
    _ComponentsChanged,
    _stratified_site,
    _Stratify,
    _Terms,
)

__all__ = ["StratifiedELBO", "StratifiedParticles"]


class StratifiedELBO(ELBO):
    r"""The ELBO of a mixture-flow guide with the sum over components exact.

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

    What is stratified: the one guide site whose distribution offers
    :meth:`~pyro_mogflow.distributions.MixtureFlow.stratified_rsample` with
    ``estimator="stratified"`` -- the packed latent of an :class:`~pyro_mogflow.AutoMixtureFlow`
    (alone or inside an ``AutoGuideList``), or a site a guide of your own samples from an
    :class:`~pyro_mogflow.AmortizedMixtureFlow`. The ELBO never looks at the guide's class.
    Outside this ELBO such a distribution samples the exact mixture (e.g. in ``Predictive``);
    under another ELBO it is the unbiased ``"implicit"`` estimator.

    Local latents: the guide may instead be a function that samples one site from an
    :class:`~pyro_mogflow.AmortizedMixtureFlow` built with ``estimator="stratified"``, inside
    the data plate (subsampled or not). Each data point :math:`b` then has its own weights
    :math:`\pi_{bk}`, and the ELBO is stratified point by point,

    .. math::
        \widehat{\mathcal{L}} = \sum_b \sum_{k=1}^K \pi_{bk}\, \frac{1}{n} \sum_{t=1}^n
            \log \frac{p(x_b, z_{bkt})}{q(z_{bkt} \mid x_b)} + \widehat{G},

    where :math:`\widehat{G}` averages the terms of sites outside the data plate (global
    latents sampled by other guide sites) over the :math:`K n` draws; for an
    ``AutoMixtureFlow`` the site lies in no plate, so every term is stratified. With
    ``importance_weighted=True`` the bound is SIWAE per data point, which needs every latent
    outside the data plate to be fixed across draws. :meth:`particles` serves mixture flows
    outside every plate (``AutoMixtureFlow``) only.

    :param int num_particles: ``n``, Gaussian draws per component (default 1), so each step
        runs the model on ``K * n`` points.
    :param bool importance_weighted: use the SIWAE bound instead of the ELBO (default False).
    :param int max_plate_nesting: the model's number of nested plates, not counting the plate
        this ELBO adds. By default it is found by running the model once at the guide's
        initial values (static model structure assumed), as Pyro does.
    :param bool retain_graph: passed to ``backward`` in :meth:`loss_and_grads`.
    :param memory_budget: bytes of working memory one evaluation may take (default
        ``DEFAULT_MEMORY_BUDGET``, 1 GiB), or ``None`` for no limit. The components are
        evaluated in chunks whose size is measured on the first evaluation (see
        :mod:`pyro_mogflow.infer.memory`): :meth:`loss_and_grads` backpropagates each chunk's
        share of the ELBO as soon as it is built (same value and gradient as one evaluation);
        :meth:`differentiable_loss` recomputes each chunk in the backward pass
        (``torch.utils.checkpoint``); with ``importance_weighted=True`` a pass without
        gradients finds every draw's weight, then each chunk is backpropagated (exact gradient,
        twice the model runs; its :meth:`differentiable_loss` keeps every chunk's graph).
        When one component's ``n`` draws do not fit, a chunk holds some of its draws (they
        are independent), each piece's share scaled by its fraction of ``n``.
        :meth:`particles` is chunked without gradients and one evaluation with them.
    :param bool antithetic: draw each component's noise in antithetic pairs
        :math:`\pm\epsilon` (``num_particles`` must be even; default False). The estimate stays
        unbiased; terms linear in the noise cancel within a pair (used by the natural-gradient
        component step of :func:`~pyro_mogflow.fit`).

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
        memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
        antithetic: bool = False,
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
        if not isinstance(antithetic, bool):
            raise TypeError(f"antithetic must be a bool, got {type(antithetic).__name__}")
        if antithetic and num_particles % 2:
            raise ValueError(
                f"antithetic draws come in pairs: num_particles must be even, got {num_particles}"
            )
        if retain_graph is not None and not isinstance(retain_graph, bool):
            raise TypeError(f"retain_graph must be a bool or None, got {retain_graph!r}")
        super().__init__(
            num_particles=int(num_particles),
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=False,
            retain_graph=retain_graph,
        )
        self.importance_weighted = importance_weighted
        self.antithetic = antithetic
        self.memory_budget = check_memory_budget(memory_budget)
        self._planner = ChunkPlanner(self.memory_budget, "component")
        self._chunking = False  # inside a chunked evaluation: a changed K is handled there
        self._probed: dict = {}
        self._draw_by_draw: set = set()  # (model, guide) pairs whose model does not vectorize
        self._latent_shapes: dict = {}  # model -> its latent sites' shapes, one draw at a time
        self._components: torch.Tensor | None = None  # set by only_components()
        self._draw_fraction = 1.0  # a chunk of some of each component's draws: their share
        #: The :class:`~pyro_mogflow.distributions.StratifiedSample` of the last evaluation.
        self.last_sample: StratifiedSample | None = None

    # ------------------------------------------------------------------ probing
    def _probe(self, model, guide, args, kwargs) -> tuple[str, int]:
        """Find the stratified site and the model's plate nesting from one run of guide and model.

        Runs once per (model, guide) pair, outside every particle plate, without gradients and
        without moving torch's random stream; a guide with a ``setup`` method is set up first.
        :return: ``(site name, K)``.
        """
        key = (id(model), id(guide))
        if key in self._probed:
            return self._probed[key]
        setup = getattr(guide, "setup", None)
        if callable(setup):
            setup(*args, **kwargs)  # outside the particle plate (and outside fork_rng below)
        with torch.random.fork_rng(devices=[]), poutine.block(), torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        name, k = _stratified_site(guide, guide_trace)
        dims = [
            frame.dim
            for trace in (model_trace, guide_trace)
            for site in prune_subsample_sites(trace).nodes.values()
            if site["type"] == "sample"
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        ]
        needed = -min(dims) if dims else 0
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = needed
        elif self.max_plate_nesting < needed:
            raise ValueError(
                f"max_plate_nesting={self.max_plate_nesting}, but the model nests {needed} "
                "plate(s) (found by running it at the guide's initial values). Pass "
                f"max_plate_nesting >= {needed}, or leave it out to have it inferred."
            )
        self._probed[key] = (name, k)
        return name, k

    @staticmethod
    def stratifies(model, guide, *args, **kwargs) -> bool:
        """Whether ``guide`` samples a site that this ELBO can stratify (one run, no gradients).

        :return: True when exactly one guide site's distribution offers
            ``stratified_rsample`` with ``estimator="stratified"``.
        """
        try:
            StratifiedELBO()._probe(model, guide, args, kwargs)
        except (TypeError, ValueError):
            return False
        return True

    # ------------------------------------------------------------------ traces
    def _terms(self, model, guide, args, kwargs) -> _Terms:
        """One vectorized run of the guide (stratified) and of the model replayed against it.

        A model that does not vectorize over the particle plate (e.g. ``X @ w``) is detected on
        its first failure and then evaluated draw by draw (``K * n`` model runs), with a warning
        that says how to vectorize it.
        """
        name, k_all = self._probe(model, guide, args, kwargs)
        n = self.num_particles
        nesting = self.max_plate_nesting + 1
        components = self._components
        if components is not None:
            components = check_components(components, k_all)
        k = k_all if components is None else components.numel()
        stratify = _Stratify(name, n, -nesting, k_all, components, self.antithetic)
        try:
            with stratify:
                particles = pyro.plate(PARTICLE_PLATE, k * n, dim=-nesting)
                guide_trace = poutine.trace(particles(guide)).get_trace(*args, **kwargs)
        except _ComponentsChanged:
            # The guide's number of components changed since it was probed (e.g. pruned
            # components): probe it again and evaluate anew.
            self._probed.pop((id(model), id(guide)), None)
            if self._chunking:
                raise
            return self._terms(model, guide, args, kwargs)
        if stratify.sample is None:
            raise ValueError(f"the guide did not sample its stratified site {name!r} this step")
        sample = stratify.sample
        self.last_sample = sample
        local = {f.name: f.dim for f in stratify.frames if f.vectorized}
        rest = sample.log_weights.shape[1:]
        acc = _Accumulator(local, nesting, sample.log_q.new_zeros((k * n,) + rest))
        key = (id(model), id(guide))
        model_trace = None
        if key not in self._draw_by_draw:
            try:
                particles = pyro.plate(PARTICLE_PLATE, k * n, dim=-nesting)
                model_trace = poutine.trace(
                    poutine.replay(particles(model), trace=guide_trace)
                ).get_trace(*args, **kwargs)
                if is_validation_enabled():
                    check_model_guide_match(model_trace, guide_trace, nesting)
                model_trace = prune_subsample_sites(model_trace)
                model_trace.compute_log_prob()
                acc.add_trace(model_trace, 1.0)
            except (RuntimeError, ValueError, IndexError) as error:
                if local or not self._model_runs_draw_by_draw(model, guide_trace, args, kwargs):
                    raise type(error)(
                        f"running the model on {k * n} particles at once (a pyro.plate of size "
                        f"K*n = {k}*{n} at dim {-nesting}) failed: {error}\n"
                        f"{_VECTORIZE_ADVICE.format(dim=-nesting)}"
                    ) from error
                self._draw_by_draw.add(key)
                warnings.warn(
                    "StratifiedELBO: the model does not vectorize over the particle plate (it "
                    f"failed with: {error}), so it is evaluated draw by draw, {k * n} runs per "
                    "step. Write it with broadcasting so a latent with extra leading dimensions "
                    "works, e.g. (X * w).sum(-1) instead of X @ w, and declare batch dimensions "
                    "with pyro.plate.",
                    UserWarning,
                    stacklevel=4,
                )
                acc.reset()
                model_trace = None
        if key in self._draw_by_draw:
            acc.local = acc.local + self._model_draw_by_draw(
                model, guide_trace, args, kwargs
            ).reshape(acc.local.shape)
        guide_trace = prune_subsample_sites(guide_trace)
        guide_trace.compute_log_prob()
        acc.add_trace(guide_trace, -1.0)
        return _Terms(
            acc.local.reshape((k, n) + rest), acc.global_, acc.global_varies, sample, k_all * n
        )

    def _model_draw_by_draw(
        self, model, guide_trace, args, kwargs, limit: int | None = None
    ) -> torch.Tensor:
        """``log p(x, z_i)`` for every draw ``i`` of a global stratified site, one model run each.

        :return: shape ``(K * n,)`` (or ``(limit,)``: the first draws only).
        """
        shapes = self._latent_shapes[id(model)]
        size = None
        rows: dict = {}
        for site_name, shape in shapes.items():
            site = guide_trace.nodes[site_name]
            value = site["value"]
            axis = value.dim() - site["fn"].event_dim - (self.max_plate_nesting + 1)
            size = value.shape[axis]
            rows[site_name] = (value, axis, shape)
        out = []
        for i in range(size if limit is None else limit):
            data = {s: v.select(axis, i).reshape(shape) for s, (v, axis, shape) in rows.items()}
            trace = poutine.trace(poutine.condition(model, data=data)).get_trace(*args, **kwargs)
            out.append(trace.log_prob_sum())
        return torch.stack(out)

    def _model_runs_draw_by_draw(self, model, guide_trace, args, kwargs) -> bool:
        """Whether the model runs on one draw at a time (records its latent sites' shapes)."""
        with poutine.block(), torch.no_grad():
            trace = poutine.trace(model).get_trace(*args, **kwargs)
        shapes = {
            site_name: site["value"].shape
            for site_name, site in trace.nodes.items()
            if site["type"] == "sample"
            and not site["is_observed"]
            and not site_is_subsample(site)
            and site_name in guide_trace.nodes
        }
        if not shapes:
            return False
        self._latent_shapes[id(model)] = shapes
        try:
            with poutine.block(), torch.no_grad():
                first = self._model_draw_by_draw(model, guide_trace, args, kwargs, limit=1)
        except (RuntimeError, ValueError, IndexError):
            return False
        return not bool(torch.isnan(first).any())

    def _get_trace(self, model, guide, args, kwargs):
        """Not used: every draw is taken in the one vectorized run of :meth:`_terms`."""
        raise NotImplementedError("StratifiedELBO evaluates its draws in one vectorized run")

    def particles(self, model, guide, *args, **kwargs) -> StratifiedParticles:
        """Run the guide and the model on every draw and return the per-draw log importance
        ratios.

        The ELBO estimate is ``(log_weights.exp() * log_ratio.mean(-1)).sum()``. For a mixture
        flow outside every plate (an :class:`~pyro_mogflow.AutoMixtureFlow`). Without gradients
        (``torch.no_grad()``) the draws are evaluated in chunks that fit ``memory_budget``
        (whole components, or pieces of one component's draws); with gradients it is one
        evaluation whose tensors stay attached to the autograd graph, so its memory grows with
        ``K n``: train with :meth:`loss_and_grads` for bounded memory.

        :param model: the Pyro model.
        :param guide: a guide with one stratified mixture-flow site outside every plate.
        :return: a :class:`StratifiedParticles` with shapes ``(K, n)``, ``(K,)``, ``(K, n, D)``.
        """
        if torch.is_grad_enabled() or self._chunking:
            return self._particles_once(model, guide, args, kwargs)
        return stratified_chunks.particles_and_base(self, model, guide, args, kwargs)[0]

    def _particles_once(self, model, guide, args, kwargs) -> StratifiedParticles:
        """:meth:`particles` in one evaluation (of the components and draws set for a chunk)."""
        terms = self._terms(model, guide, args, kwargs)
        k, n = terms.local.shape[:2]
        if terms.local[0, 0].numel() != 1:
            raise ValueError(
                "StratifiedELBO.particles() serves a mixture flow outside every plate (e.g. "
                "AutoMixtureFlow); this guide's stratified site lies in plates of shape "
                f"{tuple(terms.local.shape[2:])}"
            )
        log_ratio = terms.local.reshape(k, n) + terms.global_.reshape(k, n)
        d = terms.sample.value.shape[-1]
        return StratifiedParticles(
            log_ratio, terms.sample.log_weights.reshape(k), terms.sample.value.reshape(k, n, d)
        )

    @contextlib.contextmanager
    def only_components(self, components) -> Iterator[StratifiedELBO]:
        r"""Within this context, evaluate only the components ``components`` (a share of the ELBO).

        Inside it, :meth:`loss`, :meth:`differentiable_loss`, :meth:`loss_and_grads` and
        :meth:`particles` draw and score the ``n`` draws of the ``m`` listed components only,
        and the objective is their share of the stratified ELBO,

        .. math::
            \widehat{\mathcal{L}}_S = \sum_{k \in S} \pi_k\, \frac{1}{n} \sum_{t=1}^n
                \log \frac{p(x, z_{kt})}{q(z_{kt})} \;+\; \frac{1}{K n}
                \sum_{k \in S} \sum_{t=1}^n G_{kt},

        where :math:`G` are the terms of sites outside the stratified site's plates (none for an
        :class:`~pyro_mogflow.AutoMixtureFlow`). The shares of a partition of
        :math:`\{0, \dots, K-1\}` add up to the full ELBO and, with independent noise, to an
        estimate of its gradient with the same expectation: evaluating the components in chunks
        bounds memory by the chunk, and ranks of a process group can each take a share.
        ``log q`` stays the density of the whole mixture. Not available with
        ``importance_weighted=True`` (the SIWAE bound does not split over components).

        :param components: distinct component indices, a sequence or a 1-D integer tensor of
            shape ``(m,)``.
        :raises ValueError: if an index is out of range or repeated (checked against ``K`` at
            the evaluation), or with ``importance_weighted=True``.
        """
        if self.importance_weighted:
            raise ValueError(
                "only_components: the importance-weighted (SIWAE) bound does not split over "
                "components; use importance_weighted=False"
            )
        components = check_components(components, sys.maxsize)
        previous = self._components
        self._components = components
        try:
            yield self
        finally:
            self._components = previous

    def _objective(self, model, guide, args, kwargs) -> torch.Tensor:
        """The ELBO (or the share of ``only_components``); SIWAE: see stratified_chunks."""
        terms = self._terms(model, guide, args, kwargs)
        log_weights = terms.sample.log_weights
        if self._components is not None:
            share = terms.global_.sum() / terms.total
            value = (log_weights.exp() * terms.local.mean(1)).sum() + share
            return value if self._draw_fraction == 1.0 else self._draw_fraction * value
        return (log_weights.exp() * terms.local.mean(1)).sum() + terms.global_.mean()

    # ------------------------------------------------------------- Pyro ELBO API
    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of the negative ELBO (negative SIWAE bound if ``importance_weighted``).

        :rtype: float
        """
        loss = -torch_item(stratified_chunks.loss(self, model, guide, args, kwargs))
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative ELBO (or SIWAE bound) as a scalar tensor that autograd can differentiate.

        :rtype: torch.Tensor
        """
        loss = -stratified_chunks.differentiable_loss(self, model, guide, args, kwargs)
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Estimate the negative ELBO and backpropagate it into the parameters' ``.grad``.

        :rtype: float
        """
        value = -torch_item(stratified_chunks.loss_and_grads(self, model, guide, args, kwargs))
        warn_if_nan(value, "loss")
        return value
