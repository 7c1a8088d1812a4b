"""Eigenbasis Adam: optax's Adam run on each weight's coordinates in the eigenbasis of
its K-FAC factors, checked against optax.scale_by_adam on the rotated gradients."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import natgrad_jax as ng
from natgrad_jax._blocks import block_matmul, block_ranges, stacked
from natgrad_jax._linalg import eigenbases
from tests.helpers import classifier_nll_before_and_after, init_mlp, mlp
from tests.test_ekfac import _shared_weight_model

B1, B2, EPS = 0.8, 0.95, 1e-6


def _problem(name):
    if name == "shared_weight":  # one weight at 3 positions (K-FAC-expand factors)
        return _shared_weight_model()
    params = init_mlp(jax.random.PRNGKey(0), [3, 10, 4])  # biases share their weight's G
    x = jax.random.normal(jax.random.PRNGKey(1), (7, 3))
    return ng.Model(mlp, ng.Categorical()), params, x


def _dense(stack, size, padding):
    """An (s, s) matrix as it is, or the (s, s) block-diagonal matrix of a (B, b, b)
    stack, block k on rows ⌊ks/B⌋ to ⌊(k+1)s/B⌋, each padded (if smaller than b) with
    ``padding`` times an identity, which the check asserts."""
    stack = np.asarray(stack)
    if stack.ndim == 2:
        return stack
    count, side, _ = stack.shape
    dense = np.zeros((size, size))
    edges = [size * k // count for k in range(count + 1)]
    for k, (start, stop) in enumerate(itertools.pairwise(edges)):
        own = stop - start
        dense[start:stop, start:stop] = stack[k, :own, :own]
        expected = padding * np.eye(side)
        expected[:own, :own] = stack[k, :own, :own]
        np.testing.assert_array_equal(stack[k], expected)
    return dense


def _dense_basis(basis, size):
    return _dense(basis, size, padding=1.0)


def _block_mask(size, block_size):
    """Where the diagonal blocks of a side of ``size`` over blocks of about
    ``block_size`` lie (everywhere: kept whole)."""
    mask = np.ones((size, size), dtype=bool)
    if block_size is not None and size > 2 * block_size:
        count = -(-size // block_size)
        edges = [size * b // count for b in range(count + 1)]
        mask[:] = False
        for start, stop in itertools.pairwise(edges):
            mask[start:stop, start:stop] = True
    return mask


def _assert_diagonalises(basis, factor, block_size):
    """``basis`` is orthogonal and UᵀAU is diagonal, A the factor (with ``block_size``,
    the block-diagonal part of the factor over blocks of about that side, and U zero
    outside those blocks)."""
    factor = np.asarray(factor)
    basis = _dense_basis(basis, len(factor))
    np.testing.assert_allclose(basis.T @ basis, np.eye(len(basis)), atol=1e-12)
    mask = _block_mask(len(factor), block_size)
    assert np.all(basis[~mask] == 0)
    factor = np.where(mask, factor, 0.0)
    rotated = basis.T @ factor @ basis
    off_diagonal = rotated - np.diag(np.diag(rotated))
    assert np.max(np.abs(off_diagonal)) <= 1e-12 * max(np.max(np.abs(factor)), 1e-30)


@pytest.mark.parametrize(
    ("problem", "block_size"), [("mlp", None), ("mlp", 4), ("shared_weight", None)]
)
def test_steps_are_adam_on_the_weights_in_the_kfac_eigenbasis(problem, block_size):
    """Four steps with the basis of the first (refresh_every=100): each leaf's update is
    U_L · scale_by_adam(U_Lᵀ g U_R) · U_Rᵀ, Adam run by optax on the rotated gradients;
    U diagonalises the K-FAC factors that ng.Kronecker measures on the same batch (with
    block_size 4, the 10×10 factors' diagonal blocks of sides 3, 3 and 4)."""
    model, params, x = _problem(problem)
    solver = ng.EigenbasisAdam(b1=B1, b2=B2, block_size=block_size)
    tx = ng.scale_by_natural_gradient(
        model, fisher="exact", solver=solver, damping=EPS, refresh_every=100
    )
    kfac = ng.scale_by_natural_gradient(
        model, fisher="exact", solver=ng.Kronecker(max_factor_size=None), damping=EPS
    )
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(5), 4 * len(leaves))
    gradients = [
        treedef.unflatten(
            [jax.random.normal(k, leaf.shape) for k, leaf in zip(keys[i::4], leaves, strict=True)]
        )
        for i in range(4)
    ]
    state, updates = tx.init(params), []
    for g in gradients:
        update, state = jax.jit(tx.update)(g, state, params, inputs=x)
        updates.append(jax.tree.leaves(update))
    _, kfac_state = jax.jit(kfac.update)(gradients[0], kfac.init(params), params, inputs=x)

    for k, (leaf, reference) in enumerate(
        zip(state.curvature.leaves, kfac_state.curvature.leaves, strict=True)
    ):
        shape = leaf.first_moment.shape
        # With block_size 4 a side of 10 is kept as the diagonal blocks of K-FAC's
        # whole factor, zero-padded: measured as blocks, not cut from the whole.
        for factor, whole, size in zip(
            (leaf.left, leaf.right), (reference.left, reference.right), shape, strict=True
        ):
            blocked = _dense(factor, size, padding=0.0)
            within = np.where(_block_mask(size, block_size), whole, 0.0)
            np.testing.assert_allclose(blocked, within, rtol=1e-12, atol=1e-14)
        if shape[0] > 1:  # a bias's 1×1 input factor has the basis [[1]]
            _assert_diagonalises(leaf.left_basis, _dense(leaf.left, shape[0], 0.0), block_size)
        _assert_diagonalises(leaf.right_basis, _dense(leaf.right, shape[1], 0.0), block_size)
        left = _dense_basis(leaf.left_basis, shape[0])
        right = _dense_basis(leaf.right_basis, shape[1])
        adam = optax.scale_by_adam(b1=B1, b2=B2, eps=EPS)
        adam_state = adam.init(jnp.zeros(shape))
        for step, g in enumerate(gradients):
            rotated = left.T @ np.reshape(jax.tree.leaves(g)[k], shape) @ right
            adam_step, adam_state = adam.update(jnp.asarray(rotated), adam_state)
            expected = (left @ np.asarray(adam_step) @ right.T).reshape(leaves[k].shape)
            np.testing.assert_allclose(updates[step][k], expected, rtol=1e-10, atol=1e-14)


