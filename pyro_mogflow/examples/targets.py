r"""What the examples know about a posterior: :class:`Target`, and the mass near a mode.

A :class:`Target` is a Pyro model with its data, the locations of its posterior's modes on one
latent site, and what is known exactly about the posterior (its log evidence
:math:`\log Z = \log p(y)`, the posterior mass near each mode and an exact sampler, where they
have a closed form). :func:`mode_masses` is the one definition of "the mass near a mode" that the
demo (``python -m pyro_mogflow demo``), the tutorials and the benchmarks share.

The built-in targets are in :mod:`pyro_mogflow.examples.regression`
(:func:`~pyro_mogflow.examples.sign_regression`) and :mod:`pyro_mogflow.examples.mixtures`
(:func:`~pyro_mogflow.examples.gaussian_mixture_target`,
:func:`~pyro_mogflow.examples.label_switching_mixture`). Their data are drawn from a private
:class:`torch.Generator`, so building a target never changes the global random state, and the
same ``seed`` gives the same data on every machine.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyro_mogflow._validation import check_int, check_seed

__all__ = ["Target", "mode_masses"]


# ----------------------------------------------------------------------------- helpers
def _check_real(name: str, value, *, positive: bool = False, nonzero: bool = False) -> float:
    what = "a positive float" if positive else "a finite float"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be {what}, got {value}")
    if nonzero and value == 0:
        raise ValueError(f"{name} must be nonzero (the modes would coincide), got {value}")
    return value


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def _generator(seed) -> torch.Generator:
    seed = check_seed("seed", seed)
    # Draw on the CPU and move the data afterwards: the same seed then gives the same data on
    # every device.
    return torch.Generator(device="cpu").manual_seed(int(seed))


# ------------------------------------------------------------------------- mode masses
def mode_masses(
    samples: torch.Tensor, modes: torch.Tensor, radius: float, *, elsewhere: bool = False
) -> torch.Tensor:
    r"""Fraction of ``samples`` near each mode: the one mode-mass metric of the package.

    A point counts toward its nearest mode (Euclidean distance over the flattened site) when it
    lies strictly within ``radius`` of it, and toward no mode ("elsewhere") otherwise:

    .. math:: \hat m_j = \frac1N \sum_{n=1}^N \mathbb{1}\{\, j = \arg\min_i \|\theta_n - m_i\|_2
        \ \text{and}\ \|\theta_n - m_j\|_2 < r \,\}.

    The masses partition the draws, so they sum to at most one even when the balls around the
    modes overlap; when they do not (``radius`` at most half the smallest distance between two
    modes) the nearest mode is the only one within ``radius`` and :math:`\hat m_j` is the
    fraction of draws in the ball around :math:`m_j`. Distances are computed in float64.

    :param torch.Tensor samples: draws, shape ``(N, *site_shape)`` with ``N >= 1``.
    :param torch.Tensor modes: the mode locations, shape ``(M, *site_shape)``.
    :param float radius: capture radius :math:`r > 0`.
    :param bool elsewhere: also return the fraction of draws near no mode, as a last entry.
    :return: shape ``(M,)``, or ``(M + 1,)`` with ``elsewhere=True`` (then summing to one), in
        ``samples``' dtype (float64 for non-floating samples) and on ``samples``' device.
    """
    if not isinstance(samples, torch.Tensor) or not isinstance(modes, torch.Tensor):
        raise TypeError(
            f"samples and modes must be torch.Tensors, got {type(samples).__name__} and "
            f"{type(modes).__name__}"
        )
    radius = _check_real("radius", radius, positive=True)
    event = modes.shape[1:]
    if modes.dim() < 1 or modes.shape[0] < 1:
        raise ValueError(f"modes must have shape (M, *site_shape) with M >= 1, got {modes.shape}")
    if samples.dim() != 1 + len(event) or samples.shape[1:] != event or samples.shape[0] < 1:
        raise ValueError(
            f"samples must have shape (N, {', '.join(map(str, event))}) with N >= 1 to match "
            f"modes of shape {tuple(modes.shape)}, got {tuple(samples.shape)}"
        )
    num_modes = modes.shape[0]
    flat = samples.detach().reshape(samples.shape[0], -1).double()
    centres = modes.detach().reshape(num_modes, -1).to(flat)
    dist_ = torch.cdist(flat, centres, compute_mode="donot_use_mm_for_euclid_dist")  # (N, M)
    nearest_dist, nearest = dist_.min(-1)
    label = torch.where(nearest_dist < radius, nearest, torch.full_like(nearest, num_modes))
    counts = torch.bincount(label, minlength=num_modes + 1).double() / flat.shape[0]
    if not elsewhere:
        counts = counts[:num_modes]
    dtype = samples.dtype if samples.is_floating_point() else torch.float64
    return counts.to(dtype)


# ----------------------------------------------------------------------------- Target
@dataclasses.dataclass(frozen=True)
class Target:
    r"""A Pyro model with observed data and what is known about its multimodal posterior.

    The posterior is measured on one latent site, ``site``. Its modes sit at ``modes``
    and a guide is said to have *found* mode :math:`j` when it puts at least a fraction
    ``threshold`` of its samples nearer to :math:`m_j` than to any other mode and within
    :math:`r` = ``radius`` of it (see :func:`mode_masses` and :meth:`modes_found`).

    :param str name: a short name.
    :param callable model: the Pyro model; call it as ``model(*args, **kwargs)``.
    :param tuple args: positional arguments of the model (the data).
    :param dict kwargs: keyword arguments of the model.
    :param str site: the latent site on which modes are located.
    :param torch.Tensor modes: the mode locations, shape ``(M, *site_shape)``.
    :param float radius: capture radius of a mode, used by :meth:`mode_masses`.
    :param log_z: the log evidence :math:`\log \int p(y, \theta)\, d\theta`, or ``None`` when it
        has no closed form.
    :param reference_masses: the posterior mass in each ball, shape ``(M,)``, or ``None``.
    :param dict truth: the values of the latent sites that generated the data (if any).
    :param str description: one line for tables and plots.
    :param exact_sampler: ``exact_sampler(N, generator) -> dict`` site name -> exact posterior
        draws of shape ``(N, *site_shape)`` for every latent site, or ``None`` (see
        :meth:`sample_exact`).
    """

    name: str
    model: Callable
    args: tuple
    kwargs: dict
    site: str
    modes: torch.Tensor
    radius: float
    log_z: float | None = None
    reference_masses: torch.Tensor | None = None
    truth: dict = dataclasses.field(default_factory=dict)
    description: str = ""
    exact_sampler: Callable[[int, torch.Generator], dict] | None = None

    def __call__(self) -> object:
        """Run the model on its data (so a :class:`Target` is itself a Pyro model)."""
        return self.model(*self.args, **self.kwargs)

    @property
    def num_modes(self) -> int:
        """``M``, the number of modes."""
        return self.modes.shape[0]

    def mode_masses(self, samples: torch.Tensor) -> torch.Tensor:
        r"""Fraction of ``samples`` of ``site`` near each mode (see :func:`mode_masses`).

        A draw counts toward its nearest mode when it lies within ``radius`` of it.

        :param torch.Tensor samples: draws of ``site``, shape ``(N, *site_shape)``.
        :return: shape ``(M,)``, each entry in ``[0, 1]``, in ``samples``' dtype.
        """
        return mode_masses(samples, self.modes, self.radius)

    def sample_exact(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Exact draws from the posterior, when the target knows how (``exact_sampler``).

        :param int num_samples: ``N >= 1``.
        :param generator: a CPU :class:`torch.Generator`; default a fresh one seeded from torch's
            global random state.
        :return: site name -> tensor ``(N, *site_shape)`` (constrained space) for every latent
            site.
        :raises ValueError: if the target has no exact sampler.
        """
        if self.exact_sampler is None:
            raise ValueError(f"target {self.name!r} has no exact sampler (exact_sampler is None)")
        num_samples = check_int("num_samples", num_samples, 1)
        if generator is None:
            seed = int(torch.randint(2**62, (), dtype=torch.int64))
            generator = torch.Generator(device="cpu").manual_seed(seed)
        return self.exact_sampler(num_samples, generator)

    def modes_found(self, samples: torch.Tensor, threshold: float = 0.1) -> int:
        """Number of modes holding at least ``threshold`` of the samples (see :meth:`mode_masses`).

        :param torch.Tensor samples: shape ``(N, *site_shape)``.
        :param float threshold: in ``(0, 1)``.
        """
        threshold = _check_real("threshold", threshold, positive=True)
        if threshold >= 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        return int((self.mode_masses(samples) >= threshold).sum())

    @property
    def max_plate_nesting(self) -> int:
        """The number of plate dimensions the model uses (for vectorized ELBOs and weights)."""
        trace = poutine.trace(self.model).get_trace(*self.args, **self.kwargs)
        dims = [
            -frame.dim
            for site in trace.nodes.values()
            if site["type"] == "sample"
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        ]
        return max(dims, default=0)

    def log_joint_batch(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        r"""The unnormalised log posterior :math:`\log p(y, \theta_b)` at a batch of points.

        The model runs once, vectorized under an extra plate left of its own plates.

        :param dict values: site name -> tensor of shape ``(B, *site_shape)`` for every latent
            site (constrained space), with the same ``B`` for all sites.
        :return: shape ``(B,)``.
        """
        if not isinstance(values, dict) or not values:
            raise TypeError(f"values must be a non-empty dict site -> tensor, got {values!r}")
        sizes = {
            k: (v.shape[0] if isinstance(v, torch.Tensor) and v.dim() else None)
            for k, v in values.items()
        }
        if None in sizes.values() or len(set(sizes.values())) != 1:
            raise ValueError(
                f"values must be tensors sharing a leading batch size B, got sizes {sizes}"
            )
        batch = next(iter(sizes.values()))
        nesting = self.max_plate_nesting
        dim = -(nesting + 1)
        prototype = poutine.trace(self.model).get_trace(*self.args, **self.kwargs)
        aligned = {}
        for name, value in values.items():
            site = prototype.nodes.get(name)
            if site is None or site["type"] != "sample" or site["is_observed"]:
                raise ValueError(f"values has {name!r}, which is not a latent site of the model")
            event = site["value"].shape[len(site["fn"].batch_shape) :]
            site_shape = site["value"].shape
            if value.shape[1:] != site_shape:
                raise ValueError(
                    f"values[{name!r}] must have shape (B, {', '.join(map(str, site_shape))}), "
                    f"got {tuple(value.shape)}"
                )
            # put B on the batch plate's dim, left of the site's own batch dims
            pad = nesting - (len(site_shape) - len(event))
            aligned[name] = value.reshape((batch,) + (1,) * max(pad, 0) + tuple(site_shape))
        with pyro.plate("_log_joint_batch", batch, dim=dim):
            trace = poutine.trace(poutine.condition(self.model, data=aligned)).get_trace(
                *self.args, **self.kwargs
            )
        _check_all_latents_given(trace, values)
        trace.compute_log_prob()
        first = next(iter(values.values()))
        total = torch.zeros(batch, dtype=first.dtype, device=first.device)
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            lp = site["log_prob"]
            # left-pad to (B or 1, *plate dims), then sum the model's own plate dims
            lp = lp.reshape((1,) * (nesting + 1 - lp.dim()) + tuple(lp.shape))
            total = total + lp.reshape(lp.shape[0], -1).sum(-1)
        return total

    def log_joint(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        r"""The unnormalised log posterior :math:`\log p(y, \theta)` at one point.

        :param dict values: site name -> value for every latent site (constrained space).
        :return: a scalar tensor.
        """
        if not isinstance(values, dict):
            raise TypeError(f"values must be a dict site -> tensor, got {type(values).__name__}")
        trace = poutine.trace(poutine.condition(self.model, data=values)).get_trace(
            *self.args, **self.kwargs
        )
        _check_all_latents_given(trace, values)
        return trace.log_prob_sum()


def _check_all_latents_given(trace, values: dict) -> None:
    missing = [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and name not in values
    ]
    if missing:
        raise ValueError(f"values must give every latent site; missing {missing}")
