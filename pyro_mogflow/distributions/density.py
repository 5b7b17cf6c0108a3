"""The one place where the density of a mixture of diagonal Gaussians is computed.

Every estimator in :mod:`pyro_mogflow` scores points with :func:`mixture_log_prob` (or, when it
needs the per-component terms, :func:`component_log_prob`), so the numerics live here alone:
everything is evaluated in log space with :func:`torch.logsumexp`, which keeps float32 finite at
``D = 1000``, ``K = 32``.

Shapes follow the package convention: points ``(*sample, *batch, D)``, logits ``(*batch, K)``,
locs and scales ``(*batch, K, D)``.
"""

from __future__ import annotations

import math
import numbers

import torch
from pyro.util import ignore_jit_warnings

__all__ = [
    "component_log_prob",
    "full_component_log_prob",
    "full_mixture_log_prob",
    "mixture_log_prob",
    "check_mixture_params",
    "mixture_moments",
    "expand_mixture_params",
    "marginal_scales",
]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def component_log_prob(
    value: torch.Tensor, locs: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    r"""Log-density of ``value`` under each diagonal Gaussian component.

    .. math:: \ell_k(z) = \sum_{d=1}^D \log \mathcal{N}(z_d;\ \mu_{kd}, \sigma_{kd})

    :param torch.Tensor value: points, shape ``(*sample, *batch, D)``.
    :param torch.Tensor locs: component means, shape ``(*batch, K, D)``.
    :param torch.Tensor scales: component standard deviations, shape ``(*batch, K, D)``.
    :return: shape ``(*sample, *batch, K)``.
    """
    z = (value.unsqueeze(-2) - locs) / scales
    return -(0.5 * z.pow(2) + scales.log() + _HALF_LOG_2PI).sum(-1)


def mixture_log_prob(
    value: torch.Tensor, logits: torch.Tensor, locs: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    r"""Log-density of a mixture of diagonal Gaussians (design note, eq. 1), in log space.

    .. math:: \log q(z) = \operatorname{logsumexp}_k \big(\log\pi_k + \ell_k(z)\big),
        \qquad \log \pi = \operatorname{log\_softmax}(\text{logits})

    :param torch.Tensor value: points, shape ``(*sample, *batch, D)``.
    :param torch.Tensor logits: unnormalised log-weights, shape ``(*batch, K)``.
    :param torch.Tensor locs: shape ``(*batch, K, D)``.
    :param torch.Tensor scales: shape ``(*batch, K, D)``.
    :return: shape ``(*sample, *batch)``.
    :raises ValueError: if a scale is not positive (checked outside a JIT trace only: one
        reduction over ``scales``, so the call stays cheap).
    """
    if not torch._C._get_tracing_state() and not bool((scales > 0).all()):
        bad = scales[~(scales > 0)].flatten()[:3].tolist()
        raise ValueError(
            f"scales must be positive (the standard deviations of the components), got {bad}"
        )
    log_weights = torch.log_softmax(logits, dim=-1)
    return torch.logsumexp(log_weights + component_log_prob(value, locs, scales), dim=-1)


def full_component_log_prob(
    value: torch.Tensor, locs: torch.Tensor, scale_tril: torch.Tensor
) -> torch.Tensor:
    r"""Log-density of ``value`` under each full-covariance Gaussian component.

    With :math:`\Sigma_k = L_k L_k^\top` (:math:`L_k` lower-triangular, positive diagonal) and
    :math:`w = L_k^{-1}(z - \mu_k)` by one triangular solve,

    .. math:: \ell_k(z) = -\tfrac12 \lVert w \rVert^2 - \sum_d \log L_{k,dd}
        - \tfrac D2 \log 2\pi .

    :param torch.Tensor value: points, shape ``(*sample, *batch, D)``.
    :param torch.Tensor locs: component means, shape ``(*batch, K, D)``.
    :param torch.Tensor scale_tril: Cholesky factors :math:`L_k`, shape ``(*batch, K, D, D)``
        (only the lower triangle is read).
    :return: shape ``(*sample, *batch, K)``.
    """
    # An expanded batch of factors (stride 0, e.g. a posterior ``expand``-ed over draws) is one
    # factor: keep one copy, so no solve below sees a copy of L_k per point.
    scale_tril = scale_tril[
        tuple(
            slice(0, 1) if scale_tril.stride(i) == 0 and scale_tril.shape[i] > 1 else slice(None)
            for i in range(scale_tril.dim() - 2)
        )
    ]
    diff = value.unsqueeze(-2) - locs  # (*sample, *batch, K, D)
    d = diff.shape[-1]
    full = torch.broadcast_shapes(diff.shape[:-1], scale_tril.shape[:-2])
    rank = len(full)
    own = (1,) * (rank - scale_tril.dim() + 2) + tuple(scale_tril.shape[:-2])
    # One solve per distinct factor with every point it applies to as a right-hand side:
    # the dims where the factors broadcast (size 1) go to the right-hand sides' axis.
    points = [i for i in range(rank) if own[i] == 1 and full[i] > 1]
    kept = [i for i in range(rank) if i not in points]
    kept_shape = [full[i] for i in kept]
    rhs = diff.expand(full + (d,)).permute(kept + points + [rank])
    rhs = rhs.reshape(kept_shape + [-1, d]).transpose(-1, -2)  # (*kept, D, points)
    tril = scale_tril.reshape(own + (d, d)).permute(kept + points + [rank, rank + 1])
    tril = tril.reshape(kept_shape + [d, d]) if kept_shape else tril.reshape(d, d)
    tril = tril.expand(kept_shape + [d, d])
    w = torch.linalg.solve_triangular(tril, rhs, upper=False).transpose(-1, -2)
    w = w.reshape(kept_shape + [full[i] for i in points] + [d])
    w = w.permute([(kept + points).index(i) for i in range(rank)] + [rank])
    log_diag = scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -(0.5 * w.pow(2).sum(-1) + log_diag + value.shape[-1] * _HALF_LOG_2PI)


def full_mixture_log_prob(
    value: torch.Tensor, logits: torch.Tensor, locs: torch.Tensor, scale_tril: torch.Tensor
) -> torch.Tensor:
    r"""Log-density of a mixture of full-covariance Gaussians, in log space.

    .. math:: \log q(z) = \operatorname{logsumexp}_k \big(\log\pi_k
        + \log \mathcal N(z;\ \mu_k, L_k L_k^\top)\big)

    :param torch.Tensor value: points, shape ``(*sample, *batch, D)``.
    :param torch.Tensor logits: unnormalised log-weights, shape ``(*batch, K)``.
    :param torch.Tensor locs: shape ``(*batch, K, D)``.
    :param torch.Tensor scale_tril: shape ``(*batch, K, D, D)``, lower-triangular with a
        positive diagonal.
    :return: shape ``(*sample, *batch)``.
    :raises ValueError: if a diagonal entry of ``scale_tril`` is not positive (outside a trace).
    """
    diag = scale_tril.diagonal(dim1=-2, dim2=-1)
    if not torch._C._get_tracing_state() and not bool((diag > 0).all()):
        raise ValueError("scale_tril must have a positive diagonal (Cholesky factors)")
    log_weights = torch.log_softmax(logits, dim=-1)
    return torch.logsumexp(log_weights + full_component_log_prob(value, locs, scale_tril), dim=-1)


def marginal_scales(scale_tril: torch.Tensor) -> torch.Tensor:
    r"""The marginal standard deviations :math:`\sqrt{(L L^\top)_{dd}}` of full-covariance
    components: shape ``(*batch, K, D)`` from ``scale_tril`` of shape ``(*batch, K, D, D)``."""
    return scale_tril.tril().pow(2).sum(-1).sqrt()


def mixture_moments(
    logits: torch.Tensor, locs: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and per-coordinate variance of a diagonal Gaussian mixture.

    .. math:: \mathbb{E}[z] = \sum_k \pi_k \mu_k, \qquad
        \operatorname{Var}[z_d] = \sum_k \pi_k (\sigma_{kd}^2 + \mu_{kd}^2) - \mathbb{E}[z_d]^2

    :return: ``(mean, variance)``, each of shape ``(*batch, D)``.
    """
    weights = torch.softmax(logits, dim=-1).unsqueeze(-1)
    mean = (weights * locs).sum(-2)
    second = (weights * (scales.pow(2) + locs.pow(2))).sum(-2)
    return mean, (second - mean.pow(2)).clamp(min=0)


def _as_tensor(name: str, value, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if like is None:
            return torch.tensor(float(value))
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    raise TypeError(f"{name} must be a torch.Tensor or a real number, got {type(value).__name__}")


def check_mixture_params(logits, locs, scales) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and broadcast mixture parameters, raising before any work is done.

    :param logits: shape ``(*batch, K)``.
    :param locs: shape ``(*batch, K, D)``.
    :param scales: shape ``(*batch, K, D)`` or broadcastable to ``locs``.
    :return: ``(logits, locs, scales)`` broadcast to a common batch shape.
    :raises TypeError: if an argument is not a floating-point tensor.
    :raises ValueError: if shapes disagree or a value is not finite / not positive.
    """
    for name, value in (("logits", logits), ("locs", locs), ("scales", scales)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"logits must have shape (*batch, K), got {tuple(logits.shape)}")
    if locs.dim() < 2:
        raise ValueError(f"locs must have shape (*batch, K, D), got {tuple(locs.shape)}")
    if locs.dtype != logits.dtype or scales.dtype != logits.dtype:
        raise TypeError(
            f"logits, locs and scales must share a dtype, got {logits.dtype}, {locs.dtype}, "
            f"{scales.dtype}"
        )
    with ignore_jit_warnings():  # shapes are fixed for a traced call
        k = int(logits.shape[-1])
        k_locs = int(locs.shape[-2])
    if k_locs != k:
        raise ValueError(
            f"locs must have K={k} components on dim -2 to match logits, got shape "
            f"{tuple(locs.shape)}"
        )
    try:
        shape = torch.broadcast_shapes(locs.shape, scales.shape)
        batch = torch.broadcast_shapes(logits.shape[:-1], shape[:-2])
    except RuntimeError as e:
        raise ValueError(
            f"logits {tuple(logits.shape)}, locs {tuple(locs.shape)} and scales "
            f"{tuple(scales.shape)} do not broadcast to (*batch, K) and (*batch, K, D)"
        ) from e
    if not torch._C._get_tracing_state():
        if bool(torch.isnan(logits).any()) or bool((logits == math.inf).any()):
            raise ValueError(
                "logits must not be NaN or +inf (-inf disables a component)" + _blown_up_hint()
            )
        if not bool(torch.isfinite(locs).all()):
            raise ValueError("locs must be finite" + _blown_up_hint())
        if not bool((scales > 0).all()) or not bool(torch.isfinite(scales).all()):
            raise ValueError("scales must be positive and finite" + _blown_up_hint())
    d = shape[-1]
    return (
        logits.expand(batch + (k,)),
        locs.expand(batch + (k, d)),
        scales.expand(batch + (k, d)),
    )


def _blown_up_hint() -> str:
    """When mixture parameters are not finite, say whether a guide's training blew up.

    Only runs on the error path: it scans Pyro's param store for non-finite parameters.
    """
    import pyro

    bad = [
        name
        for name, p in pyro.get_param_store().named_parameters()
        if not bool(torch.isfinite(p).all())
    ]
    if not bad:
        return ""
    return (
        f". The cause: guide parameter(s) {bad[:5]} in Pyro's param store are NaN or infinite, "
        "so training has blown up (an optimisation step applied non-finite gradients). Lower "
        "the learning rate or check the model's log-density; estimator='pathwise' (Pyro's "
        "MixtureOfDiagNormals) overflows in float32 from a latent dimension of about 20-60 "
        "(use the default 'stratified' or float64). pyro_mogflow.fit() refuses such a step and "
        "keeps the guide as it was; reload a checkpoint or rebuild the guide to continue"
    )


def expand_mixture_params(source, cls, batch_shape, _instance=None):
    """The shared part of every mixture's ``expand``: a new ``cls`` instance whose ``logits``,
    ``locs`` and ``scales`` are ``source``'s expanded to ``batch_shape`` (views, no copies).

    The caller copies any other attribute (temperature, ...) onto the returned instance.
    """
    new = source._get_checked_instance(cls, _instance)
    batch_shape = torch.Size(batch_shape)
    k, d = source.locs.shape[-2:]
    new.logits = source.logits.expand(batch_shape + (k,))
    new.locs = source.locs.expand(batch_shape + (k, d))
    new.scales = source.scales.expand(batch_shape + (k, d))
    super(cls, new).__init__(batch_shape, source.event_shape, validate_args=False)
    new._validate_args = source._validate_args
    return new
