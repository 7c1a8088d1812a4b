"""Test configuration: references are compared in float64.

Each test runs with ``jax_enable_x64``; tests of float32 behaviour ask for float32
arrays explicitly. The doctests under ``natgrad_jax/`` run with JAX's defaults.
"""

import os

import jax
import pytest


def add_default_flag(option: str, value: str) -> None:
    """Adds ``--option=value`` to ``XLA_FLAGS`` unless the option is already set there
    (to any value: a run can override the suite's choice)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if option not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --{option}={value}".strip()


# The suite's time is mostly XLA compiling small programs, and on the CPU most of that
# is LLVM's optimisation passes, which buy nothing at these sizes: without them the
# suite runs about a third faster. XLA's default CPU fusion emitters take longer again
# than its classic ones (``xla_cpu_use_fusion_emitters=false``): with the classic ones
# XLA compiled test_kronecker.py's programs in 42% of the time (52 s to 22 s, jax
# 0.10.2; 54 s to 23 s, jax 0.9.1). Set before jax starts a backend;
# the subprocesses (notebooks, the 8-device checks) inherit them. Benchmarks and users
# keep XLA's defaults.
add_default_flag("xla_backend_optimization_level", "0")
add_default_flag("xla_cpu_use_fusion_emitters", "false")

# Run as a subprocess by test_sharding.py: it forces 8 host devices and float64 at
# import, which must not happen inside the test session (doctest collection).
collect_ignore = ["_sharded_checks.py"]


@pytest.fixture(autouse=True)
def enable_x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
