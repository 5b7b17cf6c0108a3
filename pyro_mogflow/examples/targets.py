r"""Built-in Pyro models whose posteriors have several modes, with known ground truth.

Each generator returns a :class:`Target`: the Pyro model, the arguments to call it with (the
generated data), the locations of the posterior's modes on one latent site, and what is known
exactly about the posterior (its log evidence :math:`\log Z = \log p(y)`, the posterior mass
near each mode and an exact sampler, where they have a closed form). The demo
(``python -m pyro_mogflow demo``), the tutorials and the benchmarks share them, and they share
one definition of the mass near a mode, :func:`mode_masses`.

* :func:`sign_regression` -- a regression whose likelihood cannot tell the sign of its slope
  (two mirror modes, one positive site; :math:`\log Z`, mode masses and exact draws by
  quadrature).
* :func:`gaussian_mixture_target` -- a mixture of diagonal Gaussians written as a Pyro model with
  ``pyro.factor`` (any number of modes; :math:`\log Z` known by construction, exact draws).
* :func:`label_switching_mixture` -- a two-component Gaussian mixture model fitted to data; its
  posterior is symmetric under swapping the component means (two mirror modes).

Data are drawn from a private :class:`torch.Generator`, so building a target never changes the
global random state, and the same ``seed`` gives the same data on every machine.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyro_mogflow import mixture_log_prob
from pyro_mogflow._validation import check_int

__all__ = [
    "Target",
    "mode_masses",
    "sign_regression",
    "sign_regression_model",
    "gaussian_mixture_target",
    "gaussian_mixture_model",
    "label_switching_mixture",
    "label_switching_model",
]


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
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    # Draw on the CPU and move the data afterwards: the same seed then gives the same data on
    # every device.
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _check_data(name: str, value, dim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(value).__name__}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(value.shape)}")
    return value


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

    The posterior is measured on one latent site, :attr:`site`. Its modes sit at :attr:`modes`
    and a guide is said to have *found* mode :math:`j` when it puts at least a fraction
    ``threshold`` of its samples nearer to :math:`m_j` than to any other mode and within
    :math:`r` = :attr:`radius` of it (see :func:`mode_masses` and :meth:`modes_found`).

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
        r"""Fraction of ``samples`` of :attr:`site` near each mode (see :func:`mode_masses`).

        A draw counts toward its nearest mode when it lies within :attr:`radius` of it.

        :param torch.Tensor samples: draws of :attr:`site`, shape ``(N, *site_shape)``.
        :return: shape ``(M,)``, each entry in ``[0, 1]``, in ``samples``' dtype.
        """
        return mode_masses(samples, self.modes, self.radius)

    def sample_exact(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Exact draws from the posterior, when the target knows how (:attr:`exact_sampler`).

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


# ------------------------------------------------------------------------ sign regression
def sign_regression_model(
    x: torch.Tensor, y: torch.Tensor | None = None, prior_scale: float = 3.0
) -> torch.Tensor:
    r"""A linear regression whose likelihood only sees the slope's magnitude.

    .. math::
        \theta \sim \mathcal{N}(0, s_0^2), \qquad \sigma \sim \mathrm{HalfNormal}(1), \qquad
        y_i \mid \theta, \sigma \sim \mathcal{N}(|\theta|\, x_i,\ \sigma^2), \quad i = 1..N.

    Since :math:`p(y, \theta, \sigma) = p(y, -\theta, \sigma)`, the posterior has two mirror
    modes near :math:`\theta = \pm|\theta^\star|` with equal mass -- the way a sign is lost when
    only an amplitude is observed (an unsigned gain, a loading of a factor model).

    :param torch.Tensor x: covariates, shape ``(N,)``.
    :param y: responses, shape ``(N,)``, or ``None`` to sample them.
    :param float prior_scale: :math:`s_0`.
    :return: ``y``, shape ``(*particles, N)``.
    """
    s0 = torch.as_tensor(prior_scale, dtype=x.dtype, device=x.device)
    theta = pyro.sample("theta", dist.Normal(torch.zeros_like(s0), s0))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.ones_like(s0)))
    # theta and sigma have shape () or (*particles, 1) under vectorized particles: broadcasting
    # against x (N,) puts the data plate on dim -1.
    with pyro.plate("data", x.shape[-1]):
        return pyro.sample("y", dist.Normal(theta.abs() * x, sigma), obs=y)


def _log_normal_window(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(Phi(b) - Phi(a))`` for ``a < b`` elementwise, accurate in both tails."""
    # In the upper tail use the mirror image Phi(-a) - Phi(-b), so no two numbers near 1 are
    # subtracted.
    flip = a > 0
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log1p(-torch.exp(log_a - log_b))


