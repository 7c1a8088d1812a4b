"""Benchmark: a character-level transformer LM, natural gradient against AdamW and Muon.

A decoder-only transformer in plain JAX (token and position embeddings, ``--layers``
pre-LayerNorm blocks of causal self-attention with ``--heads`` heads and a 4× GELU MLP,
a final LayerNorm and an unembedding; D = ``--width``), trained on the characters of
optax's own Python sources (installed with natgrad_jax, so offline; the last tenth held
out for validation), ``--context`` characters a sequence, ``--batch`` sequences a step,
one ``ng.Categorical`` per token. Each optimizer runs a 3-value step-size grid from the
same initialisation with the same batch order, for ``--seconds`` of step time
(compilation excluded and reported), its validation loss (nats per character, 64 held-out
sequences) measured outside the clock: AdamW (``optax.adamw``), Muon
(``optax.contrib.muon``), ``ng.natural_gradient(model, lr)`` with the defaults, and
K-FAC with its KL clipped (``_race.kl_clipped_kfac``, a grid of ``max_kl``) and
``ng.eigenbasis_adam(model, lr)`` (Adam in K-FAC's eigenbasis, AdamW's grid), each step
written as in the README's quick start. ``--busy`` runs the race with a spinning
process on every core. Prints the table and saves the loss-vs-time plot.

    python benchmarks/transformer_lm.py                 # about 17 minutes on 2 CPU cores
    python benchmarks/transformer_lm.py --busy          # the same with the cores shared
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see "CPU threads" in docs/guide.md

import argparse
import datetime
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import machine, report_run_time
from _race import add_race_arguments, race

import natgrad_jax as ng

VALIDATION_SEQUENCES = 64
F32 = jnp.float32


def corpus() -> str:
    """optax's Python sources, concatenated in path order."""
    root = pathlib.Path(optax.__file__).parent
    return "".join(path.read_text(encoding="utf-8") for path in sorted(root.rglob("*.py")))


def encode(text: str) -> tuple[np.ndarray, int]:
    """(token ids, vocabulary size): one token per distinct character."""
    vocabulary = {c: k for k, c in enumerate(sorted(set(text)))}
    return np.fromiter(map(vocabulary.__getitem__, text), np.int32, len(text)), len(vocabulary)


def init_transformer(key, vocabulary: int, width: int, layers: int, context: int):
    """Parameters: GPT-2-like scales (embeddings 0.02, dense layers 1/√fan-in)."""
    keys = iter(jax.random.split(key, 4 + 6 * layers))

    def normal(shape, scale):
        return scale * jax.random.normal(next(keys), shape, F32)

    def dense(fan_in, fan_out):
        return {"w": normal((fan_in, fan_out), fan_in**-0.5), "b": jnp.zeros(fan_out, F32)}

    def norm():
        return {"scale": jnp.ones(width, F32), "bias": jnp.zeros(width, F32)}

    blocks = [
        {
            "norm1": norm(),
            "qkv": dense(width, 3 * width),
            "out": dense(width, width),
            "norm2": norm(),
            "up": dense(width, 4 * width),
            "down": dense(4 * width, width),
        }
        for _ in range(layers)
    ]
    return {
        "embed": normal((vocabulary, width), 0.02),
        "position": normal((context, width), 0.02),
        "blocks": blocks,
        "norm": norm(),
        "unembed": dense(width, vocabulary),
    }


def _layer_norm(p, x):
    mean = jnp.mean(x, -1, keepdims=True)
    variance = jnp.mean((x - mean) ** 2, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(variance + 1e-5) * p["scale"] + p["bias"]


def _dense(p, x):
    return x @ p["w"] + p["b"]


def _attention(p, x, heads: int):
    batch, length, width = x.shape
    q, k, v = jnp.split(_dense(p["qkv"], x), 3, axis=-1)
    split = lambda z: z.reshape(batch, length, heads, width // heads).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(width // heads)
    causal = jnp.tril(jnp.ones((length, length), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    mixed = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)
    return _dense(p["out"], mixed)


def transformer(params, tokens, heads: int = 4):
    """Logits (batch, length, vocabulary) of the next character at every position."""
    x = params["embed"][tokens] + params["position"][: tokens.shape[1]]
    for block in params["blocks"]:
        x = x + _attention(block, _layer_norm(block["norm1"], x), heads)
        hidden = jax.nn.gelu(_dense(block["up"], _layer_norm(block["norm2"], x)))
        x = x + _dense(block["down"], hidden)
    return _dense(params["unembed"], _layer_norm(params["norm"], x))


def sequences(ids: np.ndarray, starts: np.ndarray, context: int):
    """(inputs, next-character targets), each (len(starts), context)."""
    windows = ids[starts[:, None] + np.arange(context + 1)]
    return jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:])


def batch_stream(ids: np.ndarray, batch: int, context: int):
    """Batches of random windows, the same order on every call."""

    def batches():
        rng = np.random.default_rng(0)
        while True:
            yield sequences(ids, rng.integers(0, len(ids) - context - 1, batch), context)

    return batches


def add_model_arguments(parser, corpus_chars: int | None = None) -> None:
    """The LM's sizes and its corpus (a prefix of ``corpus_chars`` characters)."""
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--corpus-chars", type=int, default=corpus_chars, help="use a prefix")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    add_race_arguments(parser, seconds=60.0, eval_every=25)
    args = parser.parse_args(argv)
    report_run_time()

    text = corpus()[: args.corpus_chars]
    ids, vocabulary = encode(text)
    split = len(ids) * 9 // 10
    train_ids, validation_ids = ids[:split], ids[split:]
    starts = np.linspace(0, len(validation_ids) - args.context - 2, VALIDATION_SEQUENCES)
    validation = sequences(validation_ids, starts.astype(int), args.context)
    params = init_transformer(
        jax.random.PRNGKey(0), vocabulary, args.width, args.layers, args.context
    )
    apply = lambda p, tokens: transformer(p, tokens, args.heads)
    model = ng.Model(apply, ng.Categorical())
    tokens_per_batch = args.batch * args.context
    validation_loss = jax.jit(lambda p: model.nll(p, *validation) / args.context)
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(
        f"character-level transformer LM: D = {args.width}, {args.layers} blocks, "
        f"{args.heads} heads, context {args.context}, vocabulary {vocabulary}, "
        f"P = {num_params:,}; batch {args.batch} ({tokens_per_batch} tokens); "
        f"{len(train_ids):,} training characters; {args.seconds:g} s a run"
        + (" with every core shared with a spinning process" if args.busy else "")
    )
    print(f"machine: {machine()}; {datetime.date.today()}\n")

    batches = batch_stream(train_ids, args.batch, args.context)
    title = f"char transformer LM, P = {num_params:,}"
    return race(
        model,
        params,
        batches,
        validation_loss,
        args,
        (title, "transformer_lm.png"),
    )


if __name__ == "__main__":
    main()