def test_a_leaf_the_capture_does_not_factor_takes_plain_adam():
    """A leaf used elementwise (no layer): every step equals optax.adam's."""
    model = ng.Model(lambda p, x: mlp(p["mlp"], x) * jnp.exp(p["scale"]), ng.Categorical())
    params = {"mlp": init_mlp(jax.random.PRNGKey(0), [3, 4]), "scale": jnp.zeros(4)}
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    y = jnp.arange(5) % 4
    tx = ng.eigenbasis_adam(model, 0.1, b1=B1, b2=B2, eps=EPS, fisher="exact")
    adam = optax.adam(0.1, b1=B1, b2=B2, eps=EPS)
    state, adam_state = tx.init(params), adam.init(params["scale"])
    for step in range(3):
        g = jax.grad(model.nll)(params, x, y)
        update, state = jax.jit(tx.update)(g, state, params, inputs=x, targets=y)
        expected, adam_state = adam.update(g["scale"], adam_state)
        np.testing.assert_allclose(update["scale"], expected, rtol=1e-12, err_msg=f"step {step}")
        params = optax.apply_updates(params, update)
    assert np.all(state[0].curvature.leaves[-1].right_basis == 0)  # "scale": no basis


def test_a_refresh_moves_the_basis_and_keeps_the_moments():
    """At a refresh (every 2nd step) the bases are those of the new factors and Adam's
    moments carry on: the first is the same in the leaf's own coordinates, U₂m₂U₂ᵀ =
    β₁U₁m₁U₁ᵀ + (1 − β₁)g, and v₂ = β₂v₁ + (1 − β₂)(U₂ᵀgU₂)² (g the same at every step)."""
    model, params, x = _problem("mlp")
    solver = ng.EigenbasisAdam(b1=B1, b2=B2)
    tx = ng.scale_by_natural_gradient(
        model, fisher="exact", solver=solver, damping=EPS, refresh_every=2, decay=0.5
    )
    g = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size) + 1.0).reshape(p.shape), params)
    state, leaves = tx.init(params), []
    for step in range(3):
        moved = jax.tree.map(lambda p, s=step: p + 0.3 * s, params)
        _, state = jax.jit(tx.update)(g, state, moved, inputs=x)
        leaves.append(state.curvature.leaves[-1])  # the last weight, 10×4
    before, after = leaves[1], leaves[2]
    np.testing.assert_array_equal(leaves[0].left_basis, before.left_basis)  # no refresh
    assert not np.allclose(after.left_basis, before.left_basis)
    _assert_diagonalises(after.left_basis, after.left, None)
    g = np.asarray(jax.tree.leaves(g)[-1])
    own = lambda leaf: leaf.left_basis @ leaf.first_moment @ leaf.right_basis.T
    np.testing.assert_allclose(own(after), B1 * own(before) + (1 - B1) * g, rtol=1e-12)
    rotated = np.asarray(after.left_basis).T @ g @ np.asarray(after.right_basis)
    np.testing.assert_allclose(
        after.second_moment, B2 * before.second_moment + (1 - B2) * rotated**2, rtol=1e-12
    )


