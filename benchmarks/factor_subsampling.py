"""Benchmark: K-FAC's factors from a subsample of positions, their error and their cost.

On the transformer LM and the CNN of the race benchmarks (their default sizes, one batch,
Monte-Carlo Fisher with one label per example as ``"auto"``'s K-FAC measures it), the
factors A and G of every layer are measured from all N·T positions
(``ng.Kronecker()``) and from S of them (``ng.Kronecker(statistics_positions=S)``), for
each S in ``--positions``. Prints, per S: the relative Frobenius error ‖Â − A‖/‖A‖ of
the factors (median and largest over the layers, mean of ``--draws`` draws) and the
median time of one jitted measurement against the full one, in the same run.

    python benchmarks/factor_subsampling.py          # about a minute on 2 CPU cores
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see "CPU threads" in docs/guide.md

import argparse
import datetime

import cnn
import jax
import jax.numpy as jnp
import numpy as np
import transformer_lm
from _common import machine, median_ms, report_run_time, table

import natgrad_jax as ng
from natgrad_jax._solvers.batch import CurvatureBatch


def lm_problem(args):
    ids, vocabulary = transformer_lm.encode(transformer_lm.corpus()[: args.corpus_chars])
    params = transformer_lm.init_transformer(
        jax.random.PRNGKey(0), vocabulary, args.width, args.layers, args.context
    )
    model = ng.Model(lambda p, t: transformer_lm.transformer(p, t, args.heads), ng.Categorical())
    tokens, targets = next(transformer_lm.batch_stream(ids, args.batch, args.context)())
    del targets
    return "transformer LM", model, params, tokens


def cnn_problem(args):
    x_train, _, _, _ = cnn.load()
    params = cnn.init_cnn(jax.random.PRNGKey(0), tuple(args.channels))
    return "CNN", ng.Model(cnn.cnn, ng.Categorical()), params, x_train[: args.cnn_batch]


def factors_of(model, params, inputs, positions):
    """key ↦ every factored leaf's (A, G), measured from ``positions`` per layer (the
    parameters and the batch are arguments of the jitted function, not constants XLA
    would fold at compile time)."""
    solver = ng.Kronecker(statistics_positions=positions)

    @jax.jit
    def measure(key, params, inputs):
        batch = CurvatureBatch(model, params, inputs, "monte_carlo", key=key, num_samples=1)
        factors = solver.measured(batch, jnp.float32).factors
        return [f for _, pair in sorted(factors.items()) for f in pair]

    return lambda key: measure(key, params, inputs)


def relative_errors(got, want) -> np.ndarray:
    return np.array(
        [float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) for g, w in zip(got, want, strict=True)]
    )


def rows_for(problem, positions, draws):
    """Per S: the factors' error against the full ones on the same batch and labels
    (each draw its own key: labels and positions), and the time of a measurement."""
    name, model, params, inputs = problem
    keys = jax.random.split(jax.random.PRNGKey(1), draws)
    full = factors_of(model, params, inputs, None)
    references = [full(key) for key in keys]
    full_ms = median_ms(full, keys[0])
    rows = [(name, "all", "0", "0", f"{full_ms:.2f}", "1.00")]
    for count in positions:
        sampled = factors_of(model, params, inputs, count)
        errors = np.mean(
            [relative_errors(sampled(k), r) for k, r in zip(keys, references, strict=True)], 0
        )
        ms = median_ms(sampled, keys[0])
        rows.append(
            (
                name,
                str(count),
                f"{np.median(errors):.3f}",
                f"{np.max(errors):.3f}",
                f"{ms:.2f}",
                f"{ms / full_ms:.2f}",
            )
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    transformer_lm.add_model_arguments(parser, corpus_chars=200_000)
    parser.add_argument("--channels", type=int, nargs="+", default=list(cnn.CHANNELS))
    parser.add_argument("--cnn-batch", type=int, default=128)
    parser.add_argument("--positions", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args(argv)
    report_run_time()
    print(
        f"K-FAC factors from S of each layer's N·T positions: LM batch {args.batch} × "
        f"{args.context} tokens, CNN batch {args.cnn_batch} (8×8 sites); Monte-Carlo "
        f"labels, {args.draws} draws\nmachine: {machine()}; {datetime.date.today()}\n"
    )
    rows = []
    for problem in (lm_problem(args), cnn_problem(args)):
        rows += rows_for(problem, args.positions, args.draws)
    header = ("model", "positions S", "error median", "error max", "ms", "ms / all")
    print(table(header, rows))
    return rows


if __name__ == "__main__":
    main()
