"""Flow layers stacked on the mixture base: plain ones for :class:`~pyro_mogflow.AutoMixtureFlow`
(:data:`FLOWS`, :func:`build_flow`) and conditional ones for
:class:`~pyro_mogflow.AmortizedMixtureFlow` (:data:`CONDITIONAL_FLOWS`,
:func:`build_conditional_flow`). Permutations between layers are buffers."""

from .conditional import CONDITIONAL_FLOWS, ConditionalFlowSpec, build_conditional_flow
from .plain import (
    DEFAULT_SPLINE_BOUND,
    FLOWS,
    BufferPermute,
    FlowSpec,
    ForwardOnlyGuard,
    build_flow,
    check_flow,
    is_forward_only,
    register_flow,
    stack_layers,
)

__all__ = [
    "CONDITIONAL_FLOWS",
    "DEFAULT_SPLINE_BOUND",
    "FLOWS",
    "BufferPermute",
    "ConditionalFlowSpec",
    "FlowSpec",
    "ForwardOnlyGuard",
    "build_conditional_flow",
    "build_flow",
    "check_flow",
    "is_forward_only",
    "register_flow",
    "stack_layers",
]
