"""The memory guard: what a solver would allocate in an update, checked before it runs.

Each solver estimates its own floats (``Solver.memory``) from the parameters' shapes and,
with a batch, from what ``capture`` found in the model (``RowSizes``: the layers'
inputs a and output-gradients g over their positions, the rows of the other leaves).
The guard compares that with ``max_curvature_bytes`` and, when it refuses, names only
the remedies that would pass it: other solvers, the Monte-Carlo Fisher, a smaller batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from natgrad_jax._capture import Capture, capture
from natgrad_jax._solvers.auto import Auto
from natgrad_jax._solvers.block import BlockDiagonal
from natgrad_jax._solvers.conjugate_gradient import ConjugateGradient
from natgrad_jax._solvers.dense import Dense
from natgrad_jax._solvers.diagonal import Diagonal
from natgrad_jax._solvers.eigenbasis_adam import EigenbasisAdam
from natgrad_jax._solvers.ekfac import EKFAC
from natgrad_jax._solvers.factored import captured_row_sizes
from natgrad_jax._solvers.kronecker import Kronecker
from natgrad_jax._solvers.solver import Solver
from natgrad_jax._solvers.woodbury import Woodbury

PyTree = Any

SOLVERS = {
    "auto": Auto,
    "dense": Dense,
    "woodbury": Woodbury,
    "cg": ConjugateGradient,
    "diagonal": Diagonal,
    "block_diagonal": BlockDiagonal,
    "kronecker": Kronecker,
    "ekfac": EKFAC,
    "eigenbasis_adam": EigenbasisAdam,
}
# What a refusal may offer instead, cheapest in memory last.
CHEAPER_SOLVERS = ("auto", "kronecker", "cg", "diagonal")
# A float: optax.inject_hyperparams makes every numeric default an array, and 2³² does
# not fit the int32 an int becomes without jax_enable_x64.
DEFAULT_MAX_CURVATURE_BYTES = 4.0 * 2**30


def in_units(num_bytes: float) -> str:
    """A byte count for a message: GiB from 1 GiB up, else MiB."""
    if num_bytes >= 2**30:
        return f"{num_bytes / 2**30:.2f} GiB"
    return f"{num_bytes / 2**20:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class Problem:
    """The sizes an estimate depends on: the leaves, and (with a batch) the capture,
    the score rows M, the examples N and the Fisher kind they come from."""

    leaf_shapes: tuple
    itemsize: int
    captured: Capture | None = None
    num_rows: int = 0
    num_examples: int = 0
    kind: str | None = None

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for shape in self.leaf_shapes)

    def bytes_for(self, solver: Solver) -> int:
        """What ``solver`` would allocate in an update of this problem (at ``init``,
        without a batch: its state)."""
        rows = None
        if self.captured is not None:
            rows = captured_row_sizes(
                self.captured, self.leaf_shapes, self.num_rows, self.num_examples
            )
        floats = solver.memory(self.num_params, self.num_rows, self.leaf_shapes, rows)
        return floats * self.itemsize

    def with_examples(self, num_examples: int) -> Problem:
        """The same model on a batch of ``num_examples``."""
        rows_per_example = self.num_rows // max(self.num_examples, 1)
        return dataclasses.replace(
            self, num_examples=num_examples, num_rows=rows_per_example * num_examples
        )


def problem_of(params: PyTree, dtype, batch=None) -> Problem:
    """The ``Problem`` of an update on ``batch`` (a ``CurvatureBatch``; None at ``init``)."""
    leaf_shapes = tuple(tuple(jnp.shape(leaf)) for leaf in jax.tree.leaves(params))
    itemsize = jnp.dtype(dtype).itemsize
    if batch is None:
        return Problem(leaf_shapes, itemsize)
    captured = capture(batch.model.apply_fn, batch.params, batch.inputs)
    return Problem(leaf_shapes, itemsize, captured, batch.num_rows, batch.num_examples, batch.kind)


def remedies(solver: Solver, problem: Problem, max_bytes: float):
    """The changes that bring the update within ``max_bytes``, each checked: other
    solvers (that ``exact_rows_refusal`` does not refuse either), the Monte-Carlo
    Fisher (where the exact one has more rows than examples: one sampled label each),
    the largest batch that fits (halving)."""
    found = []
    fitting = [
        name
        for name in CHEAPER_SOLVERS
        if name != solver.name
        and problem.bytes_for(SOLVERS[name]()) <= max_bytes
        and exact_rows_refusal(SOLVERS[name](), problem) is None
    ]
    if fitting:
        names = [repr(name) for name in fitting]
        found.append("solver=" + (" or ".join if len(names) < 3 else _listed)(names))
    if problem.kind == "exact" and problem.num_rows > problem.num_examples:
        sampled = dataclasses.replace(problem, num_rows=problem.num_examples, kind="monte_carlo")
        if sampled.bytes_for(solver) <= max_bytes:
            found.append("fisher='monte_carlo' (one sampled label per example: fewer rows)")
    examples = problem.num_examples // 2
    while examples >= 1 and problem.with_examples(examples).bytes_for(solver) > max_bytes:
        examples //= 2
    if 1 <= examples < problem.num_examples:
        found.append(f"a batch of at most {examples} examples")
    return found


def _listed(names) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1]


def refusal(solver: Solver, problem: Problem, max_bytes: float):
    """The message of a refused update, or None when it fits ``max_bytes``."""
    needed = problem.bytes_for(solver)
    if needed <= max_bytes:
        return None
    fixes = remedies(solver, problem, max_bytes)
    if fixes:
        offer = "Use " + "; ".join([*fixes, "or raise max_curvature_bytes."])
    else:
        offer = "No other solver, Fisher or batch size fits: raise max_curvature_bytes."
    rows = f"{problem.num_rows} score rows" if problem.captured else "its state alone"
    return (
        f"solver {solver.name!r} would allocate about {in_units(needed)} in an update "
        f"(P = {problem.num_params}, {rows}), over max_curvature_bytes = "
        f"{in_units(max_bytes)}. {offer}"
    )


def exact_rows_refusal(solver: Solver, problem: Problem, max_bytes: float | None = None):
    """The message of an update whose exact-Fisher statistics would back-propagate more
    output-Fisher rows per example than ``solver.exact_rows_limit()`` allows (one
    backward pass each), or None. It offers only what passes both guards at
    ``max_bytes`` (None: no memory budget): the Monte-Carlo Fisher (``num_samples``
    rows per example), CG's matrix-free products of the exact Fisher (for a solver
    that ``applies_curvature_inverse``), the solver without the limit."""
    limit = solver.exact_rows_limit()
    if problem.kind != "exact" or limit is None or problem.num_examples == 0:
        return None
    rows = problem.num_rows // problem.num_examples
    if rows <= limit:
        return None
    fits = lambda candidate, on=problem: max_bytes is None or on.bytes_for(candidate) <= max_bytes
    sampled = dataclasses.replace(problem, num_rows=problem.num_examples, kind="monte_carlo")
    candidates = [
        ("fisher='monte_carlo' (one backward pass per sampled label)", fits(solver, sampled))
    ]
    if solver.applies_curvature_inverse:
        cg = "solver='cg' (the exact Fisher's matrix-free products)"
        candidates.append((cg, fits(ConjugateGradient())))
    limitable = dataclasses.is_dataclass(solver) and any(
        field.name == "max_exact_rows" for field in dataclasses.fields(solver)
    )
    if limitable:  # a solver of its own may set a limit without the field
        unlimited = dataclasses.replace(solver, max_exact_rows=None)
        name = f"solver=ng.{type(solver).__name__}(max_exact_rows=None)"
        if isinstance(solver, EigenbasisAdam):
            name += " (ng.eigenbasis_adam's max_exact_rows=None)"
        candidates.append((name, fits(unlimited)))
    fixes = [fix for fix, passes in candidates if passes]
    offer = "Use " + " or ".join(fixes) + "." if fixes else "Nothing else fits max_curvature_bytes."
    return (
        f"fisher='exact' with solver {solver.name!r} back-propagates each of the {rows:,} "
        "output-Fisher rows of an example (one per entry of its outputs: positions × "
        "classes for a per-token model) at every refresh, a backward pass each, over its "
        f"max_exact_rows = {limit:,}. {offer}"
    )
