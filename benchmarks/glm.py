"""Benchmark: GLMs to the maximum-likelihood estimate, float64.

Logistic regression on scikit-learn's breast-cancer data (10 standardised features and
an intercept) and Poisson regression on synthetic counts. Iterations and seconds until
‖θ − θ*‖∞ ≤ 1e-8 ‖θ*‖∞ (θ* from Newton's method run to convergence) for natural
gradient with the exact Fisher (damping 0, learning rate 1: Fisher scoring = IRLS), Adam
and SGD (best of a learning-rate grid) and optax's L-BFGS.

    python benchmarks/glm.py           # about a minute on 2 CPU cores
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
from _common import machine, progress, report_run_time, table  # noqa: E402

import natgrad_jax as ng  # noqa: E402

TOLERANCE = 1e-8


def breast_cancer():
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    features = data.data[:, :10]
    features = (features - features.mean(0)) / features.std(0)
    x = np.concatenate([np.ones((len(features), 1)), features], axis=1)
    return x, data.target.astype(np.float64), ng.Bernoulli()


def poisson_counts(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.ones((n, 1)), 0.5 * rng.normal(size=(n, 5))], axis=1)
    y = rng.poisson(np.exp(x @ np.array([0.3, 0.5, -0.4, 0.2, 0.0, -0.3]))).astype(np.float64)
    return x, y, ng.Poisson()


def newton_optimum(model, x, y):
    w = jnp.zeros(x.shape[1])
    for _ in range(100):
        g = jax.grad(model.nll)(w, x, y)
        w = w - jnp.linalg.solve(jax.hessian(model.nll)(w, x, y), g)
    return w


def run(optimizer, model, x, y, optimum, max_steps, *, line_search=False):
    state = optimizer.init(jnp.zeros(x.shape[1]))
    value_fn = lambda w: model.nll(w, x, y)

    @jax.jit
    def step(w, state):
        value, grad = jax.value_and_grad(value_fn)(w)
        if line_search:
            extra = {"value": value, "grad": grad, "value_fn": value_fn}
        else:  # natgrad_jax reads the batch; optax's own transforms ignore it
            extra = {"inputs": x, "targets": y}
        updates, state = optimizer.update(grad, state, w, **extra)
        w = optax.apply_updates(w, updates)
        return w, state, jnp.max(jnp.abs(w - optimum)) / jnp.max(jnp.abs(optimum))

    w = jnp.zeros(x.shape[1])
    start = time.perf_counter()
    for t in range(1, max_steps + 1):
        w, state, error = step(w, state)
        if float(error) <= TOLERANCE:
            return t, time.perf_counter() - start
        if not np.isfinite(float(error)):
            return None, "diverged"
    return None, float(error)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=3000)
    args = parser.parse_args()
    report_run_time()
    print(f"machine: {machine()}\n")
    for name, problem in [
        ("logistic (breast cancer)", breast_cancer),
        ("poisson (synthetic)", poisson_counts),
    ]:
        x, y, likelihood = problem()
        model = ng.Model(lambda w, x: x @ w, likelihood)
        optimum = newton_optimum(model, jnp.asarray(x), jnp.asarray(y))
        candidates = {
            "natural gradient (exact, λ=0, η=1)": (
                ng.natural_gradient(model, 1.0, damping=0.0),
                False,
            )
        }
        for lr in (1e-3, 1e-2, 1e-1, 1.0):
            candidates[f"adam lr={lr:g}"] = (optax.adam(lr), False)
            candidates[f"sgd lr={lr:g}"] = (optax.sgd(lr), False)
        candidates["l-bfgs (optax)"] = (optax.lbfgs(), True)
        results = {}
        for label, (optimizer, line_search) in candidates.items():
            progress(f"{name}: {label}")
            results[label] = run(
                optimizer, model, x, y, optimum, args.max_steps, line_search=line_search
            )

        def best(prefix, results=results):
            names = [n for n in results if n.startswith(prefix)]
            reached = [n for n in names if results[n][0] is not None]
            if reached:
                return min(reached, key=lambda n: results[n][0])
            finite = [n for n in names if isinstance(results[n][1], float)]
            return min(finite, key=lambda n: results[n][1]) if finite else names[0]

        rows = []
        for label in [next(iter(candidates)), best("adam"), best("sgd"), "l-bfgs (optax)"]:
            steps, detail = results[label]
            if steps is None:
                rows.append(
                    [
                        label,
                        f"not within {args.max_steps}",
                        f"error {detail:.1e}" if isinstance(detail, float) else detail,
                    ]
                )
            else:
                rows.append([label, steps, f"{detail:.3f}"])
        print(f"\n{name}: N = {len(y)}, P = {x.shape[1]}, to ‖θ − θ*‖∞ ≤ {TOLERANCE:g}·‖θ*‖∞")
        print(table(["optimizer (best of its grid)", "iterations", "seconds"], rows))
        print()


if __name__ == "__main__":
    main()
