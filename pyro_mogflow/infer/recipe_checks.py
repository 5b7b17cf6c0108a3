"""Checks of :func:`~pyro_mogflow.fit`: a failed step named and refused, schedules, the
model's keyword data, gradients left behind."""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import zero_grads
from pyro.poutine.util import site_is_subsample

from ..guides import AutoMixtureFlow

__all__: list = []


class _NonFiniteStep(Exception):
    """A step's loss or gradients are not finite; raised before the optimiser moves anything."""

    def __init__(self, what: str, value, where: str = ""):
        super().__init__(what)
        self.what, self.value, self.where = what, value, where


def _check_step(loss, named: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`_NonFiniteStep` if ``loss``, a parameter or a gradient is not finite.

    ``named``: param-store name -> the leaf tensor the optimiser would update. On failure the
    gradients are zeroed, so nothing of the step remains.
    """
    value = float(loss)
    bad_params = [n for n, p in named.items() if not bool(torch.isfinite(p).all())]
    bad_grads = [
        n for n, p in named.items() if p.grad is not None and not bool(torch.isfinite(p.grad).all())
    ]
    if math.isfinite(value) and not bad_params and not bad_grads:
        return
    zero_grads(set(named.values()))
    where = []
    if bad_params:
        where.append(f"guide parameter(s) {bad_params} (already non-finite before this step)")
    if bad_grads:
        where.append(f"the gradient of parameter(s) {bad_grads}")
    if not math.isfinite(value):
        raise _NonFiniteStep("loss", value, "; ".join(where))
    raise _NonFiniteStep("gradient", "non-finite", "; ".join(where))


def _nonfinite_sites(model, guide, args, kwargs) -> str:
    """Best effort: the sites whose log-density is not finite on one fresh draw of the guide."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
            bad = []
            for who, trace in (("model", model_trace), ("guide", guide_trace)):
                for name, site in trace.nodes.items():
                    if site["type"] != "sample" or site_is_subsample(site):
                        continue
                    if not bool(torch.isfinite(site["value"]).all()):
                        bad.append(f"{who} site {name!r} (its value)")
                        continue
                    term = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
                    term = scale_and_mask(term, site["scale"], site["mask"])
                    if not bool(torch.isfinite(torch.as_tensor(term)).all()):
                        bad.append(f"{who} site {name!r} (its log-density)")
            return ", ".join(bad)
    except Exception:  # the diagnosis must never hide the error it explains
        return ""


def _pathwise_hint(guide) -> str:
    if not isinstance(guide, AutoMixtureFlow) or guide.estimator != "pathwise":
        return ""
    dtype = guide.locs.dtype
    if dtype != torch.float32:
        return ""
    d = guide.locs.shape[-1]
    return (
        f". The guide uses estimator='pathwise' (Pyro's MixtureOfDiagNormals) in float32 at "
        f"D={d}: its gradients overflow in float32 from D of about 20-60; use "
        "estimator='stratified' (the default) or float64"
    )


def _clear_grads(guide) -> None:
    """Drop the gradients of the guide's parameters (a module's and the param store's)."""
    params = list(guide.parameters()) if isinstance(guide, torch.nn.Module) else []
    params += [p for _, p in pyro.get_param_store().named_parameters()]
    for p in params:
        p.grad = None


def _check_schedule(schedule: Callable, start: int, stop: int) -> None:
    """Every beta the fit will use, checked before any work: finite, in (0, 1]."""
    for step in range(start, stop):
        value = schedule(step)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"the beta schedule returned {value!r} at step {step}; need a real number in (0, 1]"
            )
        if not (math.isfinite(value) and 0 < value <= 1):
            raise ValueError(
                f"the beta schedule returned {value!r} at step {step}; fit needs a finite beta "
                "in (0, 1] (beta tempers the likelihood from near 0 up to 1, the posterior)"
            )


def _model_kwargs(model, model_kwargs, model_keywords: dict) -> dict:
    """The model's keyword arguments: ``model_kwargs`` and the keywords fit does not know."""
    if model_kwargs is None:
        model_kwargs = {}
    if not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
    both = sorted(set(model_kwargs) & set(model_keywords))
    if both:
        raise TypeError(f"model keyword(s) {both} given both directly and in model_kwargs")
    if model_keywords:
        try:
            signature = inspect.signature(model)
        except (TypeError, ValueError):
            signature = None
        if signature is not None:
            params = signature.parameters.values()
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                takes = {
                    p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                }
                unknown = sorted(set(model_keywords) - takes)
                if unknown:
                    name = getattr(model, "__name__", type(model).__name__)
                    raise TypeError(
                        f"fit() got unexpected keyword argument(s) {unknown}: neither an option "
                        f"of fit nor an argument of the model {name}{signature}"
                    )
    return {**model_kwargs, **model_keywords}


def _learning_rates(guide, lr: float, flow_lr: float) -> Callable[[str], dict]:
    """Adam's per-parameter arguments: ``flow_lr`` for an AutoMixtureFlow's flow, else ``lr``."""
    prefix = None
    if isinstance(guide, AutoMixtureFlow) and guide.flow is not None:
        prefix = f"{guide.name}.flow."

    def args(name: str) -> dict:
        return {"lr": flow_lr if prefix is not None and name.startswith(prefix) else lr}

    return args
