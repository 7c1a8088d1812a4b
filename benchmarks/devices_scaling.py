"""Benchmark: natural-gradient step time with the batch sharded over 1, 2, 4, 8 devices,
and K-FAC's refreshes spread over the devices (``mesh=``) or not.

Forces 8 host devices on a CPU-only machine. Host "devices" share the machine's cores,
so on a 2-core CPU this measures the overhead of sharding (collectives, partitioned
kernels), not a speed-up; on a multi-GPU host the same script measures real scaling.
The second table trains a 512-512-512-16 MLP whose weights' columns are sharded over
the 'model' axis of a 2 × 4 mesh (the batch over 'data'), with K-FAC refreshing every
step or every 5 steps, its factorisations on every device (GSPMD) or spread over the
mesh: on host devices sharing two cores, the work every device repeats is paid eight
times, so the table shows the factorisation work removed from each device.

    python benchmarks/devices_scaling.py   # about a minute on 2 CPU cores
"""

import os

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see "CPU threads" in docs/guide.md

import time

import jax
import numpy as np
from _common import EVERY_STEP_REFRESHES, init_mlp, machine, median_ms, mlp, report_run_time, table
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import natgrad_jax as ng

BATCH = 512


def main():
    report_run_time()
    print(f"machine: {machine()}; {len(jax.devices())} devices\n")
    print(EVERY_STEP_REFRESHES + "\n")
    model = ng.Model(mlp, ng.Categorical())
    params = init_mlp(jax.random.PRNGKey(0), [64, 128, 10])
    x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, 64))
    y = jax.random.randint(jax.random.PRNGKey(2), (BATCH,), 0, 10)
    solvers = ["kronecker", "woodbury", "cg", "diagonal"]
    rows, baseline = [], {}
    for count in (1, 2, 4, 8):
        mesh = Mesh(np.array(jax.devices()[:count]), ("data",))
        replicated = NamedSharding(mesh, P())
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        ys = jax.device_put(y, NamedSharding(mesh, P("data")))
        cells = [count]
        for solver in solvers:
            optimizer = ng.natural_gradient(
                model, 0.1, fisher="monte_carlo", solver=solver, damping=1e-2
            )
            p = jax.device_put(params, replicated)
            state = jax.device_put(optimizer.init(params), replicated)

            @jax.jit
            def step(p, state, xb, yb, optimizer=optimizer):
                g = jax.grad(model.nll)(p, xb, yb)
                return optimizer.update(g, state, p, inputs=xb, targets=yb)

            ms = median_ms(step, p, state, xs, ys, repeats=10)
            baseline.setdefault(solver, ms)
            cells.append(f"{ms:.2f} ({ms / baseline[solver]:.2f}x)")
        rows.append(cells)
    print(f"MLP 64-128-10, Monte-Carlo Fisher, batch {BATCH} sharded over the devices")
    print(table(["devices", *[f"{s} ms (vs 1)" for s in solvers]], rows))
    print()
    spread_refreshes(model)


def spread_refreshes(model):
    """Step time of K-FAC on a tensor- and data-parallel 2 × 4 mesh, with and without
    ``mesh=``: median and mean of 30 steps (the mean holds the refreshes)."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    by_model = lambda a: NamedSharding(mesh, P(*[None] * (a.ndim - 1), "model"))
    params = jax.tree.map(
        lambda a: jax.device_put(a, by_model(a)), init_mlp(jax.random.PRNGKey(0), [512] * 3 + [16])
    )
    x = jax.device_put(
        jax.random.normal(jax.random.PRNGKey(1), (64, 512)), NamedSharding(mesh, P("data"))
    )
    y = jax.device_put(
        jax.random.randint(jax.random.PRNGKey(2), (64,), 0, 16), NamedSharding(mesh, P("data"))
    )
    rows = []
    for refresh_every in (1, 5):
        cells = [refresh_every]
        for placement in ({}, {"mesh": mesh}):
            optimizer = ng.natural_gradient(
                model, 0.1, solver="kronecker", damping=1e-2, decay=0.95,
                refresh_every=refresh_every, **placement,
            )  # fmt: skip

            @jax.jit
            def step(p, state, xb, yb, optimizer=optimizer):
                g = jax.grad(model.nll)(p, xb, yb)
                updates, state = optimizer.update(g, state, p, inputs=xb, targets=yb)
                return jax.tree.map(jax.numpy.add, p, updates), state

            p, state = params, optimizer.init(params)
            for _ in range(2):  # compiles for init's state layout, then for the step's
                p, state = jax.block_until_ready(step(p, state, x, y))
            times = []
            for _ in range(30):
                start = time.perf_counter()
                p, state = jax.block_until_ready(step(p, state, x, y))
                times.append(1e3 * (time.perf_counter() - start))
            cells.append(f"{np.median(times):.1f} / {np.mean(times):.1f}")
        rows.append(cells)
    print("MLP 512-512-512-16, K-FAC, weights' columns over 'model', 64 examples over 'data'")
    header = ["refresh every", "GSPMD ms (median / mean)", "mesh= ms (median / mean)"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
