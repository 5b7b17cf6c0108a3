"""Built-in example targets and the demo: a side room of the package, never imported by it.

* :mod:`pyro_mogflow.examples.targets` -- :class:`~pyro_mogflow.examples.Target` (a Pyro model
  with known ground truth about its multimodal posterior) and the one definition of the mass
  near a mode, :func:`~pyro_mogflow.examples.mode_masses`, that the demo, the tutorials and the
  benchmarks share.
* :mod:`pyro_mogflow.examples.regression` -- :func:`~pyro_mogflow.examples.sign_regression`.
* :mod:`pyro_mogflow.examples.mixtures` -- :func:`~pyro_mogflow.examples.gaussian_mixture_target`
  and :func:`~pyro_mogflow.examples.label_switching_mixture`.
* :mod:`pyro_mogflow.examples.demo` -- ``python -m pyro_mogflow demo``: AutoNormal and
  AutoMixtureFlow on a posterior with two modes.

The targets are re-exported here; import the demo from its module.
"""

from . import mixtures, regression, targets
from .mixtures import *  # noqa: F403
from .regression import *  # noqa: F403
from .targets import *  # noqa: F403

__all__ = [*targets.__all__, *regression.__all__, *mixtures.__all__]
