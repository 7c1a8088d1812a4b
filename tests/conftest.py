"""Test configuration: references are compared in float64.

Each test runs with ``jax_enable_x64``; tests of float32 behaviour ask for float32
arrays explicitly. The doctests under ``natgrad_jax/`` run with JAX's defaults.
"""

import jax
import pytest


@pytest.fixture(autouse=True)
def enable_x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
