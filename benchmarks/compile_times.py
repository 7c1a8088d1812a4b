"""Benchmark: what compiling each optimizer's step costs on the deep autoencoder.

Each row is compiled in a fresh Python process, so no row reuses another's compilation
or XLA's GEMM autotuning results (which a long-running benchmark would share between
rows). Per row it prints the seconds to trace and lower the jitted step, the seconds
XLA takes to compile it, and the size of the lowered program (StableHLO operations,
of which matmuls), next to Adam's; then the compile seconds of a second fresh process
that finds the first one's executable in JAX's persistent compilation cache
(``jax_compilation_cache_dir``), as a user's second run of a script would.

    python benchmarks/compile_times.py                 # about 3 minutes on 2 CPU cores
    python benchmarks/compile_times.py --batch 512     # as benchmarks/gpu.sh runs it

``XLA_FLAGS`` set for this script reaches every row (for instance
``--xla_gpu_autotune_level=0`` to see what GEMM autotuning costs on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

KRONECKER = dict(fisher="monte_carlo", solver="kronecker", decay=0.95)
ROWS = {  # name: the optimizer, given the model and the natgrad_jax and optax modules
    "adam": lambda model, ng, optax: optax.adam(1e-4),
    "ngd defaults": lambda model, ng, optax: ng.natural_gradient(model, 1.0),
    "ngd kronecker, every step": lambda model, ng, optax: ng.natural_gradient(
        model, 1.0, **KRONECKER
    ),
    "ngd kronecker, every step, precision highest": lambda model, ng, optax: ng.natural_gradient(
        model, 1.0, precision="highest", **KRONECKER
    ),
    "ngd kronecker, refresh every 5": lambda model, ng, optax: ng.natural_gradient(
        model, 1.0, refresh_every=5, **KRONECKER
    ),
    "ngd kronecker, fixed damping": lambda model, ng, optax: ng.natural_gradient(
        model, 1.0, **{**KRONECKER, "damping": 1e-3}
    ),
}


def measure(row: str, batch: int) -> dict:
    """Lowers and compiles one row's step in this process; the timings and sizes."""
    import jax
    import jax.numpy as jnp
    import optax
    from _common import init_mlp
    from autoencoder import SIZES, autoencoder, ngd_step, optax_step

    import natgrad_jax as ng

    model = ng.Model(autoencoder, ng.Gaussian(scale=1.0))
    optimizer = ROWS[row](model, ng, optax)
    init, step = (optax_step if row == "adam" else ngd_step)(optimizer, model)
    params = init_mlp(jax.random.PRNGKey(0), SIZES)
    x = jax.random.uniform(jax.random.PRNGKey(1), (batch, SIZES[0]), jnp.float32)
    state = init(params)
    start = time.perf_counter()
    lowered = jax.jit(step).lower(params, state, x)
    lowered_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - start
    text = lowered.as_text()
    return {
        "lower_s": lowered_s,
        "compile_s": compile_s,
        "ops": sum("stablehlo." in line for line in text.splitlines()),
        "dots": text.count("stablehlo.dot_general"),
    }


def measure_in_child(row: str, batch: int, cache: str) -> dict | None:
    """``measure`` in a fresh process whose persistent compilation cache is ``cache``."""
    environment = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
    command = [sys.executable, __file__, "--row", row, "--batch", str(batch)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if done.returncode != 0:
        print(f"{row}: failed\n{done.stderr[-2000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--only", default=None, help="rows whose name contains one of a|b|...")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # one row, in a child process
    args = parser.parse_args()
    if args.row is not None:
        print(json.dumps(measure(args.row, args.batch)))
        return

    from _common import machine, table

    print(f"deep autoencoder, batch {args.batch}; machine: {machine()}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n")
    rows = [r for r in ROWS if not args.only or any(w in r for w in args.only.split("|"))]
    if "adam" not in rows:
        rows.insert(0, "adam")
    results = {}
    for row in rows:
        with tempfile.TemporaryDirectory() as cache:
            cold, warm = (measure_in_child(row, args.batch, cache) for _ in range(2))
        if cold is None or warm is None:
            continue
        results[row] = dict(cold, cached_s=warm["compile_s"])
        r = results[row]
        print(
            f"{row}: lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s, "
            f"from the cache {r['cached_s']:.1f} s",
            flush=True,
        )
    adam = results.get("adam", {}).get("compile_s", float("nan"))
    lines = [
        [
            row,
            f"{r['lower_s']:.1f}",
            f"{r['compile_s']:.1f}",
            f"{r['compile_s'] / adam:.1f}",
            f"{r['cached_s']:.2f}",
            str(r["ops"]),
            str(r["dots"]),
        ]
        for row, r in results.items()
    ]
    header = ["optimizer", "lower s", "compile s", "x Adam", "cached s", "HLO ops", "matmuls"]
    print()
    print(table(header, lines))


if __name__ == "__main__":
    main()
