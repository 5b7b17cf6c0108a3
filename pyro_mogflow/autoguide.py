"""AutoMixtureFlow: a normalizing-flow guide on a learnable mixture of diagonal Gaussians."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import numbers
import pickle
import types
import warnings
import weakref

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import ComposeTransform
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from ._param_store import first_free_prefix, in_param_store
from ._validation import check_int, check_real
from .distributions import RelaxedMixtureOfDiagNormals, mixture_log_prob
from .flows import FLOWS, ForwardOnlyGuard, build_flow, is_forward_only

__all__ = ["AutoMixtureFlow", "ESTIMATORS", "StratifiedDraw"]

#: How gradients pass through the mixture's discrete choice. See the class docstring.
ESTIMATORS = ("relaxed", "relaxed-nested", "implicit", "stratified", "pathwise")

#: Estimators whose sampler is a custom autograd function that ``torch.jit.trace`` cannot record.
_UNTRACEABLE_ESTIMATORS = ("pathwise",)

#: Param-store prefixes held by live guides (name -> guide), so a guide set up after
#: ``pyro.clear_param_store()`` never takes the name of a guide that is still in use.
_LIVE_NAMES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


@dataclasses.dataclass
class StratifiedDraw:
    r"""Record of one stratified draw, filled in by :meth:`AutoMixtureFlow.stratified`.

    :ivar int num_particles: ``n``, draws per component.
    :ivar int particle_dim: the (negative) plate dimension along which the ``K * n`` draws lie.
    :ivar log_weights: ``log_softmax(logits)``, shape ``(K,)``, attached to the autograd graph.
    :ivar latent: the unconstrained draws :math:`z_{kt}`, shape ``(K, n, D)``, component-major.
    :ivar log_q: the guide's exact log-density at each draw, shape ``(K, n)``.
    :ivar base: the draws before the flow, :math:`\mu_k + \sigma_k \odot \epsilon_{kt}`, shape
        ``(K, n, D)`` (equal to ``latent`` when there is no flow).
    """

    num_particles: int
    particle_dim: int
    log_weights: torch.Tensor | None = None
    latent: torch.Tensor | None = None
    log_q: torch.Tensor | None = None
    base: torch.Tensor | None = None


def _check_positive_int(name, value, minimum=1):
    return check_int(name, value, minimum)


def _check_positive_float(name, value):
    return check_real(name, value, minimum=0.0, strict=True)


class _PriorDraw(Messenger):
    """Sets every latent site to ``draw(msg)``, overriding the guide's init strategy (which
    wraps the model from inside), so a run of the model is an ancestral draw of its prior."""

    def __init__(self, draw):
        super().__init__()
        self.draw = draw

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or site_is_subsample(msg):
            return
        msg["value"] = self.draw(msg)


class _PathwiseMixture(dist.MixtureOfDiagNormals):
    """Pyro's ``MixtureOfDiagNormals`` (its pathwise sampler), scored by the package's one
    mixture density :func:`~pyro_mogflow.distributions.mixture_log_prob`.

    Shapes as Pyro's: ``locs`` and ``coord_scale`` ``(*batch, K, D)``, ``component_logits``
    ``(*batch, K)``; :meth:`log_prob` maps ``(*sample, *batch, D)`` to ``(*sample, *batch)``.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return mixture_log_prob(value, self.component_logits, self.locs, self.coord_scale)


