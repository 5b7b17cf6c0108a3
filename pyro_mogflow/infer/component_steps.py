r"""Natural-gradient steps for the components of an :class:`~pyro_mogflow.AutoMixtureFlow`: the
diagonal improved Bayesian learning rule (iBLR, variational online Newton).

The guide's base is a mixture :math:`q_0(u) = \sum_k \pi_k \mathcal N(u; m_k, S_k^{-1})` of
diagonal Gaussians in the unconstrained packed latent space (before the flow :math:`f`), with
precision :math:`S_k = \operatorname{diag}(s_k)`, :math:`s_k = \sigma_k^{-2}`. Pulled back
through the flow, the ELBO's integrand at a base point is

.. math:: h(u) = \log p\big(x, f(u)\big) + \log\Big|\det \frac{\partial f}{\partial u}\Big|
    - \log q_0(u) = \log p(x, z) - \log q(z), \qquad z = f(u),

with :math:`\log q` the density of the whole mixture flow. For component :math:`k` with the
mixture's parameters held fixed, the Bayesian learning rule (Khan & Rue 2023) moves the
component's natural parameters along the natural gradient of
:math:`\mathbb E_{q_k}[h]`; for a Gaussian these need the expected gradient and Hessian of
:math:`h`, which Bonnet's and Price's theorems turn into expectations of the gradient alone:

.. math::
    \bar g_k = \mathbb E_{q_k}[\nabla h], \qquad
    \mathbb E_{q_k}[\nabla^2 h] = \mathbb E_{q_k}\big[\nabla h\, (u - m_k)^\top\big]\, S_k
    \quad (\text{Stein's lemma}).

Each step draws one antithetic pair :math:`u_\pm = m_k \pm \sigma_k \odot \epsilon` per
component (:class:`~pyro_mogflow.StratifiedELBO` with ``antithetic=True``), takes
:math:`g_\pm = \nabla_u h(u_\pm)` by autograd (wrt the draw, so through the model, the flow and
the whole mixture density, not the parameters), and estimates

.. math::
    \bar g_k = \tfrac12 (g_+ + g_-), \qquad
    G_k = -\tfrac12 \big(g_+ - g_-\big) \odot \epsilon \odot \sqrt{s_k}
    \ \approx\ -\operatorname{diag} \mathbb E_{q_k}[\nabla^2 h],

When :math:`h` is quadratic, :math:`\bar g_k` is exact and :math:`G_k` is
:math:`\epsilon^2` times the exact value (unbiased), so both vanish exactly at the optimum of a
Gaussian target: its fixed point carries no Monte Carlo error. With
:math:`-\nabla^2 h = -\nabla^2 \log p_u + S_k` (one component), the exact :math:`G_k` is
:math:`\Lambda - s_k` with :math:`\Lambda` the diagonal of the pulled-back target's precision
:math:`-\nabla^2 \log p_u`, and the iBLR update (Lin, Schmidt & Khan 2020) is

.. math::
    s_k \leftarrow s_k + b_k G_k + \frac{b_k^2}{2}\, \frac{G_k^2}{s_k}, \qquad
    m_k \leftarrow m_k + b_k\, \frac{\bar g_k}{s_k},

the new :math:`s_k` in the second line. The quadratic term keeps the precision positive
whatever the noise in :math:`G_k` (the right side equals
:math:`\tfrac{(s_k + b_k G_k)^2}{2 s_k} + \tfrac{s_k}{2} > 0`), and without noise the fixed
point is :math:`G_k = 0`, :math:`\bar g_k = 0`: the exact mean and diagonal precision of a
Gaussian target. The step :math:`b_k = \min\big(b,\ \sqrt{\varepsilon / \kappa_k}\big)` caps
the second-order estimate of the KL divergence between the component and its update,

.. math:: \kappa_k = \tfrac14 \sum_i \frac{G_{ki}^2}{s_{ki}^2}
    + \tfrac12 \sum_i \frac{\bar g_{ki}^2}{s_{ki}}, \qquad
    \mathrm{KL}(q_k^{\text{new}} \,\|\, q_k) \approx b_k^2 \kappa_k \le \varepsilon,

a trust region in the spirit of GMMVI (Arenz et al. 2022), so a component far out in the tails
of a tempered posterior, where the gradient is huge, moves by a bounded amount instead of
overshooting. Defaults :math:`b = 0.1`, :math:`\varepsilon = 1`. Because the update is in the
component's own natural coordinates, a component moves at the same pace whatever its weight
:math:`\pi_k` (the weights take their own natural-gradient step,
:mod:`pyro_mogflow.infer.mixture_weights`).

References:

* W. Lin, M. Schmidt, M. E. Khan, *Handling the Positive-Definite Constraint in the Bayesian
  Learning Rule*, ICML 2020 (iBLR).
* M. E. Khan, H. Rue, *The Bayesian Learning Rule*, JMLR 2023.
* O. Arenz, P. Dahlinger, Z. Ye, M. Volpp, G. Neumann, *A Unified Perspective on Natural
  Gradient Variational Inference with Gaussian Mixture Models*, TMLR 2023 (GMMVI).
* M. Opper, C. Archambeau, *The Variational Gaussian Approximation Revisited*, Neural
  Computation 2009 (Bonnet's and Price's theorems in variational inference).
"""

from __future__ import annotations

import torch
from torch.distributions import biject_to, constraints

from .._validation import check_real