def _sign_regression_log_lik_given_sigma(
    x: torch.Tensor, y: torch.Tensor, prior_scale: float, sigma: torch.Tensor, lo, hi
) -> torch.Tensor:
    r"""``log int_{lo < theta < hi} p(theta) p(y | theta, sigma) dtheta`` for ``0 <= lo < hi``.

    For :math:`\theta > 0` the integrand is Gaussian in :math:`\theta` with precision
    :math:`P = 1/s_0^2 + S_{xx}/\sigma^2` and mean :math:`\bar\theta = (S_{xy}/\sigma^2)/P`, so
    the integral is a difference of normal CDFs. ``sigma`` has any shape; so has the result.
    """
    n = x.shape[-1]
    sxx, sxy, syy = (x * x).sum(), (x * y).sum(), (y * y).sum()
    prec = 1.0 / prior_scale**2 + sxx / sigma**2
    b = sxy / sigma**2
    mean = b / prec
    root = prec.sqrt()
    log_window = _log_normal_window((lo - mean) * root, (hi - mean) * root)
    log_2pi = math.log(2 * math.pi)
    return (
        0.5 * b**2 / prec
        - 0.5 * syy / sigma**2
        - math.log(prior_scale)
        - 0.5 * log_2pi
        - n * sigma.log()
        - 0.5 * n * log_2pi
        + 0.5 * (log_2pi - prec.log())
        + log_window
    )


def _sign_regression_sigma_grid(x, y, prior_scale, lo=0.0, hi=math.inf):
    """``(u, log_f)``: ``log_f(u) = log int_{lo<theta<hi} p(theta) p(sigma) p(y|theta,sigma)``
    at ``sigma = exp(u)``, times the Jacobian ``sigma``, on a fine uniform grid ``u`` (float64).

    The integrand is smooth in ``u = log sigma`` and decays like a Gaussian on both sides of the
    grid ``[-12, 5]``, so the grid carries all of its mass.
    """
    x64, y64 = x.detach().double().cpu(), y.detach().double().cpu()
    u = torch.linspace(-12.0, 5.0, 40001, dtype=torch.float64)
    sigma = u.exp()
    log_prior = dist.HalfNormal(torch.tensor(1.0, dtype=torch.float64)).log_prob(sigma) + u
    log_f = log_prior + _sign_regression_log_lik_given_sigma(x64, y64, prior_scale, sigma, lo, hi)
    return u, log_f


def _sign_regression_log_integral(x, y, prior_scale, lo=0.0, hi=math.inf) -> float:
    """``log int int_{lo<theta<hi} p(theta) p(sigma) p(y|theta,sigma)``, by quadrature in sigma.

    The sigma integral is a sum over the grid of :func:`_sign_regression_sigma_grid` (the
    trapezoid rule in log space; the end points carry negligible mass).
    """
    u, log_f = _sign_regression_sigma_grid(x, y, prior_scale, lo, hi)
    du = float(u[1] - u[0])
    return float(torch.logsumexp(log_f, 0) + math.log(du))


