"""Checks that a model suits an :class:`~pyro_mogflow.AutoMixtureFlow`: its latent sites can be
packed (no discrete site, no subsampled local latent) and are the ones the guide was set up with."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.util import site_is_subsample

__all__ = ["ModelChecks"]


class ModelChecks:
    """Mixin for an ``AutoContinuous`` mixture-flow guide: refuses models it cannot guide."""

    def _check_sites(self):
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            support = site["fn"].support
            if support.is_discrete:
                raise ValueError(
                    f"AutoMixtureFlow cannot guide the discrete latent site '{name}' "
                    f"(support {support}). Enumerate it out with config_enumerate and "
                    "TraceEnum_ELBO (see https://pyro.ai/examples/enumeration.html), or block "
                    "it with poutine.block and guide it separately."
                )
            for frame in site["cond_indep_stack"]:
                full = frame.full_size
                if full is not None and frame.size != full:
                    raise ValueError(
                        f"latent site '{name}' lies in plate '{frame.name}' subsampled to "
                        f"{frame.size} of {full}. AutoMixtureFlow, like every AutoContinuous "
                        "guide, needs a fixed latent size and would silently mis-size it: use "
                        "pyro_mogflow.AmortizedMixtureFlow (or AutoNormal) for the local sites in "
                        "a guide of your own, and AutoMixtureFlow for the global ones via "
                        "poutine.block and AutoGuideList."
                    )

    def check_model(self, model: Callable | None = None, *args, **kwargs) -> None:
        """Raise if ``model`` (default: the guide's own) does not have the guide's latent sites.

        Runs the model once (under the guide's init strategy, without gradients) and compares
        its latent sites and their shapes with those the guide was set up with, so a guide set
        up for another model, or a model whose latent size changed since, is refused instead of
        trained or sampled silently. :func:`~pyro_mogflow.fit` and :meth:`sample_posterior`
        (when given the model's arguments) call it.

        :param model: the Pyro model to check (``None``: the guide's own).
        :param args: the model's positional arguments; :param kwargs: its keyword arguments.
        :raises ValueError: naming the first site that is missing, extra or of another shape.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if model is None:
            if self._model is None:
                raise ValueError("this guide has no model attached (it was loaded); pass one")
            model = self.model
        # without moving torch's random stream: the init strategy may draw from the prior
        with torch.random.fork_rng(devices=[]), torch.no_grad(), poutine.block():
            initialized = InitMessenger(self._init_strategy)(model)
            trace = poutine.trace(initialized).get_trace(*args, **kwargs)
        ours = {n: s["value"].shape for n, s in self.prototype_trace.iter_stochastic_nodes()}
        theirs = {
            name: site["value"].shape
            for name, site in trace.iter_stochastic_nodes()
            if not site_is_subsample(site)
        }
        for name in ours.keys() - theirs.keys():
            raise ValueError(
                f"this AutoMixtureFlow was set up for a model with latent site '{name}', which "
                f"the model given does not have (its latent sites: {sorted(theirs)}). Build "
                "the guide for this model: AutoMixtureFlow(model)."
            )
        for name in theirs.keys() - ours.keys():
            raise ValueError(
                f"the model has latent site '{name}', which this AutoMixtureFlow was not set "
                f"up with (its sites: {sorted(ours)}): it was built for another model. Build "
                "the guide for this model: AutoMixtureFlow(model)."
            )
        for name, shape in ours.items():
            if theirs[name] != shape:
                raise ValueError(
                    f"latent site '{name}' has shape {tuple(theirs[name])} in the model but "
                    f"{tuple(shape)} in this AutoMixtureFlow, which was set up before its size "
                    "changed; its samples would have the old shape. Build a new guide for the "
                    "model as it is now."
                )

    @torch.no_grad()
    def sample_posterior(self, num_samples: int, *args, **kwargs) -> dict:
        """Draw ``num_samples`` joint samples of every latent site from the guide.

        Given the model's arguments, first checks (:meth:`check_model`) that the model's latent
        sites still have the shapes the guide was set up with.

        :param int num_samples: ``N``.
        :param args: the model's arguments.
        :return: dict site name -> constrained samples of shape ``(N, *site_shape)``.
        """
        if self.prototype_trace is not None and (args or kwargs) and self._model is not None:
            self.check_model(None, *args, **kwargs)
        return super().sample_posterior(num_samples, *args, **kwargs)
