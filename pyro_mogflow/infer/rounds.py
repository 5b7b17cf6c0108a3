r"""Rounds of fresh starts: more starts where the first ones show that modes were missed.

:func:`~pyro_mogflow.fit` starts its :math:`K` components at :math:`K` prior draws, and under
tempering each one runs to a mode; a posterior with more modes than that, or with modes whose
basins are small, keeps some modes without a start. How many were missed can be estimated from
the starts themselves. Count, for every mode found, the starts that reached it (the
components :func:`~pyro_mogflow.infer.consolidation.mode_groups` puts on it when the weights
are released, each counted with the starts it was consolidated from). With :math:`n` starts of
which :math:`f_1` modes were reached by exactly one, Good's estimate of the probability that one
more start reaches a mode no start reached is

.. math:: \hat p_0 = f_1 / n

(Good 1953, after Turing): modes reached once are the evidence that some were reached zero
times. So with ``fit(rounds="auto")``, when :math:`f_1 \ge 1` after the first round, ``fit``
runs another round on the same guide: :math:`K` fresh components at new prior draws
(:func:`fresh_start`), the same annealed fit, whose result is added to the mixture found so far
(:func:`join`); the weights are set to their optimum for all the components and the modes found
twice consolidated into one. It goes on until :data:`PATIENCE` rounds in a row add no mode,
up to :data:`MAX_ROUNDS` rounds, and ends with a fit at :math:`\beta = 1` of the joined
mixture. Rounds that add no mode still join (their components on the modes held already
improved the modes' masses on the BNN of the real-models benchmark), but they can also spoil
them (frequency estimation: several components on one mode, each weight fitted from a finite
sample): so ``fit`` keeps the mixture of before the first of those rounds, and returns it
instead where its ELBO is higher (:func:`better_of`). (A round of :math:`K` starts misses a
mode whose basin draws a share :math:`p` of the starts with probability :math:`(1 - p)^K`:
0.45 for :math:`p = 0.0124` and :math:`K = 64`, the smallest share on GMM-40 below; two
rounds in a row miss it with probability 0.20.) A posterior whose
modes were each reached by two starts or more (every unimodal one, and most with a few modes)
never pays for a second round.

**Overdispersed starts.** The later rounds do not start where the first did. A start runs to
the mode whose basin it lies in, so prior draws reach the modes whose basins hold much prior
mass again and again, and the modes out in the prior's tails rarely: the modes the first round
missed are, for the most part, those. The later rounds therefore start from prior draws
spread :data:`OVERDISPERSION` times wider about their coordinatewise median in the
unconstrained space, :math:`\tilde\theta = m + c\,(\theta - m)` (overdispersed starting
points, as for the chains of Gelman and Rubin 1992). On the 50-D GMM-40 of the real-models
benchmark, the basins' shares of prior draws (each draw assigned to its nearest mean) range
from 0.003 to 0.137; of draws spread twice as wide, from 0.012 to 0.044
(``python -m benchmarks.basin_shares``). One round of 64
starts covers about 29 of its 40 modes; README has the figures with rounds.

References:

* I. J. Good, *The population frequencies of species and the estimation of population
  parameters*, Biometrika 40, 1953.
* A. Gelman and D. B. Rubin, *Inference from iterative simulation using multiple sequences*,
  Statistical Science 7, 1992.
"""

from __future__ import annotations

import math

import torch

from .._validation import check_int, check_real
from ..guides.covariance import replace_mixture_params
from ..guides.initialization import DEFAULT_INIT_SCALE, prior_locs
from .consolidation import _restore, _snapshot, estimate_elbo, mode_groups

__all__ = [
    "MAX_ROUNDS",
    "OVERDISPERSION",
    "PATIENCE",
    "better_of",
    "fresh_start",
    "join",
    "mode_counts",
    "singletons",
]

#: Most rounds of ``fit(rounds="auto")``.
MAX_ROUNDS = 6

#: How much wider than the prior's draws the starts of the rounds after the first are spread.
OVERDISPERSION = 2.0

#: Rounds in a row that add no mode before the rounds stop.
PATIENCE = 2


@torch.no_grad()
def mode_counts(guide, starts: torch.Tensor) -> list[float]:
    """The starts that reached each mode: ``starts`` (one count per component, shape ``(K,)``)
    summed over each group of :func:`~pyro_mogflow.infer.consolidation.mode_groups`."""
    starts = torch.as_tensor(starts, dtype=torch.float64).cpu()
    return [float(starts[g].sum()) for g in mode_groups(guide)]


def singletons(counts) -> int:
    """:math:`f_1`: the modes reached by exactly one start."""
    return sum(1 for c in counts if round(float(c)) == 1)


@torch.no_grad()
def fresh_start(
    guide, num_components: int, args=(), kwargs=None, spread: float = OVERDISPERSION
) -> dict:
    r"""Replace the guide's mixture by ``num_components`` fresh diagonal components (scale
    ``init_scale`` or 0.1, equal weights) at prior draws spread ``spread`` times wider about
    their coordinatewise median (in the unconstrained space; ``spread=1``: the prior draws, as
    a fit's first round starts); return the mixture it had, for :func:`join`.

    :param tuple args: the model's positional arguments.
    :param dict kwargs: its keyword arguments.
    :param float spread: :math:`c \ge 1` in :math:`m + c\,(\theta - m)`.
    """
    spread = check_real("spread", spread, minimum=1.0)
    kwargs = {} if kwargs is None else kwargs
    saved = _snapshot(guide)
    loc = saved["locs"][0]
    locs = prior_locs(guide.model, guide.prototype_trace, loc, num_components, *args, **kwargs)
    if spread != 1.0:
        mid = locs.median(0).values
        locs = mid + spread * (locs - mid)
    scale = guide._init_scale if guide._init_scale is not None else DEFAULT_INIT_SCALE
    scales = torch.full_like(locs, float(scale))
    logits = torch.zeros(num_components, dtype=locs.dtype, device=locs.device)
    replace_mixture_params(guide, logits, locs, scales=scales)
    return saved


