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
# # Why guides miss modes, and how AutoMixtureFlow finds them
#
# A variational guide is fitted by minimising the reverse KL divergence
# $\mathrm{KL}(q \,\|\, p) = \mathbb{E}_q[\log q - \log p]$. This tutorial shows, on a posterior
# with nine modes and on a real regression with two,
#
# 1. why Pyro's guides settle on one mode (and why a mixture guide alone is not enough),
# 2. the three things `pyro_mogflow.fit` does by default so that `AutoMixtureFlow` finds every
#    mode with the right mass: components started over the prior, tempering, and natural
#    gradients for the mixture,
# 3. how to check the result.
#
# Set `PYRO_MOGFLOW_FAST=1` to run with a few optimisation steps (the tests do); the numbers
# quoted in the text are from a full run. The benchmark behind every default is
# `python -m benchmarks.multimodal` (its table is in the README).

# %%
import math
import os
import sys

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # scripts and tests: no display needed

import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal
from pyro.infer.importance import vectorized_importance_weights

from pyro_mogflow import AutoMixtureFlow, fit
from pyro_mogflow.examples import gaussian_mixture_target, sign_regression
from pyro_mogflow.infer import default_beta_schedule

FAST = os.environ.get("PYRO_MOGFLOW_FAST", "") == "1"
STEPS = 80 if FAST else 2000
K = 16 if FAST else 64
torch.set_num_threads(1)

# %% [markdown]
# ## A posterior with nine modes
#
# Nine equal Gaussians (standard deviation 0.5) on the grid $\{-5, 0, 5\}^2$, written as a Pyro
# model with `pyro.factor`, so the evidence is known: $\log Z = 0$. The model's "prior"
# $\mathcal{N}(0, 10^2 I)$ is cancelled by the factor; like a real prior it says where the latent
# can live.

# %%
ticks = (-5.0, 0.0, 5.0)
target = gaussian_mixture_target([[a, b] for a in ticks for b in ticks], scales=0.5)
args, kwargs = target.args, target.kwargs


def reverse_kl(guide, num_samples=4000):
    """KL(q || p) = log Z - ELBO, from num_samples draws of the guide (log Z = 0 here)."""
    with torch.no_grad():
        log_w = vectorized_importance_weights(
            target.model, guide, *args, num_samples=num_samples, max_plate_nesting=0, **kwargs
        )[0]
    return float(target.log_z - log_w.mean())


def draws(guide, n=1000):
    """n draws of z from any guide (vectorized)."""
    predictive = Predictive(
        target.model, guide=guide, num_samples=n, parallel=True, return_sites=["z"]
    )
    with torch.no_grad():
        return predictive(*args, **kwargs)["z"].reshape(n, 2)


grid = torch.linspace(-8, 8, 161)
gx, gy = torch.meshgrid(grid, grid, indexing="xy")
log_p = target.log_joint_batch({"z": torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)})
log_p = log_p.reshape(gx.shape)