def _sign_regression_sampler(
    x: torch.Tensor, y: torch.Tensor, prior_scale: float, dtype: torch.dtype, device
) -> Callable[[int, torch.Generator], dict]:
    r"""Exact posterior draws of ``theta`` and ``sigma`` for :func:`sign_regression_model`.

    :math:`\sigma` by inverse-CDF sampling of its marginal on the grid of
    :func:`_sign_regression_sigma_grid` (the quadrature behind :math:`\log Z`), then
    :math:`|\theta| \mid \sigma` from its Gaussian truncated to :math:`\theta > 0` and a fair
    random sign.
    """
    x64, y64 = x.detach().cpu().double(), y.detach().cpu().double()
    u, log_f = _sign_regression_sigma_grid(x64, y64, prior_scale)
    probs = (log_f - log_f.logsumexp(0)).exp()
    du = float(u[1] - u[0])
    sxx, sxy = float((x64 * x64).sum()), float((x64 * y64).sum())
    s0 = prior_scale

    def sample(num_samples: int, generator: torch.Generator) -> dict:
        idx = torch.multinomial(probs, num_samples, True, generator=generator)
        jitter = torch.rand(num_samples, generator=generator, dtype=torch.float64) - 0.5
        s = (u[idx] + du * jitter).exp()
        prec = 1.0 / s0**2 + sxx / s**2
        mean = (sxy / s**2) / prec
        sd = prec.rsqrt()
        # |theta| | sigma: N(mean, sd^2) truncated to (0, inf), by inverse CDF
        lo = torch.special.ndtr(-mean / sd)
        v = torch.rand(num_samples, generator=generator, dtype=torch.float64)
        p = (lo + v * (1 - lo)).clamp(1e-300, 1 - 1e-16)
        magnitude = mean + sd * torch.special.ndtri(p)
        sign = torch.where(torch.rand(num_samples, generator=generator) < 0.5, -1.0, 1.0)
        return {
            "theta": (sign * magnitude).to(dtype=dtype, device=device),
            "sigma": s.to(dtype=dtype, device=device),
        }

    return sample


def sign_regression(
    num_data: int = 40,
    slope: float = 1.5,
    noise: float = 0.5,
    prior_scale: float = 3.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Target:
    r"""The sign-symmetric regression of :func:`sign_regression_model`, with generated data.

    Covariates :math:`x_i \sim \mathcal{N}(0, 1)` and responses are drawn with
    :math:`\theta^\star` = ``slope`` and :math:`\sigma^\star` = ``noise``. The modes of
    ``theta`` are taken at :math:`\pm\theta^\star` with radius :math:`|\theta^\star|/2` (half the
    gap to the mirror mode; the posterior's own width is about
    :math:`\sigma^\star/\sqrt{N}`).

    Ground truth, by one-dimensional quadrature after integrating :math:`\theta` in closed form
    (for :math:`\theta > 0` the likelihood is Gaussian in :math:`\theta`):

    .. math::
        \log Z = \log 2 + \log \int_0^\infty \!\! \int_0^\infty
        p(\theta)\, p(\sigma)\, p(y \mid \theta, \sigma)\, d\theta\, d\sigma,

    and the exact posterior mass of each ball (equal for both modes by symmetry). Exact draws
    (:meth:`Target.sample_exact`): :math:`\sigma` by inverse-CDF sampling of its marginal on the
    quadrature grid, then :math:`|\theta|` given :math:`\sigma` from its truncated Gaussian and
    a fair random sign.

    :param int num_data: ``N >= 1``.
    :param float slope: :math:`\theta^\star \ne 0`.
    :param float noise: :math:`\sigma^\star > 0`.
    :param float prior_scale: prior standard deviation of ``theta``.
    :param int seed: seed of the private generator that draws the data.
    :param dtype: ``torch.float32`` or ``torch.float64``; the data (hence the model) use it.
    :param device: device of the data.
    :return: a :class:`Target` on site ``"theta"`` with two modes.
    """
    num_data = check_int("num_data", num_data, 1)
    slope = _check_real("slope", slope, nonzero=True)
    noise = _check_real("noise", noise, positive=True)
    prior_scale = _check_real("prior_scale", prior_scale, positive=True)
    dtype = _check_dtype(dtype)
    device = torch.device(device)
    gen = _generator(seed)
    x = torch.randn(num_data, generator=gen, dtype=torch.float64)
    y = abs(slope) * x + noise * torch.randn(num_data, generator=gen, dtype=torch.float64)
    m = abs(slope)
    radius = m / 2
    log_half = _sign_regression_log_integral(x, y, prior_scale)
    log_ball = _sign_regression_log_integral(x, y, prior_scale, m - radius, m + radius)
    ball_mass = 0.5 * math.exp(log_ball - log_half)
    x, y = x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)
    return Target(
        name="sign_regression",
        model=sign_regression_model,
        args=(x, y),
        kwargs={"prior_scale": prior_scale},
        site="theta",
        modes=torch.tensor([-m, m], dtype=dtype, device=device),
        radius=radius,
        log_z=math.log(2.0) + log_half,
        reference_masses=torch.full((2,), ball_mass, dtype=dtype, device=device),
        truth={"theta": slope, "sigma": noise},
        description=f"y ~ N(|theta| x, sigma), {num_data} points, theta* = +-{m:g}",
        # the posterior of the model as run: the data in ``dtype``
        exact_sampler=_sign_regression_sampler(x, y, prior_scale, dtype, device),
    )