def _tril(mixture: dict) -> torch.Tensor:
    if mixture.get("scale_tril") is not None:
        return mixture["scale_tril"].tril()
    return torch.diag_embed(mixture["scales"])


@torch.no_grad()
def join(guide, saved: dict) -> None:
    """Put the mixture ``saved`` (from :func:`fresh_start`) back beside the guide's current
    components: ``saved``'s first, half the weight to each side (``fit`` then sets the weights
    to their optimum). Full covariance if either side has it."""
    new = _snapshot(guide)
    logits = torch.cat([torch.log_softmax(m["logits"], -1) for m in (saved, new)])
    logits = logits - math.log(2.0)
    locs = torch.cat([saved["locs"], new["locs"]])
    if "scale_tril" in saved or "scale_tril" in new:
        tril = torch.cat([_tril(saved), _tril(new)])
        replace_mixture_params(guide, logits, locs, scale_tril=tril)
    else:
        scales = torch.cat([saved["scales"], new["scales"]])
        replace_mixture_params(guide, logits, locs, scales=scales)


@torch.no_grad()
def better_of(
    model, guide, fallback: dict, args=(), kwargs=None, draws: int = 128, memory_budget=None
) -> dict:
    r"""Put ``fallback`` (a mixture snapshot) back in ``guide`` where its ELBO is higher by
    more than one standard error of the difference; return a dict with both estimates and
    ``restored``.

    Each mixture is scored by a stratified estimate
    (:func:`~pyro_mogflow.infer.consolidation.estimate_elbo`) with ``draws`` draws per
    component of the larger mixture in all, so both estimates rest on as many draws.

    :param model: the model (untempered).
    :param guide: a stratified ``AutoMixtureFlow`` holding the mixture fitted last.
    :param dict fallback: ``locs``, ``logits`` and ``scales`` or ``scale_tril``.
    :param int draws: draws per component of the larger mixture (at least 2).
    :param memory_budget: bytes per evaluated chunk (default 1 GiB).
    :raises TypeError: if ``fallback`` is not a mixture snapshot or ``draws`` not an int.
    :raises ValueError: if ``draws < 2``.
    """
    draws = check_int("draws", draws, 2)
    if not isinstance(fallback, dict) or not {"locs", "logits"} <= fallback.keys():
        raise TypeError("fallback must be a mixture snapshot: a dict with 'locs' and 'logits'")
    kwargs = {} if kwargs is None else kwargs
    current = _snapshot(guide)
    total = draws * max(guide.num_components, len(fallback["logits"]))

    def score():
        per = max(2, -(-total // guide.num_components))
        return estimate_elbo(model, guide, args, kwargs, per, memory_budget)

    now = score()
    _restore(guide, fallback)
    before = score()
    restored = before.value - now.value > math.hypot(before.se, now.se)
    if not restored:
        _restore(guide, current)
    return {"restored": restored, "elbo": now.value, "elbo_fallback": before.value}


def more_rounds(
    guide, args, kwargs, counts, num_components: int, max_rounds: int, fit_round, settle
) -> tuple[list[dict], dict | None]:
    """The rounds after the first (see the module docstring); the guide ends with the joined
    mixture of every round.

    :param counts: the first round's :func:`mode_counts`.
    :param int num_components: starts per round.
    :param int max_rounds: rounds in all, the first included.
    :param fit_round: ``fit_round() -> FitResult``, the annealed fit of the guide's fresh
        components.
    :param settle: ``settle()``, run on the joined mixture (``fit``: the weights' optimum,
        then one component per mode).
    :return: ``(log, fallback)``: one dict per extra round in ``log`` (``round``, ``steps``,
        ``modes_before``, ``modes_after`` and ``result``, its :class:`~pyro_mogflow.FitResult`),
        and the mixture of before the first of the last rounds that added no mode (a
        :func:`fresh_start` snapshot for :func:`better_of`; ``None`` where the last round
        added a mode or no round ran).
    """
    log: list[dict] = []
    fallback = None
    if singletons(counts) < 1:
        return log, None
    modes = len(mode_groups(guide))
    empty = 0  # rounds in a row that added no mode
    for r in range(2, max_rounds + 1):
        saved = fresh_start(guide, num_components, args, kwargs)
        try:
            result = fit_round()
        except BaseException:  # the guide goes back to the mixture found so far
            _restore(guide, saved)
            raise
        join(guide, saved)
        settle()
        now = len(mode_groups(guide))
        log.append(
            {"round": r, "steps": result.next_step, "modes_before": modes, "modes_after": now}
            | {"result": result}
        )
        if result.stopped:
            break
        if now > modes:
            empty, fallback = 0, None
        else:  # the mixture of before the first of these rounds holds every mode found
            empty += 1
            fallback = saved if fallback is None else fallback
        if empty >= PATIENCE:
            break
        modes = max(modes, now)
    return log, fallback
