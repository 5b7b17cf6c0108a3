r"""Fewer components for an :class:`~pyro_mogflow.AutoMixtureFlow`: prune and merge.

Under :class:`~pyro_mogflow.StratifiedELBO` every step evaluates the model once per component,
so after exploration a guide whose 64 components sit on two modes pays 32 times too much. Two
operations shrink the mixture :math:`q_0 = \sum_k \pi_k \mathcal N(\mu_k, \operatorname{diag}
\sigma_k^2)` (the base, before the flow, which is left as it is):

* **Pruning** keeps the components :math:`S` and renormalises their weights,
  :math:`\pi'_k = \pi_k / (1 - m)` with :math:`m = \sum_{k \notin S} \pi_k` the pruned mass.
  Then everywhere :math:`\log q'(z) - \log q(z) \le -\log(1 - m)`, with equality where the
  pruned components have no density; the ELBO moves by about :math:`-\log(1-m) \approx m` nats
  on the kept components' draws, and loses the pruned components' share.
* **Merging** replaces a group :math:`G` of components that sit on one mode by one Gaussian
  with the group's weight and its first two moments (per coordinate):

  .. math::
      \pi_G = \sum_{k\in G} \pi_k, \quad
      \mu_G = \frac{1}{\pi_G}\sum_{k \in G} \pi_k \mu_k, \quad
      \sigma_G^2 = \frac{1}{\pi_G}\sum_{k \in G} \pi_k (\sigma_k^2 + \mu_k^2) - \mu_G^2 .

  Merging identical components leaves the density unchanged; merging components whose means
  lie within a fraction of their scales changes it little (Runnalls 2007 bounds the KL cost).
  Full-covariance components (:mod:`pyro_mogflow.guides.covariance`) merge with the full second
  moment, :math:`\Sigma_G = \frac{1}{\pi_G}\sum_{k\in G} \pi_k \big(\Sigma_k + (\mu_k -
  \mu_G)(\mu_k - \mu_G)^\top\big)`, and are pruned row by row like diagonal ones.

Why prune and merge rather than subsample components without bias: with the natural-gradient
weight steps of :func:`~pyro_mogflow.fit` a component far from every mode keeps weight
``MIN_WEIGHT`` (1e-6); an unbiased subsample that draws it with probability proportional to its
weight almost never visits it (its gradient then has huge variance), and one that draws it
uniformly pays for it as before. After exploration those components carry nothing (mass below
``1e-3`` in all the benchmark's fits), and the dozens of near-copies on one mode are one
Gaussian, so removing them changes the ELBO by less than its standard error (see
``benchmarks/scaling.py`` and the tests) while the cost per step falls in proportion.

Reloading: the ``state_dict`` of a pruned guide has ``K'`` rows; restore it into a guide built
with ``num_components=K'`` (e.g. ``AutoMixtureFlow(model, num_components=guide.num_components,
...)``, set up, then ``load_state_dict``).

References:

* A. Runnalls, *Kullback-Leibler approach to Gaussian mixture reduction*, IEEE Transactions on
  Aerospace and Electronic Systems 2007.
* O. Arenz, M. Zhong, G. Neumann, *Trust-region variational inference with Gaussian mixture
  models*, JMLR 2020 (adding and deleting components of a variational mixture).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from .covariance import is_full, replace_mixture_params, set_full_params

__all__ = [
    "MERGE_LOC_TOLERANCE",
    "MERGE_SCALE_TOLERANCE",
    "connected_groups",
    "mergeable_groups",
    "prune_and_merge",
]

#: Components merge when their means differ by at most this many combined scales in every
#: coordinate, :math:`|\mu_{id} - \mu_{jd}| \le 0.5 \sqrt{\sigma_{id}^2 + \sigma_{jd}^2}`.
MERGE_LOC_TOLERANCE = 0.5
#: ... and their scales by at most this factor in every coordinate (:math:`|\log \sigma_{id} -
#: \log \sigma_{jd}| \le \log 1.25`).
MERGE_SCALE_TOLERANCE = 1.25

_OWN_PARAMS = ("locs", "scales", "scale_tril", "logits")


def mergeable_groups(
    locs: torch.Tensor,
    scales: torch.Tensor,
    loc_tolerance: float = MERGE_LOC_TOLERANCE,
    scale_tolerance: float = MERGE_SCALE_TOLERANCE,
) -> list[list[int]]:
    r"""Group components that sit on one mode with about the same shape (single linkage).

    Components :math:`i, j` are linked when, in every coordinate :math:`d`,
    :math:`|\mu_{id} - \mu_{jd}| \le` ``loc_tolerance`` :math:`\sqrt{\sigma_{id}^2 +
    \sigma_{jd}^2}` and :math:`\max(\sigma_{id}, \sigma_{jd}) / \min(\sigma_{id},
    \sigma_{jd}) \le` ``scale_tolerance``.

    :param locs: means, shape ``(K, D)``.
    :param scales: scales, shape ``(K, D)``.
    :param float loc_tolerance: in combined scales (default :data:`MERGE_LOC_TOLERANCE`).
    :param float scale_tolerance: largest scale ratio, ``>= 1`` (default
        :data:`MERGE_SCALE_TOLERANCE`).
    :return: every component in exactly one group; groups (lists of indices, ascending) in
        order of their first member.
    """
    locs = torch.as_tensor(locs).detach().double()
    scales = torch.as_tensor(scales).detach().double().expand_as(locs)
    k = locs.shape[0]
    linked = torch.zeros(k, k, dtype=torch.bool)
    log_tol = torch.log(torch.tensor(float(scale_tolerance), dtype=torch.float64))
    for i in range(k):  # row by row: (K, D) memory, not (K, K, D)
        close = (locs - locs[i]).abs() <= loc_tolerance * (scales**2 + scales[i] ** 2).sqrt()
        similar = (scales.log() - scales[i].log()).abs() <= log_tol + 1e-12
        linked[i] = (close & similar).all(-1)
    return connected_groups(linked)


def connected_groups(linked: torch.Tensor) -> list[list[int]]:
    """The connected components of a symmetric link matrix (single linkage, union-find).

    :param torch.Tensor linked: boolean, shape ``(K, K)``; only the upper triangle is read.
    :return: every index in exactly one group; groups (ascending indices) in order of their
        first member.
    """
    k = linked.shape[0]
    parent = list(range(k))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in torch.nonzero(torch.triu(linked, 1)).tolist():
        parent[root(j)] = root(i)
    members: dict[int, list[int]] = {}
    for i in range(k):
        members.setdefault(root(i), []).append(i)
    return sorted(members.values(), key=lambda g: g[0])


def _check_groups(groups, k: int) -> list[list[int]]:
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise TypeError(
            f"groups must be a sequence of sequences of component indices, got "
            f"{type(groups).__name__}"
        )
    out, seen = [], set()
    for g, group in enumerate(groups):
        if isinstance(group, torch.Tensor):
            if group.is_floating_point() or group.is_complex() or group.dim() > 1:
                raise TypeError(f"groups[{g}] must hold integer component indices")
            group = group.reshape(-1).tolist()
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence):
            raise TypeError(f"groups[{g}] must be a sequence of component indices, got {group!r}")
        if not group:
            raise ValueError(f"groups[{g}] is empty; every group needs a component")
        idx = []
        for i in group:
            if isinstance(i, bool) or not isinstance(i, int):
                try:
                    i = operator.index(i)
                except TypeError:
                    raise TypeError(
                        f"groups[{g}] must hold integer component indices, got {i!r}"
                    ) from None
            if not 0 <= i < k:
                raise ValueError(f"component index {i} in groups[{g}] is outside [0, {k})")
            if i in seen:
                raise ValueError(f"component {i} appears twice; groups must be disjoint")
            seen.add(i)
            idx.append(i)
        out.append(idx)
    if not out:
        raise ValueError("groups is empty; keep at least one component")
    return out


def _check_guide(guide) -> None:
    from .auto import AutoMixtureFlow

    if not isinstance(guide, AutoMixtureFlow):
        raise TypeError(f"guide must be an AutoMixtureFlow, got {type(guide).__name__}")
    if guide.prototype_trace is None:
        raise RuntimeError(
            "the guide is not set up yet, so it has no components; call "
            "guide.setup(*model_args) (or train it) first"
        )
    others = [name for name in guide._pyro_params if name not in _OWN_PARAMS]
    if others:
        raise NotImplementedError(
            f"prune/merge knows the parameters {_OWN_PARAMS} of the mixture; this guide has "
            f"more per-guide parameters {others} that it cannot reduce"
        )


@torch.no_grad()
def prune_and_merge(guide, groups) -> torch.Tensor:
    r"""Reduce an :class:`~pyro_mogflow.AutoMixtureFlow` to one component per group.

    Each group of component indices becomes one component, moment-matched (see the module
    docstring); a component in no group is pruned; the new weights are renormalised over the
    kept mass. ``[[i] for i in keep]`` prunes, ``mergeable_groups(...)`` merges. The guide's
    ``locs``, ``scales`` and ``logits`` are recreated with ``K' = len(groups)`` rows (new
    parameters: an optimiser gives them fresh state; the flow's parameters are untouched) and
    ``guide.num_components`` becomes ``K'``. Everything is checked
    and computed before the guide changes; on an error it is left as it was.

    :param AutoMixtureFlow guide: a set-up guide.
    :param groups: disjoint, non-empty sequences of indices in ``[0, K)``; ``K'`` of them.
    :return: the pruned mass :math:`m` (weight of the components in no group), a 0-d tensor.
    :raises TypeError, ValueError: for bad ``groups``; ``RuntimeError`` if the guide is not set up.
    """
    _check_guide(guide)
    k = guide.locs.shape[0]
    groups = _check_groups(groups, k)
    if is_full(guide):
        return _prune_and_merge_full(guide, groups)
    locs, scales = guide.locs.detach(), guide.scales.detach()

    def merge(idx, w, mu):  # the diagonal of the group's second moment about mu
        return (w.unsqueeze(-1) * (scales[idx] ** 2 + (locs[idx] - mu) ** 2)).sum(0).sqrt()

    pruned, logits, locs_new, scales_new = _moment_match(guide, groups, scales, merge)
    if not bool(torch.isfinite(logits).all() & torch.isfinite(locs_new).all()):
        raise ValueError("the reduced mixture is not finite; the guide was left unchanged")
    if not bool((scales_new > 0).all() & torch.isfinite(scales_new).all()):
        raise ValueError("a merged scale is not positive; the guide was left unchanged")
    _replace(guide, logits, locs_new, scales_new)
    return pruned


def _moment_match(guide, groups, spreads: torch.Tensor, merge):
    """One component per group: weights summed, mean and spread moment-matched.

    :param spreads: the components' scales ``(K, D)`` or Cholesky factors ``(K, D, D)``; a
        group of one keeps its own. :param merge: ``merge(idx, w, mu)``, the spread of a group
        of several (``w`` its normalised weights, ``mu`` its mean).
    :return: ``(pruned mass, logits (K',), locs (K', D), spreads (K', ...))``.
    """
    locs = guide.locs.detach()
    log_pi = torch.log_softmax(guide.logits.detach(), -1)
    new_logits, new_locs, new_spreads = [], [], []
    for group in groups:
        idx = torch.tensor(group, device=locs.device)
        lw = log_pi[idx]
        total = torch.logsumexp(lw, 0)
        w = (lw - total).exp()  # (m,), summing to one
        mu = (w.unsqueeze(-1) * locs[idx]).sum(0)
        new_logits.append(total)
        new_locs.append(mu)
        new_spreads.append(spreads[idx[0]] if len(group) == 1 else merge(idx, w, mu))
    kept = torch.logsumexp(torch.stack(new_logits), 0)
    pruned = (1 - kept.exp()).clamp(min=0)
    logits = torch.stack(new_logits) - kept
    return pruned, logits, torch.stack(new_locs), torch.stack(new_spreads)


def _prune_and_merge_full(guide, groups) -> torch.Tensor:
    """:func:`prune_and_merge` of full-covariance components (full second moments)."""
    locs = guide.locs.detach()
    tril = guide.scale_tril.detach().tril()

    def merge(idx, w, mu):  # the Cholesky factor of the group's second moment about mu
        diff = locs[idx] - mu
        cov = tril[idx] @ tril[idx].transpose(-1, -2) + diff.unsqueeze(-1) * diff.unsqueeze(-2)
        cov = (w.reshape(-1, 1, 1) * cov).sum(0)
        factor, info = torch.linalg.cholesky_ex(0.5 * (cov + cov.T))
        if int(info):
            raise ValueError(
                "a merged covariance is not positive definite; the guide was left unchanged"
            )
        return factor

    pruned, logits, locs_new, tril_new = _moment_match(guide, groups, tril, merge)
    finite = torch.isfinite(logits).all() & torch.isfinite(locs_new).all()
    if not bool(finite & torch.isfinite(tril_new).all()):
        raise ValueError("the reduced mixture is not finite; the guide was left unchanged")
    if not bool((tril_new.diagonal(dim1=-2, dim2=-1) > 0).all()):
        raise ValueError("a merged scale is not positive; the guide was left unchanged")
    set_full_params(guide, locs_new, tril_new, logits)
    return pruned


def _replace(guide, logits, locs, scales) -> None:
    """Recreate the diagonal mixture parameters (and drop the old ones from Pyro's param store)."""
    replace_mixture_params(guide, logits, locs, scales=scales)
