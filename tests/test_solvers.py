"""Damped inverse with Cholesky and its eigendecomposition fallback; the trust-region factor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from natgrad_jax._linalg import (
    _GROUP,
    _inverses_from_cholesky,
    _triangular_inverses,
    batched_inverses,
    damped_inverse,
    damped_inverses,
    trust_region_scale,
)
from tests.helpers import equations


def _random_psd(size, rank, seed=0):
    factor = np.random.default_rng(seed).normal(size=(size, rank))
    return factor @ factor.T


@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_damped_inverse_of_positive_definite_matrix(damping):
    matrix = _random_psd(6, 6)
    got = jax.jit(damped_inverse)(matrix, damping)
    np.testing.assert_allclose(got, np.linalg.inv(matrix + damping * np.eye(6)), rtol=1e-9)


def test_singular_undamped_matrix_falls_back_to_pseudo_inverse():
    matrix = _random_psd(6, 2)
    got = jax.jit(damped_inverse)(matrix, 0.0)
    assert jnp.all(jnp.isfinite(got))
    np.testing.assert_allclose(got, np.linalg.pinv(matrix, hermitian=True), rtol=1e-6, atol=1e-9)


def test_numerically_indefinite_float32_matrix_never_gives_nan():
    # Rank 1 in exact arithmetic; float32 round-off makes tiny negative eigenvalues.
    v = jnp.linspace(-3.0, 5.0, 40, dtype=jnp.float32)
    matrix = jnp.outer(v, v) + 1e-9 * jnp.eye(40, dtype=jnp.float32)
    assert jnp.linalg.eigvalsh(matrix).min() < 0 or not jnp.all(
        jnp.isfinite(jnp.linalg.cholesky(matrix))
    )
    got = damped_inverse(matrix, 0.0)
    assert got.dtype == jnp.float32 and jnp.all(jnp.isfinite(got))
    # On the range of the matrix it still inverts: M M⁺ v = v.
    np.testing.assert_allclose(matrix @ (got @ v), v, rtol=1e-3, atol=1e-3)


def test_rows_of_dead_units_keep_the_damped_inverse_in_float32():
    """A factor with zero rows (ReLU units dead on every example) and a λ far below
    float32's resolution of its largest entry: those rows of M + λI are λ alone, their
    Cholesky pivots exact, so the inverse is (M + λI)⁻¹ (1/λ on them), not the
    pseudo-inverse that zeroes every direction under P·eps·‖M‖ (the eigendecomposition
    fallback, as the CNN benchmark's 2048-wide head input factor took at every refresh
    once λ had adapted down)."""
    rng = np.random.default_rng(2)
    root = rng.normal(size=(64, 96))
    matrix = root @ root.T / 10
    dead = np.array([3, 17, 40, 41, 63])
    matrix[dead, :] = matrix[:, dead] = 0.0
    damping = 1e-5  # below 64 · eps · max diagonal ≈ 9e-5 in float32
    assert damping < 64 * np.finfo(np.float32).eps * matrix.diagonal().max()
    got = damped_inverse(jnp.asarray(matrix, jnp.float32), damping)
    want = np.linalg.inv(matrix + damping * np.eye(64))
    np.testing.assert_allclose(got[dead, dead], 1 / damping, rtol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max() / 1e5)
    jaxpr = jax.make_jaxpr(damped_inverse)(jnp.asarray(matrix, jnp.float32), damping)
    assert len(equations(jaxpr.jaxpr, "eigh")) == 1  # compiled, in the branch not taken


@pytest.mark.parametrize("max_kl, active", [(1e-3, True), (100.0, False)])
def test_trust_region_scale(max_kl, active):
    a = _random_psd(4, 4)
    g = np.array([1.0, -2.0, 0.5, 3.0])
    d = np.linalg.solve(a, g)
    c = float(trust_region_scale(jnp.vdot(g, d), max_kl))
    if active:
        assert 0.5 * (c * d) @ a @ (c * d) == pytest.approx(max_kl, rel=1e-10)
    else:
        assert c == 1.0
    assert float(trust_region_scale(0.0, max_kl)) == 1.0


def test_batched_inverses_equal_one_at_a_time_with_a_singular_one_among_them():
    """Same-size matrices share one fallback branch; a singular undamped one takes the
    pseudo-inverse without spoiling the others; vectors are diagonals; 1×1 matrices need
    no factorisation (an undamped zero's pseudo-inverse is 0). Every LAPACK call
    (Cholesky, triangular solve, eigendecomposition) is of one matrix: jaxlib 0.10's
    batched CPU kernels can deadlock (``_linalg._each``)."""
    rng = np.random.default_rng(0)
    roots = rng.normal(size=(3, 5, 5))
    matrices = [r @ r.T for r in roots]
    singular = np.outer(roots[0][0], roots[0][0])  # rank one
    factors = [matrices[0], jnp.arange(1.0, 4.0), singular, matrices[1], rng.normal(size=(2, 2))]
    factors[4] = factors[4] @ factors[4].T
    factors += [np.array([[2.5]]), np.zeros((1, 1))]  # 1×1: inverted as scalars
    dampings = [1e-2, 0.5, 0.0, 1.0, 1e-3, 0.5, 0.0]
    got = batched_inverses([jnp.asarray(f) for f in factors], [jnp.asarray(d) for d in dampings])
    for factor, damping, inverse in zip(factors, dampings, got, strict=True):
        factor = np.asarray(factor)
        assert inverse.shape == factor.shape
        if factor.ndim == 1:
            np.testing.assert_allclose(inverse, 1.0 / (factor + damping), rtol=1e-12)
        else:
            want = np.linalg.pinv(factor + damping * np.eye(len(factor)), rcond=1e-10)
            np.testing.assert_allclose(inverse, want, rtol=1e-8, atol=1e-10)
    five_by_five = jax.make_jaxpr(lambda fs, ds: batched_inverses(fs, ds))(
        [jnp.asarray(f) for f in factors], [jnp.asarray(d) for d in dampings]
    )

    def shapes(primitive):
        return [e.invars[0].aval.shape for e in equations(five_by_five.jaxpr, primitive)]

    assert shapes("cholesky") == [(5, 5)] * 3 + [(2, 2)]
    assert shapes("eigh") == [(5, 5), (2, 2)]  # the fallbacks' loop bodies, one matrix each
    # One triangular inverse each (``_inverses_from_cholesky``; small: one solve).
    assert shapes("triangular_solve") == [(5, 5)] * 3 + [(2, 2)]
    assert [e.primitive.name for e in five_by_five.jaxpr.eqns].count("cond") == 2


@pytest.mark.parametrize("size", [1, 256, 257, 803])
def test_inverses_from_cholesky_factors_by_halves_are_the_inverses(size):
    """M⁻¹ from M's Cholesky factor through ``_triangular_inverses``' halves (padded to
    2 × 129 for 257, 4 × 201 for 803), for a stack of three: equal to NumPy's inverses of
    M, and each L⁻¹ lower-triangular and inverting L; 256 is one triangular solve."""
    roots = np.random.default_rng(size).normal(size=(3, size, 2 * size))
    matrices = roots @ np.swapaxes(roots, 1, 2) / size + 0.1 * np.eye(size)
    lowers = np.linalg.cholesky(matrices)
    inverse_lowers = np.asarray(_triangular_inverses(jnp.asarray(lowers)))
    np.testing.assert_array_equal(np.triu(inverse_lowers, 1), 0.0)
    np.testing.assert_allclose(
        inverse_lowers @ lowers, np.broadcast_to(np.eye(size), lowers.shape), atol=1e-12
    )
    inverses = np.asarray(_inverses_from_cholesky(jnp.asarray(lowers)))
    np.testing.assert_allclose(inverses, np.linalg.inv(matrices), rtol=1e-10, atol=1e-12)
    jaxpr = lambda stack: jax.make_jaxpr(_triangular_inverses)(stack).jaxpr
    # One solve per diagonal block of each matrix (``_each``: a loop over groups of
    # eight beyond eight), and the same products for one matrix as for three.
    solves = equations(jaxpr(lowers), "triangular_solve")
    assert len(solves) == min(3 * {1: 1, 256: 1, 257: 2, 803: 4}[size], 8)
    products = lambda stack: len(equations(jaxpr(stack), "dot_general"))
    assert products(lowers[:1]) == products(lowers) == {1: 0, 256: 0, 257: 2, 803: 4}[size]


def test_more_same_size_matrices_than_a_group_are_inverted_in_a_loop_of_single_calls():
    """Eleven matrices of one size, a singular undamped one among them: a ``lax.map`` over
    groups of ``_GROUP`` separate one-matrix calls (padded with identities), and every
    inverse is still its own (pseudo-)inverse."""
    rng = np.random.default_rng(1)
    roots = rng.normal(size=(11, 4, 4))
    matrices = np.einsum("bij,bkj->bik", roots, roots)
    matrices[7] = np.outer(roots[7][0], roots[7][0])  # rank one
    dampings = np.where(np.arange(11) == 7, 0.0, 10.0 ** -np.arange(11))
    got = damped_inverses(jnp.asarray(matrices), jnp.asarray(dampings))
    for matrix, damping, inverse in zip(matrices, dampings, got, strict=True):
        want = np.linalg.pinv(matrix + damping * np.eye(4), rcond=1e-10)
        np.testing.assert_allclose(inverse, want, rtol=1e-7, atol=1e-9)
    jaxpr = jax.make_jaxpr(damped_inverses)(jnp.asarray(matrices), jnp.asarray(dampings))
    choleskys = equations(jaxpr.jaxpr, "cholesky")
    assert _GROUP < 11 and [e.invars[0].aval.shape for e in choleskys] == [(4, 4)] * _GROUP
    assert equations(jaxpr.jaxpr, "scan")  # the loop over the groups
