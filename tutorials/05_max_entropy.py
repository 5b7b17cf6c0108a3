# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Maximum-entropy flows: a bimodal solution from two moments
#
# Among all densities on $\mathbb{R}$ with given $\mathbb{E}[z^2] = b_2$ and
# $\mathbb{E}[z^4] = b_4$, which has the greatest entropy $H(q) = -\mathbb{E}_q[\log q]$? By
# Lagrange duality the answer is the exponential family
#
# $$p^\star(z) \propto \exp(\lambda_2 z^2 + \lambda_4 z^4),$$
#
# with the $\lambda$ that match the moments. With $\lambda_2 > 0 > \lambda_4$ it is **bimodal**.
# A maximum-entropy flow network (MEFN, Loaiza-Ganem, Gao and Cunningham, ICLR 2017) finds it
# without knowing that form: it trains a normalizing flow $q_\theta$ to maximise its entropy
# under the constraints (augmented Lagrangian), which needs reparameterized samples *and* the
# exact $\log q_\theta$ of those samples. `pyro_mogflow.fit_max_entropy` does this with a
# mixture flow: a flow on a learnable mixture of Gaussians, whose components can each take one
# mode.
#
# This tutorial fits the bimodal solution with a mixture base and with a normal base (the same
# flow, the same budget) and compares both with the exact answer. Set `PYRO_MOGFLOW_FAST=1` for
# a few steps only (the tests do); the numbers in the text come from a full run, and the
# benchmark behind them is `python -m benchmarks.maxent` (its table is in the README).

# %%
import os
import sys

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # scripts and tests: no display needed

import matplotlib.pyplot as plt
import numpy as np
import torch

from pyro_mogflow import fit_max_entropy

FAST = os.environ.get("PYRO_MOGFLOW_FAST", "") == "1"
BUDGET = (
    dict(num_outer=2, num_inner=10, num_samples=64, num_eval=4096)
    if FAST
    else dict(num_outer=10, num_inner=100, num_samples=512)  # the benchmark's budget
)
torch.set_num_threads(1)

# %% [markdown]
# ## The exact answer, by quadrature
#
# Pick $\lambda_2 = 9/4$, $\lambda_4 = -1/8$: modes at $z = \pm 3$ (where
# $z^2 = -\lambda_2 / 2\lambda_4$), each about 0.34 wide, and between them a trough
# $\lambda_2^2 / (-4\lambda_4) = 10.1$ nats deep: the density at 0 is $4 \cdot 10^{-5}$ of the
# peaks'. That is what a multimodal maximum-entropy solution looks like when the modes are really
# separate, and it is hard for a flow on a unimodal base, which has to tear its mass apart across
# the trough. Simpson's rule on a fine grid gives $\log Z$, the moments
# $b = (\mathbb{E} z^2, \mathbb{E} z^4)$ the flow will be asked to match, and the exact entropy.

# %%
lam2, lam4 = 2.25, -0.125
z = np.linspace(-12, 12, 40001)
w = np.full_like(z, 2.0)
w[1::2], w[0], w[-1] = 4.0, 1.0, 1.0
w *= (z[1] - z[0]) / 3  # Simpson weights
f = lam2 * z**2 + lam4 * z**4
log_z = np.log((w * np.exp(f - f.max())).sum()) + f.max()
p_star = np.exp(f - log_z)
b = torch.tensor([(w * p_star * z**2).sum(), (w * p_star * z**4).sum()], dtype=torch.float64)
exact_entropy = float(log_z - lam2 * b[0] - lam4 * b[1])
print(f"b = {b.numpy().round(4)}, exact entropy {exact_entropy:.4f} nats")

# %% [markdown]
# ## Fit it
#
# The statistic maps points of shape `(N, 1)` to `(N, 2)`. The default estimator is
# `"stratified"`: each step draws from every component and weights the draws by the mixture
# weights, so the expectation over the discrete choice is exact. The mixture's component means
# start spread out with standard deviation $\sqrt{b_2}$ (the RMS the constraints imply; the
# default `init_spread=1` would start every component in the trough), and the weights take
# natural-gradient steps (`weight_step=0.02`) instead of Adam's, as in the benchmark. The normal
# base is the same call with `num_components=1` (one component at 0 with a learnable scale).


