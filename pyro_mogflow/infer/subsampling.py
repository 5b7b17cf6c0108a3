"""Which plates of a model subsample its data (``pyro.plate(..., subsample_size=b)``).

Training handles a subsampled likelihood plate as Pyro does: each evaluation draws ``b`` of the
``N`` indices and the plate scales their log-likelihood by ``N / b``, an unbiased estimate of
the full-data ELBO and its gradient. Steps that need the log-likelihood of the full data itself
(re-balancing the mixture weights, whose importance weights an ``N / b``-scaled noisy
likelihood would bias; the diagnostics) ask here whether the model subsamples, and refuse.
"""

from __future__ import annotations

import warnings

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

__all__ = ["subsampled_plates"]


def subsampled_plates(model, guide, args: tuple, kwargs: dict) -> list[str]:
    """The names of the plates that draw a subsample of their data in one run of ``model``
    replayed against ``guide`` (no gradients, the random stream left as it was).

    :return: plate names with ``size < full_size``, in order of first appearance.
    """
    with torch.random.fork_rng(devices=[]), poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    names: list[str] = []
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        for frame in site["cond_indep_stack"]:
            full = frame.full_size
            if full is not None and frame.size != full and frame.name not in names:
                names.append(frame.name)
    return names


def unless_subsampled(model, guide, args: tuple, kwargs: dict, balance):
    """``balance`` (fit's final re-balancing objective), or ``None`` with a warning when the
    model subsamples its data."""
    plates = subsampled_plates(model, guide, args, kwargs)
    if plates:
        warnings.warn(
            f"fit: the model subsamples plate(s) {plates}, so the final balance_weights (which "
            "needs the full data) was skipped; call balance_weights(model, guide, ...) with "
            "arguments that run the model on all of its data",
            UserWarning,
            stacklevel=3,
        )
        return None
    return balance
