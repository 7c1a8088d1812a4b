"""Multi-process data-parallel natural gradient: JAX's multi-controller runtime.

Every process runs this same program (on a cluster: one per host). They join through
``jax.distributed.initialize`` (a coordinator on process 0's host), each holds its own
slice of every global batch, and ``jax.make_array_from_process_local_data`` assembles
the slices into one array sharded over all processes' devices. The training step is
the single-device one, under ``jax.jit``: GSPMD inserts the all-reduces of the
curvature statistics, so every process computes the same update. On the CPU the
processes' collectives go through gloo.

Launch two local processes (a free port is chosen; each process's log is shown if one
fails, and a process that does not finish within ``--timeout`` seconds is stopped):

    python examples/multi_process.py --launch 2

One process of a job started by hand or by a cluster scheduler:

    python examples/multi_process.py --num-processes 2 --process-id 0 --port 12355

It trains a small classifier for ``--steps`` steps with ``ng.natural_gradient`` and each
solver, from the same start and batches, and prints the final loss of each; process 0
saves the final parameters (``--out``), and all processes write an orbax checkpoint of
K-FAC's parameters and optimizer state (``--checkpoint``), for
``tests/test_multi_process.py``, which checks both against one process on the whole
batch.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

# "kronecker-mesh": K-FAC with its factorisations spread over the processes' devices
# (mesh=); one process has a single device, so the same K-FAC.
SOLVERS = ("dense", "woodbury", "cg", "kronecker", "kronecker-mesh", "ekfac", "diagonal", "auto")
SIZES = (6, 8, 3)
GLOBAL_BATCH = 24
AVERAGING = ("dense", "kronecker", "ekfac", "diagonal")
CHECKPOINTED = "kronecker"  # its state: averaged factors, inverses, λ, step counts


def problem(step: int):
    """The global batch of ``step``: inputs (GLOBAL_BATCH, 6) and three classes."""
    import jax
    import jax.numpy as jnp

    key = jax.random.fold_in(jax.random.PRNGKey(1), step)
    x = jax.random.normal(key, (GLOBAL_BATCH, SIZES[0]), jnp.float64)
    y = (jnp.sum(x[:, :3], axis=1) > 0).astype(jnp.int32) + (x[:, 3] > 1.0)
    return x, y


def initial_params():
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(0), len(SIZES) - 1)
    return [
        {"w": jax.random.normal(k, (m, n), jnp.float64) / m**0.5, "b": jnp.zeros(n)}
        for k, m, n in zip(keys, SIZES[:-1], SIZES[1:], strict=True)
    ]


def model():
    import jax.numpy as jnp

    import natgrad_jax as ng

    def mlp(params, x):
        for layer in params[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    return ng.Model(mlp, ng.Categorical())


def optimizer(solver: str, classifier, mesh=None):
    """The defaults (adaptive damping) with ``solver``; those that keep curvature across
    steps average it and refresh every other step, so the steps in between run too.
    ``"...-mesh"``: the solver with its factorisations spread over ``mesh``."""
    import natgrad_jax as ng

    solver, spread = solver.removesuffix("-mesh"), solver.endswith("-mesh")
    cadence = {"refresh_every": 2, "decay": 0.5} if solver in AVERAGING else {}
    placement = {"mesh": mesh} if spread else {}
    return ng.natural_gradient(classifier, 1.0, solver=solver, **cadence, **placement)


def train(solver: str, steps: int, batch_of=problem, mesh=None):
    """(parameters, optimizer state) after ``steps`` jitted steps on ``batch_of(step)``."""
    import jax
    import optax

    classifier = model()
    nll, tx = classifier.nll, optimizer(solver, classifier, mesh)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(nll)(params, x, y)
        updates, state = tx.update(grads, state, params, inputs=x, targets=y)
        return optax.apply_updates(params, updates), state

    params = initial_params()
    if mesh is None:
        state = tx.init(params)
    else:
        # Parameters and state replicated over the mesh, as the step returns them: one
        # compilation. (From tx.init's single-device arrays the second step would
        # compile again, for Adam as for any optimizer.)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params = jax.device_put(params, replicated)
        state = jax.device_put(tx.init(params), replicated)
    for t in range(steps):
        params, state = step(params, state, *batch_of(t))
    return params, state


def run_process(args) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=int(args.timeout),
    )
    import numpy as np
    from jax.flatten_util import ravel_pytree
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    per_process = GLOBAL_BATCH // jax.process_count()
    mine = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)

    def sharded_batch(step):
        x, y = problem(step)
        return tuple(
            jax.make_array_from_process_local_data(sharding, np.asarray(a[mine])) for a in (x, y)
        )

    results = {}
    for solver in args.solvers.split(","):
        params, state = train(solver, args.steps, sharded_batch, mesh)
        if solver == CHECKPOINTED and args.checkpoint:
            save(args.checkpoint, {"params": params, "state": state})
        flat = ravel_pytree(jax.tree.map(np.asarray, params))[0]
        results[solver] = np.asarray(flat)
        loss = model().nll(params, *problem(args.steps))
        print(f"process {jax.process_index()}: {solver:9s} loss {float(loss):.6f}", flush=True)
    if jax.process_index() == 0 and args.out:
        np.savez(args.out, **results)
    jax.distributed.shutdown()


def save(directory: str, tree) -> None:
    """An orbax checkpoint of ``tree``, written by every process together."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(directory), tree)
    checkpointer.wait_until_finished()