# --------------------------------------------------------------- Gaussian mixture target
def gaussian_mixture_model(
    logits: torch.Tensor,
    locs: torch.Tensor,
    scales: torch.Tensor,
    log_z: float = 0.0,
    prior_scale: float = 10.0,
) -> torch.Tensor:
    r"""A mixture of Gaussians as a Pyro model with one latent site ``z``.

    .. math::
        z \sim \mathcal{N}(0, s_0^2 I_D), \qquad
        \text{factor} = \log \sum_k \pi_k \mathcal{N}(z; \mu_k, \Sigma_k)
        - \log \mathcal{N}(z; 0, s_0^2 I_D) + \log Z,

    so the joint density is exactly :math:`Z` times the mixture density and the evidence is
    :math:`Z`. The broad prior only serves Pyro's initialisation (it is cancelled by the factor).
    The components are diagonal, :math:`\Sigma_k = \operatorname{diag}\sigma_k^2`, when
    ``scales`` has shape ``(K, D)``, and full, :math:`\Sigma_k = L_k L_k^\top`, when it holds
    lower Cholesky factors of shape ``(K, D, D)``.

    :param torch.Tensor logits: shape ``(K,)``.
    :param torch.Tensor locs: shape ``(K, D)``.
    :param torch.Tensor scales: standard deviations ``(K, D)`` or Cholesky factors
        ``(K, D, D)``.
    :param float log_z: :math:`\log Z`.
    :param float prior_scale: :math:`s_0`.
    :return: ``z``, shape ``(*particles, D)``.
    """
    d = locs.shape[-1]
    zero = torch.zeros(d, dtype=locs.dtype, device=locs.device)
    prior = dist.Normal(zero, torch.full_like(zero, prior_scale)).to_event(1)
    z = pyro.sample("z", prior)
    if scales.dim() == locs.dim() + 1:
        comp = dist.MultivariateNormal(locs, scale_tril=scales)
        log_target = torch.logsumexp(
            torch.log_softmax(logits, -1) + comp.log_prob(z.unsqueeze(-2)), -1
        )
    else:
        log_target = mixture_log_prob(z, logits, locs, scales)
    pyro.factor("target", log_target - prior.log_prob(z) + log_z)
    return z


def _mixture_sampler(
    logits: torch.Tensor, locs: torch.Tensor, scales: torch.Tensor
) -> Callable[[int, torch.Generator], dict]:
    """Exact draws of ``z`` from the mixture of :func:`gaussian_mixture_model` (float64 inside,
    returned in the dtype and on the device of ``locs``)."""
    dtype, device = locs.dtype, locs.device
    logits, locs, scales = (t.detach().cpu().double() for t in (logits, locs, scales))

    def sample(num_samples: int, generator: torch.Generator) -> dict:
        k = torch.multinomial(logits.softmax(-1), num_samples, True, generator=generator)
        eps = torch.randn((num_samples, locs.shape[-1]), generator=generator, dtype=torch.float64)
        z = locs[k] + scales[k] * eps
        return {"z": z.to(dtype=dtype, device=device)}

    return sample


