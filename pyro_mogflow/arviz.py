"""Deprecated location, kept for one release; import from pyro_mogflow.diagnostics.

``to_inference_data`` now lives in :mod:`pyro_mogflow.diagnostics.export` and ``vi_loo`` in
:mod:`pyro_mogflow.diagnostics.loo`; both are exported by :mod:`pyro_mogflow.diagnostics` and by
:mod:`pyro_mogflow`. This module only re-exports them (and the two private helpers that tests
of the old module imported).
"""

from .diagnostics.export import to_inference_data
from .diagnostics.groups import _as_datatree as _as_datatree  # used by old tests
from .diagnostics.groups import _build_groups as _build_groups
from .diagnostics.loo import vi_loo

__all__ = ["to_inference_data", "vi_loo"]
