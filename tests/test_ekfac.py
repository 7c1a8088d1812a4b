"""EKFAC: K-FAC's eigenbasis with the Fisher's own second moments, against the dense Fisher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng
from tests.helpers import (
    assert_ekfac_is_exact_in_its_eigenbasis,
    classifier_nll_before_and_after,
    equations,
    init_mlp,
    mlp,
)
from tests.test_kronecker import multi_axis_biases


def _shared_weight_model(classes=3):
    """A tanh layer applied at each of 3 positions, summed: positions share the weight."""

    def apply(p, x):  # x: (N, 3, 4)
        return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]), axis=1) @ p["v"]

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {
        "w": jax.random.normal(keys[0], (4, 5)) / 2,
        "b": jnp.full((5,), 0.1),
        "v": jax.random.normal(keys[1], (5, classes)),
    }
    return ng.Model(apply, ng.Categorical()), params, jax.random.normal(keys[2], (6, 3, 4))


def test_one_example_is_solved_exactly():
    """One example: every block is (aaᵀ) ⊗ G, diagonal in the Kronecker eigenbasis, and
    with one leaf (no bias) that block is the whole Fisher."""
    model = ng.Model(lambda w, x: x @ w, ng.Categorical())
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 4))
    g = jax.random.normal(jax.random.PRNGKey(2), (4, 5))
    w = jax.random.normal(jax.random.PRNGKey(3), (4, 5))
    damping = 1e-3
    tx = ng.scale_by_natural_gradient(model, solver="ekfac", damping=damping)
    d, _ = jax.jit(tx.update)(g, tx.init(w), w, inputs=x)
    f = ng.fisher(model, w, x)
    expected = np.linalg.solve(f + damping * np.eye(len(f)), g.ravel())
    np.testing.assert_allclose(d.ravel(), expected, rtol=1e-8, atol=1e-10)
    kronecker = ng.scale_by_natural_gradient(model, solver="kronecker", damping=damping)
    k, _ = jax.jit(kronecker.update)(g, kronecker.init(w), w, inputs=x)
    assert not np.allclose(k.ravel(), expected, rtol=1e-3)  # π-damping is not exact


@pytest.mark.parametrize(
    "make, chunk_rows",
    [
        ("mlp", 32),
        ("mlp", 3),
        ("mlp_9_classes", 32),
        ("shared_weight", 32),
        ("shared_weight", 2),
        ("shared_weight_9_classes", 32),
        ("40_gaussian_outputs", 32),
        ("multi_axis_biases", 32),
        ("multi_axis_biases", 2),
    ],
)
def test_scalings_are_the_fishers_diagonal_in_the_kronecker_eigenbasis(make, chunk_rows):
    """s = diag(Uᵀ F_ℓ U) for each factored leaf, U = U_left ⊗ U_right of the state (with
    40 Gaussian outputs: 40 exact-Fisher rows per example, more than the default chunk;
    with biases of several axes, U from their tensor-normal factors). A small
    ``chunk_rows`` takes the rows in chunks, the last one partly a repeat; over
    ``MOMENT_ROWS`` rows of a layer of one position (9 classes: groups of 5 and 4 rows;
    40 outputs in chunks of 32: four groups of 8) s is summed over groups of rows."""
    if make == "multi_axis_biases":
        model, params, x = multi_axis_biases()
    elif make in ("mlp", "mlp_9_classes", "40_gaussian_outputs"):
        width, likelihood = {
            "mlp": (4, ng.Categorical()),
            "mlp_9_classes": (9, ng.Categorical()),
            "40_gaussian_outputs": (40, ng.Gaussian(1.0)),
        }[make]
        params = init_mlp(jax.random.PRNGKey(0), [3, 5, width])
        model, x = ng.Model(mlp, likelihood), jax.random.normal(jax.random.PRNGKey(1), (7, 3))
    else:
        model, params, x = _shared_weight_model(9 if make.endswith("9_classes") else 3)
    solver = ng.EKFAC(chunk_rows=chunk_rows)
    tx = ng.scale_by_natural_gradient(model, solver=solver, damping=1e-2)
    g = jax.tree.map(jnp.ones_like, params)
    d, state = jax.jit(tx.update)(g, tx.init(params), params, inputs=x)
    f = ng.fisher(model, params, x)
    flat_g, flat_d = ravel_pytree(g)[0], ravel_pytree(d)[0]
    assert_ekfac_is_exact_in_its_eigenbasis(state.curvature.leaves, f, params, flat_g, flat_d, 1e-2)


def test_eigenbases_change_only_when_refactorised():
    params = init_mlp(jax.random.PRNGKey(0), [3, 5, 4])
    model, x = ng.Model(mlp, ng.Categorical()), jax.random.normal(jax.random.PRNGKey(1), (7, 3))
    tx = ng.scale_by_natural_gradient(
        model, solver="ekfac", damping=1e-2, decay=0.5, statistics_every=1, refresh_every=2
    )
    state, g = tx.init(params), jax.tree.map(jnp.ones_like, params)
    update = jax.jit(tx.update)
    bases, scalings = [], []  # of the last weight (5 × 4)
    for step in range(3):
        moved = jax.tree.map(lambda p, s=step: p + 0.2 * s, params)
        _, state = update(g, state, moved, inputs=x)
        bases.append(state.curvature.leaves[-1].left_basis)
        scalings.append(state.curvature.leaves[-1].scaling)
    np.testing.assert_array_equal(bases[1], bases[0])  # step 1: statistics only
    assert not np.allclose(scalings[1], scalings[0])  # ... which did move
    assert not np.allclose(bases[2], bases[0])  # step 2: refactorised


@pytest.mark.parametrize("statistics_every, refresh_every", [(2, 2), (1, 2)])
def test_rows_in_chunks_give_the_state_and_updates_of_every_row_at_once(
    statistics_every, refresh_every
):
    """Five steps over moving parameters with 3 of 7 rows at a time (chunks of 3, 3 and
    a last one that repeats two rows): factors, bases, s and updates equal those taken
    with every row at once, through each path that measures s: refreshes (2, 2: s in
    the new basis after the factors), and measurements with factorisations of their own
    (1, 2: s in the current basis with the factors, then in the new basis)."""
    params = init_mlp(jax.random.PRNGKey(0), [3, 5, 7])
    model, x = ng.Model(mlp, ng.Categorical()), jax.random.normal(jax.random.PRNGKey(1), (6, 3))
    g = jax.tree.map(jnp.ones_like, params)
    runs = []
    for chunk_rows in (None, 3):
        tx = ng.scale_by_natural_gradient(
            model,
            solver=ng.EKFAC(chunk_rows=chunk_rows),
            damping=1e-2,
            decay=0.7,
            statistics_every=statistics_every,
            refresh_every=refresh_every,
        )
        state, update, run = tx.init(params), jax.jit(tx.update), []
        for step in range(5):
            moved = jax.tree.map(lambda p, s=step: p * (1 + 0.3 * s), params)
            d, state = update(g, state, moved, inputs=x)
            run.append((d, state.curvature))
        runs.append(run)
    for every_row, chunked in zip(*runs, strict=True):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
            every_row,
            chunked,
        )
    scalings = [leaf.scaling for leaf in runs[0][-1][1].leaves]
    assert all(float(jnp.max(s)) > 0 for s in scalings)


def test_ekfac_trains_a_classifier():
    start, end = classifier_nll_before_and_after(
        lambda model: ng.natural_gradient(model, 0.5, solver=ng.EKFAC(), damping=1e-2, decay=0.9),
        steps=30,
        keys=(jax.random.PRNGKey(0), jax.random.PRNGKey(1)),
    )
    assert end < 0.25 * start


def test_ekfac_is_between_kfac_and_the_exact_fisher():
    """On a small MLP with the exact Fisher: per leaf, EKFAC's block
    (U_A ⊗ U_G) diag(s) (U_A ⊗ U_G)ᵀ is at least as close to the Fisher's block as
    K-FAC's A ⊗ G in Frobenius norm (s is the best diagonal in that eigenbasis, and
    K-FAC's eigenvalue products are one diagonal), and its update is closer than
    K-FAC's to the exact solve with those blocks, (F_blocks + λI)⁻¹g (relative error
    0.15 against 0.52 here). Against the full Fisher's solve it is not: K-FAC's
    π-damping adds I ⊗ G and A ⊗ I terms, more damping than EKFAC's s + λ."""
    model = ng.Model(mlp, ng.Categorical())
    params = init_mlp(jax.random.PRNGKey(0), [4, 6, 3])
    x = jax.random.normal(jax.random.PRNGKey(1), (20, 4))
    y = jnp.argmax(x[:, :3], axis=1)
    fisher = ng.fisher(model, params, x)
    g = jax.grad(model.nll)(params, x, y)
    flat_g, damping = ravel_pytree(g)[0], 0.1

    def update(solver):
        tx = ng.scale_by_natural_gradient(model, solver=solver, damping=damping)
        direction, state = tx.update(g, tx.init(params), params, inputs=x)
        return ravel_pytree(direction)[0], state.curvature.leaves

    kfac_update, kfac_leaves = update(ng.Kronecker())
    ekfac_update, ekfac_leaves = update(ng.EKFAC())
    blocks = np.zeros_like(fisher)
    offset, strictly_better = 0, 0
    for kfac, ekfac in zip(kfac_leaves, ekfac_leaves, strict=True):
        where = slice(offset, offset + ekfac.scaling.size)
        offset += ekfac.scaling.size
        block = blocks[where, where] = fisher[where, where]
        basis = jnp.kron(ekfac.left_basis, ekfac.right_basis)
        ekfac_block = basis @ jnp.diag(ekfac.scaling.ravel()) @ basis.T
        kfac_error = jnp.linalg.norm(jnp.kron(kfac.left, kfac.right) - block)
        ekfac_error = jnp.linalg.norm(ekfac_block - block)
        assert ekfac_error <= kfac_error * (1 + 1e-10) + 1e-12 * jnp.linalg.norm(block)
        strictly_better += bool(ekfac_error < 0.9 * kfac_error)
    assert strictly_better >= 1
    exact = jnp.linalg.solve(blocks + damping * jnp.eye(len(fisher)), flat_g)
    ekfac_distance = jnp.linalg.norm(ekfac_update - exact) / jnp.linalg.norm(exact)
    kfac_distance = jnp.linalg.norm(kfac_update - exact) / jnp.linalg.norm(exact)
    assert ekfac_distance < 0.5 * kfac_distance


