"""Conditional flow layers (conditioned on a context), built by name for amortized guides."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import pyro.distributions.transforms as T
from pyro.distributions.conditional import ConditionalTransform
from torch import nn

from .._validation import check_int
from .plain import _hidden, _spline_kwargs, stack_layers

__all__ = ["CONDITIONAL_FLOWS", "ConditionalFlowSpec", "build_conditional_flow"]


@dataclasses.dataclass(frozen=True)
class ConditionalFlowSpec:
    """How to build one conditional layer.

    :param builder: ``builder(latent_dim, context_dim, hidden_dims, **kwargs)`` returning a
        :class:`~pyro.distributions.ConditionalTransformModule`.
    :param min_dim: the smallest latent dimension the layer supports.
    :param description: one line for the docs and error messages.
    """

    builder: Callable[..., ConditionalTransform]
    min_dim: int = 1
    description: str = ""


#: Conditional flow layers buildable by name. Only invertible layers are registered, so the
#: posterior can score any point (e.g. the IWAE bound's draws, or a point from another guide).
CONDITIONAL_FLOWS: dict[str, ConditionalFlowSpec] = {
    "affine_autoregressive": ConditionalFlowSpec(
        lambda d, c, h, **kw: T.conditional_affine_autoregressive(d, c, _hidden(h, d), **kw),
        description="IAF (Kingma et al. 2016), conditioned on the encoder's features",
    ),
    "spline_autoregressive": ConditionalFlowSpec(
        lambda d, c, h, **kw: T.conditional_spline_autoregressive(
            d, c, _hidden(h, d), **_spline_kwargs(kw)
        ),
        description="autoregressive neural spline flow (Durkan et al. 2019)",
    ),
    "affine_coupling": ConditionalFlowSpec(
        lambda d, c, h, **kw: T.conditional_affine_coupling(d, c, _hidden(h, d), **kw),
        min_dim=2,
        description="Real NVP coupling (Dinh et al. 2017)",
    ),
    "spline": ConditionalFlowSpec(
        lambda d, c, h, **kw: T.conditional_spline(d, c, _hidden(h, d), **_spline_kwargs(kw)),
        description="elementwise rational-quadratic spline (Durkan et al. 2019)",
    ),
    "householder": ConditionalFlowSpec(
        lambda d, c, h, **kw: T.conditional_householder(d, c, _hidden(h, d), **kw),
        min_dim=2,
        description="Householder reflections (Tomczak & Welling 2016)",
    ),
}

#: Pyro's conditional layers that can only map forward (their inverse is missing or stale).
_FORWARD_ONLY = (T.ConditionalPlanar, T.ConditionalRadial, T.ConditionalNeuralAutoregressive)


def build_conditional_flow(
    flow,
    latent_dim: int,
    context_dim: int,
    num_flows: int = 2,
    hidden_dims: Sequence[int] | None = None,
    **flow_kwargs,
) -> nn.ModuleList:
    """Build ``num_flows`` conditional layers on ``R^latent_dim``, permutations in between.

    :param flow: a name in :data:`CONDITIONAL_FLOWS`, a callable
        ``(latent_dim, context_dim) -> ConditionalTransformModule`` (called once per layer), or
        ``None`` (no flow: an empty list).
    :param int latent_dim: ``D``.
    :param int context_dim: size of the context the layers are conditioned on.
    :param int num_flows: number of layers.
    :param hidden_dims: hidden sizes of the layers' networks (``None``: Pyro's defaults).
    :param flow_kwargs: extra keyword arguments of a registered builder (e.g. ``count_bins``,
        ``bound``; spline layers default to ``bound=8``, ``count_bins=8``).
    :return: an :class:`~torch.nn.ModuleList` of conditional layers and
        :class:`~pyro_mogflow.flows.BufferPermute` permutations (stored as buffers).
    :raises ValueError: for an unknown name, a too small ``latent_dim`` or a forward-only layer.
    """
    if flow is None:
        return nn.ModuleList()
    num_flows = check_int("num_flows", num_flows, 1)
    if isinstance(flow, str):
        if flow not in CONDITIONAL_FLOWS:
            raise ValueError(
                f"unknown conditional flow {flow!r}; registered ones are "
                f"{sorted(CONDITIONAL_FLOWS)}, or pass a callable "
                "(latent_dim, context_dim) -> ConditionalTransformModule"
            )
        spec = CONDITIONAL_FLOWS[flow]
        if latent_dim < spec.min_dim:
            raise ValueError(
                f"flow {flow!r} needs latent_dim >= {spec.min_dim}, got latent_dim={latent_dim}; "
                "use e.g. flow='affine_autoregressive' or 'spline' instead"
            )

        def make():
            return spec.builder(latent_dim, context_dim, hidden_dims, **flow_kwargs)

    elif callable(flow):
        if flow_kwargs or hidden_dims is not None:
            raise ValueError(
                "flow_hidden_dims and flow_kwargs apply only to a registered flow name, got a "
                f"callable flow with flow_hidden_dims={hidden_dims} and flow_kwargs={flow_kwargs}"
            )

        def make():
            return flow(latent_dim, context_dim)

    else:
        raise TypeError(
            "flow must be a name in CONDITIONAL_FLOWS, a callable "
            f"(latent_dim, context_dim) -> ConditionalTransformModule or None, got "
            f"{type(flow).__name__}"
        )

    def checked() -> nn.Module:
        layer = make()
        if not isinstance(layer, ConditionalTransform) or not isinstance(layer, nn.Module):
            raise TypeError(
                "a conditional flow layer must be a pyro ConditionalTransformModule, got "
                f"{type(layer).__name__}"
            )
        if isinstance(layer, _FORWARD_ONLY):
            raise ValueError(
                f"{type(layer).__name__} is forward-only: it cannot score a point it did not "
                "just produce, so the posterior's log_prob would be unavailable or stale. Use an "
                f"invertible layer, e.g. one of {sorted(CONDITIONAL_FLOWS)}"
            )
        return layer

    return nn.ModuleList(stack_layers(checked, latent_dim, num_flows))
