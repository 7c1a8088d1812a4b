r"""Damped solves against a symmetric positive semi-definite curvature matrix.

Cholesky of A = F + λI is the fast path. A Fisher is PSD in exact arithmetic but can be
numerically indefinite (rank-deficient batches, float32, λ = 0), in which case Cholesky
returns NaN; the fallback is an eigendecomposition with the spectrum clipped at zero and
pseudo-inverted, so a PSD input never produces NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from natgrad_jax._precision import exact_matmuls


def _eigh_pseudo_inverse(matrix: jax.Array) -> jax.Array:
    """Pseudo-inverse of a symmetric matrix, treating eigenvalues ≤ tol as zero."""
    eigenvalues, eigenvectors = jnp.linalg.eigh(matrix)
    eps = jnp.finfo(matrix.dtype).eps
    tol = matrix.shape[-1] * eps * jnp.maximum(jnp.max(jnp.abs(eigenvalues)), eps)
    inverse_eigenvalues = jnp.where(
        eigenvalues > tol, 1.0 / jnp.where(eigenvalues > tol, eigenvalues, 1.0), 0.0
    )
    return (eigenvectors * inverse_eigenvalues) @ eigenvectors.T


@exact_matmuls
def damped_inverse(matrix: jax.Array, damping: jax.Array | float) -> jax.Array:
    r"""(M + λI)⁻¹ for a symmetric PSD matrix M, never NaN.

    Cholesky when M + λI is numerically positive definite; otherwise the
    eigendecomposition pseudo-inverse. "Numerically positive definite" means the
    factor is finite and its smallest pivot² exceeds P·eps times the largest diagonal
    entry: some LAPACK builds return a finite but meaningless factor for a singular
    matrix instead of NaN. The choice is made with ``lax.cond``, so only one branch runs.

    Args:
      matrix: a symmetric (P, P) matrix, PSD up to round-off.
      damping: λ ≥ 0, a scalar.

    Returns:
      The (P, P) inverse (pseudo-inverse on the null space when λ = 0).
    """
    matrix = 0.5 * (matrix + matrix.T)
    damped = matrix + jnp.asarray(damping, matrix.dtype) * jnp.eye(
        matrix.shape[-1], dtype=matrix.dtype
    )
    factor = jnp.linalg.cholesky(damped)
    identity = jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
    eps = jnp.finfo(matrix.dtype).eps
    scale = jnp.max(jnp.abs(jnp.diagonal(damped)))
    smallest_pivot = jnp.min(jnp.abs(jnp.diagonal(factor))) ** 2
    positive_definite = jnp.all(jnp.isfinite(factor)) & (
        smallest_pivot > matrix.shape[-1] * eps * scale
    )
    return jax.lax.cond(
        positive_definite,
        lambda: jax.scipy.linalg.cho_solve((factor, True), identity),
        lambda: _eigh_pseudo_inverse(damped),
    )


def trust_region_scale(quadratic: jax.Array, max_kl) -> jax.Array:
    r"""The factor c ∈ (0, 1] that makes ½ (c d)ᵀ A (c d) ≤ ε, given q = dᵀ A d.

    For an exact solve d = A⁻¹ g, q = gᵀd needs no extra product with A (Schulman et
    al. 2015); an inexact solver measures q itself (see ``step_quadratic``).
    """
    quadratic = jnp.asarray(quadratic).real
    max_kl = jnp.asarray(max_kl, quadratic.dtype)
    active = quadratic > 2.0 * max_kl
    return jnp.where(active, jnp.sqrt(2.0 * max_kl / jnp.where(active, quadratic, 1.0)), 1.0)


def moving_average(average, new, decay, is_first):
    """decay·average + (1 − decay)·new, or ``new`` itself at the first measurement."""
    decay = jnp.asarray(decay, new.dtype)
    return jnp.where(is_first, new, decay * average + (1 - decay) * new)


def step_quadratic(curvature_state, gradient: jax.Array, direction: jax.Array) -> jax.Array:
    """dᵀ(F + λI)d of the step (½ of it is the step's quadratic KL).

    A representation that solves exactly with its own matrix has d = A⁻¹g, so this is
    gᵀd; one that does not (CG) measures it and keeps it in its state as ``quadratic``.
    """
    measured = getattr(curvature_state, "quadratic", None)
    return jnp.vdot(gradient, direction).real if measured is None else measured
