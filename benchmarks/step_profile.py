"""Benchmark: where the time of a natural-gradient step goes, by kind of XLA operation.

The deep autoencoder of ``autoencoder.py`` (P = 2,837,314, batch ``--batch``): Adam's
step, and the default ``ng.natural_gradient(model, 1.0)`` step (with ``ng.value_and_grad``)
between two refreshes of its K-FAC factors and at a refresh. Each is traced with
``jax.profiler`` over ``--steps`` steps; every operation the XLA program ran is put in
one kind: matrix products, LAPACK calls (Cholesky factorisations and triangular
solves), copies (layout changes, concatenations, transposes), conditionals, and the
rest (elementwise, reductions).

    python benchmarks/step_profile.py        # about 20 seconds on 2 CPU cores

CPU only: on a GPU the trace holds kernels, not XLA operations, and every row would be
"other".
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see "CPU threads" in docs/guide.md

import argparse
import collections
import gzip
import json
import pathlib
import re
import tempfile
import time

import jax
import numpy as np
import optax
from _common import init_mlp, machine, report_run_time, table
from autoencoder import SIZES, autoencoder, load, ngd_step, optax_step

import natgrad_jax as ng

KINDS = ("matmul", "LAPACK", "copy", "conditional", "other")


def steps(model):
    """(name, (init, step)) of Adam and of the default natural-gradient step, as
    ``autoencoder.py`` runs them."""
    return [
        ("adam", optax_step(optax.adam(3e-4), model)),
        ("ngd defaults", ngd_step(ng.natural_gradient(model, 1.0), model)),
    ]


def instruction_kinds(hlo_text: str) -> dict:
    """{instruction name: kind} for every instruction of an optimised HLO module."""
    bodies = dict(re.findall(r"^%?([\w.-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.S | re.M))
    kinds = {}
    pattern = r"^\s*(?:ROOT )?%([\w.-]+) = [^=]*? ([a-z][\w-]*)\((.*)$"
    for name, opcode, rest in re.findall(pattern, hlo_text, re.M):
        called = re.search(r"calls=%([\w.-]+)", rest)
        body = bodies.get(called.group(1), "") if called else ""
        if opcode == "dot" or " dot(" in body or "convolution(" in body:
            kinds[name] = "matmul"
        elif opcode == "custom-call" and "lapack" in rest:
            kinds[name] = "LAPACK"
        elif opcode == "conditional":
            kinds[name] = "conditional"
        elif opcode in ("copy", "concatenate", "transpose") or (
            opcode == "fusion" and re.search(r" (copy|concatenate|transpose)\(", body)
        ):
            kinds[name] = "copy"
        else:
            kinds[name] = "other"
    return kinds


class Runner:
    """Steps of one compiled program on the benchmark's batches, counting them."""

    def __init__(self, compiled, params, state, batches):
        self.compiled, self.batches = compiled, batches
        self.carry, self.count = (params, state), 0

    def __call__(self):
        batch = self.batches[self.count % len(self.batches)]
        self.carry = self.compiled(*self.carry, batch)
        jax.block_until_ready(self.carry)
        self.count += 1


def traced_milliseconds(run: Runner, kinds) -> collections.Counter:
    """ms of each kind of operation in one step of ``run``, and its wall time ("wall")."""
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            start = time.perf_counter()
            run()
            wall = time.perf_counter() - start
        (path,) = pathlib.Path(directory).rglob("perfetto_trace.json.gz")
        with gzip.open(path) as file:
            events = json.load(file)
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals = collections.Counter(wall=1e3 * wall)
    for event in events:
        if event.get("ph") == "X" and event.get("name") in kinds:
            totals[kinds[event["name"]]] += event["dur"] / 1e3
    return totals


def profile(run: Runner, kinds, steps: int, refreshes: bool | None) -> dict:
    """Mean ms per kind over ``steps`` traced steps: refresh steps (``True``; K-FAC
    refreshes every 5 steps by default), steps between refreshes (``False``), or any
    (``None``). Steps before the first traced one warm the program up."""
    totals = collections.Counter()
    for _ in range(steps):
        while run.count < 5 or (refreshes is not None and (run.count % 5 == 0) != refreshes):
            run()
        totals.update(traced_milliseconds(run, kinds))
    return {kind: totals[kind] / steps for kind in ("wall", *KINDS)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="traced steps per row")
    args = parser.parse_args()
    report_run_time()
    print(f"deep autoencoder {SIZES}, batch {args.batch}; machine: {machine()}\n")

    data = load()
    model = ng.Model(autoencoder, ng.Gaussian(scale=1.0))
    rng = np.random.default_rng(0)
    batches = [data[rng.choice(len(data), args.batch, replace=False)] for _ in range(64)]
    rows = []
    for name, (init, step) in steps(model):
        params = init_mlp(jax.random.PRNGKey(0), SIZES)
        state = init(params)
        compiled = jax.jit(step).lower(params, state, batches[0]).compile()
        kinds = instruction_kinds(compiled.as_text())
        run = Runner(compiled, params, state, batches)
        phases = {"": None} if name == "adam" else {", between refreshes": False, ", refresh": True}
        for label, refreshes in phases.items():
            ms = profile(run, kinds, args.steps, refreshes)
            operations = sum(ms[kind] for kind in KINDS)
            rows.append(
                [f"{name}{label}", f"{ms['wall']:.1f}", f"{operations:.1f}"]
                + [f"{ms[kind]:.1f}" for kind in KINDS]
            )
    header = ["step", "wall ms", "operations ms", *(f"{kind} ms" for kind in KINDS)]
    print(table(header, rows))
    print(
        f"\nmeans over {args.steps} traced steps each; operations ms: the XLA operations' "
        "own times summed (two may run at once); a refresh step adds K-FAC's Monte-Carlo "
        "backward pass, factor statistics and their factorisation."
    )


if __name__ == "__main__":
    main()