# %%
def statistic(x):
    return torch.cat([x**2, x**4], -1)


fits = {}
spread = float(b[0].sqrt())
for name, k in [("mixture base (K=8)", 8), ("normal base (K=1)", 1)]:
    mixture = dict(init_spread=spread, weight_step=0.02) if k > 1 else {}
    fits[name] = fit_max_entropy(
        statistic, b, dim=1, num_components=k, seed=0, progress=not FAST, **mixture, **BUDGET
    )


def kl_to_exact(res):
    """KL(q || p*) = -H(q) - lambda . E_q[T] + log Z (exact identity for an exponential family)."""
    return (
        -res.entropy - float(torch.tensor([lam2, lam4], dtype=torch.float64) @ res.moments) + log_z
    )


for name, res in fits.items():
    print(
        f"{name}: entropy {res.entropy:.4f} ± {res.entropy_se:.4f} (exact {exact_entropy:.4f}), "
        f"violation {res.violation:.1e}, KL to exact {kl_to_exact(res):.4f}"
    )

# %% [markdown]
# ## Look at them
#
# Left: both fitted densities against the exact one. Right: how the entropy and the largest
# relative constraint violation evolve over the augmented-Lagrangian iterations (the penalty
# coefficient grows while the violation does not shrink fast enough).

# %%
grid = torch.linspace(-5, 5, 1001, dtype=torch.float64).unsqueeze(-1)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
ax2 = axes[1].twinx()
axes[0].plot(z, p_star, color="k", lw=2, label="exact $p^\\star$")
for i, (name, res) in enumerate(fits.items()):
    with torch.no_grad():
        density = res.distribution.log_prob(grid).exp()
    axes[0].plot(grid[:, 0], density, color=f"C{i}", ls="--", label=name)
    steps = [h["step"] for h in res.history]
    axes[1].plot(steps, [h["entropy"] for h in res.history], color=f"C{i}", label=f"{name}: H")
    ax2.semilogy(steps, [h["violation"] for h in res.history], color=f"C{i}", ls=":")
axes[0].set_xlim(-5, 5)
axes[0].set_xlabel("z")
axes[0].legend(fontsize=8)
axes[1].axhline(exact_entropy, color="k", lw=1)
axes[1].set_xlabel("Adam step")
axes[1].set_ylabel("entropy (solid)")
ax2.set_ylabel("violation (dotted)")
axes[1].legend(fontsize=8)
fig.tight_layout()
fig.savefig("05_max_entropy.png", dpi=80)
plt.show()

# %% [markdown]
# ## What to take away
#
# * With the modes really separated, the mixture base helps, but by about 2× rather than by an
#   order of magnitude. A full run of this tutorial (2026-11-29) gave KL to the exact solution
#   0.020 with the mixture base and 0.074 with the normal base, violations below 1e-3; the
#   benchmark's runs (the README's table; seeds 0 and 1) gave 0.029 against 0.062. The normal
#   base's flow has to tear its single Gaussian apart across the trough; the mixture starts with
#   components in both modes. With the earlier, barely bimodal target (modes at $\pm 2$, a
#   4-nat barrier) both bases reached KL 0.02: there a flow on a normal base is enough.
# * The mixture needs its components spread out at the start (`init_spread`) and its weights
#   learned gently: larger natural-gradient steps chased noise (at 0.05 one mode ended with
#   69 % of the mass).
# * The reported `entropy` and `violation` are estimated from fresh exact draws of the fitted
#   distribution (randomized quasi-Monte Carlo, with standard errors), not from training batches.
# * `res.distribution` is an ordinary distribution: `sample` and an exact `log_prob`.
# * Other supports are mapped with `biject_to`: `support=constraints.positive`,
#   `constraints.interval(a, b)` or `constraints.simplex` (where entropy is measured as
#   `torch.distributions.Dirichlet.entropy` measures it). On the simplex with
#   $T(x) = \log x$ the answer is a Dirichlet, MEFN's own test case; the README's table has it.
