"""The first implementation of implicit reparameterization (a custom autograd Function with a
closed-form backward), kept frozen as a reference: the traceable sampler in
:mod:`pyro_mogflow.distributions.mixture` must give the same values and gradients."""

import torch
from torch.autograd.function import once_differentiable

from pyro_mogflow.distributions.mixture import _HALF_LOG_2PI, _conditionals


def _solve_unit_upper(m_left, m_right, rhs):
    system = m_left.transpose(-1, -2) @ m_right
    y = torch.linalg.solve_triangular(system, rhs.unsqueeze(-1), upper=True, unitriangular=True)
    return y.squeeze(-1)


def _implicit_vjp(grad, value, logits, locs, scales):
    x, _, log_w, log_q = _conditionals(value, logits, locs, scales)
    phi = torch.special.ndtr(x)
    cdf = (log_w.exp() * phi).sum(-2, keepdim=True)
    c = torch.exp(log_w - log_q) * (phi - cdf)
    d = value.shape[-1]
    if d == 1:
        y = grad
    else:
        k = locs.shape[-2]
        s = -x / scales
        lead = c.shape[:-2]
        y = _solve_unit_upper(
            s.expand(lead + (k, d)).reshape(-1, k, d),
            c.reshape(-1, k, d),
            grad.expand(lead + (d,)).reshape(-1, d),
        ).reshape(lead + (d,))
    y = y.unsqueeze(-2)
    resp = torch.exp(log_w + (-0.5 * x.pow(2) - scales.log() - _HALF_LOG_2PI) - log_q)
    direct = y * resp
    g_w = -y * c
    rev = torch.flip(torch.cumsum(torch.flip(g_w, (-1,)), dim=-1), (-1,))
    h = torch.cat([rev[..., 1:], torch.zeros_like(rev[..., :1])], dim=-1)
    grad_locs = direct + h * x / scales
    grad_scales = direct * x + h * (x.pow(2) - 1) / scales
    g_log_pi = g_w.sum(-1)
    grad_logits = g_log_pi - torch.softmax(logits, -1) * g_log_pi.sum(-1, keepdim=True)
    return (
        grad_logits.sum_to_size(logits.shape),
        grad_locs.sum_to_size(locs.shape),
        grad_scales.sum_to_size(scales.shape),
    )


class _ImplicitMixtureSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, logits, locs, scales):
        ctx.save_for_backward(value, logits, locs, scales)
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        value, logits, locs, scales = ctx.saved_tensors
        return (None, *_implicit_vjp(grad, value, logits, locs, scales))


def reference_implicit_rsample(value, logits, locs, scales):
    """``value`` with the closed-form implicit reparameterization gradient."""
    return _ImplicitMixtureSample.apply(value.detach(), logits, locs, scales)
