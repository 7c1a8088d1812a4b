"""The import-time workaround for jax ≥ 0.10's CPU scheduler deadlock (_xla_flags)."""

import os
import subprocess
import sys
from importlib import metadata

from natgrad_jax._xla_flags import (
    FIRST_AFFECTED_JAX,
    OPTION,
    _version,
    avoid_cpu_scheduler_deadlock,
)


def test_the_option_is_added_for_affected_jax_only_and_never_overrides_the_user():
    environ = {}
    assert avoid_cpu_scheduler_deadlock(environ, "0.10.2")
    assert environ["XLA_FLAGS"] == f"--{OPTION}=false"

    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert avoid_cpu_scheduler_deadlock(environ, "0.11.0.dev20261101")
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 --{OPTION}=false"

    environ = {"XLA_FLAGS": f"--{OPTION}=true"}
    assert not avoid_cpu_scheduler_deadlock(environ, "0.10.2")
    assert environ["XLA_FLAGS"] == f"--{OPTION}=true"

    environ = {}
    assert not avoid_cpu_scheduler_deadlock(environ, "0.9.1")
    assert environ == {}


def test_importing_natgrad_jax_sets_it_before_jax_starts_a_backend():
    code = (
        "import os, natgrad_jax\n"
        "from jax._src import xla_bridge\n"
        "print(bool(xla_bridge._backends))\n"
        "print(os.environ.get('XLA_FLAGS', ''))\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    started, flags = [*result.stdout.splitlines(), ""][:2]
    assert started == "False"
    affected = _version(metadata.version("jax")) >= FIRST_AFFECTED_JAX
    assert (f"--{OPTION}=false" in flags) == affected
