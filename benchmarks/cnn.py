"""Benchmark: a small CNN on scikit-learn's digits, natural gradient against AdamW and Muon.

Two 3×3 convolutions ('SAME', ReLU) with 16 and 32 channels on the 8×8 images, flattened
(8·8·32 = 2,048 features) into a dense head of 10 classes (P = 25,290), ``--batch``
images a step, ``ng.Categorical``. The race is that of transformer_lm.py: each optimizer
with a 3-value step-size grid from the same initialisation and batch order, for
``--seconds`` of step time (compilation excluded and reported), validation loss on the
held-out quarter of the digits measured outside the clock; ``--busy`` shares every core
with a spinning process.

    python benchmarks/cnn.py                 # about 6 minutes on 2 CPU cores
    python benchmarks/cnn.py --busy          # the same with the cores shared
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see "CPU threads" in docs/guide.md

import argparse
import datetime

import jax
import jax.numpy as jnp
import numpy as np
from _common import machine, report_run_time
from _race import add_race_arguments, race
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import natgrad_jax as ng

CHANNELS = (16, 32)


def load():
    """Digits as (N, 8, 8, 1) images in [0, 1]; a quarter held out."""
    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target.astype(np.int32), test_size=0.25, random_state=0
    )
    return jnp.asarray(x_train), jnp.asarray(x_test), jnp.asarray(y_train), jnp.asarray(y_test)


def init_cnn(key, channels=CHANNELS, side: int = 8, classes: int = 10):
    """He-initialised 3×3 kernels (HWIO) and a 1/√fan-in dense head, float32."""
    keys = jax.random.split(key, len(channels) + 1)
    params, previous = [], 1
    for k, out in zip(keys, channels, strict=False):
        kernel = (
            jax.random.normal(k, (3, 3, previous, out), jnp.float32) * (2.0 / (9 * previous)) ** 0.5
        )
        params.append({"w": kernel, "b": jnp.zeros(out, jnp.float32)})
        previous = out
    features = side * side * previous
    head = jax.random.normal(keys[-1], (features, classes), jnp.float32) / features**0.5
    return {"convs": params, "head": {"w": head, "b": jnp.zeros(classes, jnp.float32)}}


def cnn(params, images):
    """Logits (N, classes)."""
    x = images
    for layer in params["convs"]:
        x = jax.lax.conv_general_dilated(
            x, layer["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.nn.relu(x + layer["b"])
    x = x.reshape(x.shape[0], -1)
    return x @ params["head"]["w"] + params["head"]["b"]


def batch_stream(x, y, batch: int):
    """Random batches, the same order on every call."""

    def batches():
        rng = np.random.default_rng(0)
        while True:
            index = rng.choice(len(x), batch, replace=False)
            yield x[index], y[index]

    return batches


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS))
    add_race_arguments(parser, seconds=20.0, eval_every=10)
    args = parser.parse_args(argv)
    report_run_time()

    x_train, x_test, y_train, y_test = load()
    params = init_cnn(jax.random.PRNGKey(0), tuple(args.channels))
    model = ng.Model(cnn, ng.Categorical())
    validation_loss = jax.jit(lambda p: model.nll(p, x_test, y_test))
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(
        f"CNN on digits: 3×3 convolutions {args.channels}, dense head "
        f"{8 * 8 * args.channels[-1]} → 10, P = {num_params:,}; batch {args.batch}; "
        f"{len(x_train)} training and {len(x_test)} validation images; {args.seconds:g} s a run"
        + (" with every core shared with a spinning process" if args.busy else "")
    )
    print(f"machine: {machine()}; {datetime.date.today()}\n")

    batches = batch_stream(x_train, y_train, args.batch)
    title = f"CNN on digits, P = {num_params:,}"
    return race(model, params, batches, validation_loss, args, (title, "cnn.png"))


if __name__ == "__main__":
    main()
