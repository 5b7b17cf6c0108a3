"""Posterior summaries of a mixture-flow autoguide, estimated from its samples."""

from __future__ import annotations

import torch
from torch.distributions import biject_to

from .._validation import check_int

__all__ = ["SampleSummaries"]


class SampleSummaries:
    """Mixin for an ``AutoContinuous`` guide whose posterior has no closed-form quantiles.

    The class using it provides ``get_posterior``, ``prototype_trace``, ``_setup_prototype``,
    ``_unconstrained_shapes`` and ``num_quantile_samples``.
    """

    num_quantile_samples: int

    @torch.no_grad()
    def _sample_unconstrained(self, num_samples: int, *args, **kwargs) -> torch.Tensor:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self.get_posterior(*args, **kwargs).sample((num_samples,))

    def _constrain(self, latent: torch.Tensor) -> dict:
        """Split packed latents ``(*batch, D)`` into constrained sites ``(*batch, *site_shape)``.

        Unlike Pyro's ``_unpack_latent``, leading dims are plain batch dims that never collide
        with the model's plate dims.
        """
        batch, pos, out = latent.shape[:-1], 0, {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            shape = self._unconstrained_shapes[name]
            size = shape.numel()
            value = latent[..., pos : pos + size].reshape(batch + shape)
            out[name] = biject_to(site["fn"].support)(value)
            pos += size
        return out

    @torch.no_grad()
    def sample_posterior(self, num_samples: int, *args, **kwargs) -> dict:
        """Draw ``num_samples`` joint samples of every latent site from the guide.

        :param int num_samples: ``N``.
        :param args: the model's arguments (used to set the guide up if needed).
        :return: dict site name -> constrained samples of shape ``(N, *site_shape)``.
        """
        num_samples = check_int("num_samples", num_samples, 1)
        latent = self._sample_unconstrained(num_samples, *args, **kwargs)
        return self._constrain(latent)

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict:
        """Posterior quantiles of each latent site, estimated from guide samples.

        A mixture has no closed-form quantiles, so this draws :attr:`num_quantile_samples`
        samples, maps them to the constrained space and takes element-wise empirical quantiles.

        :param quantiles: a list or 1-D tensor of levels in ``[0, 1]``.
        :return: dict site name -> tensor of shape ``(len(quantiles), *site_shape)``.
        """
        try:
            q = torch.as_tensor(quantiles, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(
                f"quantiles must be a list or 1-D tensor of levels in [0, 1], got {quantiles!r}"
            ) from e
        if q.dim() != 1 or not bool(((q >= 0) & (q <= 1)).all()):
            raise ValueError(f"quantiles must be a list of levels in [0, 1], got {quantiles!r}")
        latent = self._sample_unconstrained(self.num_quantile_samples, *args, **kwargs)
        values = self._constrain(latent)
        out = {}
        for name, v in values.items():
            qq = q.to(dtype=v.dtype, device=v.device)
            out[name] = torch.quantile(v.reshape(v.shape[0], -1), qq, dim=0).reshape(
                (len(qq),) + v.shape[1:]
            )
        return out

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict:
        """Element-wise posterior median of each latent site, estimated from guide samples.

        :return: dict site name -> tensor of the site's shape.
        """
        return {k: v[0] for k, v in self.quantiles([0.5], *args, **kwargs).items()}

    def _loc_scale(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self._sample_unconstrained(self.num_quantile_samples, *args, **kwargs)
        return latent.mean(0), latent.std(0)
