r"""The block-diagonal solver: one dense Fisher block per parameter leaf.

Keeps the correlations inside each leaf (a weight matrix, a bias) and drops those
between leaves: Σ_ℓ P_ℓ² memory instead of P². Each block is exactly the corresponding
diagonal block of the dense Fisher.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from natgrad_jax._linalg import batched_inverses, moving_average
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._solvers.solver import Solver


class BlockDiagonalState(NamedTuple):
    """Arrays of the block-diagonal solver."""

    blocks: tuple  # per leaf, (P_ℓ, P_ℓ) float: the (averaged) Fisher block
    inverses: tuple  # per leaf, (P_ℓ, P_ℓ) float: (F_ℓ + λI)⁻¹ at the last refresh


@dataclasses.dataclass(frozen=True)
class BlockDiagonal(Solver):
    """One dense block per pytree leaf; Cholesky (eigendecomposition fallback) per block."""

    name = "block_diagonal"
    approximate = True
    averages = True
    per_leaf = True

    def memory(self, num_params: int, num_rows: int, leaf_shapes=(), rows=None) -> int:
        """Floats held at once, for the memory guard: five copies of each block (the
        state's blocks and inverses, and the batched factorisation's input, factor and
        fallback eigenvectors; XLA's memory analysis shows about five) and the dense
        rows."""
        del rows
        sizes = [math.prod(shape) for shape in leaf_shapes]
        return 5 * sum(size**2 for size in sizes) + num_rows * num_params

    def init(self, params, dtype) -> BlockDiagonalState:
        blocks = tuple(jnp.zeros((leaf.size, leaf.size), dtype) for leaf in jax.tree.leaves(params))
        return BlockDiagonalState(blocks=blocks, inverses=blocks)

    def measure(self, state, batch: CurvatureBatch, decay, is_first):
        """Measures each leaf's block on ``batch`` and averages it into the state."""
        dtype = state.blocks[0].dtype
        rows = (r.reshape(r.shape[0], -1).astype(dtype) for r in batch.score_rows_by_leaf())
        measured = [batch.device_sum(r.T @ r) / batch.num_examples for r in rows]
        blocks = tuple(
            moving_average(old, new, decay, is_first)
            for old, new in zip(state.blocks, measured, strict=True)
        )
        return state._replace(blocks=blocks)

    def factorise(self, state, batch: CurvatureBatch, damping):
        """(F_ℓ + λI)⁻¹ of every current block."""
        blocks, dampings = state.blocks, [damping] * len(state.blocks)
        inverses = tuple(batched_inverses(blocks, dampings, mesh=batch.mesh))
        return state._replace(inverses=inverses)

    def solve(self, state, batch: CurvatureBatch, vector, damping):
        del damping
        solved = (
            (inverse @ piece.ravel()).reshape(piece.shape)
            for inverse, piece in zip(state.inverses, vector, strict=True)
        )
        return tuple(solved), state
