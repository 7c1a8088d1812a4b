"""natgrad_jax demo: natural gradient vs Adam on scikit-learn's handwritten digits.

1. The Fisher of a logistic-regression model equals its closed form XᵀWX/N.
2. A 64-16-10 tanh MLP trained with natural gradient descent (a trust region of KL
   0.05) and with Adam (the best learning rate of a grid), each inside an
   ``optax.chain`` with gradient clipping, on mini-batches of 256; the table prints the
   full training-set NLL as training goes, the steps and seconds to a target NLL, test
   accuracy and time per step.

Run:  python examples/demo.py   (about a minute on two CPU cores)
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split

import natgrad_jax as ng

BATCH = 256
STEPS = 150
REPORT_EVERY = 25
TARGET_NLL = 0.05
ADAM_LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def check_logistic_regression_fisher() -> None:
    data = load_breast_cancer()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    x = jnp.asarray(np.concatenate([np.ones((len(x), 1)), x[:, :5]], axis=1), jnp.float32)
    model = ng.Model(lambda w, x: x @ w, ng.Bernoulli())
    w = 0.1 * jnp.arange(x.shape[1], dtype=jnp.float32)
    p = jax.nn.sigmoid(x @ w)
    closed_form = (x * (p * (1 - p))[:, None]).T @ x / len(x)
    error = jnp.abs(ng.fisher(model, w, x) - closed_form).max()
    print("1. Fisher of logistic regression on breast_cancer (569 x 6) vs X^T W X / N")
    largest = float(closed_form.max())
    print(f"   max |difference| = {float(error):.1e}  (largest entry {largest:.3f})\n")


def init_mlp(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n)) / jnp.sqrt(m), "b": jnp.zeros(n)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def train(name, optimizer, model, params, x_train, y_train):
    state = optimizer.init(params)
    natural = name.startswith("natural")

    @jax.jit
    def step(params, state, xb, yb):
        if natural:  # loss, gradient and curvature statistics from one forward pass
            (_, forward), grads = ng.value_and_grad(model)(params, xb, yb)
            extra = {"forward_pass": forward}
        else:
            grads, extra = jax.grad(model.nll)(params, xb, yb), {}
        updates, state = optimizer.update(grads, state, params, inputs=xb, targets=yb, **extra)
        return optax.apply_updates(params, updates), state

    full_nll = jax.jit(model.nll)
    rng = np.random.default_rng(0)
    history = {0: float(full_nll(params, x_train, y_train))}
    step_times = []
    for t in range(1, STEPS + 1):
        idx = rng.choice(len(x_train), BATCH, replace=False)
        start = time.perf_counter()
        params, state = step(params, state, x_train[idx], y_train[idx])
        jax.block_until_ready(params)
        step_times.append(time.perf_counter() - start)
        if t % 5 == 0:
            history[t] = float(full_nll(params, x_train, y_train))
    return params, history, step_times


def _first_step_at_target(history):
    return next((t for t, v in history.items() if v <= TARGET_NLL), None)


def _steps_then_loss(history):
    """Ranks a run: fewest steps to the target NLL, then lowest final NLL."""
    first = _first_step_at_target(history)
    return (STEPS + 1 if first is None else first, history[STEPS])


def main() -> None:
    check_logistic_regression_fisher()

    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, jnp.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        np.asarray(x), digits.target, test_size=0.25, random_state=0
    )
    model = ng.Model(mlp, ng.Categorical())
    params = init_mlp(jax.random.PRNGKey(0), [64, 16, 10])
    num_params = sum(p.size for p in jax.tree.leaves(params))

    def clipped(optimizer):
        return optax.chain(optax.clip_by_global_norm(10.0), optimizer)

    natural = train(
        "natural gradient",
        clipped(ng.natural_gradient(model, learning_rate=1.0, damping=1e-2, max_kl=0.05)),
        model,
        params,
        x_train,
        y_train,
    )
    adam_runs = {
        lr: train("adam", clipped(optax.adam(lr)), model, params, x_train, y_train)
        for lr in ADAM_LEARNING_RATES
    }
    best_lr = min(adam_runs, key=lambda lr: _steps_then_loss(adam_runs[lr][1]))
    results = {"natural gradient": natural, f"adam, lr {best_lr:g}": adam_runs[best_lr]}
    first = {n: _first_step_at_target(history) for n, (_, history, _) in results.items()}

    print(f"2. digits, 64-16-10 tanh MLP ({num_params} parameters), batch {BATCH}")
    print(f"   Adam's learning rate: the best of {', '.join(map(str, ADAM_LEARNING_RATES))}\n")
    names = list(results)

    def row(label, cells):
        print(f"   {label:<24}" + "".join(f"{cell:>18}" for cell in cells))

    row("training-set NLL", names)
    for t in range(0, STEPS + 1, REPORT_EVERY):
        row(f"  after {t} steps", [f"{results[n][1][t]:.4f}" for n in names])
    row(
        f"steps to NLL <= {TARGET_NLL}",
        [f"> {STEPS}" if first[n] is None else first[n] for n in names],
    )
    row(
        "  seconds, with compile",
        [
            f"> {sum(results[n][2]):.2f}"
            if first[n] is None
            else f"{sum(results[n][2][: first[n]]):.2f}"
            for n in names
        ],
    )
    row("  first step (compiles), s", [f"{results[n][2][0]:.2f}" for n in names])
    row(
        "test accuracy",
        [
            f"{float(jnp.mean(jnp.argmax(mlp(results[n][0], x_test), -1) == y_test)):.3f}"
            for n in names
        ],
    )
    row("ms per step (median)", [f"{1e3 * np.median(results[n][2][5:]):.2f}" for n in names])


if __name__ == "__main__":
    main()
