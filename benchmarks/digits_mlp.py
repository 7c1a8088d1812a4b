"""Benchmark: a 64-128-10 tanh MLP on scikit-learn's digits, batch 256.

Natural gradient (each solver and Fisher kind) against Adam (best of a learning-rate
grid) and, when importable, kfac-jax, all in this process. For each optimizer, over
``--seeds`` seeds (initialisation and mini-batch order): steps and wall time
(compilation included) to a full-training-set NLL ≤ 0.05 as median [min–max], the
time of one step (compilation excluded: the median step and the amortised mean over
all steps, refresh steps included) and test accuracy (medians).
Natural-gradient steps take the loss, gradient and curvature statistics from one forward
pass (``ng.value_and_grad``); one row repeats the defaults with ``jax.grad`` and a plain
``update``, to show what that saves.

    python benchmarks/digits_mlp.py            # about 1.5 minutes on 2 CPU cores (3 seeds)

kfac-jax 0.0.8 needs jax ≤ 0.9.1; in a separate environment:
    pip install "jax==0.9.1" "jaxlib==0.9.1" "kfac-jax==0.0.8" -e ".[benchmarks]"
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see "CPU threads" in docs/guide.md

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import (
    adaptive_kfac_optimizer,
    init_mlp,
    machine,
    mlp,
    optional_import,
    progress,
    report_run_time,
    seed_summary,
    table,
)
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import natgrad_jax as ng

BATCH = 256
TARGET = 0.05
SIZES = [64, 128, 10]


def load():
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        (digits.data / 16.0).astype(np.float32), digits.target, test_size=0.25, random_state=0
    )
    return jnp.asarray(x_train), jnp.asarray(x_test), jnp.asarray(y_train), jnp.asarray(y_test)


def optax_runner(optimizer, model):
    """(init, step) for an optax optimizer; natgrad_jax gets inputs/targets as extra args."""

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(model.nll)(params, x, y)
        updates, state = optimizer.update(grads, state, params, inputs=x, targets=y)
        return optax.apply_updates(params, updates), state

    return (lambda params, x, y: optimizer.init(params)), step


def ngd_runner(optimizer, model):
    """(init, step) for a natural-gradient optimizer, with the loss, gradient and
    curvature statistics from one forward pass (``ng.value_and_grad``)."""

    @jax.jit
    def step(params, state, x, y):
        (_, forward), grads = ng.value_and_grad(model)(params, x, y)
        updates, state = optimizer.update(
            grads, state, params, inputs=x, targets=y, forward_pass=forward
        )
        return optax.apply_updates(params, updates), state

    return (lambda params, x, y: optimizer.init(params)), step


def kfac_runner(model, kfac_jax=None):
    """kfac-jax in its adaptive configuration (as in its examples), or None if absent."""
    kfac_jax = kfac_jax or optional_import("kfac_jax")
    if kfac_jax is None:
        return None

    def loss(params, batch):
        x, y = batch
        logits = model.apply_fn(params, x)
        kfac_jax.register_softmax_cross_entropy_loss(logits, y)
        return model.nll(params, x, y)

    optimizer = adaptive_kfac_optimizer(kfac_jax, loss)
    key = jax.random.PRNGKey(42)
    counter = {"t": 0}

    def init(params, x, y):
        return optimizer.init(params, key, (x, y))

    def step(params, state, x, y):
        counter["t"] += 1
        params, state, _ = optimizer.step(
            params,
            state,
            jax.random.fold_in(key, counter["t"]),
            batch=(x, y),
            global_step_int=counter["t"],
        )
        return params, state

    return init, step


def train(runner, model, params, data, max_steps, seed):
    """Trains until the full training NLL ≤ TARGET; returns the measurements."""
    x_train, x_test, y_train, y_test = data
    init, step = runner
    full_nll = jax.jit(model.nll)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    state = init(params, x_train[:BATCH], y_train[:BATCH])
    step_times, reached, wall = [], None, None
    for t in range(1, max_steps + 1):
        index = rng.choice(len(x_train), BATCH, replace=False)
        before = time.perf_counter()
        params, state = step(params, state, x_train[index], y_train[index])
        jax.block_until_ready(params)
        step_times.append(time.perf_counter() - before)
        if t % 5 == 0 and float(full_nll(params, x_train, y_train)) <= TARGET:
            reached, wall = t, time.perf_counter() - start
            break
    accuracy = float(jnp.mean(jnp.argmax(model.apply_fn(params, x_test), -1) == y_test))
    steady = 1e3 * np.asarray(step_times[1:])  # the first step compiles
    return {
        "steps": reached,
        "wall": wall,
        "step_ms": float(np.median(steady)) if steady.size else float("nan"),
        "amortised_ms": float(np.mean(steady)) if steady.size else float("nan"),
        "accuracy": accuracy,
        "ran": len(step_times),
    }


def summarise(results, adam_names, limit):
    """The table: per optimizer, medians (and the range of steps) over the seeds."""

    def median(name, key):
        values = [r[key] for r in results[name]]
        return float(np.median([np.inf if v is None else v for v in values]))

    best_adam = min(adam_names, key=lambda n: (median(n, "steps"), median(n, "wall")))
    adam_ms = median(best_adam, "amortised_ms")
    rows = []
    for name in results:
        if name.startswith("adam") and name != best_adam:
            continue
        wall = median(name, "wall")
        rows.append(
            [
                f"{name} (best Adam)" if name == best_adam else name,
                seed_summary([r["steps"] for r in results[name]], limit),
                "-" if np.isinf(wall) else f"{wall:.2f}",
                f"{median(name, 'step_ms'):.2f}",
                f"{median(name, 'amortised_ms'):.2f}",
                f"{median(name, 'amortised_ms') / adam_ms:.1f}",
                f"{median(name, 'accuracy'):.3f}",
            ]
        )
    header = [
        "optimizer",
        "steps to target",
        "wall s (incl. compile)",
        "ms/step median",
        "ms/step amortised",
        "x Adam (amortised)",
        "test acc",
    ]
    grid = ", ".join(
        f"{n.split('=')[1]}: {seed_summary([r['steps'] for r in results[n]], limit)}"
        for n in adam_names
    )
    return table(header, rows) + f"\n\nAdam grid (steps): {grid}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per optimizer (≥ 3 to report)")
    parser.add_argument("--only", default=None, help="run only optimizers whose name contains this")
    args = parser.parse_args()
    report_run_time()

    data = load()
    model = ng.Model(mlp, ng.Categorical())
    num_params = sum(p.size for p in jax.tree.leaves(init_mlp(jax.random.PRNGKey(0), SIZES)))
    print(f"digits MLP {SIZES}, P = {num_params}, batch {BATCH}, target NLL ≤ {TARGET}")
    print(f"machine: {machine()}; {args.seeds} seeds: median [min–max]\n")

    def ngd(**kwargs):
        return lambda: ngd_runner(ng.natural_gradient(model, **kwargs), model)

    def fixed_damping(fisher, solver):  # λ = 1e-2 and a KL trust region instead of LM
        return ngd(learning_rate=1.0, fisher=fisher, solver=solver, damping=1e-2, max_kl=0.05)

    candidates = {}
    for lr in (1e-3, 3e-3, 1e-2, 3e-2):
        candidates[f"adam lr={lr:g}"] = lambda lr=lr: optax_runner(optax.adam(lr), model)
    candidates.update(
        {
            "ngd defaults (auto: kronecker)": ngd(learning_rate=1.0),
            "ngd defaults, two passes (jax.grad, then update)": lambda: optax_runner(
                ng.natural_gradient(model, learning_rate=1.0), model
            ),
            "ngd cg, exact, adaptive damping": ngd(
                learning_rate=1.0, solver=ng.ConjugateGradient(progress_tol=5e-4)
            ),
            "ngd woodbury, monte_carlo": fixed_damping("monte_carlo", "woodbury"),
            "ngd woodbury, empirical": fixed_damping("empirical", "woodbury"),
            "ngd kronecker, exact": fixed_damping("exact", "kronecker"),
            "ngd kronecker, monte_carlo": fixed_damping("monte_carlo", "kronecker"),
            "ngd cg, exact": fixed_damping("exact", ng.ConjugateGradient(tol=1e-3, max_iters=20)),
            "ngd diagonal, exact": fixed_damping("exact", "diagonal"),
        }
    )
    kfac_jax = optional_import("kfac_jax")
    if kfac_jax is None:
        print("kfac-jax is not importable here: its row is skipped (see the docstring).\n")
    else:
        candidates["kfac-jax (adaptive)"] = lambda: kfac_runner(model, kfac_jax)
    if args.only:
        candidates = {n: c for n, c in candidates.items() if args.only in n or n.startswith("adam")}

    results = {}
    for name, make_runner in candidates.items():
        progress(f"training {name}")
        results[name] = [
            train(
                make_runner(),
                model,
                init_mlp(jax.random.PRNGKey(seed), SIZES),
                data,
                args.max_steps,
                seed,
            )
            for seed in range(args.seeds)
        ]
    print()
    print(summarise(results, [n for n in results if n.startswith("adam")], args.max_steps))


if __name__ == "__main__":
    main()
