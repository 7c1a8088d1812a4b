"""natgrad_jax demo: natural gradient vs Adam on scikit-learn's handwritten digits.

1. The Fisher of a logistic-regression model equals its closed form XᵀWX/N.
2. A deep autoencoder of the digits (64-256-128-64-8-64-128-256-64, tanh, a linear
   8-unit code; squared error as ``ng.Gaussian(scale=1.0)``), the classic hard case for
   first-order methods: Adam at each learning rate of a grid for 8,000 steps, then
   ``ng.natural_gradient(model, 1.0)`` with nothing else set, until it reaches the best
   Adam's final training loss. Mini-batches of 256; the table prints the training loss
   as training goes, and the steps and seconds (compilation included) to that loss.

Run:  python examples/demo.py   (about two minutes on two CPU cores)
"""

from __future__ import annotations

import os

# Before scipy loads its OpenBLAS: jaxlib's CPU factorisations (K-FAC's refresh steps)
# call it, and its worker threads compete with XLA's own for the cores. One thread made
# the refresh steps faster on a quiet machine and kept them fast on a busy one (see
# "CPU threads" in docs/guide.md). A value already set is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_breast_cancer, load_digits

import natgrad_jax as ng

SIZES = [64, 256, 128, 64, 8, 64, 128, 256, 64]
CODE_LAYER = 3  # the 8-unit code is linear
BATCH = 256
ADAM_STEPS = 8000
MAX_NGD_STEPS = 1000
ADAM_LEARNING_RATES = (1e-3, 3e-3, 1e-2)
LOSS_EVERY = 10
REPORT_AT = (0, 50, 100, 200, 500, 1000, 2000, 4000, 8000)


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


def init_autoencoder(key):
    keys = jax.random.split(key, len(SIZES) - 1)
    return [
        {"w": jax.random.normal(k, (m, n)) / jnp.sqrt(m), "b": jnp.zeros(n)}
        for k, m, n in zip(keys, SIZES[:-1], SIZES[1:], strict=True)
    ]


def autoencoder(params, x):
    for index, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        if index not in (CODE_LAYER, len(params) - 1):
            x = jnp.tanh(x)
    return x


def reconstruction_loss(params, x):
    """½‖x − x̂‖² averaged over images (the Gaussian NLL without its constant)."""
    return 0.5 * jnp.mean(jnp.sum((autoencoder(params, x) - x) ** 2, axis=-1))


def train(optimizer, model, params, images, max_steps, *, natural, target=None):
    """Runs until ``max_steps`` or the training loss ≤ ``target`` (checked every
    ``LOSS_EVERY`` steps); returns {step: (seconds of steps so far, loss)} and the
    seconds of each step (the first one includes compilation)."""
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, batch):
        if natural:  # loss, gradient and curvature statistics from one forward pass
            (_, forward), grads = ng.value_and_grad(model)(params, batch, batch)
            extra = {"forward_pass": forward}
        else:
            grads, extra = jax.grad(model.nll)(params, batch, batch), {}
        updates, state = optimizer.update(
            grads, state, params, inputs=batch, targets=batch, **extra
        )
        return optax.apply_updates(params, updates), state

    full_loss = jax.jit(reconstruction_loss)
    rng = np.random.default_rng(0)
    history = {0: (0.0, float(full_loss(params, images)))}
    step_seconds = []
    for t in range(1, max_steps + 1):
        batch = images[rng.choice(len(images), BATCH, replace=False)]
        start = time.perf_counter()
        params, state = step(params, state, batch)
        jax.block_until_ready(params)
        step_seconds.append(time.perf_counter() - start)
        if t % LOSS_EVERY == 0:
            history[t] = (sum(step_seconds), float(full_loss(params, images)))
            if target is not None and history[t][1] <= target:
                break
    return history, step_seconds


def first_at(history, target):
    """(steps, seconds) when the loss first reached ``target``, or None."""
    return next(((t, s) for t, (s, loss) in history.items() if loss <= target), None)


def main() -> None:
    check_logistic_regression_fisher()

    images = jnp.asarray(load_digits().data / 16.0, jnp.float32)
    model = ng.Model(autoencoder, ng.Gaussian(scale=1.0))
    params = init_autoencoder(jax.random.PRNGKey(0))
    num_params = sum(p.size for p in jax.tree.leaves(params))
    layers = "-".join(map(str, SIZES))
    print(f"2. deep autoencoder of digits ({len(images)} x 64): {layers}, tanh,")
    print(f"   {num_params:,} parameters, batch {BATCH}, loss 1/2 ||x - x_hat||^2 per image")

    adam_runs = {}
    for lr in ADAM_LEARNING_RATES:
        adam_runs[lr] = train(optax.adam(lr), model, params, images, ADAM_STEPS, natural=False)
        final_loss = adam_runs[lr][0][ADAM_STEPS][1]
        print(f"   adam lr={lr:g}: loss {final_loss:.4f} after {ADAM_STEPS} steps")
    best_lr = min(adam_runs, key=lambda lr: adam_runs[lr][0][ADAM_STEPS][1])
    target = adam_runs[best_lr][0][ADAM_STEPS][1]
    natural = train(
        ng.natural_gradient(model, learning_rate=1.0),
        model,
        params,
        images,
        MAX_NGD_STEPS,
        natural=True,
        target=target,
    )
    description = ng.describe(model, params, images[:BATCH]).splitlines()
    picked = next(line for line in description if "picks" in line).strip().rstrip(":")
    print(f"   natural gradient with the defaults: {picked}")
    print(f"   target: the best Adam's loss after {ADAM_STEPS} steps, {target:.4f}\n")

    results = {"natural gradient": natural, f"adam, lr {best_lr:g}": adam_runs[best_lr]}
    names = list(results)

    def row(label, cells):
        print(f"   {label:<28}" + "".join(f"{cell:>18}" for cell in cells))

    def loss_at(history, t):
        return f"{history[t][1]:.4f}" if t in history else "-"

    row("training loss", names)
    for t in REPORT_AT:
        row(f"  after {t} steps", [loss_at(results[n][0], t) for n in names])
    reached = {n: first_at(results[n][0], target) for n in names}
    row("steps to the target", [reached[n][0] if reached[n] else "-" for n in names])
    row(
        "  seconds, with compile",
        [f"{reached[n][1]:.2f}" if reached[n] else "-" for n in names],
    )
    row("  first step (compiles), s", [f"{results[n][1][0]:.2f}" for n in names])
    # After the first step, which compiles: the median is a typical step, the mean is what
    # a step costs over the run (K-FAC's refresh steps included), the max is the longest.
    steady = {n: 1e3 * np.asarray(results[n][1][1:]) for n in names}
    row("ms per step: median", [f"{np.median(steady[n]):.2f}" for n in names])
    row("  amortised (mean)", [f"{np.mean(steady[n]):.2f}" for n in names])
    row("  slowest", [f"{np.max(steady[n]):.2f}" for n in names])
    print("   (natural gradient stops at the target: '-' marks steps it did not run)")


if __name__ == "__main__":
    main()
