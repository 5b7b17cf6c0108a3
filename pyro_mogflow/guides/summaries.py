"""Posterior summaries of a mixture-flow autoguide, estimated from its samples."""

from __future__ import annotations

import torch
from torch.distributions import biject_to
from torch.distributions.transforms import IndependentTransform

from .._validation import check_int

__all__ = ["SampleSummaries", "group_components"]

#: Components whose means differ by at most this many of their scales (in every coordinate)
#: sit on the same mode.
GROUP_TOLERANCE = 3.0


def group_components(locs, scales, weights, tolerance: float = GROUP_TOLERANCE) -> list:
    r"""Group mixture components that sit on the same mode.

    Components :math:`i` and :math:`j` are linked when their means lie within ``tolerance``
    of their combined scale in every coordinate,
    :math:`\max_d |\mu_{id} - \mu_{jd}| / \sqrt{\sigma_{id}^2 + \sigma_{jd}^2} \le`
    ``tolerance``; a group is a connected set of linked components (single linkage).

    :param locs: component means, array-like of shape ``(K, D)``.
    :param scales: component scales, shape ``(K, D)`` (positive).
    :param weights: component weights, shape ``(K,)``.
    :param float tolerance: the link distance in scales (default 3).
    :return: a list of groups, heaviest first; each a dict with ``"components"`` (component
        indices, heaviest first), ``"weight"`` (their summed weight) and ``"mean"`` (their
        weighted mean, a tensor of shape ``(D,)``).
    """
    locs = torch.as_tensor(locs, dtype=torch.float64)
    scales = torch.as_tensor(scales, dtype=torch.float64).expand_as(locs)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    k = locs.shape[0]
    diff = (locs.unsqueeze(1) - locs.unsqueeze(0)).abs()  # (K, K, D)
    spread = (scales.unsqueeze(1) ** 2 + scales.unsqueeze(0) ** 2).sqrt()
    linked = (diff <= tolerance * spread).all(-1)  # (K, K)
    parent = list(range(k))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in torch.nonzero(torch.triu(linked, 1)).tolist():
        parent[root(i)] = root(j)
    members: dict = {}
    for i in range(k):
        members.setdefault(root(i), []).append(i)
    groups = []
    for idx in members.values():
        idx = sorted(idx, key=lambda i: -float(weights[i]))
        w = weights[idx]
        total = float(w.sum())
        mean = (w.unsqueeze(-1) * locs[idx]).sum(0) / total if total > 0 else locs[idx].mean(0)
        groups.append({"components": idx, "weight": total, "mean": mean})
    groups.sort(key=lambda g: -g["weight"])
    return groups


class SampleSummaries:
    """Mixin for an ``AutoContinuous`` mixture-flow guide: samples, quantiles, median, moments.

    Without a flow the quantiles and moments are exact (each coordinate's marginal is a 1-D
    Gaussian mixture); with one they are estimated from ``num_quantile_samples`` samples.
    The class using it provides ``flow``, ``get_posterior``, ``prototype_trace``,
    ``_setup_prototype``, ``_unconstrained_shapes`` and ``num_quantile_samples``.
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

    def _sampled_quantiles(self, levels: torch.Tensor, *args, **kwargs) -> dict:
        """Element-wise empirical quantiles of ``num_quantile_samples`` guide samples."""
        latent = self._sample_unconstrained(self.num_quantile_samples, *args, **kwargs)
        values = self._constrain(latent)
        out = {}
        for name, v in values.items():
            qq = levels.to(dtype=v.dtype, device=v.device)
            out[name] = torch.quantile(v.reshape(v.shape[0], -1), qq, dim=0).reshape(
                (len(qq),) + v.shape[1:]
            )
        return out

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict:
        """Posterior quantiles of each latent site, element-wise.

        For the bare mixture (``flow=None``) each unconstrained coordinate's marginal is a
        one-dimensional Gaussian mixture, whose quantiles are computed exactly (by bisection,
        see :meth:`~pyro_mogflow.distributions.MixtureFlow.marginal_quantiles`) and mapped
        through the site's element-wise constraint transform. Sites whose transform mixes
        coordinates (simplex, correlation matrices...) and guides with a flow fall back to
        ``num_quantile_samples`` samples and empirical quantiles.

        :param quantiles: a list or 1-D tensor of levels in ``[0, 1]``.
        :return: dict site name -> tensor of shape ``(len(quantiles), *site_shape)``.
        """
        levels = _check_levels(quantiles)
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.flow is not None:
            return self._sampled_quantiles(levels, *args, **kwargs)
        n = len(levels)
        posterior = self.get_posterior(*args, **kwargs)
        # levels and 1 - levels: a decreasing transform maps the latter to the former
        latent = posterior.marginal_quantiles(torch.cat([levels, 1 - levels]))
        out, pos, sampled = {}, 0, None
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            shape = self._unconstrained_shapes[name]
            size = shape.numel()
            transform = biject_to(site["fn"].support)
            while isinstance(transform, IndependentTransform):
                transform = transform.base_transform
            if transform.domain.event_dim or transform.codomain.event_dim:
                if sampled is None:
                    sampled = self._sampled_quantiles(levels, *args, **kwargs)
                out[name] = sampled[name]
            else:
                u = latent[:, pos : pos + size].reshape((2 * n,) + shape)
                zero = torch.zeros(shape, dtype=u.dtype, device=u.device)
                increasing = transform(zero + 1) > transform(zero)
                out[name] = torch.where(increasing, transform(u[:n]), transform(u[n:]))
            pos += size
        return out

    def _loc_scale(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the unconstrained latent (exact without a flow)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.flow is not None:
            latent = self._sample_unconstrained(self.num_quantile_samples, *args, **kwargs)
            return latent.mean(0), latent.std(0)
        with torch.no_grad():
            posterior = self.get_posterior(*args, **kwargs)
            return posterior.mean, posterior.variance.sqrt()

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict:
        """Element-wise posterior median of each latent site, estimated from guide samples.

        :return: dict site name -> tensor of the site's shape.
        """
        return {k: v[0] for k, v in self.quantiles([0.5], *args, **kwargs).items()}


def _check_levels(quantiles) -> torch.Tensor:
    try:
        q = torch.as_tensor(quantiles, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(
            f"quantiles must be a list or 1-D tensor of levels in [0, 1], got {quantiles!r}"
        ) from e
    if q.dim() != 1 or not bool(((q >= 0) & (q <= 1)).all()):
        raise ValueError(f"quantiles must be a list of levels in [0, 1], got {quantiles!r}")
    return q
