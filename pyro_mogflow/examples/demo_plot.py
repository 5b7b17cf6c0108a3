"""The demo's figure: the exact posterior and each guide's samples, side by side."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .targets import Target

if TYPE_CHECKING:
    from .demo import GuideReport

__all__ = ["plot_posteriors"]


def _exact_grid(target: Target, theta_lim: float, sigma_lo: float, sigma_hi: float):
    """Exact unnormalised log posterior of the demo model on a (theta, sigma) grid."""
    x = target.args[0]
    theta = torch.linspace(-theta_lim, theta_lim, 301, dtype=torch.float64)
    sigma = torch.linspace(sigma_lo, sigma_hi, 161, dtype=torch.float64)
    tt, ss = torch.meshgrid(theta, sigma, indexing="ij")
    values = {
        "theta": tt.reshape(-1).to(dtype=x.dtype, device=x.device),
        "sigma": ss.reshape(-1).to(dtype=x.dtype, device=x.device),
    }
    logp = target.log_joint_batch(values).double().cpu().reshape(tt.shape)
    return theta, sigma, logp


def plot_posteriors(target: Target, reports: list[GuideReport], path: str | os.PathLike) -> Path:
    """Save a PNG: each guide's samples of ``(theta, sigma)`` over the exact posterior's contours,
    and the marginal of ``theta`` (exact curve and guide histograms).

    matplotlib is imported here, with the non-interactive Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    theta_star = float(target.modes.abs().max())
    sigma_star = float(target.truth["sigma"])
    lim = 2.0 * theta_star
    theta, sigma, logp = _exact_grid(target, lim, 0.4 * sigma_star, 1.9 * sigma_star)
    density = (logp - logp.max()).exp()
    marginal = density.sum(1)
    marginal = marginal / torch.trapezoid(marginal, theta)
    colours = {"AutoNormal": "tab:orange", "AutoMixtureFlow": "tab:blue"}

    fig, axes = plt.subplots(1, len(reports) + 1, figsize=(5.2 * (len(reports) + 1), 4.4))
    for ax, r in zip(axes, reports):
        ax.contour(
            theta.numpy(),
            sigma.numpy(),
            density.T.numpy(),
            levels=[math.exp(-4.5), math.exp(-2.0), math.exp(-0.5)],
            colors="black",
            linewidths=0.8,
        )
        th, sg = r.samples["theta"][:1500].double(), r.samples["sigma"][:1500].double()
        ax.scatter(th, sg, s=4, alpha=0.35, color=colours.get(r.name, "tab:green"), label="guide")
        ax.plot(
            target.modes.cpu().double(),
            [sigma_star] * target.num_modes,
            "kx",
            ms=9,
            label=r"true $\pm\theta^\star$",
        )
        ax.set_xlim(-lim, lim)
        ax.set_ylim(float(sigma[0]), float(sigma[-1]))
        ax.set_xlabel(r"$\theta$")
        ax.set_ylabel(r"$\sigma$")
        ax.set_title(
            f"{r.name}: {r.modes_found}/{target.num_modes} modes, ELBO {r.elbo:.2f}", fontsize=11
        )
        ax.legend(loc="upper right", fontsize=8)
    ax = axes[-1]
    bins = torch.linspace(-lim, lim, 81)
    for r in reports:
        ax.hist(
            r.samples["theta"].double().clamp(-lim, lim).numpy(),
            bins=bins.numpy(),
            density=True,
            alpha=0.45,
            color=colours.get(r.name, "tab:green"),
            label=r.name,
        )
    ax.plot(theta.numpy(), marginal.numpy(), "k-", lw=1.2, label="exact posterior")
    ax.set_xlim(-lim, lim)
    ax.set_xlabel(r"$\theta$")
    ax.set_ylabel("density")
    ax.set_title(r"marginal posterior of $\theta$", fontsize=11)
    ax.legend(fontsize=8)
    fig.suptitle(
        r"$y_i \sim \mathcal{N}(|\theta|\,x_i,\ \sigma^2)$: the sign of $\theta$ is not "
        f"identified ({target.args[0].shape[0]} points, exact log Z = {target.log_z:.2f})",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- main
