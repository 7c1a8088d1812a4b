r"""Adam in K-FAC's eigenbasis (the rotation of SOAP, Vyas et al. 2025, and of George et
al.'s EKFAC, with K-FAC's Fisher factors in place of Shampoo's gradient statistics).

K-FAC's factors A (layer inputs) and G (output gradients) of a layer's weight W give an
orthogonal basis U = U_A ⊗ U_G in which the layer's Fisher is close to diagonal. Adam is
run on the weight's coordinates in that basis, W̃ = U_Aᵀ W U_G: with the rotated
gradient g̃ = U_Aᵀ ∇W U_G,

    m ← β₁ m + (1 − β₁) g̃,      v ← β₂ v + (1 − β₂) g̃²,
    ΔW = U_A [ (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε) ] U_Gᵀ,

which is ``optax.scale_by_adam`` applied in the rotated coordinates while the basis is
fixed, and Adam itself for a leaf that the capture does not factor (U = I). v is the
gradients' second moment, diagonal in the Fisher's Kronecker eigenbasis; the square root
makes the step Adam's (a sign-like step per eigendirection), not the Fisher's inverse, so
this solver's damping is Adam's ε, and Levenberg–Marquardt does not apply. A step costs
two rotations per layer (g̃ and the step back): 2·(K + D)·K·D multiply-adds for a K×D
weight (K² → K·b for a side kept as blocks of b).

Cadences (``refresh_every``, ``statistics_every``, ``decay``): ``measure`` averages the
factors; ``factorise`` recomputes the eigenbases, carries m into the new basis (the same
m in W's own coordinates, as SOAP keeps it) and keeps v as it is (as SOAP does: a basis
moves slowly between refreshes). A factor side over twice ``block_size`` is measured,
kept and decomposed as its diagonal blocks (``_blocks``), as K-FAC keeps it: its
eigenbasis is that of its block-diagonal part.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from natgrad_jax._blocks import block_matmul
from natgrad_jax._linalg import moving_average
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._solvers.ekfac import kronecker_eigenbases
from natgrad_jax._solvers.factored import DEFAULT_MAX_EXACT_ROWS, check_max_exact_rows
from natgrad_jax._solvers.kronecker import DEFAULT_BLOCK_SIZE, Kronecker, split_shape
from natgrad_jax._solvers.solver import Solver


class EigenbasisAdamLeafState(NamedTuple):
    """Arrays of one parameter leaf (m×n as Kronecker's ``split_shape``)."""

    left: jax.Array  # (m, m) float: factor over the leading axes (A or G), or (B, b, b):
    #   its diagonal blocks (``Kronecker.side_shape``)
    right: jax.Array  # (n, n) or (B, b, b) float: factor over the trailing axes
    left_basis: jax.Array  # float, ``left``'s shape: its eigenvectors at the last refresh
    right_basis: jax.Array  # float, ``right``'s shape: its eigenvectors
    first_moment: jax.Array  # (m, n) float: Adam's m, in the eigenbasis (own: unfactored)
    second_moment: jax.Array  # (m, n) float: Adam's v, in the eigenbasis (own: unfactored)


class EigenbasisAdamState(NamedTuple):
    """One ``EigenbasisAdamLeafState`` per leaf, and the number of solves t."""

    leaves: tuple
    count: jax.Array  # int32


@dataclasses.dataclass(frozen=True)
class EigenbasisAdam(Solver):
    """Adam's moments in K-FAC's eigenbasis: use it through ``ng.eigenbasis_adam``.

    Args:
      b1: decay of the first moment (Adam's β₁), in [0, 1).
      b2: decay of the second moment (Adam's β₂), in [0, 1).
      approximation: ``"expand"`` or ``"reduce"`` for the factors of weights shared
        across positions, as for ``ng.Kronecker``.
      block_size: a factor side over twice this is kept as its diagonal blocks of
        about this side, each with its own eigenbasis (``None``: whole).
      max_exact_rows: with ``fisher="exact"``, the most output-Fisher rows per
        example a refresh back-propagates (one backward pass each), as for
        ``ng.Kronecker``: the transform refuses a model with more (a per-token
        language model: positions × classes). ``None``: no limit.

    The transform's damping is Adam's ε here. Example (a leaf the capture does not
    factor is plain Adam):

      >>> import jax.numpy as jnp, optax, natgrad_jax as ng
      >>> model = ng.Model(lambda w, x: x * w, ng.Gaussian(1.0))
      >>> w, x, g = jnp.ones(3), jnp.ones((2, 3)), jnp.array([1.0, -2.0, 3.0])
      >>> tx = ng.scale_by_natural_gradient(model, solver=ng.EigenbasisAdam(), damping=1e-8)
      >>> d, _ = tx.update(g, tx.init(w), w, inputs=x)
      >>> adam = optax.scale_by_adam(eps=1e-8)
      >>> bool(jnp.allclose(d, adam.update(g, adam.init(w))[0]))
      True
    """

    b1: float = 0.9
    b2: float = 0.999
    approximation: str = "expand"
    block_size: int | None = DEFAULT_BLOCK_SIZE
    max_exact_rows: int | None = DEFAULT_MAX_EXACT_ROWS

    name = "eigenbasis_adam"
    approximate = True
    averages = True
    per_leaf = True
    applies_curvature_inverse = False
    adaptive_damping_refusal = (
        "its damping is Adam's ε (added to the square root of the second moments), "
        "not a curvature's λ; pass a number"
    )

    def __post_init__(self):
        check_max_exact_rows(self.max_exact_rows)
        for name in ("b1", "b2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"EigenbasisAdam: {name} must be in [0, 1), got {value!r}.")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"EigenbasisAdam: block_size must be ≥ 1, got {self.block_size!r}.")
        self._kronecker  # noqa: B018 (validates ``approximation``)

    @property
    def _kronecker(self) -> Kronecker:
        # Every factor a matrix or its blocks (an eigenbasis needs one), never a diagonal.
        return Kronecker(self.approximation, max_factor_size=None, block_size=self.block_size)

    def memory(self, num_params: int, num_rows: int, leaf_shapes=(), rows=None) -> int:
        """Floats held at once, for the memory guard: four copies of each leaf's two
        factors as they are kept (the factors and eigenbases in the state, the
        eigendecomposition's input and output), four P-vectors (the two moments, the
        update, a rotated gradient) and the rows K-FAC's statistics are measured from."""
        floats = self._kronecker.factor_floats
        factors = sum(floats(m) + floats(n) for m, n in map(split_shape, leaf_shapes))
        statistics = self._kronecker.statistics_memory(num_rows, leaf_shapes, rows)
        return 4 * factors + 4 * num_params + statistics

    def init(self, params, dtype) -> EigenbasisAdamState:
        leaves = []
        for leaf in jax.tree.leaves(params):
            m, n = split_shape(np.shape(leaf))
            left, right = map(self._kronecker.side_shape, (m, n))
            zeros = lambda *shape: jnp.zeros(shape, dtype)
            leaves.append(
                EigenbasisAdamLeafState(
                    left=zeros(*left),
                    right=zeros(*right),
                    left_basis=zeros(*left),
                    right_basis=zeros(*right),
                    first_moment=zeros(m, n),
                    second_moment=zeros(m, n),
                )
            )
        return EigenbasisAdamState(tuple(leaves), jnp.zeros([], jnp.int32))

    def measure(self, state: EigenbasisAdamState, batch: CurvatureBatch, decay, is_first):
        """Averages this batch's K-FAC factors into the state (the moments move in
        ``solve``)."""
        factors = self._kronecker.measured(batch, state.leaves[0].left.dtype).factors
        leaves = list(state.leaves)
        for k, (left, right) in factors.items():
            leaf = leaves[k]
            leaves[k] = leaf._replace(
                left=moving_average(leaf.left, left, decay, is_first),
                right=moving_average(leaf.right, right, decay, is_first),
            )
        return state._replace(leaves=tuple(leaves))

    def factorise(self, state: EigenbasisAdamState, batch: CurvatureBatch, damping):
        """The eigenbases of the current factors; the first moment is carried from the
        old basis to the new (U_newᵀ U_old m U_oldᵀ U_new), the second kept as it is."""
        del damping  # Adam's ε, applied in the solve
        factored = self._kronecker.factored_leaves(batch)
        own = [  # the first moments in each leaf's own coordinates
            _rotated(leaf, leaf.first_moment, back=True) if k in factored else None
            for k, leaf in enumerate(state.leaves)
        ]
        leaves = kronecker_eigenbases(self._kronecker, state.leaves, batch)
        for k in factored:
            leaves[k] = leaves[k]._replace(first_moment=_rotated(leaves[k], own[k]))
        return state._replace(leaves=tuple(leaves))

    def solve(self, state: EigenbasisAdamState, batch: CurvatureBatch, vector, damping):
        """One Adam step in the eigenbasis on the gradient ``vector``: the moments move,
        so the transform calls it once a step, with the gradient."""
        factored = self._kronecker.factored_leaves(batch)
        count = state.count + 1
        steps = count.astype(vector[0].dtype)
        first_correction, second_correction = 1 - self.b1**steps, 1 - self.b2**steps
        directions, leaves = [], []
        for k, (leaf, gradient) in enumerate(zip(state.leaves, vector, strict=True)):
            matrix = gradient.reshape(leaf.first_moment.shape)
            rotated = _rotated(leaf, matrix) if k in factored else matrix
            first = self.b1 * leaf.first_moment + (1 - self.b1) * rotated
            second = self.b2 * leaf.second_moment + (1 - self.b2) * rotated**2
            scale = jnp.sqrt(second / second_correction) + jnp.asarray(damping, second.dtype)
            # 0 where nothing has moved yet and ε = 0 (Adam would give 0/0).
            step = jnp.where(scale > 0, first / first_correction, 0.0) / jnp.where(
                scale > 0, scale, 1.0
            )
            if k in factored:
                step = _rotated(leaf, step, back=True)
            directions.append(step.reshape(gradient.shape))
            leaves.append(leaf._replace(first_moment=first, second_moment=second))
        return tuple(directions), EigenbasisAdamState(tuple(leaves), count)


def _rotated(leaf: EigenbasisAdamLeafState, matrix: jax.Array, back: bool = False) -> jax.Array:
    """U_Lᵀ M U_R, the m×n matrix M in the leaf's eigenbasis (``back``: U_L M U_Rᵀ)."""
    left = block_matmul(leaf.left_basis, matrix, transpose=not back)
    return block_matmul(leaf.right_basis, left.T, transpose=not back).T
