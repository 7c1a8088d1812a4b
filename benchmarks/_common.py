"""Shared helpers of the benchmark scripts: data, models, timing and tables."""

from __future__ import annotations

import argparse
import atexit
import importlib
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def optional_import(name: str):
    """The module ``name``, or None with a printed reason if importing it fails in any way.

    An optional peer may be absent (ImportError) or present but broken on this jax
    (kfac-jax 0.0.8 raises AttributeError on jax ≥ 0.11): either way its rows are
    skipped and the others still print.
    """
    try:
        return importlib.import_module(name)
    except Exception as error:
        print(f"{name} is skipped: importing it failed with {type(error).__name__}: {error}")
        return None


def adaptive_kfac_optimizer(kfac_jax, loss):
    """kfac-jax's optimizer in its adaptive configuration (as in its examples): learning
    rate, momentum and damping all adapted, for ``loss(params, batch)`` that registers
    its likelihood."""
    return kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss),
        l2_reg=0.0,
        use_adaptive_learning_rate=True,
        use_adaptive_momentum=True,
        use_adaptive_damping=True,
        initial_damping=1.0,
        multi_device=False,
    )


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    except OSError:
        pass
    return f"{device.platform.upper()} ({device.device_kind}); host {cpu}; jax {jax.__version__}"


RESULTS = pathlib.Path(__file__).parent / "results"
DOCS_IMAGES = pathlib.Path(__file__).parent.parent / "docs" / "images"


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--update-docs``: write figures over the tracked ones in docs/images/."""
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help=f"write figures to {DOCS_IMAGES} (tracked) instead of {RESULTS} (ignored by git)",
    )


def output_path(args: argparse.Namespace, filename: str) -> pathlib.Path:
    """Where a figure goes: benchmarks/results/ unless ``--update-docs`` was given."""
    folder = DOCS_IMAGES if args.update_docs else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    return folder / filename


def report_run_time() -> None:
    """Prints, when the script ends, how long it ran (the figure docstrings quote)."""
    start = time.perf_counter()
    atexit.register(lambda: print(f"\n(ran in {(time.perf_counter() - start) / 60:.1f} min)"))


def seed_summary(values, limit) -> str:
    """``median [min–max]`` over seeds; ``None`` (not reached within ``limit``) counts as
    +∞ and shows as ``>limit``."""
    finite = [np.inf if v is None else float(v) for v in values]

    def show(value):
        return f">{limit}" if np.isinf(value) else f"{value:g}"

    return f"{show(np.median(finite))} [{show(min(finite))}–{show(max(finite))}]"


def init_mlp(key, sizes, dtype=jnp.float32):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n), dtype) / jnp.sqrt(m), "b": jnp.zeros(n, dtype)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


# Printed by the scripts that time one update repeated from the same state.
EVERY_STEP_REFRESHES = (
    "each timed update measures the curvature and factorises it (refresh_every=1, the "
    "default of an explicit solver), so its median is also the amortised time per step"
)


def block(tree):
    return jax.block_until_ready(tree)


def median_ms(fn, *args, repeats=20):
    """Median wall time of ``fn(*args)`` in milliseconds, after one warm-up call."""
    block(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def table(header, rows) -> str:
    """A plain-text table with right-aligned columns."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[k]) for row in cells) for k in range(len(header))]
    lines = [
        "  ".join(
            c.rjust(w) if k else c.ljust(w)
            for k, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def progress(message: str) -> None:
    print(f"  .. {message}", flush=True)