def test_blocked_eigenbases_are_those_of_the_diagonal_blocks():
    """``_linalg.eigenbases`` of a (3, 4, 4) stack, the diagonal blocks of sides 3, 3
    and 4 of a 10×10 matrix (zero-padded), gets the bases of those blocks as a stack
    padded with an identity; a 4×4 matrix in the same call its whole basis, a 1×1 one
    [[±1]]. A block of rank 1 keeps its null space to itself (the padding is not
    decomposed with it). ``block_matmul`` applies a stack as the block-diagonal matrix
    it stands for."""
    a = jax.random.normal(jax.random.PRNGKey(0), (10, 10))
    b = jax.random.normal(jax.random.PRNGKey(1), (4, 4))
    rank_one = a[:, :1] @ a[:, :1].T
    ranges = block_ranges(10, 3)
    assert ranges == [(0, 3), (3, 6), (6, 10)]
    as_blocks = lambda m: stacked([m[start:stop, start:stop] for start, stop in ranges])
    matrices = [a @ a.T, b @ b.T, jnp.array([[2.0]]), a.T @ a, rank_one]
    factors = [as_blocks(matrices[0]), *matrices[1:3], as_blocks(matrices[3]), as_blocks(rank_one)]
    with pytest.raises(ValueError, match="sizes="):
        eigenbases(factors)
    bases = eigenbases(factors, sizes=[10, 4, 1, 10, 10])
    assert [basis.shape for basis in bases] == [(3, 4, 4), (4, 4), (1, 1), (3, 4, 4), (3, 4, 4)]
    for basis, matrix in zip(bases, matrices, strict=True):
        _assert_diagonalises(basis, matrix, 4)
    np.testing.assert_allclose(np.abs(bases[2]), [[1.0]])
    m = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (10, 3)))
    dense = _dense_basis(bases[0], 10)
    np.testing.assert_allclose(
        block_matmul(bases[0], m, transpose=True), dense.T @ m, rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(block_matmul(bases[0], m), dense @ m, rtol=1e-12, atol=1e-14)


def test_a_blocked_side_is_measured_as_blocks():
    """With ``block_size`` 4 the 10-wide factors of a 3-10-4 MLP are kept as (3, 4, 4)
    stacks in the state (K-FAC's own, ``Kronecker.side_shape``), the 4-wide whole; the
    memory guard counts what is kept: 48 floats (3·4·4) for a blocked side against 100."""
    _, params, _ = _problem("mlp")
    blocked, whole = ng.EigenbasisAdam(block_size=4), ng.EigenbasisAdam(block_size=None)
    shapes = [leaf.shape for leaf in jax.tree.leaves(params)]
    for leaf, shape in zip(blocked.init(params, jnp.float64).leaves, shapes, strict=True):
        m, n = (1, *shape)[-2:] if len(shape) == 1 else shape
        expected = lambda side: (3, 4, 4) if side == 10 else (side, side)
        assert leaf.left.shape == leaf.left_basis.shape == expected(m)
        assert leaf.right.shape == leaf.right_basis.shape == expected(n)
    # The sides: 3 and 10, 1 and 10, 10 and 4, 1 and 4 (a bias's input side is 1).
    saved = 4 * (3 * (100 - 48))  # four copies of each of three blocked 10-wide sides
    P, M = sum(np.prod(s) for s in shapes), 7
    assert whole.memory(P, M, shapes) - blocked.memory(P, M, shapes) == saved


def test_adam_learning_rates_train_a_classifier():
    start, end = classifier_nll_before_and_after(
        lambda model: ng.eigenbasis_adam(model, 3e-2), steps=30
    )
    assert end < 0.25 * start


def test_weight_decay_is_decoupled():
    """AdamW's decay: the update with weight_decay = w is the one without, − η·w·θ."""
    model, params, x = _problem("mlp")
    y = jnp.arange(7) % 4
    g = jax.grad(model.nll)(params, x, y)
    plain, decayed = (
        ng.eigenbasis_adam(model, 0.1, weight_decay=w, fisher="exact") for w in (0.0, 0.01)
    )
    u0, _ = plain.update(g, plain.init(params), params, inputs=x, targets=y)
    u1, _ = decayed.update(g, decayed.init(params), params, inputs=x, targets=y)
    for a, b, p in zip(
        jax.tree.leaves(u1), jax.tree.leaves(u0), jax.tree.leaves(params), strict=True
    ):
        np.testing.assert_allclose(a, b - 0.1 * 0.01 * p, rtol=1e-12, atol=1e-15)


def test_bad_settings_are_refused_with_their_reason():
    model = ng.Model(mlp, ng.Categorical())
    with pytest.raises(ValueError, match="Adam's ε"):
        ng.natural_gradient(model, 1.0, solver="eigenbasis_adam")  # Levenberg–Marquardt
    with pytest.raises(TypeError, match="damping"):
        ng.eigenbasis_adam(model, 1e-3, damping=1.0)
    for bad in ({"b1": 1.0}, {"b2": -0.1}, {"block_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ng.eigenbasis_adam(model, 1e-3, **bad)
    with pytest.raises(ValueError, match="approximation"):
        ng.EigenbasisAdam(approximation="sideways")
    with pytest.raises(ValueError, match="eps"):
        ng.eigenbasis_adam(model, 1e-3, eps=-1.0)


def test_zero_eps_and_a_zero_gradient_give_zero_not_nan():
    model, params, x = _problem("mlp")
    tx = ng.scale_by_natural_gradient(model, fisher="exact", solver="eigenbasis_adam", damping=0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    update, _ = tx.update(zeros, tx.init(params), params, inputs=x)
    assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(update))
