"""Test configuration: references are compared in float64.

Each test runs with ``jax_enable_x64``; tests of float32 behaviour ask for float32
arrays explicitly. The doctests under ``natgrad_jax/`` run with JAX's defaults.
"""

import jax
import pytest

from natgrad_jax._xla_flags import add_default_flag

# The suite's time is mostly XLA compiling small programs, and on the CPU most of that
# is LLVM's optimisation passes, which buy nothing at these sizes: without them the
# suite runs about a third faster. Set before jax starts a backend; the subprocesses
# (notebooks, the 8-device checks) inherit it. Benchmarks and users keep XLA's default.
add_default_flag("xla_backend_optimization_level", "0")

# Run as a subprocess by test_sharding.py: it forces 8 host devices and float64 at
# import, which must not happen inside the test session (doctest collection).
collect_ignore = ["_sharded_checks.py"]


@pytest.fixture(autouse=True)
def enable_x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
