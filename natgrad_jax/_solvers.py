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


def _cholesky_inverse(damped: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(A⁻¹ from the Cholesky factor of A, whether A is numerically positive definite).

    The factorisation reads one triangle (no symmetrising copy), and its pivots alone
    tell whether it succeeded: a failed factor is NaN, and a NaN entry reaches the
    pivots of the rows after it. "Numerically positive definite" means the pivots are
    finite and the smallest pivot² exceeds P·eps times the largest diagonal entry: some
    LAPACK builds return a finite but meaningless factor for a singular matrix."""
    size, dtype = damped.shape[-1], damped.dtype
    factor = jax.lax.linalg.cholesky(damped, symmetrize_input=False)  # the lower triangle
    pivots = jnp.abs(jnp.diagonal(factor))
    positive_definite = jnp.all(jnp.isfinite(pivots)) & (
        jnp.min(pivots) ** 2 > size * jnp.finfo(dtype).eps * jnp.max(jnp.abs(jnp.diagonal(damped)))
    )
    identity = jnp.eye(size, dtype=dtype)
    return jax.scipy.linalg.cho_solve((factor, True), identity), positive_definite


def damped_matrix_inverses(matrices, dampings) -> list:
    """(M + λI)⁻¹ of each symmetric PSD matrix M with its own λ, never NaN: Cholesky where
    M + λI is numerically positive definite, the eigendecomposition pseudo-inverse
    otherwise. One ``lax.cond`` for all of them, so the eigendecompositions run only in
    the rare step where a factorisation fails (they then run for every matrix: the
    branch is one program).

    Each matrix has its own LAPACK calls, even where several have the same size, and
    never one batched call: jaxlib 0.10's CPU LAPACK kernels split a batch of large
    matrices into tasks on XLA's intra-op thread pool and block the calling pool thread
    until those finish; when as many such calls run at once as the pool has threads
    (one per device on 8 host devices, or concurrent ones on a 2-core machine), every
    thread waits for tasks none is free to run, and the step never completes. XLA runs
    independent calls in parallel anyway: six 1000×1000 inverses took 225 ms one by one
    against 232 ms batched (fastest of 10, 2-core CPU, jax 0.10.2).

    The solves run outside the ``cond``: on the 2.8M-parameter autoencoder's six
    1000×1000 factors that took a refresh's factorisation from 260 to 208 ms against
    the Cholesky solves inside it. The fallback branch is compiled even when it never
    runs (0.9 s of the README demo's 3.3 s of XLA compilation, jax 0.10.2, CPU).
    """
    damped = [
        m + jnp.asarray(d, m.dtype) * jnp.eye(m.shape[-1], dtype=m.dtype)
        for m, d in zip(matrices, dampings, strict=True)
    ]
    inverses, positive_definite = zip(*map(_cholesky_inverse, damped), strict=True)

    def with_fallback(inverses):
        return [
            jnp.where(ok, inverse, _eigh_pseudo_inverse(matrix))  # eigh symmetrises
            for inverse, ok, matrix in zip(inverses, positive_definite, damped, strict=True)
        ]

    all_positive_definite = jnp.all(jnp.stack(positive_definite))
    return jax.lax.cond(all_positive_definite, lambda x: x, with_fallback, list(inverses))


@exact_matmuls
def damped_inverse(matrix: jax.Array, damping: jax.Array | float) -> jax.Array:
    r"""(M + λI)⁻¹ for a symmetric PSD matrix M, never NaN.

    Cholesky when M + λI is numerically positive definite; otherwise the
    eigendecomposition pseudo-inverse (``damped_matrix_inverses``).

    Args:
      matrix: a symmetric (P, P) matrix, PSD up to round-off.
      damping: λ ≥ 0, a scalar.

    Returns:
      The (P, P) inverse (pseudo-inverse on the null space when λ = 0).
    """
    return damped_matrix_inverses([matrix], [damping])[0]


def _vector_inverse(diagonal, damping):
    damped = diagonal + damping
    return jnp.where(damped > 0, 1.0 / jnp.where(damped > 0, damped, 1.0), 0.0)


@exact_matmuls
def batched_inverses(factors, dampings) -> list:
    """(factor + damping I)⁻¹ of each factor (a matrix, or a diagonal kept as a vector).

    A 1×1 matrix is inverted as the scalar it is (the same pseudo-inverse: 0 where the
    damped value is not positive), without a factorisation of its own: a network's
    biases each have one (their input factor).
    """
    is_scalar = [f.ndim == 1 or f.size == 1 for f in factors]
    matrices = [
        (f, d) for f, d, scalar in zip(factors, dampings, is_scalar, strict=True) if not scalar
    ]
    matrix_inverses = iter(damped_matrix_inverses(*zip(*matrices, strict=True)) if matrices else [])
    return [
        _vector_inverse(f.reshape(-1), d).reshape(f.shape) if scalar else next(matrix_inverses)
        for f, d, scalar in zip(factors, dampings, is_scalar, strict=True)
    ]


def inner_products(vectors, others) -> jax.Array:
    """(k, l) inner products u_iᵀv_j of k flat ``vectors`` and l ``others`` (sequences of
    1-D arrays, or the rows of 2-D arrays).

    One dot product per pair, not ``stack(vectors) @ stack(others).T``: with vectors of
    millions of entries (flat parameters) and k, l ≤ 2, XLA's CPU backend ran that
    matmul about 10× slower than the dot products (30 ms against 3 ms for a (2, 2.8M)
    Gram, jax 0.10.2), and a broadcast multiply summed over the long axis no faster.

    Example:
      >>> import jax.numpy as jnp
      >>> inner_products(jnp.array([[1.0, 2.0], [3.0, 4.0]]), [jnp.array([1.0, 0.0])])
      Array([[1.],
             [3.]], dtype=float32)
    """
    return jnp.array([[jnp.dot(u, v) for v in others] for u in vectors])


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
