"""Test configuration: references are compared in float64.

Each test runs with ``jax_enable_x64``; tests of float32 behaviour ask for float32
arrays explicitly. The doctests under ``natgrad_jax/`` run with JAX's defaults.
"""

import os

# The suite's time is mostly XLA compiling small programs, and on the CPU most of that
# is LLVM's optimisation passes, which buy nothing at these sizes: without them the
# suite runs about a third faster. Set before jax starts a backend; the subprocesses
# (notebooks, the 8-device checks) inherit it. Benchmarks and users keep XLA's default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags.strip()

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
