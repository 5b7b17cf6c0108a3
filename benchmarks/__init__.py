"""Benchmarks for pyro_mogflow: each module is one command that prints and writes its tables.

* ``python -m benchmarks.gradients``: bias, standard error and cost of the gradient estimators
  that pass through the mixture's discrete choice.
"""
