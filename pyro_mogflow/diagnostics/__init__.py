r"""Diagnostics for variational fits: ArviZ export, PSIS, VI diagnostics, VI-LOO, independent runs.

The layer above the guides and inference code; nothing below it imports it. ArviZ, scipy and
xarray are never imported at module level: ``import pyro_mogflow`` needs none of them.

Modules, each importing only those listed before it:

* :mod:`.draws` -- drawing from fitted guides and scoring each draw under the model;
* :mod:`.groups` -- the ArviZ groups: built from draws, packaged for the installed ArviZ, read
  back;
* :mod:`.importance` -- :func:`psis`, :func:`good_k_threshold` and the evidence estimate;
* :mod:`.export` -- :func:`to_inference_data`;
* :mod:`.loo` -- :func:`vi_loo`, PSIS-LOO with the approximate-posterior correction;
* :mod:`.vi` -- :func:`vi_diagnostics` and its :class:`VIDiagnostics` report;
* :mod:`.independent` -- :func:`fit_independent` and :class:`IndependentFits`, the runs whose
  comparison reveals a missed mode.
"""

from .export import to_inference_data
from .importance import good_k_threshold, psis
from .independent import IndependentFits, fit_independent
from .loo import vi_loo
from .vi import MISSED_MODES_WARNING, VIDiagnostics, VIDiagnosticsWarning, vi_diagnostics

__all__ = [
    "MISSED_MODES_WARNING",
    "IndependentFits",
    "VIDiagnostics",
    "VIDiagnosticsWarning",
    "fit_independent",
    "good_k_threshold",
    "psis",
    "to_inference_data",
    "vi_diagnostics",
    "vi_loo",
]
