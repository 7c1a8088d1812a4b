r"""The low-rank (Woodbury, "minSR") representation: solve through the rows' kernel.

With F = SᵀS/N for M score rows S (M×P), the push-through identity gives

    (SᵀS/N + λI)⁻¹ g = (g − Sᵀ (NλI + SSᵀ)⁻¹ S g) / λ,

an M×M solve instead of a P×P one — the right tool when M ≪ P (Chen & Heyl 2023;
Rende et al. 2023). Written with the eigendecomposition SSᵀ = V diag(N w) Vᵀ and
U = SᵀV diag(1/√(N w)) (the eigenvectors of F with eigenvalues w), it reads

    U diag(1/(w + λ)) Uᵀ g  +  (I − UUᵀ) g / λ;

the second term, the part of g outside the span of the rows, is what a truncated
low-rank solve drops. For λ = 0 the pseudo-inverse U diag(1/w) Uᵀ g is returned.

**SPRING momentum** (Goldshlager, Abrahamsen & Lin 2024). With ``spring=μ`` the
direction minimises the damped quadratic model with the damping centred on μ times the
previous direction d₋ instead of on 0:

    d = argmin ½ dᵀFd − gᵀd + ½ λ ‖d − μ d₋‖²  =  (F + λI)⁻¹ (g + λ μ d₋),

computed as μ d₋ + (F + λI)⁻¹ (g − μ F d₋), so that the vector solved against stays in
the span of the rows when g does (a least-squares gradient), and λ → 0 stays stable.
Across steps the damping then acts like a Kaczmarz method's momentum: it carries
information from earlier batches' rows into the low-rank solve. μ = 0 is the plain
Woodbury solve.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from natgrad_jax import _vectors as vectors
from natgrad_jax._fisher import parameter_count
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._solvers.factored import dense_row_sizes, factored_rows
from natgrad_jax._solvers.solver import Solver


class WoodburyState(NamedTuple):
    """The low-rank representation uses this batch's rows; with SPRING momentum it keeps
    the previous direction d₋ (P,), else nothing."""

    previous: jax.Array | None = None
    quadratic: jax.Array | None = None  # dᵀ(F + λI)d of d: not gᵀd once μ > 0


def woodbury_solve_factored(
    kernel, rows_times, rows_transpose_times, num_examples, vector, damping
):
    """(SᵀS/N + λI)⁻¹ v given S Sᵀ and the products v ↦ S v, u ↦ Sᵀ u (S never formed).

    Eigendecomposition of the M×M kernel SSᵀ/N = V diag(w) Vᵀ, then one step of
    iterative refinement with the products themselves (see ``_eigenbasis_solve``).
    """
    kernel = kernel / num_examples
    eigenvalues, eigenvectors = jnp.linalg.eigh(0.5 * (kernel + kernel.T))
    damping = jnp.asarray(damping, vector.dtype)

    def solve(v):
        return _eigenbasis_solve(
            eigenvalues, eigenvectors, rows_times, rows_transpose_times, num_examples, v, damping
        )

    def residual(d):
        return vector - (rows_transpose_times(rows_times(d)) / num_examples + damping * d)

    # A small λ (energy natural gradient uses 1e-10) leaves the first solve with an
    # error of eps·|v|/λ along every direction; the residual, measured with the rows,
    # is accurate to eps·‖F‖·|d|, and corrections bring d to that level (like a
    # backward-stable dense Cholesky solve).
    direction = solve(vector)
    for _ in range(REFINEMENT_STEPS):
        direction = jnp.where(damping > 0, direction + solve(residual(direction)), direction)
    return direction


REFINEMENT_STEPS = 2


def _eigenbasis_solve(
    eigenvalues, eigenvectors, rows_times, rows_transpose_times, num_examples, vector, damping
):
    """λ > 0: (v − Sᵀ V diag(1/(N(w + λ))) Vᵀ S v) / λ, every eigenvalue kept (clipped at
    0, so w + λ ≥ λ); λ = 0: the pseudo-inverse Sᵀ V diag(1/(N w²)) Vᵀ S v on the
    eigenvalues above round-off."""
    projected = eigenvectors.T @ rows_times(vector) / num_examples  # Vᵀ S v / N
    safe_damping = jnp.where(damping > 0, damping, 1.0)
    nonnegative = jnp.maximum(eigenvalues, 0.0)
    correction = rows_transpose_times(eigenvectors @ (projected / (nonnegative + safe_damping)))
    damped = (vector - correction) / safe_damping
    eps = jnp.finfo(vector.dtype).eps
    tol = eigenvalues.shape[0] * eps * jnp.maximum(jnp.max(jnp.abs(eigenvalues)), eps)
    kept = eigenvalues > tol
    safe_w = jnp.where(kept, eigenvalues, 1.0)
    pseudo = rows_transpose_times(eigenvectors @ jnp.where(kept, projected / safe_w**2, 0.0))
    return jnp.where(damping > 0, damped, pseudo)


def dense_products(rows):
    """(S Sᵀ, v ↦ S v, u ↦ Sᵀ u) of a dense (M, P) matrix of score rows S."""
    return rows @ rows.T, lambda v: rows @ v, lambda u: rows.T @ u


def woodbury_solve(rows, num_examples, vector, damping):
    """(SᵀS/N + λI)⁻¹ v for a dense (M, P) matrix of score rows S."""
    return woodbury_solve_factored(*dense_products(rows), num_examples, vector, damping)


@dataclasses.dataclass(frozen=True)
class Woodbury(Solver):
    """Woodbury solve with this batch's score rows: exact, O(M² P + M³) per step.

    With ``capture=True`` (the default) the kernel SSᵀ and the products S v, Sᵀ u come
    from the layers' inputs and output-gradients (``ng.describe``), never from the
    (M, P) matrix of per-example gradients; leaves capture cannot explain use
    ``jax.vmap``-ed rows. ``capture=False`` always forms the rows with ``jax.vmap``.
    ``spring=μ`` in [0, 1) turns on SPRING (see the module docstring): the direction
    is (F + λI)⁻¹ (g + λ μ d₋) with d₋ the previous direction this solver returned
    (before the trust region and the learning rate), so λ sets how strongly earlier
    steps are kept; the trust region uses the step's measured dᵀ(F + λI)d.

    Example:
      >>> import jax, jax.numpy as jnp, natgrad_jax as ng
      >>> model = ng.Model(lambda w, x: x @ w, ng.Bernoulli())
      >>> x, y = jnp.eye(2, 5), jnp.array([1.0, 0.0])      # 2 rows, 5 parameters
      >>> tx = ng.scale_by_natural_gradient(model, fisher="empirical", damping=0.1,
      ...                                    solver="woodbury")
      >>> g = jax.grad(model.nll)(jnp.zeros(5), x, y)
      >>> d, _ = tx.update(g, tx.init(jnp.zeros(5)), jnp.zeros(5), inputs=x, targets=y)
      >>> f = ng.empirical_fisher(model, jnp.zeros(5), x, y)
      >>> bool(jnp.allclose((f + 0.1 * jnp.eye(5)) @ d, g, atol=1e-5))
      True
    """

    capture: bool = True
    spring: float = 0.0
    # The earlier name of ``spring``, kept working: the transform's own ``momentum`` is a
    # different thing (a switch for the quadratic model's plane search).
    momentum: dataclasses.InitVar[float | None] = None
    name = "woodbury"
    averages = False  # an average of low-rank Fishers is not low-rank

    def __post_init__(self, momentum):
        if momentum is not None:
            object.__setattr__(self, "spring", momentum)
        if not 0.0 <= self.spring < 1.0:
            raise ValueError(
                f"Woodbury spring (SPRING's μ) must be in [0, 1), got {self.spring!r}."
            )

    def memory(self, num_params: int, num_rows: int, leaf_shapes=(), rows=None) -> int:
        """Floats an update allocates, for the memory guard: the rows (``rows``, a
        ``RowSizes``, with capture; else (M, P)), three M×M matrices (the kernel, its
        damped copy and its factor), with capture one more per captured layer (each
        layer's part of the kernel is formed before the sum: XLA's memory analysis shows
        about that many on a transformer and the deep autoencoder), and a few
        P-vectors."""
        del leaf_shapes
        kernels = 3
        if rows is None or not self.capture:
            rows = dense_row_sizes(num_params, num_rows)
        elif rows.captured is not None:
            kernels += len(rows.captured.layers)
        return rows.stored + rows.per_example + kernels * num_rows**2 + 6 * num_params

    def init(self, params, dtype) -> WoodburyState:
        if not self.spring:
            return WoodburyState()
        return WoodburyState(
            previous=jnp.zeros(parameter_count(params), dtype), quadratic=jnp.zeros([], dtype)
        )

    def step_quadratic(self, state, gradient, direction):
        """dᵀ(F + λI)d: gᵀd for the plain solve; measured in the solve with SPRING
        momentum, whose d is not (F + λI)⁻¹g."""
        if state.quadratic is None:
            return super().step_quadratic(state, gradient, direction)
        return state.quadratic

    def solve(self, state, batch: CurvatureBatch, vector, damping):
        if self.capture:
            rows = factored_rows(batch, vector.dtype)
            shape = rows.gradients[0].shape[:2] if rows.gradients else rows.fallback_rows.shape[:2]
            kernel = rows.kernel()
            _, unravel = vectors.ravel(rows.leaf_templates)
            rows_times = lambda v: rows.matvec(unravel(v)).reshape(-1)
            rows_transpose_times = lambda u: vectors.ravel(rows.rmatvec(u.reshape(shape)))[0]
        else:
            dense = batch.gather_examples(batch.score_rows().astype(vector.dtype))
            kernel, rows_times, rows_transpose_times = dense_products(dense)

        def solve_with(rhs):
            return woodbury_solve_factored(
                kernel, rows_times, rows_transpose_times, batch.num_examples, rhs, damping
            )

        if not self.spring:
            return solve_with(vector), state
        # SPRING: μ d₋ + (F + λI)⁻¹ (g − μ F d₋), F d₋ = Sᵀ(S d₋)/N
        shifted = self.spring * state.previous.astype(vector.dtype)
        fisher_shifted = rows_transpose_times(rows_times(shifted)) / batch.num_examples
        direction = shifted + solve_with(vector - fisher_shifted)
        projected = rows_times(direction)
        quadratic = jnp.vdot(projected, projected) / batch.num_examples + jnp.asarray(
            damping, direction.dtype
        ) * jnp.vdot(direction, direction)
        return direction, WoodburyState(
            previous=direction.astype(state.previous.dtype), quadratic=quadratic.real
        )
