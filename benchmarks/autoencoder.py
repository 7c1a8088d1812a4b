"""Benchmark: the deep autoencoder of the K-FAC papers, natural gradient against Adam.

784-1000-500-250-30-250-500-1000-784 (tanh, linear code layer; P = 2,837,314) on
scikit-learn's digits upsampled to 28×28, ``ng.Gaussian(scale=1.0)`` (squared error),
float32, mini-batches of ``--batch``. Adam runs ``--adam-steps`` steps at each learning
rate of a grid; each natural-gradient configuration (and kfac-jax where it imports) runs
until it reaches the best Adam's final loss, ``--ngd-steps`` steps or ``--max-seconds``.
Every natural-gradient row takes its loss, gradient and curvature statistics from one
forward pass (``ng.value_and_grad``) and, except the "kl-clipped" rows, uses
Levenberg–Marquardt damping (the default of ``ng.natural_gradient``) and, except the
defaults rows, the Monte-Carlo Fisher; the "kl-clipped" rows are K-FAC with a fixed
damping and each step's KL clipped (``_race.kl_clipped_kfac``, the transformer LM's
winner); the "eigenbasis adam" rows are ``ng.eigenbasis_adam`` (Adam in K-FAC's
eigenbasis, with Adam's learning rates); the last row repeats the defaults with
``jax.grad`` and a plain ``update``.
Per optimizer it prints the compile time, the amortised ms per step, the final training
loss ½‖x − x̂‖² (mean over the training set) and the steps and wall time, compilation
included, to reach the best Adam's final loss; it saves loss-vs-time and loss-vs-step
plots (``--update-docs``: to docs/images/).

    python benchmarks/autoencoder.py             # about 12 minutes on 2 CPU cores
    python benchmarks/autoencoder.py --batch 512 --adam-steps 2000 --ngd-steps 2000  # a GPU

kfac-jax 0.0.8 needs jax ≤ 0.9.1 (see digits_mlp.py for the environment).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see "CPU threads" in docs/guide.md

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import (
    adaptive_kfac_optimizer,
    add_output_arguments,
    init_mlp,
    machine,
    optional_import,
    output_path,
    progress,
    report_run_time,
    table,
)
from _race import kl_clipped_kfac
from sklearn.datasets import load_digits

import natgrad_jax as ng

SIZES = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
# max_kl of the KL-clipped K-FAC rows (``_race.kl_clipped_kfac``): 0.001 → 140 steps to
# the target, 0.1 → 300 and 1 or 10 never (2-core AMD EPYC, 2026-12-06).
KL_CLIPPED_GRID = (0.003, 0.01, 0.03)
# Learning rates of ng.eigenbasis_adam (Adam in K-FAC's eigenbasis): Adam's grid's best
# three.
EIGENBASIS_ADAM_GRID = (1e-4, 3e-4, 1e-3)
CODE_LAYER = 3  # the 30-unit code is linear
CONSTANT = 0.5 * 784 * math.log(2 * math.pi)  # the Gaussian NLL is ½‖x − x̂‖² + this


def autoencoder(params, x):
    for index, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        if index not in (CODE_LAYER, len(params) - 1):
            x = jnp.tanh(x)
    return x


def load():
    """Digits as 28×28 images in [0, 1] (bilinear upsampling), flattened."""
    images = load_digits().data.reshape(-1, 8, 8) / 16.0
    upsampled = jax.image.resize(jnp.asarray(images), (len(images), 28, 28), "linear")
    return jnp.clip(upsampled, 0.0, 1.0).reshape(len(images), 784).astype(jnp.float32)


def optax_step(optimizer, model):
    def step(params, state, x):
        grads = jax.grad(model.nll)(params, x, x)
        updates, state = optimizer.update(grads, state, params, inputs=x, targets=x)
        return optax.apply_updates(params, updates), state

    return optimizer.init, step


def ngd_step(optimizer, model):
    """A natural-gradient step with one forward pass (``ng.value_and_grad``)."""

    def step(params, state, x):
        (_, forward), grads = ng.value_and_grad(model)(params, x, x)
        updates, state = optimizer.update(
            grads, state, params, inputs=x, targets=x, forward_pass=forward
        )
        return optax.apply_updates(params, updates), state

    return optimizer.init, step


def kfac_step(model, kfac_jax):
    """kfac-jax in its adaptive configuration (as in its examples)."""

    def loss(params, x):
        kfac_jax.register_normal_predictive_distribution(model.apply_fn(params, x), x, variance=1.0)
        return model.nll(params, x, x)

    optimizer = adaptive_kfac_optimizer(kfac_jax, loss)
    key = jax.random.PRNGKey(42)

    def init(params):
        return optimizer.init(params, key, jnp.zeros((1, 784))), 1  # step 0 would burn in

    def step(params, state, x):
        state, t = state
        params, state, _ = optimizer.step(
            params, state, jax.random.fold_in(key, t), batch=x, global_step_int=t
        )
        return params, (state, t + 1)

    return init, step, False


def train(name, runner, data, batch, max_steps, max_seconds, target, eval_every):
    """Trains from the same start and batch order; returns the loss curve and timings."""
    init, step, jit = (*runner, True) if len(runner) == 2 else runner
    model_loss = jax.jit(lambda p: ng.Model(autoencoder, ng.Gaussian(1.0)).nll(p, data, data))
    params = init_mlp(jax.random.PRNGKey(0), SIZES)
    rng = np.random.default_rng(0)
    first = data[rng.choice(len(data), batch, replace=False)]
    start = time.perf_counter()
    state = init(params)
    if jit:  # donated, as the guide recommends: the step updates params and state in place
        step = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, first).compile()
    compile_s = time.perf_counter() - start
    curve = [(0, compile_s, float(model_loss(params)) - CONSTANT)]
    trained_s, step_seconds = compile_s, []
    for t in range(1, max_steps + 1):
        x = data[rng.choice(len(data), batch, replace=False)]
        before = time.perf_counter()
        params, state = step(params, state, x)
        jax.block_until_ready(params)
        step_seconds.append(time.perf_counter() - before)
        trained_s += step_seconds[-1]
        if t % eval_every == 0 or t == max_steps:
            curve.append((t, trained_s, float(model_loss(params)) - CONSTANT))
            if curve[-1][2] <= target or trained_s > max_seconds:
                break
    step_ms = 1e3 * float(np.mean(step_seconds))  # amortised: refresh steps included
    median_ms = 1e3 * float(np.median(step_seconds))
    progress(
        f"{name}: compile {compile_s:.1f} s, {step_ms:.1f} ms/step amortised "
        f"({median_ms:.1f} median), {len(step_seconds)} steps, loss {curve[-1][2]:.3f}, "
        f"{trained_s:.1f} s"
    )
    return {"curve": curve, "compile_s": compile_s, "step_ms": step_ms, "median_ms": median_ms}


def reached(curve, target):
    """(steps, seconds) of the first evaluation at or under ``target``, or None."""
    return next(((t, s) for t, s, loss in curve if loss <= target), None)


def summarise(results, best_adam):
    target = results[best_adam]["curve"][-1][2]
    adam_ms = results[best_adam]["step_ms"]
    rows = []
    for name, result in results.items():
        hit = reached(result["curve"], target)
        rows.append(
            [
                f"{name} (best Adam)" if name == best_adam else name,
                f"{result['compile_s']:.1f}",
                f"{result['median_ms']:.1f}",
                f"{result['step_ms']:.1f}",
                f"{result['step_ms'] / adam_ms:.1f}",
                f"{result['curve'][-1][2]:.3f}",
                "-" if hit is None else str(hit[0]),
                "-" if hit is None else f"{hit[1]:.1f}",
            ]
        )
    header = [
        "optimizer",
        "compile s",
        "ms/step median",
        "ms/step amortised",
        "x Adam (amortised)",
        "final loss",
        "steps",
        "wall s",
    ]
    return table(header, rows), target


def plot(results, target, args):
    plt = optional_import("matplotlib.pyplot")
    if plt is None:
        return
    for axis, index, label in (
        ("time", 1, "wall time, compilation included (s)"),
        ("steps", 0, "step"),
    ):
        figure, ax = plt.subplots(figsize=(7, 4.5))
        for name, result in results.items():
            curve = np.asarray(result["curve"])
            ax.plot(curve[:, index], curve[:, 2], label=name)
        ax.axhline(target, color="grey", linestyle=":", label="best Adam's final loss")
        ax.set(
            xlabel=label,
            ylabel="training loss ½‖x − x̂‖²",
            yscale="log",
            xscale="log" if index else "linear",
        )
        ax.set_title(f"deep autoencoder, batch {args.batch}")
        ax.legend(fontsize=7)
        figure.tight_layout()
        path = output_path(args, f"autoencoder_{axis}.png")
        figure.savefig(path, dpi=110)
        print(f"saved {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--adam-steps", type=int, default=600)
    parser.add_argument("--ngd-steps", type=int, default=600)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per NGD optimizer")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument(
        "--only", default=None, help="run only NGD rows whose name contains one of a|b|..."
    )
    add_output_arguments(parser)
    args = parser.parse_args()
    report_run_time()

    data = load()
    model = ng.Model(autoencoder, ng.Gaussian(scale=1.0))
    print(f"deep autoencoder {SIZES}, P = 2837314, batch {args.batch}, {len(data)} digits")
    print(f"machine: {machine()}\n")

    results = {}
    for lr in (1e-4, 3e-4, 1e-3, 3e-3):
        name = f"adam lr={lr:g}"
        runner = optax_step(optax.adam(lr), model)
        results[name] = train(
            name, runner, data, args.batch, args.adam_steps, np.inf, -np.inf, args.eval_every
        )
    adam_names = list(results)
    best_adam = min(adam_names, key=lambda n: results[n]["curve"][-1][2])
    target = results[best_adam]["curve"][-1][2]

    adaptive = dict(fisher="monte_carlo", damping=ng.LevenbergMarquardt())
    kronecker = dict(adaptive, solver="kronecker", decay=0.95)
    candidates = {
        "ngd defaults (auto: kronecker)": lambda: ng.natural_gradient(model, 1.0),
        "ngd kronecker, refresh every step": lambda: ng.natural_gradient(model, 1.0, **kronecker),
        "ngd kronecker, refresh every 5": lambda: ng.natural_gradient(
            model, 1.0, refresh_every=5, **kronecker
        ),
        "ngd kronecker, refresh every 5, no momentum": lambda: ng.natural_gradient(
            model, 1.0, refresh_every=5, momentum=False, **kronecker
        ),
        "ngd ekfac, refresh every 5": lambda: ng.natural_gradient(
            model, 1.0, refresh_every=5, **{**kronecker, "solver": "ekfac"}
        ),
        "ngd woodbury": lambda: ng.natural_gradient(model, 1.0, solver="woodbury", **adaptive),
    }
    for max_kl in KL_CLIPPED_GRID:
        candidates[f"ngd kl-clipped max_kl={max_kl:g}"] = lambda m=max_kl: kl_clipped_kfac(model, m)
    for lr in EIGENBASIS_ADAM_GRID:
        candidates[f"eigenbasis adam lr={lr:g}"] = lambda lr=lr: ng.eigenbasis_adam(model, lr)
    if args.only:
        wanted = args.only.split("|")
        candidates = {n: c for n, c in candidates.items() if any(w in n for w in wanted)}

    def run_ngd(name, runner):
        budget = (args.ngd_steps, args.max_seconds, target, args.eval_every)
        results[name] = train(name, runner, data, args.batch, *budget)

    for name, make in candidates.items():
        run_ngd(name, ngd_step(make(), model))
    if not args.only:
        # The defaults as a user without ng.value_and_grad would run them.
        defaults = ng.natural_gradient(model, 1.0)
        run_ngd("ngd defaults, two passes", optax_step(defaults, model))
    kfac_jax = optional_import("kfac_jax")
    if kfac_jax is not None and not args.only:
        run_ngd("kfac-jax (adaptive)", kfac_step(model, kfac_jax))

    shown = {n: r for n, r in results.items() if n == best_adam or not n.startswith("adam")}
    text, target = summarise(shown, best_adam)
    print()
    print(text)
    grid = ", ".join(f"{n.split('=')[1]}: {results[n]['curve'][-1][2]:.3f}" for n in adam_names)
    print(f"\nAdam grid (final loss after {args.adam_steps} steps): {grid}")
    print(
        "steps / wall s: to reach the best Adam's final loss (evaluated every "
        f"{args.eval_every} steps; '-': not within the step or time budget)"
    )
    plot(shown, target, args)


if __name__ == "__main__":
    main()
