"""Built-in example targets and the demo: a side room of the package, never imported by it.

* :mod:`pyro_mogflow.examples.targets` -- Pyro models whose posteriors have several modes, with
  known ground truth (:class:`~pyro_mogflow.examples.targets.Target`), and the one definition of
  the mass near a mode (:func:`~pyro_mogflow.examples.targets.mode_masses`) that the demo, the
  tutorials and the benchmarks share.
* :mod:`pyro_mogflow.examples.demo` -- ``python -m pyro_mogflow demo``: AutoNormal and
  AutoMixtureFlow on a posterior with two modes.

The targets are re-exported here; import the demo from its module (it needs matplotlib only to
plot).
"""

from . import targets
from .targets import *  # noqa: F403 (the public names of the targets module)

__all__ = list(targets.__all__)
