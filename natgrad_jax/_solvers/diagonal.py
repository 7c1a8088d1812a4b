r"""The diagonal solver: the exact diagonal of the chosen Fisher.

diag(F)ⱼ = 1/N Σ_rows S_{rj}², the mean squared *per-row* score — not the square of the
batch gradient, which is what optax's deprecated ``fisher_diag`` computed. O(P) memory.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp

from natgrad_jax import _vectors as vectors
from natgrad_jax._linalg import damped_reciprocal, moving_average
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._solvers.factored import (
    DEFAULT_MAX_EXACT_ROWS,
    FactoredRows,
    check_max_exact_rows,
    dense_row_sizes,
    summed_over_rows,
)
from natgrad_jax._solvers.solver import Solver


class DiagonalState(NamedTuple):
    """Arrays of the diagonal solver."""

    diagonal: tuple  # per leaf, in its shape: the (averaged) diagonal of F


@dataclasses.dataclass(frozen=True)
class Diagonal(Solver):
    """diag(F) + λ, inverted elementwise (zero where both vanish: pseudo-inverse).

    With ``capture=True`` (the default) the diagonal of a captured dense layer is
    Σ (a ⊙ a)(g ⊙ g)ᵀ from one batched pass, without per-example gradients, and the
    output-Fisher rows are taken ``chunk_rows`` per example at a time (``None``: all at
    once): an exact Fisher with many outputs (784 rows per example for a Gaussian
    image model) never holds every row's g (see ``ng.Kronecker``). With
    ``fisher="exact"`` a model with more than ``max_exact_rows`` rows per example is
    refused (each row is one backward pass; see ``ng.Kronecker``).
    """

    capture: bool = True
    chunk_rows: int | None = 32
    max_exact_rows: int | None = DEFAULT_MAX_EXACT_ROWS
    name = "diagonal"
    approximate = True
    averages = True
    per_leaf = True

    def __post_init__(self):
        check_max_exact_rows(self.max_exact_rows)

    def memory(self, num_params: int, num_rows: int, leaf_shapes=(), rows=None) -> int:
        """Floats an update allocates, for the memory guard: the rows (``rows``, a
        ``RowSizes``, with capture; else (M, P)) and three P-vectors (the new diagonal,
        the update and one temporary)."""
        del leaf_shapes
        if rows is None or not self.capture:
            rows = dense_row_sizes(num_params, num_rows)
        elif self.chunk_rows is not None:
            rows = rows.in_chunks_of(self.chunk_rows)
        return rows.stored + rows.per_example + 3 * num_params

    def init(self, params, dtype) -> DiagonalState:
        return DiagonalState(diagonal=vectors.zeros_as(params, dtype))

    def measure(self, state: DiagonalState, batch: CurvatureBatch, decay, is_first):
        """Measures diag(F) on ``batch`` and averages it into the state."""
        dtype = vectors.dtype_of(state.diagonal)
        if self.capture:
            diagonal, _, _ = summed_over_rows(batch, FactoredRows.diagonal, self.chunk_rows, dtype)
        else:
            rows = batch.score_rows_by_leaf()
            diagonal = [batch.device_sum(jnp.sum(r.astype(dtype) ** 2, axis=0)) for r in rows]
        diagonal = vectors.scale(1 / batch.num_examples, diagonal)
        average = lambda old, new: moving_average(old, new, decay, is_first)
        return DiagonalState(tuple(map(average, state.diagonal, diagonal)))

    def factorise(self, state: DiagonalState, batch: CurvatureBatch, damping):
        """Nothing to factorise: the solve divides elementwise."""
        del batch, damping
        return state

    def solve(self, state: DiagonalState, batch: CurvatureBatch, vector, damping):
        del batch
        solved = (
            v * damped_reciprocal(d, damping) for v, d in zip(vector, state.diagonal, strict=True)
        )
        return tuple(solved), state
