"""What :func:`~pyro_mogflow.fit` returns: the guide, the losses and what a resume needs."""

from __future__ import annotations

import numpy as np

__all__ = ["FitResult"]


class FitResult(tuple):
    r"""What :func:`~pyro_mogflow.fit` returns; unpacks as ``guide, losses = fit(...)``.

    :ivar guide: the fitted guide.
    :ivar numpy.ndarray losses: the loss of every step this call ran, shape
        ``(next_step - start_step,)``: the negative ELBO of the tempered model at that step's
        :math:`\beta`.
    :ivar optim: the Pyro optimiser used (pass it back with ``optim=`` to resume with the
        same optimiser state).
    :ivar int next_step: the first step not yet run (``num_steps`` when the fit completed).
    :ivar bool stopped: whether ``callback`` stopped the fit before ``num_steps``.
    :ivar str reason: why the loop ended: ``"converged at step N"``, ``"reached
        max_steps=M"`` (``num_steps="auto"``), ``"num_steps"`` (an explicit ``num_steps`` ran
        out) or ``"stopped by callback at step N"``.
    :ivar list reductions: the component prunings and merges, each a dict with ``step``,
        ``pruned``, ``merged``, ``pruned_mass`` and ``num_components`` (after it).
    :ivar list rounds: the rounds of fresh starts after the first
        (:mod:`~pyro_mogflow.infer.rounds`), each a dict with ``round``, ``steps``,
        ``modes_before`` and ``modes_after``; empty when there was one round. Where the last
        rounds added no mode, the last dict also has ``fallback``
        (:func:`~pyro_mogflow.infer.rounds.better_of`'s report: ``restored`` says whether the
        mixture of before them was returned, ``elbo`` and ``elbo_fallback`` the estimates).
    """

    def __new__(
        cls,
        guide,
        losses,
        *,
        optim=None,
        next_step: int | None = None,
        stopped=False,
        reason: str = "num_steps",
        reductions: list | None = None,
        rounds: list | None = None,
    ):
        self = super().__new__(cls, (guide, losses))
        self.optim = optim
        self.next_step = len(losses) if next_step is None else next_step
        self.stopped = stopped
        self.reason = reason
        self.reductions = [] if reductions is None else reductions
        self.rounds = [] if rounds is None else rounds
        return self

    @property
    def guide(self):
        return self[0]

    @property
    def losses(self) -> np.ndarray:
        return self[1]

    def __repr__(self) -> str:
        return (
            f"FitResult(guide={type(self.guide).__name__}, losses=<{len(self.losses)} steps>, "
            f"next_step={self.next_step}, reason={self.reason!r})"
        )
