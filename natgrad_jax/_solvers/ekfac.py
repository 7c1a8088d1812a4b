r"""Eigenvalue-corrected K-FAC (EKFAC, George et al. 2018).

K-FAC approximates a layer's Fisher block by A ⊗ G = (U_A ⊗ U_G)(Λ_A ⊗ Λ_G)(U_A ⊗ U_G)ᵀ.
EKFAC keeps the Kronecker eigenbasis U = U_A ⊗ U_G but replaces the eigenvalues Λ_A ⊗ Λ_G
by the Fisher's own second moments in that basis,

    s_{kd} = 1/N Σ_{n,r} ((U_Aᵀ ∇W_{rn} U_G)_{kd})²   = diag(Uᵀ F U),

where ∇W_{rn} = Σ_t a_{nt} g_{rnt}ᵀ is score row (r, n) of the layer as a K×D matrix. So
F ≈ U diag(s) Uᵀ is the best diagonal approximation of F in the K-FAC eigenbasis (it is
never worse than K-FAC in Frobenius norm), and the damped solve is exact in that basis:

    ΔW = U_A [(U_Aᵀ V U_G) / (s + λ)] U_Gᵀ.

It is exact when F is diagonal in that basis: for a single example (A = aaᵀ), and for
any batch whose Fisher block is a Kronecker product. The factors and s come from the
layer inputs and output-gradients that capture finds, like K-FAC's (a bias of several
axes: its score rows as matrices, with K-FAC's tensor-normal factors); a leaf that
capture does not explain uses its exact diagonal.

Cadences (``statistics_every``, ``refresh_every``): ``measure`` averages the factors and
re-estimates s in the current eigenbasis (cheap: a projection of the rows);
``factorise`` recomputes the eigenbases and measures s in the new basis on the batch.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from natgrad_jax._linalg import damped_reciprocal, eigenbases, moving_average
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._solvers.factored import (
    DEFAULT_MAX_EXACT_ROWS,
    check_max_exact_rows,
    summed_over_rows,
)
from natgrad_jax._solvers.kronecker import Kronecker, output_side, split_shape, unused_diagonal
from natgrad_jax._solvers.solver import Solver


class EkfacLeafState(NamedTuple):
    """Arrays of one parameter leaf (m×n as Kronecker's ``split_shape``)."""

    left: jax.Array  # (m, m) float: factor over the leading axes (A or G)
    right: jax.Array  # (n, n) float: factor over the trailing axes
    left_basis: jax.Array  # (m, m) float: eigenvectors of ``left`` at the last factorisation
    right_basis: jax.Array  # (n, n) float: eigenvectors of ``right``
    scaling: jax.Array  # (m, n) float: second moments s in that eigenbasis
    diagonal: jax.Array  # float, the leaf's shape: exact diagonal, used when it is not factored


class EkfacState(NamedTuple):
    """Arrays of the EKFAC solver: one ``EkfacLeafState`` per leaf."""

    leaves: tuple


# Σ_r (g_r U)² over a layer's output-Fisher rows (of one position) is taken this many rows
# at a time, in at most ``MOMENT_GROUPS`` groups (a bounded program), not every row's
# rotation at once. On the 512-512-512-16 MLP with the exact Fisher (16 rows, float64):
# one device's step held 37.6 MiB against 41.5, and with its weights over 'model' of the
# 2 × 4 mesh of docs/sharding.md 13.8 MiB a device against 14.0; the step took the same
# time (133–135 ms against 134–136). A ``lax.scan`` over the groups copied the rows into
# its loop: 48.0 MiB on one device.
MOMENT_ROWS = 8
MOMENT_GROUPS = 4


def _second_moments(rows, layer_index, orientation, left_basis, right_basis):
    """s = 1/N Σ_{n,r} (U_Lᵀ ∇W_{rn} U_R)² for one captured layer (leaf orientation).
    Of one position it is (a U_a)²ᵀ Σ_r (g_r U_g)², the (N, D) sum taken in groups of
    rows (``MOMENT_ROWS``)."""
    if orientation == "tensor_normal":  # the rows ∇W_{rn} themselves, as m×n matrices
        shape = (left_basis.shape[0], right_basis.shape[0])
        rotated = left_basis.T @ rows.leaf_gradients(layer_index, shape) @ right_basis
        return jnp.sum(rotated**2, axis=0) / rows.num_examples
    a, g = rows.layer_inputs(layer_index), rows.gradients[layer_index]  # (N, T, K), (R, N, T, D)
    a_basis, g_basis = (
        (left_basis, right_basis) if orientation == "left_is_inputs" else (right_basis, left_basis)
    )
    a = a @ a_basis
    if a.shape[1] == 1:  # one position: the square of an outer product is separable
        squares = lambda group: jnp.sum((group[:, :, 0] @ g_basis) ** 2, axis=0)  # (N, D)
        moments = (a[:, 0] ** 2).T @ _summed_over_groups(squares, g)
    else:
        moments = jnp.sum(jnp.einsum("ntk,rntd->rnkd", a, g @ g_basis) ** 2, axis=(0, 1))
    moments = moments / rows.num_examples
    return moments if orientation == "left_is_inputs" else moments.T


def _summed_over_groups(summand, rows: jax.Array) -> jax.Array:
    """Σ of ``summand(group)`` over consecutive groups of the rows (the leading axis):
    groups of about ``MOMENT_ROWS``, at most ``MOMENT_GROUPS`` of them, as even as they
    can be (the last may be smaller)."""
    count = rows.shape[0]
    groups = min(-(-count // MOMENT_ROWS), MOMENT_GROUPS)
    size = -(-count // groups)
    return sum(summand(rows[start : start + size]) for start in range(0, count, size))


def _moments_in(leaves, factored):
    """rows ↦ {factored leaf: s of ``_second_moments`` in the leaf's bases}: a sum over
    the output-Fisher rows."""

    def moments(rows):
        return {
            k: _second_moments(rows, *factored[k], leaves[k].left_basis, leaves[k].right_basis)
            for k in factored
        }

    return moments


def kronecker_eigenbases(kronecker: Kronecker, leaves, batch) -> list:
    """The leaves (states with ``left``, ``right``, ``left_basis``, ``right_basis``) with
    the eigenbases of their current factors (``_linalg.eigenbases``; a factor kept as its
    diagonal blocks gets the bases of its blocks); a bias that shares its weight's G
    (``Kronecker.shared_output_factors``) takes the weight's basis of it."""
    factored = kronecker.factored_leaves(batch)
    shared = kronecker.shared_output_factors(batch)
    shapes = [split_shape(np.shape(leaf)) for leaf in jax.tree.leaves(batch.params)]
    leaves = list(leaves)
    owned = sorted(set(factored) - set(shared))
    factors = [f for k in owned for f in (leaves[k].left, leaves[k].right)]
    sizes = [size for k in owned for size in shapes[k]]
    bases = iter(eigenbases(factors, batch.mesh, sizes))
    for k in owned:
        leaves[k] = leaves[k]._replace(left_basis=next(bases), right_basis=next(bases))
    for bias, weight in shared.items():
        bases_of_weight = (leaves[weight].left_basis, leaves[weight].right_basis)
        g_basis = bases_of_weight[output_side(factored[weight][1])]
        leaves[bias] = leaves[bias]._replace(
            left_basis=jnp.ones_like(leaves[bias].left), right_basis=g_basis
        )
    return leaves


@dataclasses.dataclass(frozen=True)
class EKFAC(Solver):
    """EKFAC: K-FAC's eigenbasis with the Fisher's own second moments in it.

    Args:
      approximation: ``"expand"`` or ``"reduce"`` for the factors of weights shared
        across positions, as for ``ng.Kronecker``.
      chunk_rows: the output-Fisher rows per example are taken this many at a time
        (``None``: all at once), as for ``ng.Kronecker``: the factors and the second
        moments s are sums over rows. A refresh then takes the rows twice, once for the
        factors and once for s in their new eigenbasis; with every row at once it
        takes them once. Under tensor parallelism each row's backward pass holds the
        layers' output-gradients at full width, so fewer rows at a time hold less per
        device (docs/sharding.md).
      max_exact_rows: with ``fisher="exact"``, the most output-Fisher rows per
        example a refresh back-propagates (one backward pass each); the transform
        refuses a model with more (a per-token language model: positions × classes)
        and names the remedies. ``None``: no limit.

    Example:
      >>> import jax, jax.numpy as jnp, natgrad_jax as ng
      >>> model = ng.Model(lambda w, x: x @ w, ng.Categorical())
      >>> w, x = jnp.zeros((3, 2)), jnp.array([[1.0, 2.0, -1.0]])
      >>> tx = ng.scale_by_natural_gradient(model, solver=ng.EKFAC(), damping=0.1)
      >>> g = jnp.ones((3, 2))
      >>> d, state = tx.update(g, tx.init(w), w, inputs=x)
      >>> f = ng.fisher(model, w, x)   # one example: EKFAC is exact
      >>> bool(jnp.allclose(d.ravel(), jnp.linalg.solve(f + 0.1 * jnp.eye(6), g.ravel())))
      True
    """

    approximation: str = "expand"
    chunk_rows: int | None = 32
    max_exact_rows: int | None = DEFAULT_MAX_EXACT_ROWS

    name = "ekfac"
    approximate = True
    averages = True
    per_leaf = True

    def __post_init__(self):
        check_max_exact_rows(self.max_exact_rows)

    @property
    def _kronecker(self) -> Kronecker:
        # Eigenbases need whole matrices.
        return Kronecker(
            self.approximation, max_factor_size=None, chunk_rows=self.chunk_rows, block_size=None
        )

    def memory(self, num_params: int, num_rows: int, leaf_shapes=(), rows=None) -> int:
        """Floats held at once, for the memory guard: four copies of each leaf's two
        factors (the factors and eigenbases in the state, the eigendecomposition's input
        and output), four P-vectors (scalings, diagonals, the update, a temporary), and
        the layers' inputs and output-gradients, every row at once but each layer's
        reduced to its statistics as the backward pass produces it."""
        factors = sum(m * m + n * n for m, n in map(split_shape, leaf_shapes))
        if rows is None:
            return 4 * factors + 4 * num_params + num_rows * sum(map(sum, leaf_shapes))
        if self.chunk_rows is not None:
            rows = rows.in_chunks_of(self.chunk_rows)
        rows = rows._replace(streamed=True)
        return 4 * factors + 4 * num_params + rows.stored + rows.per_example

    def init(self, params, dtype) -> EkfacState:
        leaves = []
        for leaf in jax.tree.leaves(params):
            m, n = split_shape(np.shape(leaf))
            zeros = lambda *shape: jnp.zeros(shape, dtype)
            leaves.append(
                EkfacLeafState(
                    left=zeros(m, m),
                    right=zeros(n, n),
                    left_basis=zeros(m, m),
                    right_basis=zeros(n, n),
                    scaling=zeros(m, n),
                    diagonal=jnp.zeros_like(leaf, dtype=dtype),
                )
            )
        return EkfacState(tuple(leaves))

    def _update(self, state, batch, decay, is_first, refactorise):
        dtype = state.leaves[0].diagonal.dtype
        factored = self._kronecker.factored_leaves(batch)
        # Measured in the current basis, s is summed in the factors' pass; a new basis
        # needs the new factors first.
        in_current_basis = None if refactorise else _moments_in(state.leaves, factored)
        measurement = self._kronecker.measured(batch, dtype, also=in_current_basis)
        average = lambda old, new: moving_average(old, new, decay, is_first)
        new_leaves = []
        leaves = jax.tree.leaves(batch.params)
        for k, (old, diagonal) in enumerate(zip(state.leaves, measurement.diagonals, strict=True)):
            if k not in factored:
                new_leaves.append(old._replace(diagonal=average(old.diagonal, diagonal)))
                continue
            left, right = measurement.factors[k]
            left, right = average(old.left, left), average(old.right, right)
            unused = unused_diagonal(old.diagonal, leaves[k])
            new_leaves.append(old._replace(left=left, right=right, diagonal=unused))
        if not refactorise:
            for k, moments in measurement.also.items():
                new_leaves[k] = new_leaves[k]._replace(
                    scaling=average(state.leaves[k].scaling, moments)
                )
            return EkfacState(tuple(new_leaves))
        new_leaves = kronecker_eigenbases(self._kronecker, new_leaves, batch)
        # In a new basis the old moments mean nothing: start from this batch's.
        return self._with_moments(new_leaves, batch, factored, measurement.rows)

    def _with_moments(self, leaves, batch, factored, rows=None):
        """The leaves with s measured on ``batch`` in their bases: from ``rows`` where
        every row is at hand, else in a pass of their own (chunk by chunk)."""
        in_their_bases = _moments_in(leaves, factored)
        if rows is None:
            dtype = leaves[0].diagonal.dtype
            moments, _, _ = summed_over_rows(batch, in_their_bases, self.chunk_rows, dtype)
        else:
            moments = in_their_bases(rows)
        leaves = list(leaves)
        for k, scaling in moments.items():
            leaves[k] = leaves[k]._replace(scaling=scaling)
        return EkfacState(tuple(leaves))

    def measure(self, state: EkfacState, batch: CurvatureBatch, decay, is_first):
        """Averages the factors, the diagonals and s (in the current basis)."""
        return self._update(state, batch, decay, is_first, refactorise=False)

    def factorise(self, state: EkfacState, batch: CurvatureBatch, damping):
        """New eigenbases of the current factors, and s measured in them on ``batch``."""
        del damping  # applied in the solve: (s + λ)
        factored = self._kronecker.factored_leaves(batch)
        # Only the rows are needed here: the factors were averaged by ``measure``.
        new_leaves = kronecker_eigenbases(self._kronecker, state.leaves, batch)
        return self._with_moments(new_leaves, batch, factored)

    def refresh(self, state: EkfacState, batch: CurvatureBatch, damping, decay, is_first):
        del damping
        return self._update(state, batch, decay, is_first, refactorise=True)

    def solve(self, state: EkfacState, batch: CurvatureBatch, vector, damping):
        factored = self._kronecker.factored_leaves(batch)
        solved = []
        for k, (leaf, piece) in enumerate(zip(state.leaves, vector, strict=True)):
            scale = leaf.scaling if k in factored else leaf.diagonal
            inverse = damped_reciprocal(scale, damping)
            if k in factored:
                matrix = piece.reshape(scale.shape)
                rotated = leaf.left_basis.T @ matrix @ leaf.right_basis
                solved.append(
                    (leaf.left_basis @ (rotated * inverse) @ leaf.right_basis.T).reshape(
                        piece.shape
                    )
                )
            else:
                solved.append(piece * inverse)
        return tuple(solved), state
