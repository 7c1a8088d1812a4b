"""Benchmark: one natural-gradient update on real layer types, against a gradient step.

Three small flax models, each with the layers capture reads (see ``ng.describe``):

* **CNN** on 16×16×3 images: two convolutions, LayerNorm, a dense head (10 classes);
* **GRU** over 20 steps of 8 features (``nn.RNN(nn.GRUCell)``), a dense head;
* **LSTM** likewise with ``nn.OptimizedLSTMCell`` (its gates' kernels concatenated
  before one matmul);
* **transformer language model**: token embedding, positional table, causal
  self-attention, MLP, LayerNorms; per-token logits over 64 tokens of length 16.

For each, the median time of one jitted update of every solver (Monte-Carlo Fisher,
one sampled label per example, batch 32) is printed with its ratio to one jitted
gradient step (``jax.grad`` of the NLL), measured side by side in this process. No model
here falls back to per-example ``vmap`` for any leaf (the script checks it).

    python benchmarks/architectures.py     # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see "CPU threads" in docs/guide.md

import argparse

import jax
import jax.numpy as jnp
from _common import (
    EVERY_STEP_REFRESHES,
    add_output_arguments,
    machine,
    median_ms,
    progress,
    report_run_time,
    table,
)

import natgrad_jax as ng

BATCH = 32
SOLVERS = ["auto", "woodbury", "kronecker", "ekfac", "cg", "diagonal"]


def cnn():
    import flax.linen as nn

    class Cnn(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
            x = nn.LayerNorm()(x)
            x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
            return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))

    x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, 16, 16, 3))
    y = jax.random.randint(jax.random.PRNGKey(2), (BATCH,), 0, 10)
    return Cnn(), x, y, ng.Categorical()


def _recurrent(cell_name):
    """A flax recurrent cell over 20 steps of 8 features, a dense head on its last state."""
    import flax.linen as nn

    cell = getattr(nn, cell_name)

    class Recurrent(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.RNN(cell(32))(x)[:, -1])

    x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, 20, 8))
    y = jax.random.randint(jax.random.PRNGKey(2), (BATCH,), 0, 10)
    return Recurrent(), x, y, ng.Categorical()


def gru():
    return _recurrent("GRUCell")


def lstm():
    return _recurrent("OptimizedLSTMCell")


def transformer():
    import flax.linen as nn

    vocab, length, width = 64, 16, 32

    class LanguageModel(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            h = nn.Embed(vocab, width)(tokens)
            h = h + self.param("positions", nn.initializers.normal(0.02), (length, width))
            attention = nn.SelfAttention(num_heads=4)
            h = h + attention(nn.LayerNorm()(h), mask=nn.make_causal_mask(tokens))
            h = h + nn.Dense(width)(nn.gelu(nn.Dense(4 * width)(nn.LayerNorm()(h))))
            return nn.Dense(vocab)(nn.LayerNorm()(h))

    tokens = jax.random.randint(jax.random.PRNGKey(1), (BATCH, length), 0, vocab)
    return LanguageModel(), tokens, jnp.roll(tokens, -1, axis=1), ng.Categorical()


def measure(make):
    module, x, y, likelihood = make()
    params = module.init(jax.random.PRNGKey(0), x)["params"]
    model = ng.Model(lambda p, x: module.apply({"params": p}, x), likelihood)
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    assert "vmap" not in ng.describe(model, params, x)  # every leaf is captured
    gradient = jax.jit(jax.grad(model.nll))
    grad_ms = median_ms(gradient, params, x, y)
    g = gradient(params, x, y)
    times = {}
    for solver in SOLVERS:
        progress(f"{make.__name__}: {solver}")
        tx = ng.scale_by_natural_gradient(model, fisher="monte_carlo", solver=solver, damping=1e-2)
        update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, inputs=x, targets=y)[0])
        times[solver] = median_ms(update, g, tx.init(params), params)
    return num_params, grad_ms, times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    parser.parse_args()
    report_run_time()
    print(f"machine: {machine()}\n")
    print(EVERY_STEP_REFRESHES + "\n")
    rows = []
    for make in (cnn, gru, lstm, transformer):
        num_params, grad_ms, times = measure(make)
        rows.append(
            [
                make.__name__,
                f"{num_params:,}",
                f"{grad_ms:.2f}",
                *[f"{times[s]:.2f} ({times[s] / grad_ms:.1f}×)" for s in SOLVERS],
            ]
        )
    header = ["model", "P", "grad ms", *[f"{s} ms (× grad)" for s in SOLVERS]]
    print(table(header, rows))


if __name__ == "__main__":
    main()
