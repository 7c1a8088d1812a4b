"""Test configuration: references are compared in float64.

Each test runs with ``jax_enable_x64``; tests of float32 behaviour ask for float32
arrays explicitly. The doctests under ``natgrad_jax/`` run with JAX's defaults.
"""

import jax
import pytest

# Run as a subprocess by test_sharding.py: it forces 8 host devices and float64 at
# import, which must not happen inside the test session (doctest collection).
collect_ignore = ["_sharded_checks.py"]


@pytest.fixture(autouse=True)
def enable_x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
