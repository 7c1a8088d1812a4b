r"""The dense representation: the full P×P Fisher and its damped inverse.

Exact, simple and O(P²) memory, O(P³) per refresh: the right choice up to a few
thousand parameters and the reference every other representation is tested against.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from natgrad_jax._curvature.batch import CurvatureBatch
from natgrad_jax._solvers import damped_inverse


class DenseState(NamedTuple):
    """Arrays of the dense representation."""

    fisher: jax.Array  # (P, P) float: the (averaged) Fisher F
    inverse: jax.Array  # (P, P) float: (F + λI)⁻¹ at the last refresh


@dataclasses.dataclass(frozen=True)
class Dense:
    """Dense P×P Fisher; solves with Cholesky of F + λI (eigh fallback)."""

    name = "dense"

    def init(self, num_params: int, dtype: jnp.dtype) -> DenseState:
        zeros = jnp.zeros((num_params, num_params), dtype)
        return DenseState(fisher=zeros, inverse=zeros)

    def refresh(
        self, state: DenseState, batch: CurvatureBatch, damping, decay, is_first
    ) -> DenseState:
        """Measures F on ``batch``, averages it into the state and refactorises F + λI."""
        rows = batch.score_rows().astype(state.fisher.dtype)
        batch_fisher = rows.T @ rows / batch.num_examples
        decay = jnp.asarray(decay, state.fisher.dtype)
        fisher = jnp.where(
            is_first, batch_fisher, decay * state.fisher + (1 - decay) * batch_fisher
        )
        return DenseState(fisher=fisher, inverse=damped_inverse(fisher, damping))

    def solve(self, state: DenseState, vector: jax.Array) -> jax.Array:
        """(F + λI)⁻¹ v with the factorisation of the last refresh."""
        return state.inverse @ vector
