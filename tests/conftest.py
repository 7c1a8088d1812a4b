"""Test configuration: references are compared in float64.

Each test runs with ``jax_enable_x64``; tests of float32 behaviour ask for float32
arrays explicitly. The doctests under ``natgrad_jax/`` run with JAX's defaults.
"""

import os
import subprocess
import sys

import jax
import pytest


def xla_knows(flags: str) -> bool:
    """Whether this jaxlib's XLA starts with ``flags`` in ``XLA_FLAGS``: XLA aborts the
    process on a flag it does not know, and releases remove flags (jax 0.12 removed
    ``xla_cpu_use_fusion_emitters``), so each is tried in a child process first."""
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}"}
    check = "import jax.numpy as jnp; jnp.zeros(2).block_until_ready()"
    child = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True)
    return child.returncode == 0


def add_default_flags(flags: dict[str, str]) -> None:
    """Adds ``--option=value`` to ``XLA_FLAGS`` for each option not set there already (to
    any value: a run can override the suite's choice) and known to the running XLA.
    pytest's workers inherit the main process's choice and find nothing left to add."""
    current = os.environ.get("XLA_FLAGS", "")
    wanted = [f"--{option}={value}" for option, value in flags.items() if option not in current]
    if not wanted:
        return
    if not xla_knows(" ".join(wanted)):
        wanted = [flag for flag in wanted if xla_knows(flag)]
    os.environ["XLA_FLAGS"] = " ".join([current, *wanted]).strip()


# The suite's time is mostly XLA compiling small programs, and on the CPU most of that
# is LLVM's optimisation passes, which buy nothing at these sizes: without them the
# suite runs about a third faster. XLA's default CPU fusion emitters take longer again
# than its classic ones (``xla_cpu_use_fusion_emitters=false``, a flag jax 0.12's XLA
# no longer has): with the classic ones XLA compiled test_kronecker.py's programs in 42%
# of the time (52 s to 22 s, jax 0.10.2; 54 s to 23 s, jax 0.9.1). Set before jax
# starts a backend; the subprocesses (notebooks, the 8-device checks) inherit them.
# Benchmarks and users keep XLA's defaults.
add_default_flags({"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false"})

# One OpenBLAS thread for jaxlib's CPU factorisations: with two workers on two cores,
# OpenBLAS's own pool would compete with XLA's (see "CPU threads" in docs/guide.md).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Run as a subprocess by test_sharding.py: it forces 8 host devices and float64 at
# import, which must not happen inside the test session (doctest collection).
collect_ignore = ["_sharded_checks.py"]


@pytest.fixture(autouse=True)
def enable_x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
