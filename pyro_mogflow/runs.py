"""Deprecated location, kept for one release; import from pyro_mogflow.diagnostics.

``fit_independent`` and ``IndependentFits`` now live in
:mod:`pyro_mogflow.diagnostics.independent`; both are exported by
:mod:`pyro_mogflow.diagnostics` and by :mod:`pyro_mogflow`. This module only re-exports them.
"""

from .diagnostics.independent import IndependentFits, fit_independent

__all__ = ["IndependentFits", "fit_independent"]
