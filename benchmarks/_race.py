"""Optimizers raced at equal wall time: the harness of transformer_lm.py and cnn.py.

Every optimizer starts from the same parameters and sees the same batches in the same
order. Its jitted step, donating parameters and state, is compiled first (the compile
time is reported, not charged); then it trains until its steps have used ``seconds`` of
wall time, with the validation loss measured every ``eval_every`` steps outside the
clock. The table gives, per optimizer, the compile time, the median and the amortised
(mean, refresh steps included) step, its 95th percentile and slowest step over AdamW's
median (a typical refresh step, and the worst pause), the steps taken and the validation
loss at the budget; ``busy`` runs the race with another job spinning on every core.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import add_output_arguments, optional_import, output_path, progress, table

import natgrad_jax as ng


@dataclasses.dataclass
class Result:
    name: str
    compile_s: float
    step_seconds: list
    curve: list  # (step, training seconds, validation loss)

    @property
    def median_ms(self) -> float:
        return 1e3 * float(np.median(self.step_seconds))

    @property
    def amortised_ms(self) -> float:
        return 1e3 * float(np.mean(self.step_seconds))

    @property
    def slow_ms(self) -> float:
        """The 95th percentile step: with a refresh every 5 or 10 steps, a typical
        refresh step (the slowest step alone is often a one-off pause)."""
        return 1e3 * float(np.percentile(self.step_seconds, 95))

    @property
    def slowest_ms(self) -> float:
        return 1e3 * float(np.max(self.step_seconds))

    @property
    def final_loss(self) -> float:
        return self.curve[-1][2]

    def loss_at(self, seconds: float) -> float:
        """The last validation loss measured within ``seconds`` of training."""
        return [loss for _, s, loss in self.curve if s <= seconds][-1]


def optax_step(model: ng.Model, optimizer) -> Callable:
    """A step as a user writes it: the gradient of the NLL, then ``update`` (natgrad_jax's
    transforms take the batch as extra arguments; optax's own ignore them)."""

    def step(params, state, x, y):
        grads = jax.grad(model.nll)(params, x, y)
        updates, state = optimizer.update(grads, state, params, inputs=x, targets=y)
        return optax.apply_updates(params, updates), state

    return step


def race_one(
    name: str,
    optimizer,
    model: ng.Model,
    params,
    batches: Callable[[], Iterator],
    validation_loss: Callable,
    seconds: float,
    eval_every: int,
    max_steps: int | None = None,
) -> Result:
    """Trains ``optimizer`` for ``seconds`` of step time (or ``max_steps``)."""
    stream = batches()
    x, y = next(stream)
    params = jax.tree.map(jnp.copy, params)  # the step donates them; the caller's stay
    state = optimizer.init(params)
    start = time.perf_counter()
    # Parameters and state donated, as training loops do: state that a step passes
    # through unchanged (K-FAC's factors between refreshes) is then not copied.
    donated = jax.jit(optax_step(model, optimizer), donate_argnums=(0, 1))
    step = donated.lower(params, state, x, y).compile()
    compile_s = time.perf_counter() - start
    curve = [(0, 0.0, float(validation_loss(params)))]
    trained, step_seconds = 0.0, []
    while trained < seconds and (max_steps is None or len(step_seconds) < max_steps):
        before = time.perf_counter()
        params, state = jax.block_until_ready(step(params, state, x, y))
        step_seconds.append(time.perf_counter() - before)
        trained += step_seconds[-1]
        x, y = next(stream)
        if len(step_seconds) % eval_every == 0:
            curve.append((len(step_seconds), trained, float(validation_loss(params))))
    if curve[-1][0] != len(step_seconds):
        curve.append((len(step_seconds), trained, float(validation_loss(params))))
    result = Result(name, compile_s, step_seconds, curve)
    progress(
        f"{name}: compile {compile_s:.1f} s, {result.median_ms:.1f} ms/step median, "
        f"{result.amortised_ms:.1f} amortised, {len(step_seconds)} steps, "
        f"validation loss {result.final_loss:.4f}"
    )
    return result


def summary(results: list[Result], reference: str, seconds: float) -> str:
    """The table, ratios to the ``reference`` row (the best AdamW)."""
    base = next(r for r in results if r.name == reference)
    rows = []
    for r in results:
        rows.append(
            [
                r.name,
                f"{r.compile_s:.1f}",
                f"{r.compile_s / base.compile_s:.1f}",
                f"{r.median_ms:.1f}",
                f"{r.amortised_ms:.1f}",
                f"{r.amortised_ms / base.amortised_ms:.1f}",
                f"{r.slow_ms / base.median_ms:.0f}",
                f"{r.slowest_ms / base.median_ms:.0f}",
                str(len(r.step_seconds)),
                f"{r.loss_at(seconds):.4f}",
            ]
        )
    header = [
        "optimizer",
        "compile s",
        "x AdamW",
        "ms/step median",
        "amortised",
        "x AdamW",
        "p95 step / AdamW step",
        "slowest / AdamW",
        "steps",
        f"val loss at {seconds:g} s",
    ]
    return table(header, rows)


def best(results: list[Result], prefix: str, seconds: float) -> Result:
    """The row starting with ``prefix`` whose validation loss at ``seconds`` is least."""
    return min((r for r in results if r.name.startswith(prefix)), key=lambda r: r.loss_at(seconds))


def plot(results: list[Result], title: str, filename: str, args) -> None:
    plt = optional_import("matplotlib.pyplot")
    if plt is None:
        return
    figure, ax = plt.subplots(figsize=(7, 4.5))
    families = list(dict.fromkeys(r.name.split("=")[0] for r in results))
    runs_drawn = dict.fromkeys(families, 0)
    for r in results:  # a colour per family, a line style per step size
        family = r.name.split("=")[0]
        style = ("-", "--", ":", "-.")[runs_drawn[family] % 4]
        runs_drawn[family] += 1
        curve = np.asarray(r.curve)
        ax.plot(curve[:, 1], curve[:, 2], style, color=f"C{families.index(family)}", label=r.name)
    ax.set(xlabel="training wall time, compilation excluded (s)", ylabel="validation loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    figure.tight_layout()
    path = output_path(args, filename)
    figure.savefig(path, dpi=110)
    print(f"saved {path}")


def _spin(stop) -> None:
    x = np.random.default_rng(0).standard_normal((256, 256))
    while not stop.is_set():
        x = np.tanh(x @ x.T / 256)


@contextlib.contextmanager
def busy_cores(busy: bool):
    """With ``busy``, one process spinning on matrix products per core while inside."""
    if not busy:
        yield
        return
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    workers = [context.Process(target=_spin, args=(stop,)) for _ in range(os.cpu_count() or 1)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        stop.set()
        for worker in workers:
            worker.join()


def add_race_arguments(parser, seconds: float, eval_every: int) -> None:
    """The options every race takes."""
    parser.add_argument("--seconds", type=float, default=seconds, help="step time per run")
    parser.add_argument("--eval-every", type=int, default=eval_every)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--busy", action="store_true", help="a spinning process per core")
    parser.add_argument("--only", default=None, help="run only rows containing a|b|...")
    add_output_arguments(parser)


# Step-size grids: what a user would try first (Muon's adam_learning_rate follows). The
# KL-clipped K-FAC takes every step at learning rate 1 with its KL bounded by ε (the
# quadratic model and Levenberg–Marquardt off: a step costs what the solve costs), so ε
# is its step size.
GRIDS = {
    "adamw": ("lr", (1e-3, 3e-3, 1e-2)),
    "muon": ("lr", (3e-3, 1e-2, 3e-2)),
    "ngd defaults": ("lr", (0.25, 0.5, 1.0)),
    "ngd adapt_every=5": ("lr", (0.25, 0.5, 1.0)),
    "ngd kl-clipped": ("max_kl", (0.03, 0.1, 0.3)),
    "ng eigenbasis adam": ("lr", (1e-3, 3e-3, 1e-2)),
}


def kl_clipped_kfac(model: ng.Model, max_kl: float):
    """K-FAC as its implementations usually run it: a fixed damping, each step's KL by
    K-FAC's own quadratic clipped to ``max_kl`` (``kl_measure="solver"``: no extra
    product), no quadratic model (``rescale``, ``momentum``) nor Levenberg–Marquardt
    (their forward passes and forward-mode products cost more than the solve on a
    transformer)."""
    return ng.natural_gradient(
        model,
        1.0,
        damping=1e-2,
        max_kl=max_kl,
        kl_measure="solver",
        rescale=False,
        momentum=False,
    )


def race(model, params, batches, validation_loss, args, plot_as):
    """Runs AdamW, Muon, ``ng.natural_gradient(model, lr)`` with its defaults, the
    KL-clipped K-FAC (``kl_clipped_kfac``) and ``ng.eigenbasis_adam(model, lr)``, each
    over its step-size grid; prints the table of each family's best (ratios to the best
    AdamW) and every run, saves the plot (``plot_as``: (title, file name)); returns the
    best rows."""
    optimizers = {
        "adamw": optax.adamw,
        "muon": optax.contrib.muon,
        "ngd defaults": lambda lr: ng.natural_gradient(model, lr),
        "ngd adapt_every=5": lambda lr: ng.natural_gradient(model, lr, adapt_every=5),
        "ngd kl-clipped": lambda max_kl: kl_clipped_kfac(model, max_kl),
        "ng eigenbasis adam": lambda lr: ng.eigenbasis_adam(model, lr),
    }
    wanted = None if args.only is None else args.only.split("|")
    results = []
    with busy_cores(args.busy):
        for family, make in optimizers.items():
            knob, values = GRIDS[family]
            for value in values:
                name = f"{family} {knob}={value:g}"
                if wanted and not any(w in name for w in wanted):
                    continue
                budget = (args.seconds, args.eval_every, args.max_steps)
                run = race_one(name, make(value), model, params, batches, validation_loss, *budget)
                results.append(run)
    families = [f for f in optimizers if any(r.name.startswith(f) for r in results)]
    chosen = [best(results, family, args.seconds) for family in families]
    print()
    print(summary(chosen, chosen[0].name, args.seconds))
    print("\nevery run (validation loss at the budget):")
    print(", ".join(f"{r.name}: {r.loss_at(args.seconds):.4f}" for r in results))
    title, filename = plot_as
    if args.busy:
        title, filename = f"{title}, cores shared", filename.replace(".png", "_busy.png")
    plot(results, title, filename, args)
    return chosen
