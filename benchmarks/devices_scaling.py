"""Benchmark: natural-gradient step time with the batch sharded over 1, 2, 4, 8 devices.

Forces 8 host devices on a CPU-only machine. Host "devices" share the machine's cores,
so on a 2-core CPU this measures the overhead of sharding (collectives, partitioned
kernels), not a speed-up; on a multi-GPU host the same script measures real scaling.

    python benchmarks/devices_scaling.py
"""

import os

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see "CPU threads" in docs/guide.md

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


if __name__ == "__main__":
    main()
