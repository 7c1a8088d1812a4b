"""A workaround, applied when natgrad_jax is imported, for a deadlock of jax ≥ 0.10's CPU
runtime.

With XLA's concurrency-optimised scheduler (the CPU default from jax 0.10), a compiled
K-FAC step of a network with wide layers (784-100-784 and larger, Monte-Carlo Fisher)
intermittently never completes: ``block_until_ready`` waits for ever while every XLA
worker thread waits for work. Turning that scheduler off avoided it in every run here;
jax 0.9.1 never showed it. The flag must be set before jax starts its CPU backend, so
it is added to ``XLA_FLAGS`` at import, unless ``XLA_FLAGS`` already sets it (to either
value: pass ``--xla_cpu_enable_concurrency_optimized_scheduler=true`` to keep XLA's
default). Importing natgrad_jax after jax has run a computation leaves the backend as it
is; set the flag in the environment then.
"""

from __future__ import annotations

import os
import re
from importlib import metadata

OPTION = "xla_cpu_enable_concurrency_optimized_scheduler"
FIRST_AFFECTED_JAX = (0, 10)


def _version(text: str) -> tuple[int, int]:
    major, minor = (re.match(r"\d+", part) for part in text.split(".")[:2])
    return int(major.group()), int(minor.group())


def add_default_flag(option: str, value: str, environ=os.environ) -> bool:
    """Adds ``--option=value`` to ``XLA_FLAGS`` unless the option is already set there
    (to any value); returns whether it did."""
    flags = environ.get("XLA_FLAGS", "")
    if option in flags:
        return False
    environ["XLA_FLAGS"] = f"{flags} --{option}={value}".strip()
    return True


def avoid_cpu_scheduler_deadlock(environ=os.environ, jax_version: str | None = None) -> bool:
    """Adds ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` to ``XLA_FLAGS``
    for jax ≥ 0.10 unless the option is already there; returns whether it did."""
    if jax_version is None:
        jax_version = metadata.version("jax")
    if _version(jax_version) < FIRST_AFFECTED_JAX:
        return False
    return add_default_flag(OPTION, "false", environ)