class AutoMixtureFlow(AutoContinuous):
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

    The ``estimator`` decides how gradients pass through the mixture's discrete choice:

    ==================  ==============================  ==================  =====================
    estimator           sample                          base log-density    weight gradient
    ==================  ==============================  ==================  =====================
    ``relaxed``         Gumbel-softmax soft selection   exact mixture       biased (relaxation)
    ``relaxed-nested``  Gumbel-softmax soft selection   nested estimate     biased (+ Jensen)
    ``implicit``        exact mixture sample            exact mixture       unbiased
    ``stratified``      one draw set per component      exact mixture       exact expectation
    ``pathwise``        Pyro ``MixtureOfDiagNormals``   exact mixture       Pyro's estimator
    ==================  ==============================  ==================  =====================

    ``relaxed-nested`` is the design note's method as written; ``stratified`` is meant for
    :class:`~pyro_mogflow.StratifiedELBO` (under any other ELBO it samples the exact mixture as
    ``implicit`` does, unbiased but not stratified, and warns once); every other estimator works
    with any Pyro ELBO.

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
        ``"implicit"`` and warns. The relaxed estimators' objectives are unbounded, see README).
    :param temperature: Gumbel-softmax temperature for the relaxed estimators: a positive float
        or a callable ``step -> float``, where ``step`` is :attr:`step`, the number of guide
        calls made with gradients enabled (one per ``svi.step`` for a single particle).
    :param int num_nested: inner draws of the nested density for ``"relaxed-nested"``.
    :param callable init_loc_fn: a Pyro init strategy, as in every ``AutoContinuous`` guide.
    :param float init_scale: initial standard deviation of every component (default 0.1).
    :param init_spread: ``"prior"``: the component means start at ``K`` independent draws of
        the model's prior (ancestral draws of every latent site, mapped to the unconstrained
        space), so the components start spread over where the posterior can live; a site whose
        distribution cannot be sampled (e.g. ``ImproperUniform``) is offset from the initial
        location by standard normal noise instead, with a warning naming it. A float: the
        component means start at the initial location plus ``init_spread`` times independent
        standard normal offsets, so they never coincide. Default ``"prior"``; with ``K = 1``
        the single mean is the initial location.
    :param int num_quantile_samples: samples used by :meth:`median` and :meth:`quantiles`.
    :param str name: prefix of the guide's names in Pyro's param store. By default the first
        free name among ``AutoMixtureFlow``, ``AutoMixtureFlow_1``, ... is taken when the guide
        is set up (free: no parameter in the store and no live guide holding it), so two guides
        never share parameters; an explicit ``name`` that is already in use raises instead. A
        copy made by :mod:`pickle`, :func:`torch.load` or :func:`copy.deepcopy` in a process
        where its name is in use takes the next free name (see :attr:`name`).
    :param callable create_plates: as in :class:`~pyro.infer.autoguide.AutoGuide`.

    Saving and restoring: ``torch.save(guide)`` / ``torch.load`` (and :mod:`pickle`) copy the
    whole guide without touching the original; the copy has no model attached, which a set-up
    guide does not need. To restore from a ``state_dict``, build the guide with the same
    arguments, call :meth:`setup` with the model's arguments, then ``load_state_dict``::

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
        model,
        num_components: int = 64,
        flow=None,
        num_flows: int = 2,
        hidden_dims=None,
        flow_kwargs: dict | None = None,
        estimator: str = "stratified",
        temperature=0.5,
        num_nested: int = 32,
        init_loc_fn=init_to_median,
        init_scale: float = 0.1,
        init_spread: float | str = "prior",
        num_quantile_samples: int = 4096,
        name: str | None = None,
        create_plates=None,
    ):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        _check_positive_int("num_components", num_components)
        if flow is not None and not callable(flow):
            if not isinstance(flow, str):
                raise TypeError(
                    "flow must be a registered name, a callable latent_dim -> TransformModule "
                    f"or None, got {type(flow).__name__}"
                )
            if flow not in FLOWS:
                raise ValueError(f"unknown flow {flow!r}; registered flows are {sorted(FLOWS)}")
        _check_positive_int("num_flows", num_flows)
        if hidden_dims is not None:
            if isinstance(hidden_dims, numbers.Integral):
                hidden_dims = [int(hidden_dims)]
            hidden_dims = list(hidden_dims)
            for h in hidden_dims:
                _check_positive_int("hidden_dims[i]", h)
        if flow_kwargs is not None and not isinstance(flow_kwargs, dict):
            raise TypeError(f"flow_kwargs must be a dict, got {type(flow_kwargs).__name__}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
        if not callable(temperature):
            _check_positive_float("temperature", temperature)
        _check_positive_int("num_nested", num_nested)
        _check_positive_float("init_scale", init_scale)
        if isinstance(init_spread, str):
            if init_spread != "prior":
                raise ValueError(
                    f"init_spread must be 'prior' or a float >= 0, got {init_spread!r}"
                )
        elif isinstance(init_spread, bool) or not isinstance(init_spread, numbers.Real):
            raise TypeError(
                f"init_spread must be 'prior' or a float, got {type(init_spread).__name__}"
            )
        elif init_spread < 0:
            raise ValueError(f"init_spread must be >= 0, got {init_spread}")
        if num_components > 1 and init_spread == 0:
            raise ValueError(
                "init_spread must be > 0 when num_components > 1, or every component starts on "
                "the same point and they can never separate"
            )
        _check_positive_int("num_quantile_samples", num_quantile_samples)
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"name must be a non-empty str, got {name!r}")

        self.num_components = int(num_components)
        self.flow_name = flow
        self.num_flows = int(num_flows) if flow is not None else 0
        self.hidden_dims = hidden_dims
        self.flow_kwargs = dict(flow_kwargs or {})
        self.estimator = estimator
        self.temperature = temperature
        self.num_nested = int(num_nested)
        self._init_scale = float(init_scale)
        self._init_spread = init_spread if isinstance(init_spread, str) else float(init_spread)
        self.num_quantile_samples = int(num_quantile_samples)
        self._explicit_name = name
        #: Number of guide calls made with gradients enabled (drives temperature schedules).
        self.step = 0
        self._stratified_draw = None
        self._warned_unstratified = False
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
        if k == 1:
            locs = loc.unsqueeze(0)
        elif self._init_spread == "prior":
            locs = self._prior_locs(loc, *args, **kwargs)
        else:
            locs = loc + torch.randn(k, d, dtype=loc.dtype, device=loc.device) * self._init_spread
        self.locs = PyroParam(locs, event_dim=2)
        self.scales = PyroParam(
            torch.full((k, d), self._init_scale, dtype=loc.dtype, device=loc.device),
            constraint=constraints.softplus_positive,
            event_dim=2,
        )
        self.logits = PyroParam(torch.zeros(k, dtype=loc.dtype, device=loc.device), event_dim=1)
        self.flow = None if flow is None else flow.to(device=loc.device, dtype=loc.dtype)
        self._forward_only = self.flow is not None and is_forward_only(self.flow)

    @torch.no_grad()
    def _prior_locs(self, loc: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``K`` ancestral draws of the model's prior, packed and unconstrained, shape ``(K, D)``.

        A site whose distribution cannot be sampled gets the initial value plus standard normal
        noise (in the unconstrained space) instead, and a warning names it.
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
            proto = self.prototype_trace.nodes[site["name"]]["value"].detach()
            transform = biject_to(site["fn"].support)
            u = transform.inv(proto)
            return transform(u + torch.randn_like(u))

        rows = []
        for _ in range(self.num_components):
            with pyro.poutine.block():
                trace = pyro.poutine.trace(_PriorDraw(draw)(self.model)).get_trace(
                    *args, **kwargs
                )
            parts = []
            for name, site in self.prototype_trace.iter_stochastic_nodes():
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
                stacklevel=4,
            )
        return torch.stack(rows)

    def _check_sites(self):
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            support = site["fn"].support
            if support.is_discrete:
                raise ValueError(
                    f"AutoMixtureFlow cannot guide the discrete latent site '{name}' "
                    f"(support {support}). Enumerate it out with config_enumerate and "
                    "TraceEnum_ELBO, or block it with poutine.block and guide it separately."
                )
            for frame in site["cond_indep_stack"]:
                full = frame.full_size
                if full is not None and frame.size != full:
                    raise ValueError(
                        f"latent site '{name}' lies in plate '{frame.name}' subsampled to "
                        f"{frame.size} of {full}. AutoMixtureFlow, like every AutoContinuous "
                        "guide, needs a fixed latent size and would silently mis-size it: use "
                        "pyro_mogflow.AmortizedMixtureFlow (or AutoNormal) for the local sites in "
                        "a guide of your own, and AutoMixtureFlow for the global ones via "
                        "poutine.block and AutoGuideList."
                    )

    @property
    def name(self) -> str:
        """The prefix of this guide's parameters in Pyro's param store (claimed at set-up)."""
        return self._pyro_name

    def _name_taken(self, prefix: str) -> bool:
        holder = _LIVE_NAMES.get(prefix)
        if holder is not None and holder is not self:
            return True
        return in_param_store(prefix)

    def _claim_name(self, rename: bool = False):
        """Take a param-store prefix no other guide uses; ``rename``: derive one, never raise."""
        base = self._explicit_name
        if base is not None and not rename:
            if self._name_taken(base):
                raise ValueError(
                    f"name={base!r} already has parameters in Pyro's param store or belongs to "
                    "another live guide; two guides would share them. Pass another name or call "
                    "pyro.clear_param_store()."
                )
            prefix = base
        else:
            prefix = first_free_prefix(base or type(self).__name__, self._name_taken)
        self._pyro_name = prefix
        _LIVE_NAMES[prefix] = self

    # ----------------------------------------------------------- distributions
    def current_temperature(self) -> float:
        """The Gumbel-softmax temperature at the current :attr:`step`."""
        if callable(self.temperature) and torch._C._get_tracing_state():
            raise ValueError(
                "temperature is a schedule (a callable), but the guide is being traced by "
                "torch.jit (e.g. JitTrace_ELBO), which would freeze it at its first value. Pass a "
                "fixed float temperature, or train with a non-jit ELBO such as Trace_ELBO."
            )
        tau = self.temperature(self.step) if callable(self.temperature) else self.temperature
        if isinstance(tau, torch.Tensor):
            tau = float(tau)
        if not isinstance(tau, numbers.Real) or not tau > 0:
            raise ValueError(f"temperature schedule returned {tau!r} at step {self.step}; need > 0")
        return float(tau)

    def get_base_dist(self):
        """The mixture base distribution for the chosen estimator (event shape ``(D,)``)."""
        if self.estimator in _UNTRACEABLE_ESTIMATORS and torch._C._get_tracing_state():
            raise ValueError(
                f"estimator={self.estimator!r} samples with Pyro's MixtureOfDiagNormals, whose "
                "custom autograd function torch.jit cannot trace, so it cannot run under "
                "JitTrace_ELBO (or any jit ELBO). Use estimator='implicit' or 'relaxed', or a "
                "non-jit ELBO such as Trace_ELBO."
            )
        if self.estimator in ("relaxed", "relaxed-nested"):
            return RelaxedMixtureOfDiagNormals(
                self.logits,
                self.locs,
                self.scales,
                self.current_temperature(),
                density="nested" if self.estimator == "relaxed-nested" else "exact",
                num_nested=self.num_nested,
            )
        if self.estimator == "pathwise":
            return _PathwiseMixture(self.locs, self.scales, self.logits)
        # "implicit" and "stratified": the exact mixture, sampled exactly. (Under StratifiedELBO
        # the "stratified" guide is sampled per component instead; see pyro_mogflow.infer.)
        from .distributions.mixture import DiagNormalMixture

        return DiagNormalMixture(self.logits, self.locs, self.scales)

    def get_transform(self, *args, **kwargs):
        """The flow applied to the base (identity when ``flow=None``)."""
        if self.flow is None:
            return ComposeTransform([])
        if self._forward_only:
            # One guard per posterior: it scores exactly the points that posterior sampled, so
            # traces kept from earlier draws (sequential Predictive) stay scoreable, and a
            # point it did not produce raises instead of getting a stale log-det.
            return ForwardOnlyGuard(self.flow, name=str(self.flow_name))
        return self.flow

    def get_posterior(self, *args, **kwargs):
        """``q(z)`` on the packed unconstrained latent, event shape ``(latent_dim,)``."""
        base = self.get_base_dist()
        if self.flow is None:
            return base
        return dist.TransformedDistribution(base, [self.get_transform(*args, **kwargs)])

    @contextlib.contextmanager
    def stratified(self, num_particles: int = 1, particle_dim: int = -1):
        r"""Within this context the guide draws ``num_particles`` points from *every* component.

        Instead of sampling the mixture, :meth:`sample_latent` returns the ``K * n`` points

        .. math:: z_{kt} = f(\mu_k + \sigma_k \odot \epsilon_{kt}), \qquad
            \epsilon_{kt} \sim \mathcal{N}(0, I), \quad k \le K,\ t \le n,

        component-major (draw ``k * n + t``), as a ``Delta`` site whose log-density is the exact
        :math:`\log q(z_{kt})` (mixture density of the base point minus the flow's log-det), so
        weighting the draws by :math:`\pi_k` gives the expectation over components exactly.
        This is the hook :class:`~pyro_mogflow.StratifiedELBO` uses; the caller must run the guide
        (and the model) inside a ``pyro.plate`` of size ``K * n`` at ``particle_dim``, and set
        the guide up (one call outside the context) beforehand. Outside the context the guide
        samples the exact mixture as usual (e.g. in ``Predictive``).

        :param int num_particles: ``n``, draws per component.
        :param int particle_dim: negative plate dimension of the draws; the latent has batch
            shape ``(K * n, 1, ..., 1)`` with ``-particle_dim`` dimensions.
        :return: a :class:`StratifiedDraw` that the guide fills in when it runs.
        :raises ValueError: if the guide's estimator is not ``"stratified"``.
        """
        if self.estimator != "stratified":
            raise ValueError(
                f"stratified draws need AutoMixtureFlow(estimator='stratified'), this guide has "
                f"estimator={self.estimator!r}"
            )
        _check_positive_int("num_particles", num_particles)
        if (
            isinstance(particle_dim, bool)
            or not isinstance(particle_dim, numbers.Integral)
            or particle_dim >= 0
        ):
            raise ValueError(f"particle_dim must be a negative int, got {particle_dim!r}")
        if self._stratified_draw is not None:
            raise RuntimeError("AutoMixtureFlow.stratified() contexts cannot be nested")
        draw = StratifiedDraw(int(num_particles), int(particle_dim))
        self._stratified_draw = draw
        try:
            yield draw
        finally:
            self._stratified_draw = None

    def sample_latent(self, *args, **kwargs):
        """Sample the packed unconstrained latent (stratified inside :meth:`stratified`)."""
        draw = self._stratified_draw
        if draw is None:
            return super().sample_latent(*args, **kwargs)
        logits, locs, scales = self.logits, self.locs, self.scales
        k, n, d = self.num_components, draw.num_particles, self.latent_dim
        eps = torch.randn((k, n, d), dtype=locs.dtype, device=locs.device)
        base = (locs.unsqueeze(-2) + scales.unsqueeze(-2) * eps).reshape(k * n, d)
        log_q = mixture_log_prob(base, logits, locs, scales)
        latent = base
        if self.flow is not None:
            transform = self.get_transform(*args, **kwargs)
            latent = transform(base)
            log_q = log_q - transform.log_abs_det_jacobian(base, latent)
        draw.log_weights = torch.log_softmax(logits, dim=-1)
        draw.latent = latent.reshape(k, n, d)
        draw.log_q = log_q.reshape(k, n)
        draw.base = base.reshape(k, n, d)
        batch = (k * n,) + (1,) * (-draw.particle_dim - 1)
        return pyro.sample(
            f"_{self._pyro_name}_latent",
            dist.Delta(latent.reshape(batch + (d,)), log_density=log_q.reshape(batch), event_dim=1),
            infer={"is_auxiliary": True},
        )

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if (
            self.estimator == "stratified"
            and self._stratified_draw is None
            and torch.is_grad_enabled()
            and not self._warned_unstratified
        ):
            # Not an error: the exact mixture sample is still unbiased (implicit estimator).
            self._warned_unstratified = True
            warnings.warn(
                "AutoMixtureFlow(estimator='stratified') is running with gradients enabled "
                "outside StratifiedELBO, so it samples the exact mixture with implicit "
                "reparameterization: unbiased, but not stratified. Train it with "
                "SVI(..., loss=pyro_mogflow.StratifiedELBO()), or use estimator='implicit'.",
                UserWarning,
                stacklevel=2,
            )
        result = super().forward(*args, **kwargs)
        if torch.is_grad_enabled():
            self.step += 1
        return result

    # --------------------------------------------------------------- summaries
    @torch.no_grad()
    def _sample_unconstrained(self, num_samples, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self.get_posterior(*args, **kwargs).sample((num_samples,))

    def _constrain(self, latent: torch.Tensor) -> dict:
        """Split packed latents ``(*batch, D)`` into constrained sites ``(*batch, *site_shape)``.

        Unlike Pyro's ``_unpack_latent``, leading dims are plain batch dims that never collide
        with the model's plate dims.
        """
        batch, pos, out = latent.shape[:-1], 0, {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            shape = self._unconstrained_shapes[name]
            size = shape.numel()
            value = latent[..., pos : pos + size].reshape(batch + shape)
            out[name] = biject_to(site["fn"].support)(value)
            pos += size
        return out

    @torch.no_grad()
    def sample_posterior(self, num_samples: int, *args, **kwargs) -> dict:
        """Draw ``num_samples`` joint samples of every latent site from the guide.

        :param int num_samples: ``N``.
        :param args: the model's arguments (used to set the guide up if needed).
        :return: dict site name -> constrained samples of shape ``(N, *site_shape)``.
        """
        _check_positive_int("num_samples", num_samples)
        latent = self._sample_unconstrained(int(num_samples), *args, **kwargs)
        return self._constrain(latent)

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs):
        """Posterior quantiles of each latent site, estimated from guide samples.

        A mixture has no closed-form quantiles, so this draws :attr:`num_quantile_samples`
        samples, maps them to the constrained space and takes element-wise empirical quantiles.

        :param quantiles: a list or 1-D tensor of levels in ``[0, 1]``.
        :return: dict site name -> tensor of shape ``(len(quantiles), *site_shape)``.
        """
        try:
            q = torch.as_tensor(quantiles, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(
                f"quantiles must be a list or 1-D tensor of levels in [0, 1], got {quantiles!r}"
            ) from e
        if q.dim() != 1 or not bool(((q >= 0) & (q <= 1)).all()):
            raise ValueError(f"quantiles must be a list of levels in [0, 1], got {quantiles!r}")
        latent = self._sample_unconstrained(self.num_quantile_samples, *args, **kwargs)
        values = self._constrain(latent)
        out = {}
        for name, v in values.items():
            qq = q.to(dtype=v.dtype, device=v.device)
            out[name] = torch.quantile(v.reshape(v.shape[0], -1), qq, dim=0).reshape(
                (len(qq),) + v.shape[1:]
            )
        return out

    @torch.no_grad()
    def median(self, *args, **kwargs):
        """Element-wise posterior median of each latent site, estimated from guide samples.

        :return: dict site name -> tensor of the site's shape.
        """
        return {k: v[0] for k, v in self.quantiles([0.5], *args, **kwargs).items()}

    @torch.no_grad()
    def components(self, *args, **kwargs) -> dict:
        """The modes the guide found: each component's weight and its mean pushed through the
        flow and the constraints.

        :return: a dict with ``"weights"`` (shape ``(K,)``, summing to one), ``"latent"``
            (shape ``(K, D)``, the component means mapped through the flow, unconstrained) and
            ``"values"`` (dict site name -> tensor ``(K, *site_shape)``, constrained). Rows are in
            component order; sort by ``weights`` to rank them.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        locs = self.locs.detach()
        latent = locs if self.flow is None else self.flow(locs)
        return {
            "weights": torch.softmax(self.logits.detach(), -1),
            "latent": latent,
            "values": self._constrain(latent),
        }

    def _loc_scale(self, *args, **kwargs):
        latent = self._sample_unconstrained(self.num_quantile_samples, *args, **kwargs)
        return latent.mean(0), latent.std(0)

    # ------------------------------------------------------------- pickling
    def __getstate__(self):
        # Pyro's AutoGuide.__getstate__ drops the model reference *on the guide itself*, so
        # torch.save(guide) breaks the guide it saves. Pickle a copy of the state instead.
        saved = (self._model, self.master)
        try:
            state = dict(super().__getstate__())
        finally:
            self._model, self.master = saved
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.prototype_trace is not None:
            # A copy in a process where the original (or its parameters) lives must not adopt
            # the original's parameters through the shared param store.
            if self._name_taken(self._pyro_name):
                self._claim_name(rename=True)
            else:
                _LIVE_NAMES[self._pyro_name] = self

    def __deepcopy__(self, memo):
        # Plain deepcopy fails on the flows' caches (non-leaf tensors); pickle copies them.
        # Functions (the model, a temperature schedule, a flow callable) are shared, as
        # deepcopy shares them.
        shared: list = []

        class _Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, (types.FunctionType, functools.partial)):
                    shared.append(obj)
                    return len(shared) - 1
                return None

        class _Unpickler(pickle.Unpickler):
            def persistent_load(self, pid):
                return shared[pid]

        buffer = io.BytesIO()
        _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(self)
        buffer.seek(0)
        new = _Unpickler(buffer).load()
        new._model = self._model
        memo[id(self)] = new
        return new

    # ---------------------------------------------------------- state_dict
    def get_extra_state(self) -> dict:
        """Extra ``state_dict`` entry: the step counter that drives temperature schedules."""
        return {"step": self.step}

    def set_extra_state(self, state: dict) -> None:
        """Restore :attr:`step` from a ``state_dict`` written by :meth:`get_extra_state`."""
        self.step = int(state["step"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.prototype_trace is None and any(k.startswith(prefix) for k in state_dict):
            raise RuntimeError(
                "this AutoMixtureFlow is not set up yet, so it has no parameters to load into. "
                "Call guide.setup(*model_args, **model_kwargs) (or the guide once) before "
                "load_state_dict."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
