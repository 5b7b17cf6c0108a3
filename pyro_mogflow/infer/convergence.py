r"""When to stop training: a plateau test on the ELBO and on the mixture's masses.

:func:`~pyro_mogflow.fit` with ``num_steps="auto"`` runs until :class:`PlateauTest` says the fit
has converged, or until ``max_steps``. The test looks only at steps taken at :math:`\beta = 1`
(a tempered ELBO is another objective) and runs every ``window`` steps on the last two windows
of losses :math:`\ell_t` (negative ELBO estimates):

1. **The ELBO has stopped improving.** With :math:`\bar\ell_1, \bar\ell_2` the means of the
   older and the newer window of :math:`W` steps, the fit has stopped improving when

   .. math:: \bar\ell_1 - \bar\ell_2 \;\le\; z \sqrt{2}\, \hat s / \sqrt{W},

   the improvement is within ``z`` standard errors of zero, or at most ``min_improvement``
   nats per step (:math:`W \delta`): an estimate averaged over many components can be so
   precise that a drift of a thousandth of a nat per window is significant, and waiting for it
   to stop costs hundreds of steps for nothing a user could see (measured on a 20-weight
   logistic regression: the test at :math:`\beta = 1` kept failing on improvements of 0.002-0.003
   nats per 100 steps against a threshold of 0.002, 300 steps at :math:`K = 64`). The per-step
   noise :math:`\hat s`
   is estimated from successive differences, :math:`\hat s^2 = \frac{1}{2(2W-1)} \sum_t
   (\ell_{t+1} - \ell_t)^2` over both windows, which a slow drift of the mean does not inflate
   (von Neumann's mean square successive difference).
2. **The masses have settled.** The mixture weights averaged over each window, summed over the
   groups of components that sit on one mode (``groups``), differ by at most
   ``mass_tolerance`` in total variation, :math:`\frac12 \sum_g |\bar\pi_g -
   \bar\pi'_g|`. (Weight moving between near-copies on one mode is a neutral random walk
   that never settles: with 64 components on 9 modes of the benchmark's grid it kept the
   component-level test from passing in 10000 steps.) A mode still winning or losing mass
   means the fit is still moving mass between modes even when the ELBO is flat. (The weights
   jitter from step to step under noisy natural-gradient steps, by about 0.02 in total
   variation per 100 steps on the benchmark's 2-D targets; the window averages do not.)
   Where the weight steps are noisier than that (big data: each component's ELBO term is a sum
   over many points), a mode's window-averaged mass can wander by more than
   ``mass_tolerance`` while nothing moves on average, and the test would never pass. So a mode
   also counts as settled when its change is within ``z`` standard errors: each window is cut
   into :data:`MASS_BATCHES` batches, and the variance of a batch mean of mode :math:`g`'s mass
   is estimated from successive differences of the batch means, :math:`\hat v_g =
   \frac{1}{2(2B-1)} \sum_b (\bar\pi_{g,b+1} - \bar\pi_{g,b})^2` over both windows (a
   drift does not inflate it), so the change between windows has standard error
   :math:`\sqrt{2 \hat v_g / B}`.

The fit has converged when both hold at ``patience`` checks in a row. Each check is one
comparison of noisy means, so with the default ``z = 2`` a still-improving fit passes one check
by chance with probability of at most a few percent; ``patience = 2`` makes a premature stop rarer.

References:

* J. von Neumann, R. Kent, H. Bellinson, B. Hart, *The mean square successive difference*,
  Annals of Mathematical Statistics 1941.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._validation import check_int, check_real

__all__ = ["MASS_BATCHES", "MIN_IMPROVEMENT", "PlateauTest"]

#: Batches per window for the standard error of the mode masses (see the module docstring).
MASS_BATCHES = 5
#: Default floor of the ELBO test, in nats per step (0.01 nats per window of 100 steps).
MIN_IMPROVEMENT = 1e-4


class PlateauTest:
    r"""Decides, step by step, whether a fit at :math:`\beta = 1` has converged.

    Usage::

        test = PlateauTest(window=100)
        for step in range(max_steps):
            loss = svi.step(data)
            if test.update(step, loss, beta=1.0, weights=guide.components(data)["weights"]):
                break
        print(test.reason)   # "converged at step 812" or None

    :param int window: ``W``, steps per window and between checks (default 100).
    :param float z: standard errors the improvement must exceed to count (default 2).
    :param float mass_tolerance: largest total-variation change of the window-averaged weights
        between the two windows (default 0.01).
    :param int patience: checks in a row that must pass (default 2).
    :param float min_improvement: :math:`\delta`, an improvement of at most this many nats per
        step counts as none, however significant (default :data:`MIN_IMPROVEMENT`; 0 turns the
        floor off).
    :ivar converged_at: the step at which the test passed, or ``None``.
    """

    def __init__(
        self,
        window: int = 100,
        z: float = 2.0,
        mass_tolerance: float = 0.01,
        patience: int = 2,
        min_improvement: float | None = None,
    ):
        self.window = check_int("window", window, 2)
        self.z = check_real("z", z, minimum=0.0)
        self.mass_tolerance = check_real("mass_tolerance", mass_tolerance, minimum=0.0)
        self.patience = check_int("patience", patience, 1)
        if min_improvement is None:
            min_improvement = MIN_IMPROVEMENT
        self.min_improvement = check_real("min_improvement", min_improvement, minimum=0.0)
        self.converged_at: int | None = None
        self.reset()

    def reset(self) -> None:
        """Forget every loss seen (e.g. after the guide changed shape)."""
        self._losses: list[float] = []
        self._weights: list[torch.Tensor | None] = []
        self._sum: torch.Tensor | None = None
        self._group: list | None = None
        self._batch_sum: torch.Tensor | None = None
        self._batch_n = 0
        self._batches: list[torch.Tensor] = []
        self._passed = 0
        self.last: dict = {}

    @property
    def reason(self) -> str | None:
        """``"converged at step N"`` once the test passed, else ``None``."""
        return None if self.converged_at is None else f"converged at step {self.converged_at}"

    def update(self, step: int, loss: float, beta: float = 1.0, weights=None, groups=None) -> bool:
        """Record one step's loss; return whether the fit has converged.

        :param int step: the step just taken.
        :param float loss: its loss (negative ELBO estimate).
        :param float beta: its inverse temperature; a step with ``beta < 1`` restarts the test.
        :param weights: the mixture weights after it, shape ``(K,)``, or ``None`` (no mass
            test), or a callable returning them.
        :param groups: ``None`` (every component its own mode) or a callable returning a list
            of lists of component indices, the components on each mode; called at checks only.
        :return: True once the plateau test has passed ``patience`` checks in a row.
        """
        if self.converged_at is not None:
            return True
        if beta < 1 or not math.isfinite(loss):
            self.reset()
            return False
        self._losses.append(float(loss))
        w = weights() if callable(weights) else weights
        if w is not None:
            w = torch.as_tensor(w).detach().double()
            same = self._sum is not None and self._sum.shape == w.shape
            self._sum = self._sum + w if same else w.clone()
            if self._batch_sum is None or self._batch_sum.shape != w.shape:
                self._batch_sum, self._batch_n = w.clone(), 1
                if self._batches and self._batches[-1].shape != w.shape:
                    self._batches = []
            else:
                self._batch_sum, self._batch_n = self._batch_sum + w, self._batch_n + 1
            if self._batch_n == max(1, self.window // MASS_BATCHES):
                self._batches.append((self._batch_sum / self._batch_n).cpu())
                self._batches = self._batches[-2 * MASS_BATCHES :]
                self._batch_sum, self._batch_n = None, 0
        n = len(self._losses)
        if n % self.window:
            return False
        self._weights.append(None if self._sum is None else (self._sum / self.window).cpu())
        self._sum = None
        if n < 2 * self.window:
            return False
        if groups is not None and self._weights[-1] is not None:
            self._group = [list(g) for g in groups()]
        ok = self._check()
        self._passed = self._passed + 1 if ok else 0
        if self._passed >= self.patience:
            self.converged_at = step
            return True
        return False

    def _check(self) -> bool:
        w = self.window
        recent = np.asarray(self._losses[-2 * w :])
        old, new = recent[:w].mean(), recent[w:].mean()
        noise = math.sqrt(np.mean(np.diff(recent) ** 2) / 2)
        threshold = self.z * math.sqrt(2.0) * noise / math.sqrt(w)
        improvement = old - new
        a, b = self._weights[-2], self._weights[-1]
        moved = 0.0
        if a is not None and b is not None and self._group is not None and a.shape == b.shape:
            a = torch.stack([a[g].sum() for g in self._group])
            b = torch.stack([b[g].sum() for g in self._group])
        if a is not None and b is not None:
            moved = float(0.5 * (a - b).abs().sum()) if a.shape == b.shape else math.inf
        within_noise = self._masses_within_noise()
        floor = self.min_improvement * w
        self.last = {"improvement": improvement, "threshold": threshold, "mass_moved": moved}
        self.last.update(floor=floor, masses_within_noise=within_noise)
        settled = moved <= self.mass_tolerance or within_noise
        return improvement <= max(threshold, floor) and settled

    def _masses_within_noise(self) -> bool:
        """Every mode's mass changed between the windows by at most ``z`` standard errors."""
        batches = self._batches
        if len(batches) < 2 * MASS_BATCHES or len({b.shape for b in batches}) != 1:
            return False
        w = torch.stack(batches)  # (2B, K)
        if self._group is not None:
            w = torch.stack([w[:, g].sum(-1) for g in self._group], -1)  # (2B, G)
        change = w[MASS_BATCHES:].mean(0) - w[:MASS_BATCHES].mean(0)
        var = (w[1:] - w[:-1]).pow(2).mean(0) / 2
        se = (2 * var / MASS_BATCHES).sqrt()
        return bool((change.abs() <= self.z * se).all()) and bool((se > 0).all())