def gaussian_mixture_target(
    locs: torch.Tensor | Sequence | None = None,
    scales: float | torch.Tensor | Sequence = 0.5,
    weights: torch.Tensor | Sequence | None = None,
    log_z: float = 0.0,
    radius: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Target:
    r"""A Pyro model whose posterior is a given mixture of diagonal Gaussians, with known evidence.

    .. math:: p(z \mid \cdot) = \sum_{k=1}^K \pi_k\, \mathcal{N}(z;\ \mu_k,
        \operatorname{diag}\sigma_k^2), \qquad \log Z = \texttt{log\_z}

    (see :func:`gaussian_mixture_model`). The modes are the component means.

    :param locs: component means, shape ``(K, D)``; default the four corners
        :math:`(\pm 4, \pm 4)`.
    :param scales: a positive float, or per-component standard deviations ``(K, D)``.
    :param weights: mixture weights ``(K,)`` (positive; normalised here); default equal.
    :param float log_z: the evidence the model is built to have.
    :param float radius: capture radius for :func:`mode_masses`; default three times the
        largest scale, capped at half the smallest distance between two means (so the balls
        around the means do not overlap).
    :param dtype: ``torch.float32`` or ``torch.float64``.
    :param device: device of the parameters.
    :return: a :class:`Target` on site ``"z"`` with ``K`` modes. Its
        :attr:`~Target.reference_masses` are :math:`\pi_k` times the Gaussian mass of each ball
        when every component is isotropic (a chi-square CDF), counting only the component's own
        mass (the others add at most their tail beyond the gap between means; an approximation
        when ``radius`` exceeds half that gap); otherwise ``None``. Its
        :meth:`~Target.sample_exact` draws the mixture exactly.
    """
    dtype = _check_dtype(dtype)
    device = torch.device(device)
    if locs is None:
        locs = [[-4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [4.0, 4.0]]
    locs = torch.as_tensor(locs, dtype=dtype).to(device).clone()
    if locs.dim() != 2 or locs.shape[0] < 1 or locs.shape[1] < 1:
        raise ValueError(f"locs must have shape (K, D) with K, D >= 1, got {tuple(locs.shape)}")
    if not bool(torch.isfinite(locs).all()):
        raise ValueError("locs must be finite")
    k, d = locs.shape
    if isinstance(scales, numbers.Real) and not isinstance(scales, bool):
        scales = torch.full((k, d), _check_real("scales", scales, positive=True), dtype=dtype)
    scales = torch.as_tensor(scales, dtype=dtype).to(device).clone()
    if scales.shape != (k, d):
        raise ValueError(
            f"scales must be a positive float or have shape {(k, d)}, got {tuple(scales.shape)}"
        )
    if not bool((scales > 0).all()) or not bool(torch.isfinite(scales).all()):
        raise ValueError("scales must be positive and finite")
    if weights is None:
        weights = torch.ones(k, dtype=dtype)
    weights = torch.as_tensor(weights, dtype=dtype).to(device).clone()
    if weights.shape != (k,) or not bool((weights > 0).all()):
        raise ValueError(
            f"weights must be {k} positive numbers (one per row of locs), got {weights.tolist()}"
        )
    weights = weights / weights.sum()
    log_z = _check_real("log_z", log_z)
    if k > 1:
        gaps = torch.cdist(locs, locs) + torch.diag(
            torch.full((k,), math.inf, dtype=dtype, device=locs.device)
        )
        min_gap = float(gaps.min())
        if min_gap == 0:
            raise ValueError("locs must be distinct: two components share a mean")
    else:
        min_gap = math.inf
    if radius is None:
        radius = min(3.0 * float(scales.max()), 0.5 * min_gap)
    radius = _check_real("radius", radius, positive=True)
    logits = weights.log()
    reference = None
    isotropic = bool((scales == scales[:, :1]).all())
    if isotropic:
        x = torch.as_tensor(radius**2, dtype=dtype) / (2 * scales[:, 0].cpu() ** 2)
        own = torch.special.gammainc(torch.tensor(d / 2, dtype=dtype), x)
        reference = (weights.cpu() * own).to(device)
    return Target(
        name="gaussian_mixture",
        model=gaussian_mixture_model,
        args=(logits, locs, scales),
        kwargs={"log_z": log_z},
        site="z",
        modes=locs,
        radius=radius,
        log_z=log_z,
        reference_masses=reference,
        description=f"{k}-component Gaussian mixture in {d}-D",
        exact_sampler=_mixture_sampler(logits, locs, scales),
    )


# ----------------------------------------------------------------------- label switching
def label_switching_model(y: torch.Tensor, prior_scale: float = 5.0) -> torch.Tensor:
    r"""A two-component Gaussian mixture fitted to 1-D data: label switching makes two modes.

    .. math::
        \mu_1, \mu_2 \sim \mathcal{N}(0, s_0^2), \qquad \sigma \sim \mathrm{HalfNormal}(2),
        \qquad y_i \sim \tfrac12 \mathcal{N}(\mu_1, \sigma^2) + \tfrac12 \mathcal{N}(\mu_2,
        \sigma^2).

    The likelihood is unchanged when :math:`\mu_1` and :math:`\mu_2` swap, so the posterior of
    ``mu`` (shape ``(2,)``) has two mirror modes across the diagonal :math:`\mu_1 = \mu_2`.

    :param torch.Tensor y: observations, shape ``(N,)``.
    :param float prior_scale: :math:`s_0`.
    """
    zero = torch.zeros(2, dtype=y.dtype, device=y.device)
    mu = pyro.sample("mu", dist.Normal(zero, torch.full_like(zero, prior_scale)).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.full_like(zero[0], 2.0)))
    mix = dist.Categorical(logits=torch.zeros_like(zero))
    with pyro.plate("data", y.shape[-1]):
        # mu: (2,) or (*particles, 1, 2); the components sit on the last dim.
        comp = dist.Normal(mu, sigma[..., None])
        return pyro.sample("y", dist.MixtureSameFamily(mix, comp), obs=y)


def label_switching_mixture(
    num_data: int = 100,
    means: tuple[float, float] = (-2.0, 2.0),
    noise: float = 1.0,
    prior_scale: float = 5.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Target:
    r"""Data from a two-component Gaussian mixture, and :func:`label_switching_model` to fit it.

    The modes of ``mu`` are taken at the generating means and their swap,
    :math:`(\mu_1^\star, \mu_2^\star)` and :math:`(\mu_2^\star, \mu_1^\star)`, with radius
    :math:`|\mu_1^\star - \mu_2^\star| / 4`. The two balls hold exactly equal posterior mass (the
    posterior is symmetric under the swap); the evidence has no closed form.

    :param int num_data: ``N >= 1``.
    :param means: the two distinct generating means.
    :param float noise: generating standard deviation.
    :param float prior_scale: prior standard deviation of each mean.
    :param int seed: seed of the private generator that draws the data.
    :param dtype: ``torch.float32`` or ``torch.float64``.
    :param device: device of the data.
    :return: a :class:`Target` on site ``"mu"`` with two modes.
    """
    num_data = check_int("num_data", num_data, 1)
    if not isinstance(means, (tuple, list)) or len(means) != 2:
        raise ValueError(f"means must be a pair of floats, got {means!r}")
    m1 = _check_real("means[0]", means[0])
    m2 = _check_real("means[1]", means[1])
    if m1 == m2:
        raise ValueError(f"means must differ (the two modes would coincide), got {means!r}")
    noise = _check_real("noise", noise, positive=True)
    prior_scale = _check_real("prior_scale", prior_scale, positive=True)
    dtype = _check_dtype(dtype)
    device = torch.device(device)
    gen = _generator(seed)
    pick = torch.rand(num_data, generator=gen, dtype=torch.float64) < 0.5
    centre = torch.where(pick, torch.tensor(m1, dtype=torch.float64), m2)
    y = centre + noise * torch.randn(num_data, generator=gen, dtype=torch.float64)
    y = y.to(dtype=dtype, device=device)
    modes = torch.tensor([[m1, m2], [m2, m1]], dtype=dtype, device=device)
    return Target(
        name="label_switching",
        model=label_switching_model,
        args=(y,),
        kwargs={"prior_scale": prior_scale},
        site="mu",
        modes=modes,
        radius=abs(m1 - m2) / 4,
        truth={"mu": (m1, m2), "sigma": noise},
        description=f"2-component mixture, {num_data} points, means {m1:g}, {m2:g}",
    )
