r"""Damped solves against a symmetric positive semi-definite curvature matrix.

Cholesky of A = F + λI is the fast path. A Fisher is PSD in exact arithmetic but can be
numerically indefinite (rank-deficient batches, float32, λ = 0), in which case Cholesky
returns NaN; the fallback is an eigendecomposition with the spectrum clipped at zero and
pseudo-inverted, so a PSD input never produces NaN.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from natgrad_jax._blocks import blocks_of, stacked
from natgrad_jax._precision import exact_matmuls

Mesh = jax.sharding.Mesh | jax.sharding.AbstractMesh

# Calls ``_each`` makes side by side; more matrices go through a loop of such groups.
_GROUP = 8


def _each(function, matrices: jax.Array) -> jax.Array:
    """``function`` of each matrix of a (B, P, P) stack, with one LAPACK call per matrix.

    Never one batched call: jaxlib 0.10's CPU LAPACK kernels split a batch of large
    matrices into tasks on XLA's intra-op thread pool and block the calling pool thread
    until those finish. When as many such calls run at once as the pool has threads (one
    per device on 8 host devices, or concurrent ones on a 2-core machine), every thread
    waits for tasks none is free to run, and the step never completes.

    Up to ``_GROUP`` matrices are separate calls side by side, which XLA runs in
    parallel: six 1000×1000 Cholesky inverses took 225 ms against 232 ms batched
    (fastest of 10, 2-core CPU, jax 0.10.2). More go through a ``lax.map`` over groups
    of that many (padded with identities), so that the program stays the same size:
    96 inverses of 256×256 compiled in 0.6–0.7 s and ran in 206 ms, against 2.3 s and
    303 ms as 96 separate calls and 0.45 s and 200 ms batched.
    """
    count, size = matrices.shape[0], matrices.shape[-1]
    if count <= _GROUP:
        return jnp.stack([function(matrix) for matrix in matrices])
    filler = jnp.broadcast_to(jnp.eye(size, dtype=matrices.dtype), (-count % _GROUP, size, size))
    groups = jnp.concatenate([matrices, filler]).reshape(-1, _GROUP, size, size)
    results = jax.lax.map(lambda group: jnp.stack([function(m) for m in group]), groups)
    return results.reshape(-1, *results.shape[2:])[:count]


def spread_over(mesh: Mesh | None, function, matrices: jax.Array, *per_matrix: jax.Array):
    """``function(matrices, *per_matrix)`` for a ``function`` that treats each of the B
    matrices (B, n, n) on its own, with the matrices split over the D devices of
    ``mesh``: each device computes ⌈B/D⌉ of them (B padded with identities, and each
    ``per_matrix`` array with ones, to a multiple of D), and XLA moves the results to
    wherever they are used. A refresh's factorisations then cost each device about 1/D
    of the work and of the temporaries instead of all of them. As is with no mesh, or
    one of ``SPREAD_MAX_PADDING`` or more times as many devices as matrices.
    """
    count, size = matrices.shape[0], matrices.shape[-1]
    if mesh is None or not 1 < mesh.size < SPREAD_MAX_PADDING * count:
        return function(matrices, *per_matrix)
    padding = -count % mesh.size
    fill = lambda a, value: jnp.concatenate([a, jnp.full((padding, *a.shape[1:]), value, a.dtype)])
    identities = jnp.broadcast_to(jnp.eye(size, dtype=matrices.dtype), (padding, size, size))
    padded = [jnp.concatenate([matrices, identities]), *(fill(a, 1) for a in per_matrix)]
    split = jax.sharding.PartitionSpec(mesh.axis_names)  # the matrix axis, over every device
    spread = jax.shard_map(function, mesh=mesh, in_specs=(split,) * len(padded), out_specs=split)
    return jax.tree.map(lambda result: result[:count], spread(*padded))


# The padded matrices are gathered with the others where the results are used, so a
# mesh of this many times as many devices as matrices leaves them on every device: one
# 1024×1024 factor padded to 8 devices held 86 MiB of temporaries per device against 40
# unspread, three 512×512 ones on 8 devices 0.35 of one device's memory against 0.49
# (K-FAC; EKFAC 0.56 against 0.65). Spreading over some of the mesh's axes only (4 of 8
# devices for those three) held more than not spreading EKFAC's (0.70).
SPREAD_MAX_PADDING = 4


def _indices_by_size(matrices) -> list[list[int]]:
    """The indices of the square matrices, grouped by their side (first seen first)."""
    by_size: dict[int, list[int]] = {}
    for index, matrix in enumerate(matrices):
        by_size.setdefault(matrix.shape[0], []).append(index)
    return list(by_size.values())


def eigenbases(factors, mesh: Mesh | None = None, sizes=None) -> list:
    """The eigenvectors of each symmetric factor (``jnp.linalg.eigh``), those of the same
    size stacked for one loop of LAPACK calls (``_each``) spread over ``mesh``'s devices
    (``spread_over``). A factor is an (s, s) matrix or a (B, b, b) stack of the diagonal
    blocks of a side of ``sizes[i]`` entries (``_blocks``); a stack gets the
    eigenbases of its blocks, as a stack of the same shape: together an orthogonal
    basis, the eigenbasis of the block-diagonal matrix the stack stands for, for s·b²
    work against s³. The blocks are decomposed without their padding (a padded block's
    eigenvectors would mix the padding into the block's own null space); each basis is
    padded with an identity afterwards."""
    if sizes is None:
        if any(factor.ndim == 3 for factor in factors):
            raise ValueError("eigenbases: a (B, b, b) stack needs its side in sizes=.")
        sizes = [factor.shape[-1] for factor in factors]
    blocks, parts = [], []  # the symmetric matrices to decompose; each factor's among them
    for factor, size in zip(factors, sizes, strict=True):
        own = blocks_of(factor, size) if factor.ndim == 3 else [factor]
        parts.append(list(range(len(blocks), len(blocks) + len(own))))
        blocks += own
    vectors = [None] * len(blocks)
    eigenvectors = lambda group: _each(_eigenvectors, group)
    for indices in _indices_by_size(blocks):
        group = spread_over(mesh, eigenvectors, jnp.stack([blocks[i] for i in indices]))
        for position, index in enumerate(indices):
            vectors[index] = group[position]
    return [
        stacked([vectors[i] for i in own], padding=1.0) if factor.ndim == 3 else vectors[own[0]]
        for factor, own in zip(factors, parts, strict=True)
    ]


def _eigenvectors(matrix: jax.Array) -> jax.Array:
    """The eigenvectors of a symmetric matrix, handed to LAPACK transposed (as
    ``damped_inverses`` hands its matrices): a column-major input is the row-major
    matrix XLA keeps in the state, so a step that does not refresh copies nothing."""
    return jax.lax.linalg.eigh(matrix.T, symmetrize_input=False)[0]


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
    factor is finite and each pivot² exceeds P·eps times its row's diagonal entry of
    M + λI (no row lost its digits to cancellation): some LAPACK builds return a finite
    but meaningless factor for a singular matrix instead of NaN. The choice is made
    with ``lax.cond``, so the eigendecomposition runs only when it is needed.

    Args:
      matrix: a symmetric (P, P) matrix, PSD up to round-off.
      damping: λ ≥ 0, a scalar.

    Returns:
      The (P, P) inverse (pseudo-inverse on the null space when λ = 0).
    """
    return damped_inverses(matrix[None], jnp.reshape(damping, (1,)))[0]


def damped_inverses(matrices: jax.Array, dampings: jax.Array) -> jax.Array:
    """``damped_inverse`` of each of B same-size matrices (B, P, P) with its own λ (B,),
    one Cholesky each (``_each``); the eigendecompositions run only if one needs it.

    The Cholesky factorisation reads one triangle (no symmetrising copy), its pivots
    alone tell whether it succeeded (a failed factor is NaN, and a NaN entry reaches
    the pivots of the rows after it), and the inverses are formed outside the
    ``lax.cond``, whose other branch replaces the failed ones by pseudo-inverses. On
    the 2.8M-parameter autoencoder's six 1000×1000 factors this took a refresh's
    factorisation from 260 to 208 ms (fastest of 15 runs, 2-core CPU, jax 0.10.2)
    against the Cholesky solves inside the ``cond`` after a symmetrising copy and a
    scan of every entry for NaN.

    The fallback's branch is compiled even when it never runs: on the README demo's
    autoencoder it was 0.9 s of the default step's 3.3 s of XLA compilation (jax
    0.10.2, CPU). One ``cond`` for all sizes would pass a list of inverses instead of
    one stacked array per size: tried, on that autoencoder the steps between refreshes
    spent 60 ms more in copies (80 against 20 ms), so it is one ``cond`` per size.
    """
    size, dtype = matrices.shape[-1], matrices.dtype
    identity = jnp.eye(size, dtype=dtype)
    damped = matrices + jnp.asarray(dampings, dtype)[:, None, None] * identity
    # Symmetric matrices, handed to LAPACK transposed (column-major): the state's
    # factors keep XLA's row-major layout, and the inverses come out of products
    # (``_inverses_from_cholesky``), so the steps that do not refactorise copy nothing in
    # or out of the cond.
    transposed = jnp.swapaxes(damped, -1, -2)
    factors = _each(partial(jax.lax.linalg.cholesky, symmetrize_input=False), transposed)
    # Each pivot against its own row's diagonal entry: Cholesky's rounding error in a
    # row is relative to that entry (it is invariant to a diagonal scaling), so a row
    # that is tiny or zero but damped (a ReLU unit dead on every example: λ on the
    # diagonal, nothing else) is exact, not a sign of a singular matrix.
    pivots = jnp.abs(jnp.diagonal(factors, axis1=-2, axis2=-1))
    diagonals = jnp.abs(jnp.diagonal(damped, axis1=-2, axis2=-1))
    eps = jnp.finfo(dtype).eps
    # One number per matrix (a zero row without damping gives NaN: not definite). The
    # same test taken elementwise and then reduced held 8 MiB more temporaries per
    # device in a sharded K-FAC step on jax 0.12 (33 against 25 MiB).
    positive_definite = jnp.all(jnp.isfinite(pivots), axis=-1) & (
        jnp.min(pivots**2 / diagonals, axis=-1) > size * eps
    )
    inverses = _inverses_from_cholesky(factors)

    def with_fallback(inverses):
        # A loop over the matrices (one eigh each, as ``_each``) compiles one body for
        # the rare branch instead of B: 473 against 954 operations for six matrices.
        pseudo_inverses = jax.lax.map(_eigh_pseudo_inverse, damped)  # eigh symmetrises
        return jnp.where(positive_definite[:, None, None], inverses, pseudo_inverses)

    return jax.lax.cond(jnp.all(positive_definite), lambda x: x, with_fallback, inverses)


# Triangular inverses work on diagonal blocks of at most this side.
_TRIANGULAR_LEAF = 256


def _triangular_inverses(lowers: jax.Array) -> jax.Array:
    """L⁻¹ of each lower-triangular L of a (B, s, s) stack, by halves:

        [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹ C A⁻¹, D⁻¹]]

    (LAPACK's trtri, unrolled bottom-up), so that nearly all the work is matrix
    products. L is padded with an identity to n·w, n = 2ᵏ diagonal blocks of side
    w ≤ ``_TRIANGULAR_LEAF``; those are inverted by triangular solves (``_each``), and
    each level joins pairs of inverses of all the matrices in one batched product, so
    that the program does not grow with B. A triangular solve against the identity
    (what ``cho_solve`` does twice) runs far below a product's speed on XLA's CPU
    backend: the CNN of ``benchmarks/cnn.py``'s damped inverses (four 512×512, five
    of 9–144) took 19 against 28 ms, the 2.8M-parameter autoencoder's sixteen (250 to
    1001 wide) 170 against 197 ms (2-core CPU, jax 0.10.2). Each size's joins compile
    on their own: 0.2 and 2.1 s more than ``cho_solve`` there (blocks of 128: 0.5
    and 3.7 s, no faster), so the blocks are as large as 256."""
    count, size, dtype = lowers.shape[0], lowers.shape[-1], lowers.dtype
    blocks = 2 ** max(0, math.ceil(math.log2(size / _TRIANGULAR_LEAF)))
    side = -(-size // blocks)
    padding = blocks * side - size
    padded = jnp.pad(lowers, ((0, 0), (0, padding), (0, padding)))
    if padding:  # an identity there: its inverse is the identity, apart from L's
        padded = padded + jnp.diag(jnp.arange(blocks * side) >= size).astype(dtype)
    block = lambda row, column, w: padded[:, row * w : (row + 1) * w, column * w : (column + 1) * w]
    leaves = jnp.stack([block(i, i, side) for i in range(blocks)])  # (blocks, B, w, w)
    identity = jnp.eye(side, dtype=dtype)
    solve = lambda lower: jax.lax.linalg.triangular_solve(
        lower, identity, left_side=True, lower=True
    )
    inverses = _each(solve, leaves.reshape(-1, side, side))  # (blocks·B, w, w): block-major
    inverses = jnp.swapaxes(inverses.reshape(blocks, count, side, side), 0, 1)
    while inverses.shape[1] > 1:  # join pairs: half as many blocks, twice the side
        pairs = inverses.shape[1] // 2
        below = jnp.stack([block(2 * k + 1, 2 * k, side) for k in range(pairs)], axis=1)
        top, bottom = inverses[:, 0::2], inverses[:, 1::2]
        corner = -(bottom @ (below @ top))
        inverses = jnp.concatenate(
            [
                jnp.concatenate([top, jnp.zeros_like(top)], axis=-1),
                jnp.concatenate([corner, bottom], axis=-1),
            ],
            axis=-2,
        )
        side *= 2
    return inverses[:, 0, :size, :size]


def _inverses_from_cholesky(lowers: jax.Array) -> jax.Array:
    """M⁻¹ = L⁻ᵀ L⁻¹ of each matrix of a stack from its Cholesky factor L: triangular
    inverses by products (``_triangular_inverses``) and one product; the same as
    ``cho_solve`` to float32's rounding."""
    inverses = _triangular_inverses(lowers)
    return jnp.swapaxes(inverses, -1, -2) @ inverses


def damped_reciprocal(values: jax.Array, damping) -> jax.Array:
    """1 / (values + λ) where that is positive, else 0: the damped pseudo-inverse of a
    diagonal (a Fisher's diagonal, or its second moments in an eigenbasis)."""
    damped = values + jnp.asarray(damping, values.dtype)
    return jnp.where(damped > 0, 1.0 / jnp.where(damped > 0, damped, 1.0), 0.0)


@exact_matmuls
def batched_inverses(factors, dampings, mesh: Mesh | None = None) -> list:
    """(factor + damping I)⁻¹ of each factor: a matrix, a diagonal kept as a vector, or
    a (B, b, b) stack of diagonal blocks (``_blocks``; each block inverted on its own,
    s·b² work against s³). Matrices and blocks of the same size are inverted together
    (``damped_inverses``), spread over the devices of ``mesh`` if given
    (``spread_over``).

    A 1×1 matrix is inverted as the scalar it is (the same pseudo-inverse: 0 where the
    damped value is not positive), without a factorisation of its own: a network's
    biases each have one (their input factor), and a Cholesky for them would add a
    ``lax.cond`` and an eigendecomposition branch to compile. A block's zero padding is
    damped like the rest of its diagonal (undamped, it takes the pseudo-inverse
    branch, as a dead unit's zero row does, and its inverse is 0 there).
    """
    inverses = [
        damped_reciprocal(f, d) if f.ndim == 1 or f.shape[-1] == 1 else None
        for f, d in zip(factors, dampings, strict=True)
    ]
    pieces, parts = [], {}  # square matrices to invert; each factor's positions among them
    for index, factor in enumerate(factors):
        if inverses[index] is None:
            own = list(factor) if factor.ndim == 3 else [factor]
            parts[index] = list(range(len(pieces), len(pieces) + len(own)))
            pieces.extend(own)
    damping_of = {position: dampings[i] for i, positions in parts.items() for position in positions}
    inverted = [None] * len(pieces)
    for positions in _indices_by_size(pieces):
        group = spread_over(
            mesh,
            damped_inverses,
            jnp.stack([pieces[p] for p in positions]),
            jnp.stack([damping_of[p] for p in positions]),
        )
        for k, position in enumerate(positions):
            inverted[position] = group[k]
    for index, positions in parts.items():
        own = [inverted[p] for p in positions]
        inverses[index] = jnp.stack(own) if factors[index].ndim == 3 else own[0]
    return inverses


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
    """decay·average + (1 − decay)·new, or ``new`` itself at the first measurement; the
    ``average`` unchanged where ``new`` holds a NaN or an infinity (a batch that would
    poison every later average: the transform's skipped steps rely on it)."""
    decay = jnp.asarray(decay, new.dtype)
    averaged = jnp.where(is_first, new, decay * average + (1 - decay) * new)
    return jnp.where(jnp.all(jnp.isfinite(new)), averaged, average)
