"""Benchmark: a physics-informed network for the 2-D Poisson equation, to 1e-7.

−Δu = f on the unit square with u = 0 on the boundary, f = 2π² sin(πx) sin(πy), whose
solution is u* = sin(πx) sin(πy). The PDE and boundary residuals are the outputs of a
Gaussian model with target 0, so the loss is the mean squared residual and the exact
Fisher is the Gauss–Newton matrix of the residuals: natural gradient is "energy natural
gradient" (ENGD, Müller & Zeinhofer 2023), here with a backtracking line search on its
step. The network (P = 1,185) has more parameters than there are residuals (500), so
the Woodbury solve through the 500×500 kernel of the residual rows (Guzmán-Cordero et
al. 2025) replaces the 1,185×1,185 dense one, optionally with SPRING momentum
(Goldshlager et al. 2024). Reports, for each optimizer, the steps and seconds (training
steps only, compilation excluded) until the relative L2 error of u against u* on a test
grid first falls below 1e-5, 1e-6 and 1e-7, and the error at the end of its budget.

    python benchmarks/pinn_poisson.py        # about 6 minutes on 2 CPU cores
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see "CPU threads" in docs/guide.md

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import init_mlp, machine, progress, report_run_time, table  # noqa: E402

import natgrad_jax as ng  # noqa: E402

SIZES = [2, 32, 32, 1]


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


THRESHOLDS = (1e-5, 1e-6, 1e-7)


def run(optimizer, model, params, inputs, steps, *, line_search, check_every):
    """Trains for ``steps``; returns ({threshold: (steps, seconds) or None}, final error).

    The error is measured every ``check_every`` steps, outside the timed region."""
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

    jax.block_until_ready(step.lower(params, state).compile())  # compilation not timed
    reached, seconds, error = {}, 0.0, relative_l2_error(params)
    for done in range(1, steps + 1):
        start = time.perf_counter()
        params, state = step(params, state)
        jax.block_until_ready(params)
        seconds += time.perf_counter() - start
        if done % check_every == 0 or done == steps:
            error = relative_l2_error(params)
            for threshold in THRESHOLDS:
                if error <= threshold and threshold not in reached:
                    reached[threshold] = (done, seconds)
            if error <= THRESHOLDS[-1] or not np.isfinite(error):
                break
    return reached, error


def engd(model, solver):
    """Energy natural gradient (λ = 1e-10) with a backtracking line search on its step."""
    return optax.chain(
        ng.scale_by_natural_gradient(model, damping=1e-10, solver=solver),
        optax.scale(-1.0),
        optax.scale_by_backtracking_linesearch(max_backtracking_steps=30),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ngd-steps", type=int, default=600)
    parser.add_argument("--adam-steps", type=int, default=20_000)
    parser.add_argument("--lbfgs-steps", type=int, default=5_000)
    args = parser.parse_args()
    report_run_time()
    print(f"machine: {machine()}\n")
    model = ng.Model(residuals, ng.Gaussian(scale=1.0))
    inputs = collocation()
    params = init_mlp(jax.random.PRNGKey(0), SIZES, jnp.float64)
    num_params = sum(p.size for p in jax.tree.leaves(params))
    candidates = [
        ("ENGD, dense solve", engd(model, "dense"), args.ngd_steps, True, 10),
        ("ENGD, Woodbury", engd(model, ng.Woodbury(capture=False)), args.ngd_steps, True, 10),
        (
            "ENGD, Woodbury + SPRING μ=0.5, λ=1e-8",
            optax.chain(
                ng.scale_by_natural_gradient(
                    model, damping=1e-8, solver=ng.Woodbury(capture=False, spring=0.5)
                ),
                optax.scale(-1.0),
                optax.scale_by_backtracking_linesearch(max_backtracking_steps=30),
            ),
            args.ngd_steps,
            True,
            10,
        ),
        (
            "adam lr=1e-3 (decayed ×0.1)",
            optax.adam(optax.exponential_decay(1e-3, args.adam_steps, 0.1)),
            args.adam_steps,
            False,
            200,
        ),
        ("l-bfgs (optax, zoom line search)", optax.lbfgs(), args.lbfgs_steps, True, 50),
    ]
    rows = []
    for name, optimizer, steps, line_search, check_every in candidates:
        progress(f"{name}, up to {steps} steps")
        reached, error = run(
            optimizer,
            model,
            params,
            inputs,
            steps,
            line_search=line_search,
            check_every=check_every,
        )
        cells = [
            f"{reached[t][0]} / {reached[t][1]:.1f}" if t in reached else "-" for t in THRESHOLDS
        ]
        rows.append([name, steps, *cells, f"{error:.2e}"])
    print(
        f"\nPINN, 2-D Poisson, MLP {'-'.join(map(str, SIZES))} (P = {num_params}), "
        f"{inputs.shape[0]} collocation points, float64; steps / seconds to each error"
    )
    header = ["optimizer", "budget", *[f"to {t:g}" for t in THRESHOLDS], "final error"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
