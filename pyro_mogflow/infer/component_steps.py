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

**Full covariance.** After :meth:`~pyro_mogflow.AutoMixtureFlow.to_full_covariance` a
component is :math:`\mathcal N(m_k, \Sigma_k)`, :math:`\Sigma_k = L_k L_k^\top = S_k^{-1}`,
drawn as :math:`u_\pm = m_k \pm L_k \epsilon`. Stein's lemma gives the whole Hessian,
:math:`\mathbb E[\nabla^2 h] = \mathbb E[\nabla h\, (u - m_k)^\top] S_k =
\mathbb E[\nabla h\, \epsilon^\top] L_k^{-1}`, estimated from the draws and symmetrised:

.. math::
    G_k = -\operatorname{sym}\Big(\frac1n \sum_t g_t \epsilon_t^\top\Big) L_k^{-1},
    \qquad \operatorname{sym}(A) = \tfrac12 (A + A^\top),

(exact in expectation; for a quadratic :math:`h` it vanishes exactly at the optimum, since
:math:`g_t` is then linear in :math:`\epsilon_t` and the pair averages out the constant),
and the full iBLR step (Lin, Schmidt & Khan 2020, eq. 11) is

.. math::
    S_k \leftarrow S_k + b_k G_k + \frac{b_k^2}{2}\, G_k S_k^{-1} G_k, \qquad
    m_k \leftarrow m_k + b_k\, S_k^{-1} \bar g_k,

positive definite whatever :math:`G_k` (it equals :math:`\tfrac12 (S_k + b_k G_k) S_k^{-1}
(S_k + b_k G_k) + \tfrac12 S_k`); on a Gaussian target its fixed point is the target's exact
mean and covariance. The KL cap uses
:math:`\kappa_k = \tfrac14 \lVert L_k^\top G_k L_k \rVert_F^2 + \tfrac12 \lVert L_k^\top
\bar g_k \rVert^2` (the same second-order KL, :math:`\tfrac14 \operatorname{tr}
(\Sigma_k G_k)^2 + \tfrac12 \bar g_k^\top \Sigma_k \bar g_k`). The step is computed in
float64 on :math:`S_k` and returned as the Cholesky factor of the new covariance; a factor
that does not exist (non-finite gradients) makes the step non-finite, and it is refused.
Per component it costs :math:`O(D^3)`, negligible beside the model evaluations up to a few
hundred dimensions.

*Step size in high dimension.* One antithetic pair estimates :math:`G_k` from the rank-one
:math:`\epsilon\epsilon^\top`: on a Gaussian target, with error :math:`E` of the whitened
precision, the step maps :math:`E \mapsto (1-b)E + b\,\operatorname{sym}(E(\epsilon
\epsilon^\top - I))`, whose mean square grows by the factor :math:`(1-b)^2 + b^2 D`
(roughly): above 1 for :math:`b = 0.1` once :math:`D \gtrsim 20`, so the error does not
shrink and the KL cap alone bounds it (measured: on the 50-D GMM-40 target, unit-variance
modes, full components ended 1.6 nats of reverse KL above diagonal ones). The full step
therefore uses :math:`b_{\text{full}} = \min(b, 1/(D+1))`, the step that minimises that factor
(to :math:`D/(D+1)`): slower per step in high dimension, but contracting.

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
from torch.distributions import biject_to, constraints, transform_to

from .._validation import check_int, check_real
from ..guides.covariance import is_full

__all__ = [
    "COMPONENT_STEPS",
    "KL_BOUND",
    "STEP_SIZE",
    "base_gradients",
    "check_component_step",
    "check_stratified_guide",
    "full_step_size",
    "natural_component_update",
    "natural_component_deltas",
    "natural_full_update",
]

#: What :func:`~pyro_mogflow.fit` can use to move the component means and scales.
COMPONENT_STEPS = ("auto", "natural", "adam")
#: :math:`b`, the largest natural-gradient step of a component.
STEP_SIZE = 0.1
#: :math:`\varepsilon`, the bound on the estimated KL between a component and its update.
KL_BOUND = 1.0


