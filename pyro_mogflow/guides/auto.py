"""AutoMixtureFlow: a normalizing-flow guide on a learnable mixture of diagonal Gaussians."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import ComposeTransform
from pyro.infer.autoguide import AutoContinuous
from pyro.nn import PyroParam
from torch.distributions import Transform

from .._validation import check_int, check_real
from ..distributions import MixtureFlow, mixture_base
from ..distributions.estimators import ESTIMATORS, Temperature
from ..distributions.full_mixture import FullNormalMixture
from ..flows import ForwardOnlyGuard, build_flow, check_flow, is_forward_only
from .covariance import component_scales, is_full, to_full_covariance
from .initialization import (
    DEFAULT_INIT_SCALE,
    check_init_spread,
    init_to_median_or_zero,
    init_to_zero,
    prior_locs,
    resolve_init_spread,
    spread_locs,
)
from .model_checks import ModelChecks
from .naming import UniqueName
from .state import EstimatorState
from .summaries import SampleSummaries

__all__ = ["AutoMixtureFlow", "ESTIMATORS"]


class AutoMixtureFlow(EstimatorState, UniqueName, ModelChecks, SampleSummaries, AutoContinuous):
    r"""A normalizing flow on a learnable mixture of diagonal Gaussians, as a Pyro autoguide.

    The guide packs every latent site into one unconstrained vector :math:`z \in \mathbb{R}^D`
    (as every :class:`~pyro.infer.autoguide.AutoContinuous` guide does) and gives it the law

    .. math::
        z = f(z_0), \qquad z_0 \sim \sum_{k=1}^K \pi_k\, \mathcal{N}(\mu_k, \operatorname{diag}
        \sigma_k^2), \qquad
        \log q(z) = \log q_0(z_0) - \log\left|\det \frac{\partial f}{\partial z_0}\right|,

    where :math:`f` is a stack of ``num_flows`` Pyro transforms (``flow``) and the weights
    :math:`\pi = \operatorname{softmax}(\text{logits})`, means :math:`\mu` and scales
    :math:`\sigma` are learned. Each component can settle on its own mode of the posterior, and
    the flow bends the components' shapes.

    The ``estimator`` decides how gradients pass through the mixture's discrete choice
    (``relaxed``, ``relaxed-nested``, ``implicit``, ``stratified`` or ``pathwise``; the table in
    :mod:`pyro_mogflow.distributions.estimators` says what each samples and how biased its
    weight gradient is). The guide's posterior is a
    :class:`~pyro_mogflow.distributions.MixtureFlow`.

    ``relaxed-nested`` is the design note's method as written. ``stratified`` takes the exact
    expectation over components under :class:`~pyro_mogflow.StratifiedELBO`; under any other
    ELBO (``Trace_ELBO``, the jit ELBOs, ``Predictive``) it samples the exact mixture with
    implicit reparameterization gradients, as ``implicit`` does (unbiased, not stratified), so
    ``SVI(model, AutoMixtureFlow(model), optim, Trace_ELBO())`` works as with any Pyro guide,
    without a warning. Every estimator but ``pathwise`` can be traced by ``JitTrace_ELBO``.

    Usage (:func:`pyro_mogflow.fit` adds the tempering and weight updates that find modes)::

        guide, losses = pyro_mogflow.fit(model, data)   # AutoMixtureFlow(model), defaults
        print(guide.components(data))   # the modes the guide found, with their weights

        guide = AutoMixtureFlow(model, num_components=8, flow="spline_autoregressive")
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), StratifiedELBO())
        for step in range(2000):
            svi.step(data)

    :param callable model: a Pyro model with continuous latent sites.
    :param int num_components: ``K``, the number of mixture components (default 64: the
        multimodal benchmark needed about that many for 40 modes, and spare components cost
        little, since their weights fall to zero; with ``estimator="stratified"`` every step
        evaluates the model ``K`` times, so lower it for expensive models).
    :param flow: a registered flow name (see :data:`pyro_mogflow.flows.FLOWS`), a callable
        ``latent_dim -> TransformModule`` called once per layer, or ``None`` for the bare
        mixture. Default ``None``: in the multimodal benchmark every flow tried (spline and
        affine autoregressive) made the fit worse on every target but one, and cost 2-3 times
        more per step (see README).
    :param int num_flows: number of flow layers (default 2); permutations between them are
        buffers, so they survive ``state_dict`` round trips.
    :param hidden_dims: hidden sizes of the flows' networks (``None``: Pyro's defaults).
    :param dict flow_kwargs: extra keyword arguments for a registered flow (spline flows default
        to ``bound=8``, ``count_bins=8``).
    :param str estimator: one of :data:`ESTIMATORS` (default ``"stratified"``: the exact
        expectation over components, trained with :class:`~pyro_mogflow.StratifiedELBO`, e.g. by
        :func:`pyro_mogflow.fit`; under another ELBO it samples the exact mixture like
        ``"implicit"``. The relaxed estimators' objectives are unbounded, see README).
    :param temperature: Gumbel-softmax temperature for the relaxed estimators: a positive float
        or a callable ``step -> float``, where ``step`` is :attr:`step`, the number of guide
        calls made with gradients enabled (one per ``svi.step`` for a single particle).
    :param int num_nested: inner draws of the nested density for ``"relaxed-nested"``.
    :param callable init_loc_fn: a Pyro init strategy, as in every ``AutoContinuous`` guide
        (default ``None``: ``pyro_mogflow.guides.initialization.init_to_zero``, the point that
        is zero in the unconstrained space, as ``AutoNormal``; ``init_to_prior_mean`` and
        Pyro's ``init_to_median`` are the alternatives).
    :param float init_scale: initial standard deviation of every component, in the
        unconstrained space (default ``None``: 0.1, as ``AutoNormal``).
    :param init_spread: where the component means start. ``"auto"`` (default): every mean at
        the initial location (``init_loc_fn``'s point), so the guide starts as one Gaussian of
        scale ``init_scale``, as ``AutoNormal`` does. In a plain ``SVI`` loop under
        ``Trace_ELBO`` the components then get identical gradients and stay one Gaussian
        (measured: components started apart, even by 1e-4, drift apart and each learns only
        from the steps that draw it, which left the fit far behind ``AutoNormal``'s); under
        :class:`~pyro_mogflow.StratifiedELBO` each component gets its own draws, so they
        separate and can settle on nearby modes or shape a correlated one.
        :func:`~pyro_mogflow.fit` sets a guide left at ``"auto"``, with neither ``init_loc_fn``
        nor ``init_scale`` given, up at ``"prior"`` instead (its mode finding needs that
        start). With ``estimator="pathwise"`` (Pyro's sampler is NaN when two means coincide)
        ``"auto"`` offsets the means by ``init_scale`` times antithetic normal draws.
        ``"prior"``: at ``K`` independent draws of the model's prior (ancestral draws of every
        latent site, mapped to the unconstrained space), so the components start spread over
        where the posterior can live -- the start for mode finding, with
        :func:`~pyro_mogflow.fit` or, in a plain loop, with
        :class:`~pyro_mogflow.MixtureNaturalGradient`; a site whose distribution cannot be
        sampled (e.g. ``ImproperUniform``) is offset from the initial location by standard
        normal noise instead, with a warning naming it. A float ``s >= 0``: at the initial
        location plus ``s`` times independent standard normal offsets. With ``K = 1`` the
        single mean is the initial location.
    :param int num_quantile_samples: samples used by :meth:`median` and :meth:`quantiles`.
    :param str name: prefix of the guide's names in Pyro's param store. By default the first
        free name among ``AutoMixtureFlow``, ``AutoMixtureFlow_1``, ... is taken when the guide
        is set up (free: no parameter in the store and no live guide holding it), so two guides
        never share parameters; an explicit ``name`` that is already in use raises instead. A
        copy made by :mod:`pickle`, :func:`torch.load` or :func:`copy.deepcopy` in a process
        where its name is in use takes the next free name (see :attr:`name`).
    :param callable create_plates: as in :class:`~pyro.infer.autoguide.AutoGuide`.

    Saving and restoring: ``torch.save(guide)`` / ``torch.load(f, weights_only=False)`` (and
    :mod:`pickle`) copy the whole guide without touching the original; the copy has no model
    attached, which a set-up guide does not need. A whole guide is arbitrary pickled Python
    (its flows, init strategy, plates), so torch's default ``weights_only=True`` refuses it:
    pass ``weights_only=False``, and only for files you trust. The ``state_dict`` (tensors
    only) loads under the safe default. To restore from a ``state_dict``, build the guide with
    the same arguments, call :meth:`setup` with the model's arguments, then ``load_state_dict``::

        fresh = AutoMixtureFlow(model, num_components=4, flow="affine_autoregressive")
        fresh.setup(data)
        fresh.load_state_dict(guide.state_dict())

    The ``state_dict`` holds the mixture, the flow's weights, its permutations (buffers) and
    :attr:`step`, so the fresh guide draws the very same samples for the same seed. Pyro's
    ``ParamStoreDict.save``/``load`` is not a restore path: the guide claims a fresh name
    rather than adopt parameters it did not create.

    References:

    * D. Rezende, S. Mohamed, *Variational Inference with Normalizing Flows*, ICML 2015.
    * E. Jang, S. Gu, B. Poole, *Categorical Reparameterization with Gumbel-Softmax*, ICLR 2017.
    * M. Figurnov, S. Mohamed, A. Mnih, *Implicit Reparameterization Gradients*, NeurIPS 2018.
    * W. Morningstar, S. Vikram, C. Ham, A. Gallagher, J. Dillon, *Automatic Differentiation
      Variational Inference with Mixtures*, AISTATS 2021.
    """

    def __init__(
        self,
        model: Callable,
        num_components: int = 64,
        flow: str | Callable[[int], Transform] | None = None,
        num_flows: int = 2,
        hidden_dims: int | Sequence[int] | None = None,
        flow_kwargs: dict | None = None,
        estimator: str = "stratified",
        temperature: Temperature = 0.5,
        num_nested: int = 32,
        init_loc_fn: Callable | None = None,
        init_scale: float | None = None,
        init_spread: float | str = "auto",
        num_quantile_samples: int = 4096,
        name: str | None = None,
        create_plates: Callable | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        num_components = check_int("num_components", num_components, 1)
        check_flow(flow)
        num_flows = check_int("num_flows", num_flows, 1)
        if hidden_dims is not None:
            if isinstance(hidden_dims, numbers.Integral) and not isinstance(hidden_dims, bool):
                hidden_dims = [hidden_dims]
            if isinstance(hidden_dims, (str, bytes)) or not isinstance(hidden_dims, Iterable):
                raise TypeError(
                    "hidden_dims must be an int >= 1, a sequence of them or None, got "
                    f"{type(hidden_dims).__name__} {hidden_dims!r}"
                )
            hidden_dims = [
                check_int(f"hidden_dims[{i}]", h, 1) for i, h in enumerate(list(hidden_dims))
            ]
        if flow_kwargs is not None and not isinstance(flow_kwargs, dict):
            raise TypeError(f"flow_kwargs must be a dict, got {type(flow_kwargs).__name__}")
        self._init_estimator(estimator, temperature, num_nested)
        if init_loc_fn is not None and not callable(init_loc_fn):
            raise TypeError(
                "init_loc_fn must be a callable init strategy (site -> value), e.g. "
                f"pyro.infer.autoguide.init_to_mean, or None, got {type(init_loc_fn).__name__}"
            )
        if create_plates is not None and not callable(create_plates):
            raise TypeError(
                "create_plates must be a callable (*args, **kwargs) -> plate(s) or None, got "
                f"{type(create_plates).__name__}"
            )
        if init_scale is not None:
            init_scale = check_real("init_scale", init_scale, minimum=0.0, strict=True)
        init_spread = check_init_spread(init_spread, num_components)
        num_quantile_samples = check_int("num_quantile_samples", num_quantile_samples, 1)
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"name must be a non-empty str, got {name!r}")

        self.num_components = num_components
        self.flow_name = flow
        self.num_flows = num_flows if flow is not None else 0
        self.hidden_dims = hidden_dims
        self.flow_kwargs = dict(flow_kwargs or {})
        self._init_scale = init_scale
        self._init_spread = resolve_init_spread(init_spread, self.estimator, init_scale)
        self._symmetric_spread = init_spread == "auto"  # pathwise's offsets: antithetic
        # fit() may set such a guide up at prior draws instead (see _start_at_prior)
        self._auto_start = init_spread == "auto" and init_loc_fn is None and init_scale is None
        self.num_quantile_samples = num_quantile_samples
        self._explicit_name = name
        if init_loc_fn is None:
            init_loc_fn = self._default_init
        self._init_strategy = init_loc_fn
        super().__init__(model, init_loc_fn=init_loc_fn)
        if create_plates is not None:
            self.create_plates = create_plates

    # ------------------------------------------------------------------ set-up
    def setup(self, *args, **kwargs) -> AutoMixtureFlow:
        """Set the guide up from one run of the model, without drawing a sample.

        A guide learns its latent sites (and so the shapes of its parameters) by running the
        model once; this happens on the first call, or here. Call it on a fresh guide before
        ``load_state_dict``. Does nothing if the guide is already set up.

        :param args: the model's positional arguments.
        :param kwargs: the model's keyword arguments.
        :return: the guide itself.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self

    def _default_init(self, site: dict | None = None):
        """The default init strategy: for a start at one location the point that is zero in
        the unconstrained space, ``AutoNormal``'s start; with the prior spread (where it only
        seeds the prototype) the median of 15 prior draws, so a ``"prior"`` start, e.g. under
        :func:`~pyro_mogflow.fit`, draws the very components it drew before.

        Measured (2026-11-29, fifth session; README, "Fifth session"): with ``AutoNormal``'s
        start (and its random draws) a one-component guide under ``Trace_ELBO`` follows
        ``AutoNormal``'s losses exactly (``python -m benchmarks.plain_saddle``); over 5 seeds
        the plain ``Trace_ELBO`` loop from this start left the Bayesian mixture's
        label-switching saddle in 2 seeds, from the former start (the prior mean, a scale
        site at 1.6 rather than 1) in none; the median of 15 prior draws lies about 10 from
        the centre of an N(0, 30^2) prior per coordinate and left a plain loop hundreds of
        nats behind ``AutoNormal`` on the 20-100-D targets."""
        if site is None:
            return self._default_init
        if self._init_spread == "prior":
            return init_to_median_or_zero(site)
        return init_to_zero(site)

    def _start_at_prior(self, *args, **kwargs) -> bool:
        """For :func:`~pyro_mogflow.fit`: a guide whose start was left to ``init_spread="auto"``
        (no ``init_loc_fn``, no ``init_scale``) starts its component means at prior draws, the
        start fit's mode finding needs. Returns whether it does.

        A guide not set up yet is set up there. A guide already set up (e.g. by ``setup()``)
        that still holds its plain-loop start, every component on one point with equal
        weights, gets its means redrawn at prior draws (in place, so an optimiser's references
        stay valid): from one point, a model with a sign symmetry keeps every component on its
        saddle (antithetic draws about it give exactly zero mean gradients), and the fit ends
        as one smeared component on both modes. ``args``/``kwargs`` are the model's arguments.
        """
        if not (self._auto_start and self.num_components > 1):
            return False
        if self.prototype_trace is None:
            self._init_spread = "prior"
            return True
        if is_full(self) or not self._at_one_point():
            return False
        loc = self.locs.detach()[0]
        with torch.no_grad():
            drawn = prior_locs(
                self.model, self.prototype_trace, loc, self.num_components, *args, **kwargs
            )
            self.locs_unconstrained.copy_(drawn)
        return True

    def _restore_start(self, locs: torch.Tensor) -> None:
        """Put back the means :meth:`_start_at_prior` replaced (a fit that failed at once)."""
        with torch.no_grad():
            self.locs_unconstrained.copy_(locs)

    def _at_one_point(self) -> bool:
        """Every component has the same mean and scales and all weights are equal."""
        with torch.no_grad():
            locs, scales, logits = self.locs, self.scales, self.logits
            return bool(
                (locs == locs[:1]).all()
                and (scales == scales[:1]).all()
                and (logits == logits[0]).all()
            )

    def _setup_prototype(self, *args, **kwargs):
        try:
            super()._setup_prototype(*args, **kwargs)
        except (NotImplementedError, ValueError, TypeError):
            try:
                if self.prototype_trace is not None:
                    self._check_sites()  # raises a clearer error if a site is discrete
            finally:
                self.prototype_trace = None
            raise
        try:
            self._check_sites()
            self._build_params(*args, **kwargs)
        except BaseException:
            # Leave no half-built guide behind: the next call sets up again (and raises again).
            self.prototype_trace = None
            raise

    def _build_params(self, *args, **kwargs):
        loc = self._init_loc().detach()
        k, d = self.num_components, self.latent_dim
        try:
            flow = build_flow(
                self.flow_name, d, self.num_flows, self.hidden_dims, **self.flow_kwargs
            )
        except (ValueError, TypeError) as e:
            raise type(e)(
                f"cannot build flow={self.flow_name!r} with num_flows={self.num_flows}, "
                f"hidden_dims={self.hidden_dims} and flow_kwargs={self.flow_kwargs} on the "
                f"model's latent_dim={d}: {e} (autoregressive flows need every hidden size "
                f">= latent_dim)"
            ) from e
        self._claim_name()
        scale = self._init_scale
        if k == 1:
            locs = loc.unsqueeze(0)
        elif self._init_spread == "prior":
            locs = prior_locs(self.model, self.prototype_trace, loc, k, *args, **kwargs)
        else:
            locs = spread_locs(loc, k, self._init_spread, symmetric=self._symmetric_spread)
        if scale is None:
            scale = DEFAULT_INIT_SCALE
        scales = torch.as_tensor(scale, dtype=loc.dtype, device=loc.device).expand(k, d)
        self.locs = PyroParam(locs, event_dim=2)
        self.scales = PyroParam(
            scales.clone(), constraint=constraints.softplus_positive, event_dim=2
        )
        self.logits = PyroParam(torch.zeros(k, dtype=loc.dtype, device=loc.device), event_dim=1)
        self.flow = None if flow is None else flow.to(device=loc.device, dtype=loc.dtype)
        self._forward_only = self.flow is not None and is_forward_only(self.flow)

    # ----------------------------------------------------------- distributions
    def get_base_dist(self):
        """The mixture base distribution for the chosen estimator (event shape ``(D,)``)."""
        options = self._estimator_kwargs()
        if is_full(self):
            return FullNormalMixture(self.logits, self.locs, self.scale_tril)
        return mixture_base(
            options["estimator"],
            self.logits,
            self.locs,
            self.scales,
            options["temperature"],
            options["num_nested"],
        )

    def get_transform(self, *args, **kwargs) -> Transform:
        """The flow applied to the base (identity when ``flow=None``)."""
        if self.flow is None:
            return ComposeTransform([])
        if self._forward_only:
            # One guard per posterior: it scores exactly the points that posterior sampled, so
            # traces kept from earlier draws (sequential Predictive) stay scoreable, and a
            # point it did not produce raises instead of getting a stale log-det.
            return ForwardOnlyGuard(self.flow, name=str(self.flow_name))
        return self.flow

    def get_posterior(self, *args, **kwargs) -> MixtureFlow:
        """``q(z)`` on the packed unconstrained latent, event shape ``(latent_dim,)``.

        Under :class:`~pyro_mogflow.StratifiedELBO` this distribution is drawn from every
        component (:meth:`~pyro_mogflow.distributions.MixtureFlow.stratified_rsample`); elsewhere
        it is sampled by the guide's estimator.
        """
        transforms = [] if self.flow is None else [self.get_transform(*args, **kwargs)]
        if is_full(self):
            return MixtureFlow(
                self.logits,
                self.locs,
                None,
                transforms,
                scale_tril=self.scale_tril,
                **self._estimator_kwargs(),
            )
        return MixtureFlow(
            self.logits, self.locs, self.scales, transforms, **self._estimator_kwargs()
        )

    @property
    def covariance(self) -> str:
        """``"full"`` after :meth:`to_full_covariance`, else ``"diag"``."""
        return "full" if is_full(self) else "diag"

    def to_full_covariance(self) -> bool:
        """Replace the diagonal ``scales`` by full-covariance Cholesky factors ``scale_tril``
        ``(K, D, D)`` initialised at ``diag(scales)`` (the density is unchanged); see
        ``pyro_mogflow.guides.covariance.to_full_covariance``. Returns ``False`` if the
        guide already had full covariance."""
        return to_full_covariance(self)

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        result = super().forward(*args, **kwargs)
        self._count_step()
        return result

    # --------------------------------------------------------------- summaries
    @torch.no_grad()
    def components(self, *args, **kwargs) -> dict:
        """The modes the guide found: each component's weight and its mean pushed through the
        flow and the constraints, and the components grouped by the mode they sit on.

        Several components often share one mode (64 components on a two-mode posterior end up
        as two groups of near-copies); ``"groups"`` merges components whose means lie within
        ``pyro_mogflow.guides.summaries.GROUP_TOLERANCE`` of their scales of each other
        (see ``pyro_mogflow.guides.summaries.group_components``), weights summed.

        :return: a dict with ``"weights"`` (shape ``(K,)``, summing to one), ``"latent"``
            (shape ``(K, D)``, the component means mapped through the flow, unconstrained),
            ``"values"`` (dict site name -> tensor ``(K, *site_shape)``, constrained) and
            ``"groups"``: a list, heaviest first, of dicts with ``"components"`` (indices,
            heaviest first), ``"weight"`` (summed), ``"latent"`` (shape ``(D,)``, the heaviest
            member's mean through the flow) and ``"values"`` (its constrained sites). Rows of
            the per-component entries are in component order; sort by ``weights`` to rank them.
        """
        from .summaries import group_components  # (kept inside: the rest of this module is
        # another change's; a module-level import belongs with it)

        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        locs = self.locs.detach()
        latent = locs if self.flow is None else self.flow(locs)
        weights = torch.softmax(self.logits.detach(), -1)
        values = self._constrain(latent)
        groups = []
        for group in group_components(locs, component_scales(self), weights):
            top = group["components"][0]
            groups.append(
                {
                    "components": group["components"],
                    "weight": group["weight"],
                    "latent": latent[top],
                    "values": {name: v[top] for name, v in values.items()},
                }
            )
        return {"weights": weights, "latent": latent, "values": values, "groups": groups}

    # ------------------------------------------------------------ pruning
    def prune(self, keep) -> torch.Tensor:
        """Keep only the components ``keep`` (indices), weights renormalised; see
        :func:`pyro_mogflow.guides.pruning.prune_and_merge`. Returns the pruned mass."""
        from .pruning import prune_and_merge

        if isinstance(keep, torch.Tensor):
            keep = keep.reshape(-1).tolist()
        if isinstance(keep, (str, bytes)) or not isinstance(keep, Iterable):
            raise TypeError(f"keep must be a sequence of component indices, got {keep!r}")
        return prune_and_merge(self, [[i] for i in keep])

    def merge_components(self, groups=None) -> int:
        """Merge components that sit on one mode by moment matching (``groups`` default:
        :func:`pyro_mogflow.guides.pruning.mergeable_groups` of the current components); see
        :func:`~pyro_mogflow.guides.pruning.prune_and_merge`. Returns the components removed."""
        from .pruning import mergeable_groups, prune_and_merge

        if self.prototype_trace is None:
            raise RuntimeError("the guide is not set up yet; call guide.setup(*model_args)")
        before = self.num_components
        if groups is None:
            groups = mergeable_groups(self.locs.detach(), component_scales(self))
            if len(groups) == before:
                return 0
        prune_and_merge(self, groups)
        return before - self.num_components

    # ---------------------------------------------------------- state_dict
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.prototype_trace is None and any(k.startswith(prefix) for k in state_dict):
            raise RuntimeError(
                "this AutoMixtureFlow is not set up yet, so it has no parameters to load into. "
                "Call guide.setup(*model_args, **model_kwargs) (or the guide once) before "
                "load_state_dict."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
