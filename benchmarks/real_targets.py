r"""Targets of the real-models benchmark: Pyro models written the way users write them.

Each builder returns a :class:`RealTarget`: a :class:`~pyro_mogflow.examples.Target` (the Pyro
model, its data, the modes on one site and their capture radius, :math:`\log Z` and an exact
sampler where they are known) plus what the benchmark needs to score a guide against the ground
truth: symmetry-invariant key statistics (for moment errors) and, for symmetric posteriors, the
symmetry group (to put every draw of a sampler into a canonical labelling and to spread it back
over every symmetric image, so each image gets its exact share of the mass).

=================  =====  ===============================================================  ======
name               D      posterior                                                        truth
=================  =====  ===============================================================  ======
``bgmm``           4      3-component Bayesian Gaussian mixture, 6 label-switching modes   NUTS
``bnn``            8      one-hidden-layer tanh net (2 units), 1-D regression; 8 modes     NUTS
                          from the sign flips and the swap of the hidden units
``factor``         12     one-factor factor analysis, loadings' sign: 2 modes              NUTS
``frequency``      3      sinusoid frequency under aliasing: 5 equal modes                 exact
``eight_schools``  10     eight schools, non-centred (a funnel), unimodal                  exact
``synth20``        20     2 mirror modes, full covariances (random rotations, scales       exact
                          0.1--2), broad :math:`\mathcal N(0, 30^2)` prior
``synth50``        50     3 such modes, weights 0.5/0.3/0.2                                exact
``synth100``       100    2 such modes, weights 0.6/0.4                                    exact
``gmm40_50d``      50     40 unit Gaussians, means uniform on :math:`[-40, 40]^{50}`       exact
=================  =====  ===============================================================  ======

"exact" means an exact sampler and :math:`\log Z` (closed form, or 1-D/2-D quadrature after
integrating the linear-Gaussian sites out analytically); "NUTS" means long multi-chain NUTS
stored in ``benchmarks/ground_truth/<name>.npz`` (``python -m benchmarks.real_models
--ground-truth``). For symmetric targets the modes are the images of a reference point (the mean
of the canonically relabelled draws) under the symmetry group.

References:

* D. Blessing, X. Jia, J. Esslinger, F. Vargas, G. Neumann, *Beyond ELBOs: A Large-Scale
  Evaluation of Variational Methods for Sampling*, ICML 2024 (the 50-D GMM-40).
* A. Gelman et al., *Bayesian Data Analysis*, 3rd ed., 2013 (eight schools).
* G. L. Bretthorst, *Bayesian Spectrum Analysis and Parameter Estimation*, 1988 (frequency).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch

from pyro_mogflow.examples import Target, gaussian_mixture_model, gaussian_mixture_target

__all__ = [
    "REAL_TARGETS",
    "RealTarget",
    "bgmm",
    "bgmm_model",
    "bnn",
    "bnn_model",
    "build_real_target",
    "eight_schools",
    "eight_schools_model",
    "factor",
    "factor_model",
    "frequency",
    "frequency_model",
    "gmm40_50d",
    "synthetic",
]

Draws = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class RealTarget:
    """A benchmark case: a :class:`~pyro_mogflow.examples.Target` and how to score it.

    :param str name: short key.
    :param Target target: the model, data, modes on :attr:`Target.site` and capture radius,
        ``log_z`` and exact sampler where known.
    :param str truth: ``"exact"`` (exact sampler) or ``"nuts"`` (stored NUTS draws).
    :param bool multimodal: whether mode coverage and mode masses are scored.
    :param stats: ``stats(draws) -> {name: (N,) tensor}``, symmetry-invariant key statistics
        for the moment errors, or ``None``.
    :param group: the symmetry group, a list of maps ``draws -> draws`` (identity first), or
        ``None``.
    :param canonical: ``canonical(draws) -> draws``, each draw mapped to the canonical
        labelling (a fundamental domain of ``group``), or ``None``.
    :param init: constrained values of every latent site near one mode (NUTS starts its chains
        at the images of this point under ``group``), or ``None``.
    """

    name: str
    target: Target
    truth: str = "exact"
    multimodal: bool = True
    stats: Callable[[Draws], Draws] | None = None
    group: list[Callable[[Draws], Draws]] | None = None
    canonical: Callable[[Draws], Draws] | None = None
    init: Draws | None = None

    @property
    def description(self) -> str:
        """One line for tables."""
        return self.target.description

    def symmetrize(self, draws: Draws) -> Draws:
        """Every draw relabelled canonically, then mapped by every element of the group.

        The result has ``len(group)`` times as many draws, and every symmetric image of the
        canonical region holds exactly ``1 / len(group)`` of them.
        """
        if self.group is None or self.canonical is None:
            return draws
        canon = self.canonical(draws)
        images = [g(canon) for g in self.group]
        return {k: torch.cat([im[k] for im in images]) for k in draws}

    def with_modes(self, draws: Draws) -> RealTarget:
        """This target with its modes set to the group images of the canonical mean of ``draws``.

        The capture radius is half the smallest distance between two images (disjoint balls).
        """
        canon = self.canonical(draws)
        ref = {k: v.mean(0, keepdim=True) for k, v in canon.items()}
        modes = torch.cat([g(ref)[self.target.site] for g in self.group])
        flat = modes.reshape(modes.shape[0], -1).double()
        gaps = torch.cdist(flat, flat) + torch.eye(len(flat), dtype=torch.float64) * 1e9
        target = dataclasses.replace(
            self.target, modes=modes.to(self.target.modes), radius=0.5 * float(gaps.min())
        )
        return dataclasses.replace(self, target=target)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


# ----------------------------------------------------------------- Bayesian Gaussian mixture
def bgmm_model(y: torch.Tensor, num_components: int = 3, prior_scale: float = 5.0) -> None:
    r"""A Bayesian Gaussian mixture with equal known weights and a shared noise scale.

    .. math:: \mu_k \sim \mathcal N(0, s_0^2),\ \sigma \sim \mathcal{HN}(2),\
        y_i \sim \tfrac1K \textstyle\sum_k \mathcal N(\mu_k, \sigma^2).

    The posterior is invariant under the :math:`K!` permutations of :math:`\mu` (label
    switching).
    """
    zero = y.new_zeros(())
    with pyro.plate("components", num_components):
        mu = pyro.sample("mu", dist.Normal(zero, zero + prior_scale))
    sigma = pyro.sample("sigma", dist.HalfNormal(zero + 2.0))
    mix = dist.Categorical(logits=y.new_zeros(num_components))
    with pyro.plate("data", y.shape[0]):
        comp = dist.Normal(mu.unsqueeze(-2), sigma[..., None])
        pyro.sample("y", dist.MixtureSameFamily(mix, comp), obs=y)


def _permutation(perm: tuple) -> Callable[[Draws], Draws]:
    def apply(d: Draws) -> Draws:
        return {**d, "mu": d["mu"][:, list(perm)]}

    return apply


def bgmm() -> RealTarget:
    """Three clusters at -3, 0, 3 (40 points each, std 1); 6 label-switching modes."""
    g = _gen(1)
    centres = torch.tensor([-3.0, 0.0, 3.0], dtype=torch.float64)
    y = (centres.repeat_interleave(40) + torch.randn(120, generator=g, dtype=torch.float64)).float()
    perms = list(itertools.permutations(range(3)))
    modes = torch.stack([centres[list(p)] for p in perms]).float()
    target = Target(
        name="bgmm",
        model=bgmm_model,
        args=(y,),
        kwargs={},
        site="mu",
        modes=modes,
        radius=1.5,
        description="Bayesian Gaussian mixture, 3 components, 120 points: 6 label-switching modes",
    )
    return RealTarget(
        "bgmm",
        target,
        truth="nuts",
        stats=lambda d: {
            **{f"mu(sorted)[{i}]": v for i, v in enumerate(d["mu"].sort(-1).values.T)},
            "sigma": d["sigma"],
        },
        group=[_permutation(p) for p in perms],
        canonical=lambda d: {**d, "mu": d["mu"].sort(-1).values},
        init={"mu": centres.float(), "sigma": torch.tensor(1.0)},
    )


# ----------------------------------------------------------------- Bayesian neural network
def bnn_model(x: torch.Tensor, y: torch.Tensor, hidden: int = 2) -> None:
    r"""One hidden layer of ``hidden`` tanh units, 1-D input and output, Gaussian noise.

    .. math:: f(x) = b_2 + \textstyle\sum_h w_{2h} \tanh(w_{1h} x + b_{1h}), \quad
        y_i \sim \mathcal N(f(x_i), \sigma^2),

    standard normal priors on every weight and :math:`\sigma \sim \mathcal{HN}(1)`. Flipping
    the signs of :math:`(w_{1h}, b_{1h}, w_{2h})` or permuting the units leaves :math:`f`
    unchanged: :math:`2^H H!` symmetric modes.
    """
    zero = x.new_zeros(())
    with pyro.plate("hidden", hidden):
        w1 = pyro.sample("w1", dist.Normal(zero, 1.0))
        b1 = pyro.sample("b1", dist.Normal(zero, 1.0))
        w2 = pyro.sample("w2", dist.Normal(zero, 1.0))
    b2 = pyro.sample("b2", dist.Normal(zero, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(zero + 1.0))
    f = _bnn_mean(x, w1, b1, w2, b2)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(f, sigma), obs=y)


def _bnn_mean(x, w1, b1, w2, b2) -> torch.Tensor:
    """``f(x)``, shape ``(*batch, len(x))``, for ``w1, b1, w2`` of shape ``(*batch, H)`` and
    ``b2`` broadcastable to ``(*batch, 1)`` (as a global site is under vectorized particles)."""
    h = torch.tanh(w1.unsqueeze(-2) * x.unsqueeze(-1) + b1.unsqueeze(-2))  # (*batch, N, H)
    return (h * w2.unsqueeze(-2)).sum(-1) + b2


_BNN_SITES = ("w1", "b1", "w2")


def _bnn_element(signs: tuple, perm: tuple) -> Callable[[Draws], Draws]:
    s = torch.tensor(signs, dtype=torch.float32)

    def apply(d: Draws) -> Draws:
        return {**d, **{k: (d[k] * s.to(d[k]))[:, list(perm)] for k in _BNN_SITES}}

    return apply


def _bnn_canonical(d: Draws) -> Draws:
    sign = torch.where(d["w1"] < 0, -1.0, 1.0).to(d["w1"])
    flipped = {k: d[k] * sign for k in _BNN_SITES}
    order = flipped["w1"].argsort(-1, descending=True)
    return {**d, **{k: v.gather(-1, order) for k, v in flipped.items()}}


def bnn() -> RealTarget:
    """Tanh net with two hidden units on 30 points of a two-tanh curve plus noise 0.15."""
    g = _gen(2)
    x = torch.linspace(-2, 2, 30, dtype=torch.float64)
    f = 1.2 * torch.tanh(2.5 * x - 0.5) - 0.8 * torch.tanh(0.8 * x + 0.5)
    y = (f + 0.15 * torch.randn(30, generator=g, dtype=torch.float64)).float()
    x = x.float()
    xs = torch.tensor([-1.5, 0.0, 1.5])
    group = [
        _bnn_element(s, p)
        for s in itertools.product((1.0, -1.0), repeat=2)
        for p in itertools.permutations(range(2))
    ]
    placeholder = torch.zeros(len(group), 2)

    def stats(d: Draws) -> Draws:
        pred = _bnn_mean(xs, d["w1"], d["b1"], d["w2"], d["b2"][:, None])
        return {**{f"f({v:g})": pred[:, i] for i, v in enumerate(xs.tolist())}, "sigma": d["sigma"]}

    target = Target(
        name="bnn",
        model=bnn_model,
        args=(x, y),
        kwargs={},
        site="w1",
        modes=placeholder,  # set from the ground truth (RealTarget.with_modes)
        radius=1.0,
        description="tanh BNN, 2 hidden units, 30 points: 8 sign/permutation modes",
    )
    init = {
        "w1": torch.tensor([2.5, 0.8]),
        "b1": torch.tensor([-0.5, 0.5]),
        "w2": torch.tensor([1.2, -0.8]),
        "b2": torch.tensor(0.0),
        "sigma": torch.tensor(0.15),
    }
    return RealTarget(
        "bnn", target, "nuts", stats=stats, group=group, canonical=_bnn_canonical, init=init
    )


# ------------------------------------------------------------------------ factor analysis
def factor_model(y: torch.Tensor) -> None:
    r"""One-factor factor analysis with the factor integrated out.

    .. math:: \lambda_j \sim \mathcal N(0, 1),\ \psi_j \sim \mathcal{HN}(1),\
        y_i \sim \mathcal N(0, \lambda\lambda^\top + \operatorname{diag}\psi^2).

    The likelihood depends on :math:`\lambda` only through :math:`\lambda\lambda^\top`: the
    posterior has two mirror modes, :math:`\pm\lambda`.
    """
    p = y.shape[-1]
    zero = y.new_zeros(())
    with pyro.plate("features", p):
        lam = pyro.sample("lam", dist.Normal(zero, 1.0))
        psi = pyro.sample("psi", dist.HalfNormal(zero + 1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample(
            "y",
            dist.LowRankMultivariateNormal(
                y.new_zeros(p), lam[..., None, :, None], psi[..., None, :] ** 2
            ),
            obs=y,
        )


def factor() -> RealTarget:
    """Six features, 80 observations, loadings 0.9/0.8/0.7/-0.6/0.5/0.8, noise 0.5."""
    g = _gen(3)
    lam = torch.tensor([0.9, 0.8, 0.7, -0.6, 0.5, 0.8], dtype=torch.float64)
    z = torch.randn(80, 1, generator=g, dtype=torch.float64)
    y = (z * lam + 0.5 * torch.randn(80, 6, generator=g, dtype=torch.float64)).float()
    group = [lambda d: d, lambda d: {**d, "lam": -d["lam"]}]

    def canonical(d: Draws) -> Draws:
        sign = torch.where(d["lam"].sum(-1, keepdim=True) < 0, -1.0, 1.0).to(d["lam"])
        return {**d, "lam": d["lam"] * sign}

    def stats(d: Draws) -> Draws:
        c = canonical(d)
        out = {f"lam(canonical)[{j}]": c["lam"][:, j] for j in range(6)}
        out.update({f"psi[{j}]": d["psi"][:, j] for j in range(6)})
        return out

    target = Target(
        name="factor",
        model=factor_model,
        args=(y,),
        kwargs={},
        site="lam",
        modes=torch.stack([lam, -lam]).float(),
        radius=1.0,
        description="one-factor factor analysis, 6 features, 80 points: 2 sign modes",
    )
    init = {"lam": lam.float(), "psi": torch.full((6,), 0.5)}
    return RealTarget(
        "factor", target, "nuts", stats=stats, group=group, canonical=canonical, init=init
    )


# ---------------------------------------------------------------------- frequency estimation
FREQ_RANGE = 5 * math.pi
FREQ_NOISE = 0.5
FREQ_PRIOR = 2.0


def frequency_model(t: torch.Tensor, y: torch.Tensor) -> None:
    r"""A sinusoid of unknown frequency sampled at integer times.

    .. math:: \omega \sim \mathcal U(0, 5\pi),\ a, b \sim \mathcal N(0, 2^2),\
        y_t \sim \mathcal N(a \cos \omega t + b \sin \omega t,\ 0.5^2).

    At integer :math:`t` the frequencies :math:`\omega`, :math:`2\pi k \pm \omega` give the same
    curve (aliasing, with :math:`b \to -b` for the minus sign): five equal modes of
    :math:`\omega` in :math:`(0, 5\pi)` for a true :math:`\omega < \pi`.
    """
    zero = y.new_zeros(())
    omega = pyro.sample("omega", dist.Uniform(zero, zero + FREQ_RANGE))
    with pyro.plate("coef", 2):
        ab = pyro.sample("ab", dist.Normal(zero, FREQ_PRIOR))
    phase = omega * t
    mean = ab[..., :1] * torch.cos(phase) + ab[..., 1:] * torch.sin(phase)
    with pyro.plate("data", t.shape[0]):
        pyro.sample("y", dist.Normal(mean, FREQ_NOISE), obs=y)


def _freq_grid(t, y, num: int = 400_000):
    """Cell midpoints of omega, log p(y | omega) and the Gaussian posterior of (a, b)."""
    t, y = t.double(), y.double()
    w = (torch.arange(num, dtype=torch.float64) + 0.5) * (FREQ_RANGE / num)
    x = torch.stack([torch.cos(w[:, None] * t), torch.sin(w[:, None] * t)], -1)  # (G, N, 2)
    prec = (
        x.transpose(-1, -2) @ x / FREQ_NOISE**2 + torch.eye(2, dtype=torch.float64) / FREQ_PRIOR**2
    )
    rhs = (x.transpose(-1, -2) @ y[:, None]).squeeze(-1) / FREQ_NOISE**2
    chol = torch.linalg.cholesky(prec)
    mean = torch.cholesky_solve(rhs[..., None], chol).squeeze(-1)
    n = y.shape[0]
    log_ev = (
        -0.5 * (y @ y / FREQ_NOISE**2 - (rhs * mean).sum(-1))
        - torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        - 2 * math.log(FREQ_PRIOR)
        - n * math.log(FREQ_NOISE)
        - 0.5 * n * math.log(2 * math.pi)
    )
    return w, log_ev, mean, chol


def frequency() -> RealTarget:
    r"""24 points of :math:`\cos t + 0.5 \sin t` plus noise 0.5; :math:`\log Z` by quadrature."""
    g = _gen(4)
    t = torch.arange(24, dtype=torch.float64)
    y = (
        torch.cos(t)
        + 0.5 * torch.sin(t)
        + FREQ_NOISE * torch.randn(24, generator=g, dtype=torch.float64)
    )
    w, log_ev, mean, chol = _freq_grid(t, y)
    cell = FREQ_RANGE / w.shape[0]
    log_post = log_ev - math.log(FREQ_RANGE) + math.log(cell)
    log_z = float(torch.logsumexp(log_post, 0))
    probs = (log_post - log_z).exp()
    # the five aliases of the highest peak
    w0 = float(w[probs.argmax()]) % (2 * math.pi)
    w0 = min(w0, 2 * math.pi - w0)
    modes = torch.tensor(
        sorted([w0, 2 * math.pi - w0, 2 * math.pi + w0, 4 * math.pi - w0, 4 * math.pi + w0])
    )

    def sample(num: int, gen: torch.Generator) -> Draws:
        idx = torch.multinomial(probs, num, True, generator=gen)
        omega = w[idx] + (torch.rand(num, generator=gen, dtype=torch.float64) - 0.5) * cell
        eps = torch.randn(num, 2, 1, generator=gen, dtype=torch.float64)
        # (a, b) | omega ~ N(mean, prec^-1): solve L^T x = eps
        ab = mean[idx] + torch.linalg.solve_triangular(
            chol[idx].transpose(-1, -2), eps, upper=True
        ).squeeze(-1)
        return {"omega": omega.float(), "ab": ab.float()}

    def stats(d: Draws) -> Draws:
        folded = d["omega"] % (2 * math.pi)
        folded = torch.minimum(folded, 2 * math.pi - folded)
        return {
            "omega (aliased to [0, pi])": folded,
            "a": d["ab"][:, 0],
            "|b|": d["ab"][:, 1].abs(),
        }

    target = Target(
        name="frequency",
        model=frequency_model,
        args=(t.float(), y.float()),
        kwargs={},
        site="omega",
        modes=modes.float(),
        radius=0.5,
        log_z=log_z,
        description="sinusoid frequency, 24 integer times: 5 aliased modes of omega",
        exact_sampler=sample,
    )
    return RealTarget("frequency", target, "exact", stats=stats)


# ---------------------------------------------------------------------------- eight schools
SCHOOLS_Y = (28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0)
SCHOOLS_SIGMA = (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0)


def eight_schools_model(y: torch.Tensor, sigma: torch.Tensor) -> None:
    r"""Eight schools, non-centred.

    .. math:: \mu \sim \mathcal N(0, 5^2),\ \tau \sim \mathrm{HalfCauchy}(5),\
        \tilde\theta_j \sim \mathcal N(0, 1),\ y_j \sim \mathcal N(\mu + \tau\tilde\theta_j,
        \sigma_j^2).
    """
    zero = y.new_zeros(())
    mu = pyro.sample("mu", dist.Normal(zero, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(zero + 5.0))
    with pyro.plate("schools", y.shape[0]):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(zero, 1.0))
        theta = mu + tau * theta_tilde
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def _schools_grid(num_mu: int = 1000, num_tau: int = 1000):
    """Midpoint grid on (mu, log tau) and log p(y, mu, log tau) with theta integrated out."""
    y = torch.tensor(SCHOOLS_Y, dtype=torch.float64)
    s = torch.tensor(SCHOOLS_SIGMA, dtype=torch.float64)
    mu_lo, mu_hi, lt_lo, lt_hi = -35.0, 45.0, -12.0, 7.0
    dmu, dlt = (mu_hi - mu_lo) / num_mu, (lt_hi - lt_lo) / num_tau
    mu = mu_lo + (torch.arange(num_mu, dtype=torch.float64) + 0.5) * dmu
    lt = lt_lo + (torch.arange(num_tau, dtype=torch.float64) + 0.5) * dlt
    tau = lt.exp()
    sd = (s**2 + tau[:, None] ** 2).sqrt()  # (T, J)
    loglik = torch.distributions.Normal(mu[:, None, None], sd).log_prob(y).sum(-1)  # (M, T)
    logp = (
        loglik
        + torch.distributions.Normal(0.0, 5.0).log_prob(mu)[:, None]
        + (math.log(2 / (math.pi * 5.0)) - torch.log1p((tau / 5.0) ** 2) + lt)[None, :]
    )
    return mu, lt, dmu, dlt, logp


def eight_schools() -> RealTarget:
    r"""The eight schools data; :math:`\log Z` and exact draws by 2-D quadrature on
    :math:`(\mu, \log\tau)` with :math:`\tilde\theta` integrated out (Gaussian)."""
    y = torch.tensor(SCHOOLS_Y)
    sigma = torch.tensor(SCHOOLS_SIGMA)
    mu, lt, dmu, dlt, logp = _schools_grid()
    logp_cell = logp + math.log(dmu * dlt)
    log_z = float(torch.logsumexp(logp_cell.reshape(-1), 0))
    probs = (logp_cell - log_z).exp().reshape(-1)
    y64, s64 = y.double(), sigma.double()

    def sample(num: int, gen: torch.Generator) -> Draws:
        idx = torch.multinomial(probs, num, True, generator=gen)
        i, j = idx // lt.shape[0], idx % lt.shape[0]
        m = mu[i] + (torch.rand(num, generator=gen, dtype=torch.float64) - 0.5) * dmu
        tau = (lt[j] + (torch.rand(num, generator=gen, dtype=torch.float64) - 0.5) * dlt).exp()
        prec = 1 + tau[:, None] ** 2 / s64**2
        mean = tau[:, None] * (y64 - m[:, None]) / s64**2 / prec
        tt = mean + torch.randn(num, 8, generator=gen, dtype=torch.float64) / prec.sqrt()
        return {"mu": m.float(), "tau": tau.float(), "theta_tilde": tt.float()}

    def stats(d: Draws) -> Draws:
        theta = d["mu"][:, None] + d["tau"][:, None] * d["theta_tilde"]
        return {
            "mu": d["mu"],
            "log tau": d["tau"].log(),
            **{f"theta[{j}]": theta[:, j] for j in range(8)},
        }

    target = Target(
        name="eight_schools",
        model=eight_schools_model,
        args=(y, sigma),
        kwargs={},
        site="mu",
        modes=torch.zeros(1),
        radius=1e6,
        log_z=log_z,
        description="eight schools, non-centred (funnel in tau)",
        exact_sampler=sample,
    )
    return RealTarget("eight_schools", target, "exact", multimodal=False, stats=stats)


# ---------------------------------------------------------------- synthetic correlated modes
def _rotation(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def synthetic(dim: int, weights: tuple, seed: int, mirror: bool = False) -> RealTarget:
    r"""A mixture of full-covariance Gaussians with :math:`\log Z = 0` and an exact sampler.

    Each component has covariance :math:`R_k \operatorname{diag}(s_k^2) R_k^\top` with
    :math:`R_k` a uniformly random rotation and :math:`s_{kj}` log-uniform on
    :math:`[0.1, 2]`. Means: :math:`\pm m` (``mirror``) or independent draws, with
    :math:`m \sim \mathcal N(0, 3^2 I)`. Written as :func:`~pyro_mogflow.examples.
    gaussian_mixture_model` on a broad :math:`\mathcal N(0, 30^2 I)` prior that the factor
    cancels.
    """
    gen = _gen(100 + seed)
    k = len(weights)
    if mirror:
        m = 3.0 * torch.randn(dim, generator=gen, dtype=torch.float64)
        locs = torch.stack([m, -m])
    else:
        locs = 3.0 * torch.randn(k, dim, generator=gen, dtype=torch.float64)
    scales = torch.exp(
        math.log(0.1)
        + (math.log(2.0) - math.log(0.1)) * torch.rand(k, dim, generator=gen, dtype=torch.float64)
    )
    rot = torch.stack([_rotation(dim, gen) for _ in range(k)])
    cov = rot @ torch.diag_embed(scales**2) @ rot.transpose(-1, -2)
    tril = torch.linalg.cholesky(cov)
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    gaps = torch.cdist(locs, locs) + torch.eye(k, dtype=torch.float64) * 1e9

    def sample(num: int, g: torch.Generator) -> Draws:
        idx = torch.multinomial(w, num, True, generator=g)
        eps = torch.randn(num, dim, 1, generator=g, dtype=torch.float64)
        return {"z": (locs[idx] + (tril[idx] @ eps).squeeze(-1)).float()}

    name = f"synth{dim}"
    target = Target(
        name=name,
        model=gaussian_mixture_model,
        args=(w.log().float(), locs.float(), tril.float()),
        kwargs={"log_z": 0.0, "prior_scale": 30.0},
        site="z",
        modes=locs.float(),
        radius=0.5 * float(gaps.min()),
        log_z=0.0,
        description=f"{k} correlated Gaussians in {dim}-D (scales 0.1-2, random rotations), "
        f"weights {'/'.join(f'{v:g}' for v in w.tolist())}",
        exact_sampler=sample,
    )
    return RealTarget(name, target, "exact")


GMM40_50D_SEED = 0


def gmm40_50d() -> RealTarget:
    r"""GMM-40 of Blessing et al. (2024) in 50-D: 40 equal unit Gaussians, means uniform on
    :math:`[-40, 40]^{50}` (drawn from seed :data:`GMM40_50D_SEED`), :math:`\log Z = 0`.

    Capture radius 12 (a unit Gaussian in 50-D lies within 12 of its mean with probability
    :math:`1 - 10^{-8}`; the means are over 100 apart). Prior of the factor: :math:`\mathcal
    N(0, 25^2)`.
    """
    u = torch.rand((40, 50), generator=_gen(GMM40_50D_SEED), dtype=torch.float32)
    locs = (u - 0.5) * 80.0
    target = gaussian_mixture_target(locs, scales=1.0, radius=12.0)
    target = dataclasses.replace(
        target,
        name="gmm40_50d",
        kwargs={**target.kwargs, "prior_scale": 25.0},
        description="GMM-40 in 50-D (Blessing et al. 2024): 40 unit Gaussians, means U[-40,40]^50",
    )
    return RealTarget("gmm40_50d", target, "exact")


#: name -> builder, in the order of the report.
REAL_TARGETS: dict[str, Callable[[], RealTarget]] = {
    "bgmm": bgmm,
    "bnn": bnn,
    "factor": factor,
    "frequency": frequency,
    "eight_schools": eight_schools,
    "synth20": lambda: synthetic(20, (0.5, 0.5), seed=20, mirror=True),
    "synth50": lambda: synthetic(50, (0.5, 0.3, 0.2), seed=50),
    "synth100": lambda: synthetic(100, (0.6, 0.4), seed=100),
    "gmm40_50d": gmm40_50d,
}


def build_real_target(name: str) -> RealTarget:
    """The target called ``name`` (one of :data:`REAL_TARGETS`)."""
    if name not in REAL_TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {list(REAL_TARGETS)}")
    return REAL_TARGETS[name]()
