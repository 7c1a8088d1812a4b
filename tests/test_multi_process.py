"""Several processes joined by ``jax.distributed`` give the single-process update.

``examples/multi_process.py --launch N`` starts N CPU processes (a coordinator on
localhost, a free port, gloo collectives), each holding 1/N of every global batch; after
5 steps of ``ng.natural_gradient`` (adaptive damping) with each solver, the averaging
ones refreshing every other step, and of K-FAC with its factorisations spread over the
processes' devices (``mesh=``), process 0's parameters must equal those of one process
on the whole batch (float64, 1e-10), and the orbax checkpoint of K-FAC's parameters
and state the processes write together, restored in one process, equals that process's
own. Timeouts are the test's: a process that cannot
reach its peers ends the launch with every process's log, never a hang.
"""

import os

import chex
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from tests.helpers import BENCHMARKS, optional_import

EXAMPLES = BENCHMARKS.parent / "examples"
# The processes' five steps of a tiny MLP are nearly all compilation: they take the
# suite's flags for fast compilation (conftest.py: without LLVM's optimisations, and with
# XLA's classic CPU emitters where this XLA has them), not its others (8 host devices).
# Without LLVM's optimisations two processes took 18 s against 27–28 s (2-core CPU, jax
# 0.10.2); the programs, their collectives and their numbers are the same to round-off.
FAST_COMPILE = " ".join(
    flag
    for flag in os.environ.get("XLA_FLAGS", "").split()
    if flag.startswith(("--xla_backend_optimization_level=", "--xla_cpu_use_fusion_emitters="))
)


@pytest.fixture(scope="module")
def multi_process():
    import importlib.util

    spec = importlib.util.spec_from_file_location("multi_process", EXAMPLES / "multi_process.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("num_processes", [2, 4])
def test_every_solver_in_several_processes_equals_one_process(
    multi_process, num_processes, tmp_path
):
    out = tmp_path / "params.npz"
    logs = multi_process.launch(
        num_processes, steps=5, out=str(out), timeout=240, xla_flags=FAST_COMPILE
    )
    assert logs.count("Rank") == num_processes  # every process joined the collectives
    saved = np.load(out)
    for solver in multi_process.SOLVERS:
        single = ravel_pytree(multi_process.train(solver, 5)[0])[0]
        assert not np.allclose(single, ravel_pytree(multi_process.initial_params())[0])
        np.testing.assert_allclose(saved[solver], single, rtol=1e-10, atol=1e-12, err_msg=solver)


def test_a_checkpoint_written_by_two_processes_restores_in_one(multi_process, tmp_path):
    """K-FAC's parameters and state (factors, inverses, λ, step counts) as the two
    processes save them together with orbax, restored in this one process."""
    optional_import("orbax.checkpoint")
    checkpoint, solver = tmp_path / "checkpoint", multi_process.CHECKPOINTED
    multi_process.launch(
        2,
        steps=5,
        out=None,
        timeout=240,
        checkpoint=str(checkpoint),
        solvers=[solver],
        xla_flags=FAST_COMPILE,
    )
    params, state = multi_process.train(solver, 5)
    restored = multi_process.restore(str(checkpoint), {"params": params, "state": state})
    chex.assert_trees_all_close(restored, {"params": params, "state": state}, rtol=1e-10)


def test_a_process_whose_peer_never_comes_ends_with_the_logs(multi_process):
    with pytest.raises(RuntimeError, match=r"processes \[0\] failed") as failure:
        multi_process.launch(2, steps=1, out=None, timeout=8, missing=1, xla_flags=FAST_COMPILE)
    assert "--- process 0 ---" in str(failure.value)