def check_component_step(component_step) -> str:
    """``component_step`` if it is one of :data:`COMPONENT_STEPS`, else a ValueError."""
    if component_step not in COMPONENT_STEPS:
        raise ValueError(f"component_step must be one of {COMPONENT_STEPS}, got {component_step!r}")
    return component_step


def check_stratified_guide(guide, global_mixture: bool, component_step: str, covariance: str):
    """Refuse ``component_step="natural"`` or ``covariance="full"`` for a guide that is not an
    :class:`~pyro_mogflow.AutoMixtureFlow` with ``estimator="stratified"`` (ValueError)."""
    for option, value, default in (
        ("component_step", component_step, "adam"),
        ("covariance", covariance, "diag"),
    ):
        if value not in (default, "auto") and not global_mixture:
            estimator = getattr(guide, "estimator", None)
            raise ValueError(
                f"{option}={value!r} needs an AutoMixtureFlow with estimator='stratified' (the "
                f"default guide), got {type(guide).__name__}"
                + (f"(estimator={estimator!r})" if estimator is not None else "")
                + f"; use {option}={default!r}"
            )


def base_gradients(
    log_ratio: torch.Tensor, base: torch.Tensor, retain_graph: bool = True
) -> torch.Tensor:
    r""":math:`\nabla_u h(u)` at every draw, with the mixture's parameters held fixed.

    :param torch.Tensor log_ratio: :math:`h(u_{kt}) = \log p(x, z_{kt}) - \log q(z_{kt})`, shape
        ``(m, n)`` (:meth:`~pyro_mogflow.StratifiedELBO.particles`), attached to the graph.
    :param torch.Tensor base: the base draws :math:`u` the ratios were computed from, shape
        ``(m * n, D)`` (:attr:`~pyro_mogflow.distributions.StratifiedSample.base`): an
        intermediate tensor of that graph (each draw's ratio depends on its own draw only).
    :param bool retain_graph: keep the graph for a later backward pass (default).
    :return: the gradients, shape ``(m, n, D)``, detached.
    """
    (grad,) = torch.autograd.grad(log_ratio.sum(), base, retain_graph=retain_graph)
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


