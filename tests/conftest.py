"""Shared test fixtures: every test starts with an empty param store and a fixed seed."""

import pyro
import pytest


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Clear Pyro's global param store and fix every RNG seed before (and after) each test."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
