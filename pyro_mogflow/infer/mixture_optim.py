r"""A Pyro optimiser that gives an :class:`~pyro_mogflow.AutoMixtureFlow` the natural-gradient
mixture steps of :func:`~pyro_mogflow.fit` inside a plain ``SVI`` loop.

For a mixture :math:`q = \sum_k \pi_k q_k` with :math:`\pi = \mathrm{softmax}(\ell)` and the ELBO
:math:`\mathcal{L} = \sum_k \pi_k L_k`, :math:`L_k = \mathbb{E}_{q_k}[\log p(x, z) - \log q(z)]`,
the gradient of the loss :math:`-\mathcal{L}` wrt the logits is

.. math:: g_k = \frac{\partial(-\mathcal{L})}{\partial \ell_k}
    = -\pi_k \Big(L_k - \sum_j \pi_j L_j\Big),

so the natural-gradient step of :mod:`~pyro_mogflow.infer.mixture_weights` can be read off the
gradient any ELBO leaves in ``.grad``:

.. math:: \log \pi \leftarrow \mathrm{log\_softmax}\big(\log \pi - \eta\, g / \pi\big).

The gradients wrt component :math:`k`'s mean and scale carry the same factor :math:`\pi_k`; they
are divided by it before the wrapped optimiser moves them.
"""

from __future__ import annotations

import torch
from pyro.optim import PyroOptim

from .._validation import check_real
from ..guides import AutoMixtureFlow
from ..guides.covariance import is_full
from .mixture_weights import _natural_weight_step, _unconstrained

__all__ = ["DEFAULT_WEIGHT_STEP", "MixtureNaturalGradient"]

#: :math:`\eta` of the weight update, as in :func:`~pyro_mogflow.fit`.
DEFAULT_WEIGHT_STEP = 0.05


class MixtureNaturalGradient(PyroOptim):
    r"""Natural-gradient steps for the mixture of an :class:`~pyro_mogflow.AutoMixtureFlow`,
    every other parameter moved by a wrapped Pyro optimiser: the weight steps of
    :func:`~pyro_mogflow.fit`, as an optimiser for a plain ``SVI`` loop.

    After the ELBO's backward pass, with :math:`g` the gradient of the loss wrt the guide's
    logits and :math:`\pi = \mathrm{softmax}(\ell)`, one step sets

    .. math:: \log \pi \leftarrow \mathrm{log\_softmax}\big(\log \pi - \eta\, g / \pi\big)
        \quad (\text{each weight floored at }
        :data:`~pyro_mogflow.infer.mixture_weights.MIN_WEIGHT`),

    which for the ELBO :math:`\sum_k \pi_k L_k` is the multiplicative update
    :math:`\log \pi_k \mathrel{+}= \eta\,(L_k - \sum_j \pi_j L_j)` (Amari 1998; see
    :mod:`~pyro_mogflow.infer.mixture_optim`): a weight moves by the evidence of its component,
    not by Adam's fixed ``lr`` per step, so a component far from every mode loses its weight in
    a few dozen steps. The gradients wrt the component means and scales are divided by
    :math:`\pi_k` (the Fisher block of a component scales with its weight), so a component whose
    weight has collapsed keeps moving toward a mode at full speed; then the wrapped optimiser
    steps every parameter but the logits. Pair it with a scale-free optimiser such as Adam: the
    division can scale a gradient by up to :math:`10^6`.

    The update reads only the gradients, so it runs under any ELBO, but use it with
    :class:`~pyro_mogflow.StratifiedELBO`, where :math:`g` has the sum over components exact:
    under ``Trace_ELBO`` (one implicit draw per step) it was measured not to help
    (``python -m benchmarks.plain_loop``). It finds modes where the components can reach them:
    build the guide with ``init_spread="prior"`` (components at prior draws, as
    :func:`~pyro_mogflow.fit` does); on broad priors in 5-20 dimensions Adam at a small lr did
    not bring such components to the modes in 2000 steps, where :func:`~pyro_mogflow.fit`'s
    tempering (:class:`~pyro_mogflow.TemperedModel`) and larger lr did.

    Usage::

        guide = AutoMixtureFlow(model, init_spread="prior")
        optim = MixtureNaturalGradient(guide, pyro.optim.Adam({"lr": 5e-3}))
        svi = SVI(model, guide, optim, StratifiedELBO())

    :param AutoMixtureFlow guide: the guide whose mixture gets the natural-gradient steps (it
        may still be un-set-up; its parameters are looked up at every step).
    :param PyroOptim optim: the optimiser for every other parameter (and the means and scales,
        after the division by :math:`\pi_k`).
    :param float weight_step: :math:`\eta > 0` (default 0.05, as in
        :func:`~pyro_mogflow.fit`).

    References:

    * S. Amari, *Natural Gradient Works Efficiently in Learning*, Neural Computation 1998.
    * O. Arenz, M. Zhong, G. Neumann, *Trust-Region Variational Inference with Gaussian Mixture
      Models*, JMLR 2020 (natural-gradient weight and component updates).
    """

    def __init__(
        self,
        guide: AutoMixtureFlow,
        optim: PyroOptim,
        weight_step: float = DEFAULT_WEIGHT_STEP,
    ) -> None:
        if not isinstance(guide, AutoMixtureFlow):
            raise TypeError(f"guide must be an AutoMixtureFlow, got {type(guide).__name__}")
        if not isinstance(optim, PyroOptim):
            raise TypeError(
                f"optim must be a Pyro optimizer (pyro.optim.*), got {type(optim).__name__}"
            )
        if isinstance(optim, MixtureNaturalGradient):
            raise TypeError("optim must not itself be a MixtureNaturalGradient")
        self.guide = guide
        self.optim = optim
        self.weight_step = check_real("weight_step", weight_step, minimum=0.0, strict=True)

    def __call__(self, params, *args, **kwargs) -> None:
        """Step the mixture's logits by the natural gradient and every other parameter in
        ``params`` by the wrapped optimiser (means and scales after dividing by :math:`\\pi_k`).

        :param params: the unconstrained parameter tensors to update (as ``SVI`` passes them).
        """
        params = list(params)
        guide = self.guide
        if guide.prototype_trace is not None:
            logits = _unconstrained(guide.logits)
            if any(p is logits for p in params) and logits.grad is not None:
                with torch.no_grad():
                    pi = torch.softmax(logits.detach(), -1)
                    for name in ("locs", "scale_tril" if is_full(guide) else "scales"):
                        leaf = _unconstrained(getattr(guide, name))
                        if leaf.grad is not None and any(p is leaf for p in params):
                            leaf.grad.div_(pi.reshape(pi.shape + (1,) * (leaf.dim() - 1)))
                    # -g / pi = L_k - sum_j pi_j L_j: the "terms" of the shared update
                    _natural_weight_step(logits, -logits.grad / pi, self.weight_step)
                params = [p for p in params if p is not logits]
        self.optim(params, *args, **kwargs)

    # The wrapped optimiser holds all the state.
    def get_state(self) -> dict:
        """The wrapped optimiser's state (the logits have none)."""
        return self.optim.get_state()

    def set_state(self, state_dict: dict) -> None:
        """Set the wrapped optimiser's state."""
        self.optim.set_state(state_dict)

    def save(self, filename: str) -> None:
        """Save the wrapped optimiser's state to ``filename``."""
        self.optim.save(filename)

    def load(self, filename: str, map_location=None) -> None:
        """Load the wrapped optimiser's state from ``filename``."""
        self.optim.load(filename, map_location=map_location)
