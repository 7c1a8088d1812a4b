"""Benchmark: a physics-informed network for the 2-D Poisson equation, NGD vs Adam.

−Δu = f on the unit square with u = 0 on the boundary, f = 2π² sin(πx) sin(πy), whose
solution is u* = sin(πx) sin(πy). The PDE and boundary residuals are the outputs of a
Gaussian model with target 0, so the loss is the mean squared residual and the exact
Fisher is the Gauss–Newton matrix of the residuals: natural gradient is "energy natural
gradient" (Müller & Zeinhofer 2023), here with a backtracking line search on its step.
Reports the relative L2 error of u against u* on a test grid after a fixed budget.

    python benchmarks/pinn_poisson.py        # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import init_mlp, machine, progress, report_run_time, table  # noqa: E402

import natgrad_jax as ng  # noqa: E402


def network(params, point):
    return init_free_mlp(params, point[None])[0, 0]


def init_free_mlp(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def source(point):
    return 2 * jnp.pi**2 * jnp.sin(jnp.pi * point[0]) * jnp.sin(jnp.pi * point[1])


def residuals(params, inputs):
    """inputs (N, 3): a point and a flag, 1 on the boundary. Outputs (N, 1) residuals."""

    def one(row):
        point, on_boundary = row[:2], row[2]
        laplacian = jnp.trace(jax.hessian(lambda p: network(params, p))(point))
        return jnp.where(on_boundary > 0, network(params, point), -laplacian - source(point))

    return jax.vmap(one)(inputs)[:, None]


def collocation(interior_side=20, boundary_per_side=25):
    grid = (np.arange(interior_side) + 0.5) / interior_side
    interior = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
    t = np.linspace(0, 1, boundary_per_side, endpoint=False)
    zeros, ones = np.zeros_like(t), np.ones_like(t)
    boundary = np.concatenate(
        [np.stack(p, 1) for p in [(t, zeros), (ones, t), (1 - t, ones), (zeros, 1 - t)]]
    )
    points = np.concatenate([interior, boundary])
    flags = np.concatenate([np.zeros(len(interior)), np.ones(len(boundary))])
    return jnp.asarray(np.concatenate([points, flags[:, None]], axis=1))


def relative_l2_error(params):
    grid = np.linspace(0, 1, 61)
    points = jnp.asarray(np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2))
    exact = jnp.sin(jnp.pi * points[:, 0]) * jnp.sin(jnp.pi * points[:, 1])
    approx = init_free_mlp(params, points)[:, 0]
    return float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))


def run(optimizer, model, params, inputs, steps, *, line_search):
    targets = jnp.zeros((inputs.shape[0], 1))
    value_fn = lambda p: model.nll(p, inputs, targets)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        value, grad = jax.value_and_grad(value_fn)(params)
        extra = {"inputs": inputs, "targets": targets}
        if line_search:  # the line search evaluates model.nll(params, inputs, targets)
            extra.update(value=value, grad=grad, value_fn=model.nll)
        updates, state = optimizer.update(grad, state, params, **extra)
        return optax.apply_updates(params, updates), state

    start = time.perf_counter()
    for _ in range(steps):
        params, state = step(params, state)
    jax.block_until_ready(params)
    return relative_l2_error(params), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ngd-steps", type=int, default=100)
    args = parser.parse_args()
    report_run_time()
    print(f"machine: {machine()}\n")
    model = ng.Model(residuals, ng.Gaussian(scale=1.0))
    inputs = collocation()
    params = init_mlp(jax.random.PRNGKey(0), [2, 16, 16, 1], jnp.float64)
    num_params = sum(p.size for p in jax.tree.leaves(params))
    ngd = optax.chain(
        ng.scale_by_natural_gradient(model, damping=1e-10, solver="dense"),
        optax.scale(-1.0),
        optax.scale_by_backtracking_linesearch(max_backtracking_steps=30),
    )
    adam_steps = 10 * args.ngd_steps
    rows = []
    progress(f"natural gradient, {args.ngd_steps} steps")
    error, seconds = run(ngd, model, params, inputs, args.ngd_steps, line_search=True)
    rows.append(
        ["energy natural gradient + line search", args.ngd_steps, f"{error:.2e}", f"{seconds:.1f}"]
    )
    for lr in (1e-3, 1e-2):
        progress(f"adam lr={lr:g}, {adam_steps} steps")
        schedule = optax.exponential_decay(lr, transition_steps=adam_steps, decay_rate=0.1)
        error, seconds = run(
            optax.adam(schedule), model, params, inputs, adam_steps, line_search=False
        )
        rows.append(
            [f"adam lr={lr:g} (decayed ×0.1)", adam_steps, f"{error:.2e}", f"{seconds:.1f}"]
        )
    print(
        f"\nPINN, 2-D Poisson, MLP 2-16-16-1 (P = {num_params}), {inputs.shape[0]} collocation points, float64"
    )
    print(table(["optimizer", "steps", "relative L2 error", "seconds"], rows))


if __name__ == "__main__":
    main()