def show(panels, beta=1.0):
    """Contours of p^beta and each guide's draws, one panel per guide."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.3), squeeze=False)
    for ax, (title, z) in zip(axes[0], panels.items()):
        ax.contour(gx, gy, beta * log_p, levels=8, colors="0.6", linewidths=0.6)
        if z is not None:
            ax.scatter(z[:, 0], z[:, 1], s=2, alpha=0.4, color="C3")
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
    fig.tight_layout()
    plt.show()


def modes_found(guide):
    masses = target.mode_masses(draws(guide, 4000))
    return int((masses > 0.2 * target.reference_masses).sum())


# %% [markdown]
# ## Pyro's guides find one mode
#
# Train `AutoNormal` and `AutoIAFNormal` the usual way.


# %%
def train(guide, steps=STEPS, particles=8):
    pyro.clear_param_store()
    svi = SVI(
        target.model,
        guide,
        pyro.optim.Adam({"lr": 0.02}),
        Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=0),
    )
    for _ in range(steps):
        svi.step(*args, **kwargs)
    return guide


pyro.set_rng_seed(0)
normal = train(AutoNormal(target.model))
iaf = train(AutoIAFNormal(target.model, num_transforms=2))
for name, g in (("AutoNormal", normal), ("AutoIAFNormal", iaf)):
    print(f"{name:14s} modes found {modes_found(g)}/9, KL(q||p) = {reverse_kl(g):.3f}")
print(f"one mode fitted exactly would have KL(q||p) = log 9 = {math.log(9):.3f}")
show({"AutoNormal": draws(normal), "AutoIAFNormal": draws(iaf)})

# %% [markdown]
# Reverse KL is *mode seeking*: $\mathbb{E}_q[\log q - \log p]$ punishes $q$ for putting mass
# where $p$ has none, and says nothing about mass of $p$ that $q$ never visits. A guide that
# fits one of nine equal modes perfectly pays only $\log 9 \approx 2.2$ nats, while a guide
# stretched over all nine would pay for every valley between them. Gradients see only where
# $q$ samples, so once $q$ sits on a mode nothing pulls it to the others.
#
# ## A mixture is not enough on its own
#
# Give the guide 64 components, but train it like the guides above: components started near
# one point (the former initialisation, `init_spread=1.0`), plain `Trace_ELBO`, Adam on every
# parameter.

# %%
pyro.set_rng_seed(0)
plain = train(
    AutoMixtureFlow(target.model, num_components=K, estimator="implicit", init_spread=1.0)
)
print(f"plain mixture: modes found {modes_found(plain)}/9, KL(q||p) = {reverse_kl(plain):.3f}")
show({"mixture, plain SVI": draws(plain)})

# %% [markdown]
# In a full run it finds 3 of the 9 modes ($\mathrm{KL} = 1.49$). The components start within
# a unit of the origin, where only the central mode's basin is felt, and each follows its own
# gradient into the nearest basin; the weights then drift slowly under Adam. The design note's Gumbel-softmax estimator is worse: its objective is
# unbounded (the README has the measurement), so it shrinks the components instead.
#
# ## What `fit` does by default
#
# `fit(model, *args)` trains `AutoMixtureFlow(model)` (64 components, no flow, the stratified
# estimator) with three mode-discovery devices, each chosen by the benchmark:
#
# 1. **Components start over the prior** (`init_spread="prior"`): each mean is an independent
#    draw of the model's prior, mapped to the unconstrained space.
# 2. **Tempering.** The likelihood is raised to a power $\beta$ that grows geometrically from
#    0.01 to 1 over the first half of the steps. At small $\beta$ the target is nearly the
#    prior, broad and unimodal; as $\beta$ grows, it splits into modes and the components,
#    already spread out, split with it:

# %%
schedule = default_beta_schedule(STEPS)
betas = [schedule(0), schedule(STEPS // 6), schedule(STEPS // 3), 1.0]
prior = dist.Normal(0.0, 10.0).log_prob(torch.stack([gx, gy], -1)).sum(-1)
fig, axes = plt.subplots(1, 4, figsize=(13, 3.3))
for ax, beta in zip(axes, betas):
    # observed-only tempering: log p_beta = log prior + beta * (log p - log prior)
    ax.contour(gx, gy, prior + beta * (log_p - prior), levels=8, colors="0.5", linewidths=0.6)
    ax.set_title(f"beta = {beta:.3g}", fontsize=9)
    ax.set_aspect("equal")
fig.tight_layout()
plt.show()

# %% [markdown]
# 3. **Natural gradients for the mixture.** With $L_k = \mathbb{E}_{q_k}[\log p - \log q]$,
#    the weights take multiplicative steps $\log \pi_k \mathrel{+}= \eta (L_k - \sum_j \pi_j
#    L_j)$ (the natural gradient on the simplex), and each component's gradient is divided by
#    its weight, so a component whose weight collapsed keeps moving until it finds an empty
#    mode. After the last step the weights are set to the posterior mass each component
#    accounts for (importance-weighted, `balance="forward"`).

# %%
pyro.clear_param_store()
pyro.set_rng_seed(0)
guide, losses = fit(
    target.model,
    *args,
    guide=AutoMixtureFlow(target.model, num_components=K),
    num_steps=STEPS,
    model_kwargs=kwargs,
    progress=False,
)
print(f"fit(): modes found {modes_found(guide)}/9, KL(q||p) = {reverse_kl(guide):.3f}")
masses = target.mode_masses(draws(guide, 20000))
print(
    "mass near each mode:",
    [round(float(m), 3) for m in masses],
    f"(exact {float(target.reference_masses[0]):.3f} each)",
)
show({"fit() with its defaults": draws(guide)})

# %% [markdown]
# All nine modes, each with its ninth of the mass (0.108-0.112 against 0.110), and
# $\mathrm{KL}(q\|p) = 0.008$ in a full run (9 of 9 modes in 5 of 5 seeds in the benchmark).
# `guide.components()` lists what the guide found: several components may share a mode (their
# weights add up), and the rest end with negligible weight, which costs only their model
# evaluations.

# %%
found = guide.components(*args, **kwargs)
order = found["weights"].argsort(descending=True)
for w, z in zip(found["weights"][order][:10], found["latent"][order][:10]):
    print(f"weight {float(w):.3f}  at ({float(z[0]):+.2f}, {float(z[1]):+.2f})")

# %% [markdown]
# ## A real model: a sign the data cannot see
#
# $y_i \sim \mathcal{N}(|\theta| x_i, \sigma)$ with $\theta \sim \mathcal{N}(0, 3^2)$,
# $\sigma \sim \mathrm{HalfNormal}(1)$: two mirror modes $\theta \approx \pm 1.5$ of equal mass,
# a positive site, observed data. Nothing changes in the call.

# %%
reg = sign_regression()
pyro.clear_param_store()
pyro.set_rng_seed(0)
reg_guide, _ = fit(
    reg.model,
    *reg.args,
    guide=AutoMixtureFlow(reg.model, num_components=K),
    num_steps=STEPS,
    model_kwargs=reg.kwargs,
    progress=False,
)
theta = reg_guide.sample_posterior(20000, *reg.args, **reg.kwargs)["theta"]
print(
    "mass near theta = -1.5, +1.5:",
    [round(float(m), 3) for m in reg.mode_masses(theta)],
    "exact:",
    [round(float(m), 3) for m in reg.reference_masses],
)
plt.figure(figsize=(5, 3))
plt.hist(theta.numpy(), bins=200, density=True, color="C3", alpha=0.7)
plt.xlabel("theta")
plt.title("fit(): posterior of theta in the sign regression", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Checking the result
#
# A guide's own diagnostics cannot see a mode it never visits (tutorial 03 shows a fit with a
# fine Pareto $\hat k$ and a missing mode). Two checks that can: compare independent fits
# (`fit_independent`, then `vi_diagnostics`), and, where the model allows it, compare the
# importance-sampling evidence of fits started from different seeds. In the benchmark the
# defaults cover every mode of `grid9`, `ring8`, the sign regression and a 10-D mixture with
# weights 0.5/0.3/0.2 in every seed, and 37-40 of the 40 modes of the FAB mixture
# (`python -m benchmarks.multimodal --suite full`).
#
# What the defaults cost: with `estimator="stratified"` every step evaluates the model once
# per component (64 times). For an expensive model pass `num_components=` a smaller number:
# 16 to 32 components were enough for up to about ten modes in the benchmark.
