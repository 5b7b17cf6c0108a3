r"""The guides the multimodal benchmark compares, and how each one is trained.

Every guide is trained by :func:`pyro_mogflow.fit` with the same optimiser (Adam, the same
learning rate), the same number of steps and the same number of model evaluations per step:
``K`` vectorized particles of ``Trace_ELBO`` for the sampling guides, one draw per component for
``StratifiedELBO`` (``K`` components). Pyro's guides are trained as users train them: no
tempering, their own initialisation. ``AutoMixtureFlow`` rows use :func:`pyro_mogflow.fit` with
its mode-discovery defaults and change one thing each.

=======================  ==========================================================================
row                      guide
=======================  ==========================================================================
``AutoNormal``           Pyro's mean-field Gaussian
``AutoMultivariateNormal``  Pyro's full-covariance Gaussian
``AutoIAFNormal``        Pyro's IAF guide (two affine autoregressive layers)
``AutoNormalizingFlow``  Pyro's flow guide on :math:`\mathcal{N}(0, I)` with :data:`FLOW`, the very
                         flow stack AutoMixtureFlow builds (``pyro_mogflow.flows``)
``Pyro mixture+IAF``     what a Pyro user writes today: ``MixtureOfDiagNormals`` (pathwise
                         gradients) under two affine autoregressive layers, ``Trace_ELBO``
``design note``          the design note as written: ``AutoMixtureFlow(estimator=
                         "relaxed-nested")`` under :data:`FLOW`, with the former
                         initialisation (means within one unit of the initial location), plain
                         ``Trace_ELBO``, no tempering
``AMF defaults``         ``pyro_mogflow.fit(model)``: every default of this package
``AMF <estimator>``      ``fit`` with ``AutoMixtureFlow(estimator=<estimator>)``, other defaults
``AMF adam``, ``AMF natural``  ``fit(..., component_step="adam"`` / ``"natural")``, other
                         defaults
``AMF natural full``     ``fit(..., component_step="natural", covariance="full")`` (ablation)
``AMF spline flow``      ``fit`` with ``AutoMixtureFlow(flow=...)`` of :data:`FLOW` (ablation)
``AMF no tempering``     ``fit(..., beta=None)``, other defaults (ablation)
``AMF no natural grad``  ``fit(..., weight_step=None, balance=None)``, other defaults (ablation)
=======================  ==========================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import affine_autoregressive
from pyro.infer.autoguide import (
    AutoContinuous,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroModule, PyroParam

from pyro_mogflow import AutoMixtureFlow
from pyro_mogflow.flows import BufferPermute, build_flow

__all__ = ["FLOW", "GUIDES", "GuideSpec", "PyroMixtureIAF"]

#: The flow of the AutoNormalizingFlow row: the default flow stack of AutoMixtureFlow.
FLOW = ("spline_autoregressive", 2)


class PyroMixtureIAF(AutoContinuous):
    r"""Pyro's ``MixtureOfDiagNormals`` base under affine autoregressive layers.

    .. math:: z = f(z_0), \qquad z_0 \sim \textstyle\sum_k \pi_k \mathcal{N}(\mu_k,
        \operatorname{diag}\sigma_k^2)

    with Pyro's pathwise mixture gradients. Means start at the initial location plus standard
    normal offsets, scales at 0.1, equal weights.

    :param callable model: the Pyro model.
    :param int num_components: ``K``.
    :param int num_transforms: affine autoregressive layers (default 2).
    """

    def __init__(self, model, num_components: int, num_transforms: int = 2):
        super().__init__(model, init_loc_fn=init_to_median)
        self.num_components = num_components
        self.num_transforms = num_transforms

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        loc = self._init_loc().detach()
        k, d = self.num_components, self.latent_dim
        self.locs = PyroParam(loc + torch.randn(k, d, dtype=loc.dtype), event_dim=2)
        self.scales = PyroParam(
            torch.full((k, d), 0.1, dtype=loc.dtype), constraint=constraints.positive
        )
        self.logits = PyroParam(torch.zeros(k, dtype=loc.dtype), event_dim=1)
        layers = []
        for i in range(self.num_transforms):
            if i and d > 1:
                layers.append(BufferPermute(torch.randperm(d)))
            layers.append(affine_autoregressive(d))
        self.transform = PyroModule[torch.nn.ModuleList](layers).to(dtype=loc.dtype)

    def get_base_dist(self):
        return dist.MixtureOfDiagNormals(self.locs, self.scales, self.logits)

    def get_transform(self, *args, **kwargs):
        return dist.transforms.ComposeTransformModule(list(self.transform))

    def get_posterior(self, *args, **kwargs):
        return dist.TransformedDistribution(self.get_base_dist(), list(self.transform))


@dataclasses.dataclass(frozen=True)
class GuideSpec:
    """How to build and train one row of the table.

    :param build: ``build(model, num_components) -> guide``.
    :param dict fit_kwargs: keyword arguments of :func:`pyro_mogflow.fit` (besides the shared
        steps, learning rate and particles).
    :param bool stratified: trained with one draw per component (else ``K`` particles).
    :param str family: ``"pyro"``, ``"design"``, ``"amf"`` or ``"ablation"`` (the defaults
        with one device removed; the goal "reverse KL lower than every other guide" compares
        the defaults with every row but these).
    """

    build: Callable
    fit_kwargs: dict = dataclasses.field(default_factory=dict)
    stratified: bool = False
    family: str = "pyro"


def _nf(model, k):
    name, layers = FLOW
    return AutoNormalizingFlow(model, lambda d: build_flow(name, d, layers))


def _amf(estimator: str):
    def build(model, k):
        return AutoMixtureFlow(model, num_components=k, estimator=estimator)

    return build


_NO_TEMPERING = {"beta": None}
_PYRO_FIT = {"beta": None, "balance": None, "weight_step": None}

#: label -> :class:`GuideSpec`, in the order of the table's rows.
GUIDES: dict[str, GuideSpec] = {
    "AutoNormal": GuideSpec(lambda m, k: AutoNormal(m), _PYRO_FIT),
    "AutoMultivariateNormal": GuideSpec(lambda m, k: AutoMultivariateNormal(m), _PYRO_FIT),
    "AutoIAFNormal": GuideSpec(lambda m, k: AutoIAFNormal(m, num_transforms=2), _PYRO_FIT),
    "AutoNormalizingFlow": GuideSpec(_nf, _PYRO_FIT),
    "Pyro mixture+IAF": GuideSpec(lambda m, k: PyroMixtureIAF(m, k), _PYRO_FIT),
    "design note": GuideSpec(
        lambda m, k: AutoMixtureFlow(
            m,
            num_components=k,
            flow=FLOW[0],
            num_flows=FLOW[1],
            estimator="relaxed-nested",
            init_spread=1.0,
        ),
        _PYRO_FIT,
        family="design",
    ),
    "AMF defaults": GuideSpec(lambda m, k: None, {}, stratified=True, family="amf"),
    "AMF implicit": GuideSpec(_amf("implicit"), {}, family="amf"),
    "AMF pathwise": GuideSpec(_amf("pathwise"), {}, family="amf"),
    "AMF relaxed": GuideSpec(_amf("relaxed"), {}, family="amf"),
    "AMF relaxed-nested": GuideSpec(_amf("relaxed-nested"), {}, family="amf"),
    "AMF spline flow": GuideSpec(
        lambda m, k: AutoMixtureFlow(m, num_components=k, flow=FLOW[0], num_flows=FLOW[1]),
        {},
        stratified=True,
        family="ablation",
    ),
    "AMF adam": GuideSpec(
        _amf("stratified"), {"component_step": "adam"}, stratified=True, family="ablation"
    ),
    "AMF natural": GuideSpec(
        _amf("stratified"), {"component_step": "natural"}, stratified=True, family="ablation"
    ),
    "AMF natural full": GuideSpec(
        _amf("stratified"),
        {"component_step": "natural", "covariance": "full"},
        stratified=True,
        family="ablation",
    ),
    "AMF no tempering": GuideSpec(
        _amf("stratified"), _NO_TEMPERING, stratified=True, family="ablation"
    ),
    "AMF no natural grad": GuideSpec(
        _amf("stratified"),
        {"weight_step": None, "balance": None},
        stratified=True,
        family="ablation",
    ),
}