__all__ = [
    "COMPONENT_STEPS",
    "KL_BOUND",
    "STEP_SIZE",
    "base_gradients",
    "check_component_step",
    "natural_component_update",
    "natural_component_deltas",
]

#: What :func:`~pyro_mogflow.fit` can use to move the component means and scales.
COMPONENT_STEPS = ("natural", "adam")
#: :math:`b`, the largest natural-gradient step of a component.
STEP_SIZE = 0.1
#: :math:`\varepsilon`, the bound on the estimated KL between a component and its update.
KL_BOUND = 1.0


def check_component_step(component_step) -> str:
    """``component_step`` if it is one of :data:`COMPONENT_STEPS`, else a ValueError."""
    if component_step not in COMPONENT_STEPS:
        raise ValueError(f"component_step must be one of {COMPONENT_STEPS}, got {component_step!r}")
    return component_step


def base_gradients(log_ratio: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    r""":math:`\nabla_u h(u)` at every draw, with the mixture's parameters held fixed.

    :param torch.Tensor log_ratio: :math:`h(u_{kt}) = \log p(x, z_{kt}) - \log q(z_{kt})`, shape
        ``(m, n)`` (:meth:`~pyro_mogflow.StratifiedELBO.particles`), attached to the graph.
    :param torch.Tensor base: the base draws :math:`u` the ratios were computed from, shape
        ``(m * n, D)`` (:attr:`~pyro_mogflow.distributions.StratifiedSample.base`): an
        intermediate tensor of that graph (each draw's ratio depends on its own draw only).
    :return: the gradients, shape ``(m, n, D)``, detached; the graph is kept for a later
        backward pass.
    """
    (grad,) = torch.autograd.grad(log_ratio.sum(), base, retain_graph=True)
    return grad.reshape(log_ratio.shape + base.shape[-1:])


def natural_component_update(
    locs: torch.Tensor,
    scales: torch.Tensor,
    base: torch.Tensor,
    grads: torch.Tensor,
    step_size: float = STEP_SIZE,
    kl_bound: float = KL_BOUND,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One diagonal iBLR step of each component (see the module docstring).

    :param torch.Tensor locs: :math:`m`, shape ``(K, D)``.
    :param torch.Tensor scales: :math:`\sigma = s^{-1/2}`, shape ``(K, D)``.
    :param torch.Tensor base: antithetic base draws :math:`u_{kt}`, shape ``(K, n, D)`` with
        ``n`` even and draw ``t + n/2`` the mirror image of draw ``t`` about :math:`m_k`.
    :param torch.Tensor grads: :math:`\nabla_u h` at those draws, shape ``(K, n, D)``.
    :param float step_size: :math:`b`, the largest step (default :data:`STEP_SIZE`).
    :param float kl_bound: :math:`\varepsilon` (default :data:`KL_BOUND`).
    :return: the new ``(locs, scales)``, shapes ``(K, D)``; non-finite wherever the gradients
        were (the caller refuses such a step).
    """
    step_size = check_real("step_size", step_size, minimum=0.0, strict=True)
    kl_bound = check_real("kl_bound", kl_bound, minimum=0.0, strict=True)
    with torch.no_grad():
        eps = (base - locs.unsqueeze(1)) / scales.unsqueeze(1)  # (K, n, D)
        prec = scales.pow(-2)
        gbar = grads.mean(1)
        big_g = -(grads * eps).mean(1) / scales  # -E[g eps] sqrt(s)
        size = (big_g / prec).pow(2).sum(-1) / 4 + (gbar.pow(2) / prec).sum(-1) / 2
        # size = 0 (a fixed point): the full step; non-finite gradients stay non-finite.
        b = torch.clamp((kl_bound / size).sqrt(), max=step_size).unsqueeze(-1)
        new_prec = prec + b * big_g + 0.5 * b.pow(2) * big_g.pow(2) / prec
        new_locs = locs + b * gbar / new_prec
        return new_locs, new_prec.rsqrt()


def _scales_constraint(guide) -> constraints.Constraint:
    params = getattr(guide, "_pyro_params", {})
    return params["scales"][0] if "scales" in params else constraints.positive


def natural_component_deltas(
    guide,
    base: torch.Tensor,
    grads: torch.Tensor,
    step_size: float = STEP_SIZE,
    kl_bound: float = KL_BOUND,
) -> dict[str, torch.Tensor]:
    r"""The change of the guide's ``locs`` and ``scales`` leaves for one natural-gradient step.

    :param guide: an :class:`~pyro_mogflow.AutoMixtureFlow` (set up).
    :param torch.Tensor base: antithetic base draws, shape ``(K, n, D)``.
    :param torch.Tensor grads: :math:`\nabla_u h` there, shape ``(K, n, D)``.
    :return: ``{"locs": new - old, "scales": new - old}``, each in the unconstrained space the
        optimiser updates (the leaf of the Pyro parameter), shape ``(K, D)``, in the
        parameters' dtype and device. Non-finite entries mean the step must be refused.
    """
    locs, scales = guide.locs.detach(), guide.scales.detach()
    new_locs, new_scales = natural_component_update(
        locs,
        scales,
        base.detach().to(locs.dtype),
        grads.to(locs.dtype),
        step_size,
        kl_bound,
    )
    to_leaf = biject_to(_scales_constraint(guide)).inv
    with torch.no_grad():
        old = to_leaf(scales)
        # A scale that underflows or overflows its constraint's range is a failed step too.
        new = to_leaf(new_scales)
        return {"locs": new_locs - locs, "scales": new - old}
