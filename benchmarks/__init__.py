"""Benchmarks for pyro_mogflow: each module is one command that prints and writes its tables.

* ``python -m benchmarks.gradients``: bias, standard error and cost of the gradient estimators
  that pass through the mixture's discrete choice.
* ``python -m benchmarks.vae``: a VAE on scikit-learn's digits with Gaussian, IAF and
  mixture-flow encoders (every estimator) at equal CPU time; held-out IWAE, ELBO, NMI.
* ``python -m benchmarks.multimodal``: does a guide find every mode with the right mass?
  Pyro's guides, the design note's method and AutoMixtureFlow on six targets with ground truth.
* ``python -m benchmarks.maxent``: maximum-entropy flows against closed forms (Dirichlet,
  Gaussian, exponential, bimodal); a mixture base against a normal base, every estimator.
* ``python -m benchmarks.real_models``: ``fit()``, the plain SVI loop and Pyro's guides on models
  written as users write them (mixture, BNN, factor analysis, frequency, eight schools) and on
  20- to 100-D correlated mixtures, against exact or multi-chain NUTS ground truth.
"""
