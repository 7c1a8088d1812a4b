"""Benchmark: time and memory of each curvature representation as P and N grow.

1. P sweep (N = 256, Monte-Carlo Fisher): one natural-gradient update of a 64-h-10 tanh
   MLP for each solver, P from ~10³ to ~10⁶ (dense only while P ≤ 4096).
2. N sweep (P ≈ 10⁴): the same for N from 32 to 4096.
3. Overhead of the dense empirical Fisher over the irreducible work: ``empirical_fisher``
   against per-example scores plus one bare SᵀS matmul, timed in the same process.

Memory is XLA's temporary allocation of the compiled update (``memory_analysis``).
Saves ``curvature_scaling_P.png`` and ``..._N.png`` in ``benchmarks/results/`` (with
``--update-docs``: over the README's figures in ``docs/images/``).

    python benchmarks/curvature_scaling.py        # about 2 minutes on 2 CPU cores
    python benchmarks/curvature_scaling.py --quick  # under a minute
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see "CPU threads" in docs/guide.md

import argparse

import jax
from _common import (
    EVERY_STEP_REFRESHES,
    add_output_arguments,
    init_mlp,
    machine,
    median_ms,
    mlp,
    output_path,
    progress,
    report_run_time,
    table,
)

import natgrad_jax as ng

SOLVERS = ["dense", "woodbury", "cg", "kronecker", "diagonal"]


def problem(hidden, num_examples):
    params = init_mlp(jax.random.PRNGKey(0), [64, hidden, 10])
    x = jax.random.normal(jax.random.PRNGKey(1), (num_examples, 64))
    y = jax.random.randint(jax.random.PRNGKey(2), (num_examples,), 0, 10)
    return params, x, y


def measure(solver, hidden, num_examples):
    """(ms per update, temporary MB) or None where the solver is out of its range."""
    params, x, y = problem(hidden, num_examples)
    model = ng.Model(mlp, ng.Categorical())
    representation = ng.ConjugateGradient(tol=1e-4, max_iters=20) if solver == "cg" else solver
    tx = ng.scale_by_natural_gradient(
        model, fisher="monte_carlo", solver=representation, damping=1e-2, max_curvature_bytes=2**31
    )
    try:
        state = tx.init(params)
    except ValueError:  # the memory guard: out of range for this solver
        return None
    g = jax.grad(model.nll)(params, x, y)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, inputs=x, targets=y))
    try:
        compiled = update.lower(g, state, params).compile()
    except ValueError:
        return None
    analysis = compiled.memory_analysis()
    megabytes = analysis.temp_size_in_bytes / 2**20 if analysis is not None else float("nan")
    return median_ms(compiled, g, state, params, repeats=5), megabytes


def sweep(points, hidden_of, examples_of, label):
    results = {solver: [] for solver in SOLVERS}
    for point in points:
        hidden, num_examples = hidden_of(point), examples_of(point)
        num_params = 64 * hidden + hidden + 10 * hidden + 10
        for solver in SOLVERS:
            if solver == "dense" and num_params > 4096:
                results[solver].append(None)
                continue
            progress(f"{label} {point}: {solver}")
            results[solver].append(measure(solver, hidden, num_examples))
    return results


def print_and_plot(points, results, xlabel, path):
    header = [xlabel, *[f"{s} ms / MB" for s in SOLVERS]]
    rows = [
        [
            point,
            *[
                ("-" if r[i] is None else f"{r[i][0]:.1f} / {r[i][1]:.0f}")
                for r in results.values()
            ],
        ]
        for i, point in enumerate(points)
    ]
    print(table(header, rows))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for solver, values in results.items():
        kept = [(p, v) for p, v in zip(points, values, strict=True) if v is not None]
        if kept:
            time_axis.loglog([p for p, _ in kept], [v[0] for _, v in kept], "o-", label=solver)
            memory_axis.loglog(
                [p for p, _ in kept], [max(v[1], 1e-3) for _, v in kept], "o-", label=solver
            )
    time_axis.set_xlabel(xlabel)
    time_axis.set_ylabel("ms per update")
    memory_axis.set_xlabel(xlabel)
    memory_axis.set_ylabel("temporary memory, MB")
    time_axis.legend(fontsize=8)
    fig.suptitle(machine(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


def dense_overhead(hidden=24, num_examples=256):
    params, x, y = problem(hidden, num_examples)
    model = ng.Model(mlp, ng.Categorical())
    empirical = jax.jit(lambda p: ng.empirical_fisher(model, p, x, y))
    scores = jax.jit(lambda p: ng.per_example_scores(model, p, x, y))
    gram = jax.jit(lambda s: s.T @ s)
    s = scores(params)
    full = median_ms(empirical, params)
    parts = median_ms(scores, params) + median_ms(gram, s)
    num_params = s.shape[1]
    print(
        f"dense empirical Fisher, P = {num_params}, N = {num_examples}: {full:.2f} ms vs "
        f"scores + SᵀS {parts:.2f} ms: ratio {full / parts:.2f} (target ≤ 1.25)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sweeps")
    add_output_arguments(parser)
    args = parser.parse_args()
    report_run_time()
    print(f"machine: {machine()}\n")
    print(EVERY_STEP_REFRESHES + "\n")
    dense_overhead()
    widths = [13, 53, 1333, 13333] if not args.quick else [13, 53]
    p_points = [64 * h + h + 10 * h + 10 for h in widths]
    print("\n1. P sweep, N = 256, Monte-Carlo Fisher")
    results = sweep(p_points, lambda p: widths[p_points.index(p)], lambda p: 256, "P")
    print_and_plot(p_points, results, "P", output_path(args, "curvature_scaling_P.png"))
    n_points = [32, 256, 1024, 4096] if not args.quick else [32, 256]
    print("\n2. N sweep, P = 10,010 (hidden width 133), Monte-Carlo Fisher")
    results = sweep(n_points, lambda n: 133, lambda n: n, "N")
    print_and_plot(n_points, results, "N", output_path(args, "curvature_scaling_N.png"))


if __name__ == "__main__":
    main()