def test_biases_take_their_weights_eigenbasis_of_g():
    """A bias added straight to its weight's output has the weight's G: one
    eigendecomposition serves both (two per weight, none per bias), and the basis the
    bias gets diagonalises its own G (in the last layer A and G are both 5×5, so the
    weight's A basis would fit the shapes but not this)."""
    params = init_mlp(jax.random.PRNGKey(0), [5, 5, 5])
    model, x = ng.Model(mlp, ng.Categorical()), jax.random.normal(jax.random.PRNGKey(1), (7, 5))
    tx = ng.scale_by_natural_gradient(model, solver="ekfac", damping=1e-2)
    g = jax.tree.map(jnp.ones_like, params)
    jaxpr = jax.make_jaxpr(lambda s: tx.update(g, s, params, inputs=x))(tx.init(params)).jaxpr
    assert len(equations(jaxpr, "eigh")) == 4  # two weights, A and G each
    _, state = jax.jit(tx.update)(g, tx.init(params), params, inputs=x)
    leaves = state.curvature.leaves  # [b, w, b, w]
    for bias, weight in zip(leaves[::2], leaves[1::2], strict=True):
        np.testing.assert_array_equal(bias.right, weight.right)
        rotated = np.asarray(bias.right_basis.T @ bias.right @ bias.right_basis)
        np.testing.assert_allclose(rotated, np.diag(np.diag(rotated)), atol=1e-10)
        np.testing.assert_array_equal(bias.left_basis, np.ones((1, 1)))
