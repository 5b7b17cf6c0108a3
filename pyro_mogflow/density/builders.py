r"""The density models :func:`~pyro_mogflow.fit_density` fits, as ``nn.Module``\ s.

Every model works in standardised coordinates :math:`\tilde x = (x - m) / s` (per-coordinate mean
and standard deviation of the training data) and ends with the affine map back, so its
log-density includes :math:`-\sum_d \log s_d`. Models:

=================  ============================================================================
``mixture_flow``   :class:`~pyro_mogflow.MixtureFlow`: a flow on a learnable diagonal mixture
``gmm``            the same mixture with no flow
``realnvp``        affine coupling (Real NVP) on a standard normal base
``nsf``            spline coupling (neural spline flow) on a standard normal base
``rad``            :class:`~pyro_mogflow.density.rad.RADFlow` (RAD layers, affine couplings)
=================  ============================================================================

All but ``rad`` are :class:`~pyro_mogflow.MixtureFlow`\ s (a standard normal base is a mixture
with one fixed component), so they share one log-density kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions.transforms as T
import torch
from pyro.distributions import TorchDistribution
from torch import nn
from torch.distributions import AffineTransform

from ..distributions import MixtureFlow
from ..flows import build_flow
from .rad import RADCoupling, RADFlow, build_rad_layers

__all__ = ["MODELS", "DensityModule", "MixtureFlowDensity", "RADDensity", "stack_flow"]

#: Model names accepted by :func:`~pyro_mogflow.fit_density`.
MODELS = ("mixture_flow", "gmm", "realnvp", "nsf", "rad")


def stack_flow(
    flow: str, dim: int, num_flows: int, hidden_dims: Sequence[int], **flow_kwargs
) -> T.ComposeTransformModule:
    """``num_flows`` layers of a registered flow, stacked by :func:`~pyro_mogflow.flows.build_flow`
    (buffer permutations between them and a last one undoing them, so the stack is the identity
    when its layers are)."""
    return build_flow(flow, dim, num_flows, list(hidden_dims), **flow_kwargs)


class DensityModule(nn.Module):
    """Base of the fitted models: standardisation buffers and the common interface."""

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("shift", shift.clone())
        self.register_buffer("scale", scale.clone())

    def _unstandardise(self) -> AffineTransform:
        return AffineTransform(self.shift, self.scale, event_dim=1)

    def distribution(self, estimator: str | None = None) -> TorchDistribution:  # pragma: no cover
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density, ``(...)`` for ``x`` of shape ``(..., D)``."""
        return self.distribution().log_prob(x)

    def components(self) -> dict:  # pragma: no cover
        raise NotImplementedError

    def param_groups(self, learning_rate: float) -> list[dict]:
        """Adam parameter groups for :func:`~pyro_mogflow.fit_density` (one group by default)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": learning_rate}]

    def num_parameters(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class MixtureFlowDensity(DensityModule):
    """A :class:`~pyro_mogflow.MixtureFlow` with learnable (or fixed standard normal) base.

    :param logits: initial logits ``(K,)``; :param locs: ``(K, D)``; :param scales: ``(K, D)``,
        all in standardised coordinates.
    :param flow: a ``ComposeTransformModule`` or ``None``.
    :param bool learn_base: ``False`` keeps the base fixed (a standard normal for Real NVP/NSF).
    :param str estimator: the estimator of :meth:`distribution` (sampling only).
    :param float temperature: the relaxed estimators' temperature.
    """

    def __init__(
        self,
        shift: torch.Tensor,
        scale: torch.Tensor,
        logits: torch.Tensor,
        locs: torch.Tensor,
        scales: torch.Tensor,
        flow: T.ComposeTransformModule | None,
        learn_base: bool = True,
        estimator: str = "implicit",
        temperature: float = 0.5,
    ):
        super().__init__(shift, scale)
        if learn_base:
            self.logits = nn.Parameter(logits.clone())
            self.locs = nn.Parameter(locs.clone())
            self.log_scales = nn.Parameter(scales.log())
        else:
            self.register_buffer("logits", logits.clone())
            self.register_buffer("locs", locs.clone())
            self.register_buffer("log_scales", scales.log())
        self.flow = flow
        self.estimator = estimator
        self.temperature = temperature

    def _transforms(self) -> list:
        return ([] if self.flow is None else [self.flow]) + [self._unstandardise()]

    def distribution(self, estimator: str | None = None) -> MixtureFlow:
        """The :class:`~pyro_mogflow.MixtureFlow` with the current parameters (data space)."""
        return MixtureFlow(
            self.logits,
            self.locs,
            self.log_scales.exp(),
            self._transforms(),
            estimator=self.estimator if estimator is None else estimator,
            temperature=self.temperature,
        )

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        # always the exact density (the "relaxed-nested" estimator's log_prob is an estimate)
        return self.distribution("implicit").log_prob(x)

    def components(self) -> dict:
        """Weights ``(K,)``, means pushed to data space ``(K, D)`` and the base parameters."""
        with torch.no_grad():
            locs = self.locs.detach()
            pushed = locs
            for t in self._transforms():
                pushed = t(pushed)
            return {
                "weights": torch.softmax(self.logits.detach(), -1),
                "locs": pushed,
                "base_locs": locs,
                "base_scales": self.log_scales.detach().exp(),
            }


class RADDensity(DensityModule):
    """A :class:`~pyro_mogflow.density.rad.RADFlow` on a standard normal base.

    :param int dim: ``D``; :param int num_layers: RAD layers; :param int num_pieces: pieces per
        coordinate; :param hidden_dims: hidden sizes of every network.
    """

    #: learning-rate multiplier of the RAD layers (see :meth:`param_groups`)
    lr_scale = 2.0

    def __init__(
        self,
        shift: torch.Tensor,
        scale: torch.Tensor,
        dim: int,
        num_layers: int = 2,
        num_pieces: int = 3,
        hidden_dims: Sequence[int] = (32, 32),
    ):
        super().__init__(shift, scale)
        self.dim = dim
        self.layers = build_rad_layers(dim, num_layers, num_pieces, hidden_dims).to(shift)

    def param_groups(self, learning_rate: float) -> list[dict]:
        """The RAD layers' conditioners and gates at :attr:`lr_scale` times the learning rate
        (their piece boundaries and gate logits move data between pieces, which a plain
        coupling layer never has to do; at the common rate they train too slowly)."""
        groups = []
        for layer in self.layers:
            if isinstance(layer, RADCoupling):
                groups.append(
                    {"params": list(layer.parameters()), "lr": self.lr_scale * learning_rate}
                )
            else:
                groups.append({"params": list(layer.parameters()), "lr": learning_rate})
        return [g for g in groups if g["params"]]

    def distribution(self, estimator: str | None = None) -> RADFlow:
        """The :class:`~pyro_mogflow.density.rad.RADFlow` in data space (``estimator`` unused)."""
        return RADFlow(self.layers, self.dim, [self._unstandardise()])

    def components(self, num_samples: int = 4096) -> dict:
        """The discrete structure, estimated by sampling: one row per joint piece code.

        A RAD flow has no component means; the joint code of every RAD layer's pieces plays the
        part of a component. ``num_samples`` exact draws are grouped by code.

        :return: ``"weights"`` ``(C,)`` (fraction of draws with each code, descending),
            ``"locs"`` ``(C, D)`` (mean of those draws) and ``"codes"`` ``(C, L * D_b)`` (the
            pieces), for the ``C`` codes that occurred.
        """
        x, pieces = self.distribution().sample_with_pieces((num_samples,))
        codes = torch.cat(pieces, -1) if pieces else torch.zeros(num_samples, 0, dtype=torch.long)
        uniq, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
        sums = torch.zeros(uniq.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)
        sums.index_add_(0, inverse, x)
        order = counts.argsort(descending=True)
        return {
            "weights": (counts.to(x.dtype) / num_samples)[order],
            "locs": (sums / counts.unsqueeze(-1).to(x.dtype))[order],
            "codes": uniq[order],
        }


def is_rad(module: nn.Module) -> bool:
    """True for a RAD model (no ``rsample``)."""
    return isinstance(module, RADDensity) or isinstance(module, RADCoupling)
