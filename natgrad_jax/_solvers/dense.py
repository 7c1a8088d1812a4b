r"""The dense solver: the full P×P Fisher and its damped inverse.

Exact, simple, O(P²) memory and O(P³) per refresh: the right choice up to a few
thousand parameters and the reference every other solver is tested against.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from natgrad_jax._fisher import parameter_count
from natgrad_jax._linalg import damped_inverse, moving_average
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._solvers.solver import Solver


class DenseState(NamedTuple):
    """Arrays of the dense solver."""

    fisher: jax.Array  # (P, P) float: the (averaged) Fisher F
    inverse: jax.Array  # (P, P) float: (F + λI)⁻¹ at the last refresh


@dataclasses.dataclass(frozen=True)
class Dense(Solver):
    """Dense P×P Fisher; solves with Cholesky of F + λI (eigendecomposition fallback)."""

    name = "dense"
    averages = True  # supports decay (EMA) and refresh_every

    def memory(self, num_params: int, num_rows: int, leaf_shapes=(), rows=None) -> int:
        """Floats an update allocates, for the memory guard: the (M, P) rows and seven
        P×P matrices (the new F and its inverse, and the measurement's, the moving
        average's and the factorisation's temporaries; XLA's memory analysis of the
        compiled update shows 7 P²)."""
        del leaf_shapes, rows
        return 7 * num_params**2 + num_rows * num_params

    def init(self, params, dtype) -> DenseState:
        num_params = parameter_count(params)
        zeros = jnp.zeros((num_params, num_params), dtype)
        return DenseState(fisher=zeros, inverse=zeros)

    def measure(self, state: DenseState, batch: CurvatureBatch, decay, is_first):
        """Measures F on ``batch`` and averages it into the state."""
        rows = batch.score_rows().astype(state.fisher.dtype)
        measured = batch.device_sum(rows.T @ rows) / batch.num_examples
        return state._replace(fisher=moving_average(state.fisher, measured, decay, is_first))

    def factorise(self, state: DenseState, batch: CurvatureBatch, damping):
        """(F + λI)⁻¹ of the current F."""
        del batch
        return state._replace(inverse=damped_inverse(state.fisher, damping))

    def solve(self, state: DenseState, batch: CurvatureBatch, vector, damping):
        """(F + λI)⁻¹ v with the factorisation of the last refresh."""
        del batch, damping
        return state.inverse @ vector, state