def restore(directory: str, like):
    """The checkpoint at ``directory``, read in this (single) process as ``like``'s
    shapes and dtypes."""
    import jax
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return ocp.StandardCheckpointer().restore(os.path.abspath(directory), abstract)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(
    num_processes: int,
    steps: int,
    out: str | None,
    timeout: float,
    missing: int = 0,
    checkpoint: str | None = None,
    solvers=SOLVERS,
    xla_flags: str = "",
) -> str:
    """Runs ``num_processes`` copies of this program and returns their logs; raises with
    the logs if one fails or any is still running after ``timeout`` seconds.
    ``missing``: start that many fewer (their peers then time out waiting for them).
    ``xla_flags``: the processes' ``XLA_FLAGS`` (none of the caller's)."""
    port = free_port()
    command = [sys.executable, __file__, "--num-processes", str(num_processes), "--port"]
    command += [str(port), "--steps", str(steps), "--timeout", str(int(timeout))]
    command += ["--out", out] if out else []
    command += ["--checkpoint", checkpoint] if checkpoint else []
    command += ["--solvers", ",".join(solvers)]
    env = {**os.environ, "XLA_FLAGS": xla_flags, "OPENBLAS_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [*command, "--process-id", str(k)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for k in range(num_processes - missing)
    ]
    deadline = time.monotonic() + timeout
    logs = []
    for process in processes:
        try:
            logs.append(process.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            logs.append(process.communicate()[0])
    failed = [k for k, p in enumerate(processes) if p.returncode != 0]
    shown = "\n".join(f"--- process {k} ---\n{log}" for k, log in enumerate(logs))
    if failed:
        raise RuntimeError(f"processes {failed} failed or timed out after {timeout} s:\n{shown}")
    return shown


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", type=int, default=None, help="run this many processes")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=12355)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None, help="process 0 saves the parameters here")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--solvers", default=",".join(SOLVERS), help="comma-separated")
    parser.add_argument(
        "--checkpoint", default=None, help=f"save {CHECKPOINTED}'s parameters and state here"
    )
    args = parser.parse_args(argv)
    if args.launch:
        solvers = args.solvers.split(",")
        logs = launch(args.launch, args.steps, args.out, args.timeout, 0, args.checkpoint, solvers)
        print(logs)
    else:
        run_process(args)


if __name__ == "__main__":
    main()
