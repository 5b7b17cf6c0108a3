"""Deprecated location, kept for one release: import from :mod:`pyro_mogflow.infer.tempering`."""

from .tempering import *  # noqa: F401,F403
from .tempering import __all__  # noqa: F401