def natural_full_update(
    locs: torch.Tensor,
    scale_tril: torch.Tensor,
    base: torch.Tensor,
    grads: torch.Tensor,
    step_size: float = STEP_SIZE,
    kl_bound: float = KL_BOUND,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One full-covariance iBLR step of each component (module docstring, "Full covariance").

    :param torch.Tensor locs: :math:`m`, shape ``(K, D)``.
    :param torch.Tensor scale_tril: :math:`L`, lower-triangular, shape ``(K, D, D)``.
    :param torch.Tensor base: antithetic draws :math:`u_{kt} = m_k + L_k \epsilon_{kt}`, shape
        ``(K, n, D)``, draw ``t + n/2`` the mirror image of draw ``t``.
    :param torch.Tensor grads: :math:`\nabla_u h` at those draws, shape ``(K, n, D)``.
    :param float step_size: :math:`b` (default :data:`STEP_SIZE`).
    :param float kl_bound: :math:`\varepsilon` (default :data:`KL_BOUND`).
    :return: the new ``(locs, scale_tril)``, shapes ``(K, D)`` and ``(K, D, D)``, in the dtype
        of ``locs``; non-finite where the step failed (the caller refuses it).
    """
    step_size = check_real("step_size", step_size, minimum=0.0, strict=True)
    kl_bound = check_real("kl_bound", kl_bound, minimum=0.0, strict=True)
    dtype = locs.dtype
    f64 = torch.float64
    with torch.no_grad():
        m, tril = locs.to(f64), scale_tril.to(f64).tril()
        g = grads.to(f64)
        diff = (base.to(f64) - m.unsqueeze(1)).transpose(-1, -2)  # (K, D, n)
        eps = torch.linalg.solve_triangular(tril, diff, upper=False)  # (K, D, n)
        gbar = g.mean(1)  # (K, D)
        cross = (g.transpose(-1, -2) @ eps.transpose(-1, -2)) / g.shape[1]  # (K, D, D)
        # E[g eps^T] L^{-1}: solve X L = cross
        hess = torch.linalg.solve_triangular(tril, cross, upper=False, left=False)
        big_g = -0.5 * (hess + hess.transpose(-1, -2))
        whitened = tril.transpose(-1, -2) @ big_g @ tril  # L^T G L
        lg = (tril.transpose(-1, -2) @ gbar.unsqueeze(-1)).squeeze(-1)
        size = whitened.pow(2).sum((-1, -2)) / 4 + lg.pow(2).sum(-1) / 2
        b = torch.clamp((kl_bound / size).sqrt(), max=step_size).reshape(-1, 1, 1)
        prec = torch.cholesky_inverse(tril)  # S = (L L^T)^{-1}
        cov_g = tril @ (tril.transpose(-1, -2) @ big_g)  # S^{-1} G = L L^T G
        new_prec = prec + b * big_g + 0.5 * b.pow(2) * (big_g @ cov_g)
        new_prec = 0.5 * (new_prec + new_prec.transpose(-1, -2))
        chol_prec, info = torch.linalg.cholesky_ex(new_prec)
        new_cov = torch.cholesky_inverse(chol_prec)
        new_tril, info_cov = torch.linalg.cholesky_ex(0.5 * (new_cov + new_cov.transpose(-1, -2)))
        new_m = m + b.squeeze(-1) * torch.cholesky_solve(gbar.unsqueeze(-1), chol_prec).squeeze(-1)
        bad = (info != 0) | (info_cov != 0)
        nan = torch.tensor(float("nan"), dtype=f64, device=m.device)
        new_tril = torch.where(bad.reshape(-1, 1, 1), nan, new_tril)
        new_m = torch.where(bad.reshape(-1, 1), nan, new_m)
        return new_m.to(dtype), new_tril.to(dtype)


def full_step_size(dim: int) -> float:
    r"""The largest full-covariance step :math:`1/(D+1)` in ``dim`` dimensions (module
    docstring, "Step size in high dimension")."""
    return 1.0 / (check_int("dim", dim, 1) + 1)


def _unconstrained(value: torch.Tensor) -> torch.Tensor:
    """The leaf tensor the optimiser updates for a constrained Pyro parameter value."""
    unconstrained = getattr(value, "unconstrained", None)
    return unconstrained() if callable(unconstrained) else value


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
    :return: ``{"locs": new - old, "scales": new - old}`` (``"scale_tril"``, shape
        ``(K, D, D)``, instead of ``"scales"`` for a full-covariance guide), each in the
        unconstrained space the optimiser updates (the leaf of the Pyro parameter), shape
        ``(K, D)``, in the
        parameters' dtype and device. Non-finite entries mean the step must be refused.
    """
    if is_full(guide):
        return _full_deltas(guide, base, grads, step_size, kl_bound)
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


def _full_deltas(guide, base, grads, step_size, kl_bound) -> dict[str, torch.Tensor]:
    """:func:`natural_component_deltas` of a full-covariance guide: ``locs`` and ``scale_tril``."""
    locs, tril = guide.locs.detach(), guide.scale_tril.detach()
    step_size = min(step_size, full_step_size(locs.shape[-1]))
    new_locs, new_tril = natural_full_update(
        locs, tril, base.detach().to(locs.dtype), grads.to(locs.dtype), step_size, kl_bound
    )
    constraint = guide._pyro_params["scale_tril"][0]
    to_leaf = transform_to(constraint).inv
    with torch.no_grad():
        return {"locs": new_locs - locs, "scale_tril": to_leaf(new_tril) - to_leaf(tril)}
