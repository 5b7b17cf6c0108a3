r"""k-means++ seeding, so every component of a density model starts where the data are.

:func:`kmeans_init` picks ``K`` centres by D² sampling (Arthur & Vassilvitskii, 2007): the first
uniformly from the data, each next one with probability proportional to the squared distance
to the nearest centre chosen so far (greedy variant: of ``2 + log K`` candidates per step, the
one that lowers the total squared distance most, as scikit-learn does). A few Lloyd iterations
then move each centre to its cluster's mean. The component weights are the cluster fractions
and the scales each cluster's per-coordinate standard deviation, so no mode of the data is left
without a component at the start.

Reference: D. Arthur, S. Vassilvitskii, *k-means++: the advantages of careful seeding*, SODA 2007.
"""

from __future__ import annotations

import math

import torch

from .._validation import check_int, check_real

__all__ = ["kmeans_init", "kmeans_pp_centres"]


def _nearest(
    x: torch.Tensor, centres: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance to, and index of, the nearest centre; ``chunk`` rows at a time."""
    dists, idx = [], []
    for part in x.split(chunk):
        d2 = torch.cdist(part, centres).pow(2)
        m = d2.min(-1)
        dists.append(m.values)
        idx.append(m.indices)
    return torch.cat(dists), torch.cat(idx)


def kmeans_pp_centres(
    x: torch.Tensor, num_centres: int, generator: torch.Generator | None = None, chunk: int = 65536
) -> torch.Tensor:
    """``K`` centres by k-means++ D² sampling.

    :param torch.Tensor x: data, shape ``(N, D)``.
    :param int num_centres: ``K``, at most ``N``.
    :param generator: a torch generator on ``x``'s device (``None``: the global one).
    :param int chunk: rows per distance block (memory ``chunk * K``).
    :return: shape ``(K, D)``, rows of ``x``.
    """
    n = x.shape[0]
    k = check_int("num_centres", num_centres, 1)
    if k > n:
        raise ValueError(f"num_centres must be <= the number of points {n}, got {k}")
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    centres = x[first]
    d2 = _nearest(x, centres, chunk)[0]
    trials = 2 + int(math.log(k))
    for _ in range(1, k):
        total = d2.sum()
        probs = torch.ones_like(d2) if total <= 0 else d2 / total  # all points alike: any
        cand = torch.multinomial(probs, trials, replacement=True, generator=generator)
        # greedy k-means++: keep the candidate that lowers the potential most
        options = [torch.minimum(d2, _nearest(x, x[c : c + 1], chunk)[0]) for c in cand.tolist()]
        best = min(range(trials), key=lambda i: float(options[i].sum()))
        centres = torch.cat([centres, x[cand[best : best + 1]]])
        d2 = options[best]
    return centres


def kmeans_init(
    x: torch.Tensor,
    num_components: int,
    num_iters: int = 10,
    min_scale: float = 1e-2,
    generator: torch.Generator | None = None,
    chunk: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Mixture parameters from k-means++ seeding and ``num_iters`` Lloyd steps.

    .. math::
        \pi_k = \frac{|C_k|}{N}, \quad \mu_k = \frac{1}{|C_k|}\sum_{x \in C_k} x, \quad
        \sigma_{kd} = \max\Big(\sqrt{\tfrac{1}{|C_k|}\textstyle\sum_{x \in C_k}(x_d -
        \mu_{kd})^2},\ \sigma_{\min}\Big),

    with :math:`C_k` the points nearest to centre :math:`k`; an empty cluster keeps its seed and
    the average scale.

    :param torch.Tensor x: data, shape ``(N, D)``.
    :param int num_components: ``K``.
    :param int num_iters: Lloyd iterations after seeding (``0``: seeds only).
    :param float min_scale: the smallest scale, ``> 0``.
    :param generator: torch generator for the seeding.
    :param int chunk: rows per distance block.
    :return: ``(logits (K,), locs (K, D), scales (K, D))`` in ``x``'s dtype and device.
    """
    check_int("num_iters", num_iters, 0)
    min_scale = check_real("min_scale", min_scale, minimum=0.0, strict=True)
    centres = kmeans_pp_centres(x, num_components, generator, chunk)
    k = centres.shape[0]
    for _ in range(num_iters + 1):
        _, label = _nearest(x, centres, chunk)
        counts = torch.bincount(label, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, label, x)
        filled = counts > 0
        means = torch.where(filled.unsqueeze(-1), sums / counts.clamp_min(1).unsqueeze(-1), centres)
        centres = means
    sq = torch.zeros_like(centres).index_add_(0, label, (x - centres[label]) ** 2)
    var = sq / counts.clamp_min(1).unsqueeze(-1)
    scales = var.sqrt()
    fallback = scales[filled].mean(0) if filled.any() else torch.ones_like(centres[0])
    scales = torch.where((counts > 1).unsqueeze(-1), scales, fallback).clamp_min(min_scale)
    weights = (counts + 0.5) / (counts.sum() + 0.5 * k)
    return weights.log(), centres, scales
