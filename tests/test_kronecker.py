"""K-FAC without tagging: exact where K-FAC is exact, π-damping, fallbacks, training."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng
from natgrad_jax._solvers.batch import CurvatureBatch
from tests.helpers import (
    classifier_nll_before_and_after,
    equations,
    init_mlp,
    leaf_slices,
    mlp,
)
from tests.test_capture import _tricky_model, equinox_mlp


def _blocks(matrix, params):
    return [np.asarray(matrix)[where, where] for where in leaf_slices(params)]


def _refreshed_state(model, params, x, damping=1e-3):
    tx = ng.scale_by_natural_gradient(model, damping=damping, solver="kronecker")
    y = model.likelihood.sample(jax.random.PRNGKey(7), model.apply_fn(params, x))
    g = jax.grad(model.nll)(params, x, y)
    return tx.update(g, tx.init(params), params, inputs=x)[1].curvature


def _mlp_pi_dampings(leaves, damping):
    """(left, right) π-dampings of each leaf of an MLP's [b, w, b, w, ...] state, written
    out: a weight's π = √((tr A / K) / (tr G / D)) (A = left, G = right); its bias
    (a 1×1 A_b and a G_b equal to the weight's G) takes the weight's π."""
    root = np.sqrt(damping)
    dampings = []
    for bias, weight in zip(leaves[::2], leaves[1::2], strict=True):
        left, right = np.asarray(weight.left), np.asarray(weight.right)
        pi = np.sqrt((np.trace(left) / len(left)) / (np.trace(right) / len(right)))
        np.testing.assert_allclose(bias.right, right, rtol=1e-12)  # one G, measured once
        dampings += [(pi * root, root / pi)] * 2
    return dampings


def _deep_linear(params, x):
    for layer in params:
        x = x @ layer["w"] + layer["b"]
    return x


@pytest.mark.parametrize(
    "case",
    ["single-example-mlp", "deep-linear-gaussian"],
)
def test_kronecker_factors_are_exact_where_kfac_is_exact(case):
    if case == "single-example-mlp":
        model = ng.Model(mlp, ng.Categorical())
        x = jax.random.normal(jax.random.PRNGKey(1), (1, 3))
    else:
        model = ng.Model(_deep_linear, ng.Gaussian(scale=0.5))
        x = jax.random.normal(jax.random.PRNGKey(1), (10, 3))
    params = init_mlp(jax.random.PRNGKey(0), [3, 4, 2])
    state = _refreshed_state(model, params, x)
    for block, leaf in zip(_blocks(ng.fisher(model, params, x), params), state.leaves, strict=True):
        np.testing.assert_allclose(np.kron(leaf.left, leaf.right), block, rtol=1e-10, atol=1e-12)


def test_equinox_weights_store_the_factors_the_other_way_round():
    apply, params = equinox_mlp()  # weights (out, in): left is G, right is A
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    model = ng.Model(apply, ng.Categorical())
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 3))
    state = _refreshed_state(model, params, x)
    blocks = _blocks(ng.fisher(model, params, x), params)
    for block, leaf, value in zip(blocks, state.leaves, jax.tree.leaves(params), strict=True):
        if value.ndim == 2:
            np.testing.assert_allclose(np.kron(leaf.left, leaf.right), block, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_kronecker_solve_is_the_pi_damped_factored_inverse(damping):
    model = ng.Model(_deep_linear, ng.Gaussian(scale=0.5))
    params = init_mlp(jax.random.PRNGKey(0), [3, 4, 2])
    x = jax.random.normal(jax.random.PRNGKey(1), (10, 3))
    y = jax.random.normal(jax.random.PRNGKey(2), (10, 2))
    g = jax.grad(model.nll)(params, x, y)
    tx = ng.scale_by_natural_gradient(model, damping=damping, solver="kronecker")
    updates, state = tx.update(g, tx.init(params), params, inputs=x)
    dense_blocks = _blocks(ng.fisher(model, params, x), params)
    leaves = state.curvature.leaves
    for leaf, (left_damping, right_damping), grad, update, block in zip(
        leaves,
        _mlp_pi_dampings(leaves, damping),
        jax.tree.leaves(g),
        jax.tree.leaves(updates),
        dense_blocks,
        strict=True,
    ):
        left, right = np.asarray(leaf.left), np.asarray(leaf.right)
        left_damped = left + left_damping * np.eye(len(left))
        right_damped = right + right_damping * np.eye(len(right))
        v = np.asarray(grad).reshape(len(left), len(right))
        # Pseudo-inverses: undamped, the first layer's G has rank 2 < 4.
        pinv = lambda m: np.linalg.pinv(m, rcond=1e-10, hermitian=True)
        expected = pinv(left_damped) @ v @ pinv(right_damped)
        np.testing.assert_allclose(
            np.asarray(update).reshape(expected.shape), expected, rtol=1e-8, atol=1e-12
        )
        if damping == 0.0:  # an exact case: the undamped K-FAC step is the exact block solve
            np.testing.assert_allclose(
                np.asarray(update).ravel(),
                pinv(block) @ np.asarray(grad).ravel(),
                rtol=1e-6,
                atol=1e-9,
            )


def test_leaves_kfac_cannot_factor_use_their_exact_diagonal():
    apply, params = _tricky_model()
    model = ng.Model(apply, ng.Categorical())
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 3))
    y = jnp.array([0, 1, 2, 3, 0, 1])
    g = jax.grad(model.nll)(params, x, y)
    tx = ng.scale_by_natural_gradient(model, damping=0.1, solver="kronecker")
    updates, _ = tx.update(g, tx.init(params), params, inputs=x)
    diagonal = np.diag(np.asarray(ng.fisher(model, params, x)))
    names = ["custom", "out", "scale", "tied"]  # the leaves in ravel order
    for name, where in zip(names, leaf_slices(params), strict=True):
        if name in ("out", "scale"):  # factored: a matmul and an elementwise scale
            continue
        d = diagonal[where]
        np.testing.assert_allclose(
            updates[name].ravel(), np.asarray(g[name]).ravel() / (d + 0.1), rtol=1e-10
        )


def multi_axis_biases(num_examples=6):
    """An attention-like bias (heads, head_dim) shared by 3 positions and a positional
    table (positions, classes): views of 1 × 6, not the 2×3 and 3×2 their factors are
    kept in. (N, 3, 4) inputs, Categorical over 2 classes."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {
        "b": jax.random.normal(keys[0], (2, 3)) / 2,
        "pos": jax.random.normal(keys[1], (3, 2)) / 2,
        "v": jax.random.normal(keys[2], (6, 2)),
        "w": jax.random.normal(keys[3], (4, 2, 3)) / 2,
    }

    def apply(p, x):
        h = jnp.tanh(jnp.einsum("ntk,khd->nthd", x, p["w"]) + p["b"])
        return jnp.mean(h.reshape(*x.shape[:2], 6) @ p["v"] + p["pos"], axis=1)

    x = jax.random.normal(jax.random.PRNGKey(5), (num_examples, 3, 4))
    return ng.Model(apply, ng.Categorical()), params, x


def _rank_one_bias():
    """One example, y = Σ_hd x_h w_d (x_h + b_hd): its score G = x wᵀ has rank one."""
    w = jnp.arange(1.0, 4.0)

    def apply(p, x):
        return jnp.einsum("nhd,nh,d->n", x[:, :, None] + p["b"], x, w)[:, None]

    params = {"b": jnp.zeros((2, 3))}
    return ng.Model(apply, ng.Gaussian(scale=0.5)), params, jnp.array([[0.7, -1.3]])


def _partial_traces(block, shape):
    """(Σ_j F[ij, kj], Σ_i F[ij, il] / tr F) of a leaf's Fisher block, the leaf as m×n:
    the tensor-normal factors L and R of its score rows."""
    m, n = shape
    square = block.reshape(m, n, m, n)
    return np.einsum("ijkj->ik", square), np.einsum("ijil->jl", square) / np.trace(block)


@pytest.mark.parametrize("make", [multi_axis_biases, _rank_one_bias], ids=["batch", "rank_one"])
def test_biases_of_several_axes_get_tensor_normal_factors(make):
    """L = E[G Gᵀ] and R = E[GᵀG] / E‖G‖² of the score rows G as m×n matrices are
    partial traces of the Fisher block (m, n, m, n): L = Σ_j F[ij, kj] and
    R = Σ_i F[ij, il] / tr F; for rank-one rows of one example L ⊗ R is the block."""
    model, params, x = make()
    text = ng.describe(model, params, x)
    assert "tensor-normal" in next(row for row in text.splitlines() if "['b']" in row)
    state = _refreshed_state(model, params, x)
    blocks = _blocks(ng.fisher(model, params, x), params)
    for k, name in enumerate(sorted(params)):
        if name not in ("b", "pos"):
            continue
        expected_left, expected_right = _partial_traces(blocks[k], params[name].shape)
        left, right = state.leaves[k].left, state.leaves[k].right
        np.testing.assert_allclose(left, expected_left, rtol=1e-10)
        np.testing.assert_allclose(right, expected_right, rtol=1e-10)
        if make is _rank_one_bias:
            np.testing.assert_allclose(np.kron(left, right), blocks[k], rtol=1e-10, atol=1e-12)
    if make is multi_axis_biases:  # sums over the 2 exact rows: the same one row at a time
        whole, chunked = (
            _kronecker_update(model, params, x, ng.Kronecker(chunk_rows=chunk))
            for chunk in (None, 1)
        )
        for got, want in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


def test_tensor_normal_factors_in_float32():
    """From float32 parameters and inputs: float32 factors, the partial traces of the
    (float64) Fisher block to float32 accuracy."""
    model, params, x = multi_axis_biases()
    blocks = _blocks(ng.fisher(model, params, x), params)
    params32, x32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x))
    tx = ng.scale_by_natural_gradient(model, damping=1e-3, solver="kronecker")
    g = jax.tree.map(jnp.ones_like, params32)
    state = jax.jit(tx.update)(g, tx.init(params32), params32, inputs=x32)[1].curvature
    for k, name in enumerate(sorted(params)):
        if name in ("b", "pos"):
            expected_left, expected_right = _partial_traces(blocks[k], params[name].shape)
            left, right = state.leaves[k].left, state.leaves[k].right
            assert left.dtype == right.dtype == jnp.float32
            np.testing.assert_allclose(left, expected_left, rtol=2e-4, atol=1e-6)
            np.testing.assert_allclose(right, expected_right, rtol=2e-4, atol=1e-6)


def test_training_with_kronecker_decay_and_refresh():
    start, end = classifier_nll_before_and_after(
        lambda model: ng.natural_gradient(
            model, 0.5, solver="kronecker", damping=1e-2, decay=0.9, refresh_every=2
        ),
        steps=40,
    )
    assert end < 0.25 * start


def _embedding_classifier():
    """Tokens → rows of a (12, 3) table → mean over 5 positions → (3, 4) read-out."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"table": jax.random.normal(keys[0], (12, 3)), "w": jax.random.normal(keys[1], (3, 4))}
    tokens = jax.random.randint(keys[2], (6, 5), 0, 12)

    def apply(p, tokens):
        return jnp.mean(jnp.take(p["table"], tokens, axis=0), axis=1) @ p["w"]

    return ng.Model(apply, ng.Categorical()), params, tokens


def _kronecker_update(model, params, inputs, solver):
    tx = ng.scale_by_natural_gradient(model, solver=solver, damping=1e-2)
    g = jax.tree.map(jnp.ones_like, params)
    return tx.update(g, tx.init(params), params, inputs=inputs)


def test_an_embeddings_input_factor_is_kept_as_its_diagonal_with_the_same_update():
    """A one-hot row has a diagonal second moment (token counts): over max_factor_size
    it is stored as a vector of V entries, and the update is unchanged."""
    model, params, tokens = _embedding_classifier()
    dense, dense_state = _kronecker_update(model, params, tokens, ng.Kronecker())
    small, small_state = _kronecker_update(model, params, tokens, ng.Kronecker(max_factor_size=8))
    table = 0  # leaves in order: table, w
    full, kept = dense_state.curvature.leaves[table], small_state.curvature.leaves[table]
    assert full.left.shape == (12, 12) and kept.left.shape == (12,)
    np.testing.assert_array_equal(full.left, jnp.diag(jnp.diag(full.left)))  # diagonal
    counts = jnp.sum(jax.nn.one_hot(tokens, 12), axis=(0, 1)) / tokens.shape[0]
    np.testing.assert_allclose(kept.left, counts, rtol=1e-12)
    for got, want in zip(jax.tree.leaves(small), jax.tree.leaves(dense), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10)


def test_a_factor_over_max_factor_size_keeps_the_diagonal_of_the_full_factor():
    """For a dense layer wider than max_factor_size the kept factor is the diagonal of
    the one the unlimited representation stores (an approximation there)."""
    model = ng.Model(mlp, ng.Categorical())
    params = init_mlp(jax.random.PRNGKey(0), [4, 16, 3])
    x = jax.random.normal(jax.random.PRNGKey(1), (10, 4))
    _, full = _kronecker_update(model, params, x, ng.Kronecker())
    _, kept = _kronecker_update(model, params, x, ng.Kronecker(max_factor_size=8))
    hidden = 3  # leaves: b0 (16,), w0 (4, 16), b1, w1 (16, 3): w1's input factor is 16×16
    assert kept.curvature.leaves[hidden].left.shape == (16,)
    assert kept.curvature.leaves[1].right.shape == (16,)  # w0's output factor
    for k in (1, hidden):
        for side in ("left", "right"):
            want = getattr(full.curvature.leaves[k], side)
            got = getattr(kept.curvature.leaves[k], side)
            np.testing.assert_allclose(got, want if got.ndim == 2 else jnp.diag(want), rtol=1e-12)


def test_factors_are_inverted_one_call_each_under_one_fallback_branch():
    """An 8-8-8-8-8-8 MLP has twenty factors: the kernels' 8×8 A and G, the biases'
    1×1 and their G, which is their kernel's (shared, not factorised again). The update
    factorises the ten 8×8 ones one LAPACK call each (jaxlib 0.10's batched calls can
    deadlock; ten is over ``_GROUP``, so a loop of eight calls), the 1×1 ones as
    scalars, under one ``lax.cond`` fallback for the size, and still equals the
    π-damped inverses."""
    model = ng.Model(mlp, ng.Categorical())
    params = init_mlp(jax.random.PRNGKey(0), [8] * 6)
    x = jax.random.normal(jax.random.PRNGKey(1), (10, 8))
    tx = ng.scale_by_natural_gradient(model, solver="kronecker", damping=1e-2)
    g = jax.tree.map(jnp.ones_like, params)
    update = lambda s: tx.update(g, s, params, inputs=x)
    jaxpr = jax.make_jaxpr(update)(tx.init(params)).jaxpr
    choleskys = equations(jaxpr, "cholesky")
    assert [e.invars[0].aval.shape for e in choleskys] == [(8, 8)] * 8
    loops = [e for e in equations(jaxpr, "scan") if equations(e.params["jaxpr"].jaxpr, "cholesky")]
    assert [e.params["length"] for e in loops] == [2]  # ten matrices, padded to two groups
    fallbacks = [
        e
        for e in equations(jaxpr, "cond")
        if any(equations(branch.jaxpr, "eigh") for branch in e.params["branches"])
    ]
    assert len(fallbacks) == 1
    _, state = update(tx.init(params))
    leaves = state.curvature.leaves
    for leaf, dampings in zip(leaves, _mlp_pi_dampings(leaves, 1e-2), strict=True):
        for factor, inverse, damping in zip(
            (leaf.left, leaf.right), (leaf.left_inverse, leaf.right_inverse), dampings, strict=True
        ):
            want = np.linalg.inv(factor + damping * np.eye(len(factor)))
            np.testing.assert_allclose(inverse, want, rtol=1e-8)


def _many_output_model():
    """10 Gaussian outputs (10 exact-Fisher rows per example); the scale ``s`` is used
    twice, so its curvature is the exact diagonal from vmap-ed rows."""

    def apply(p, x):
        h = jnp.tanh(x @ p["w"] + p["b"])
        return (h * p["s"]) @ p["v"] + jnp.sum(p["s"])

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {
        "w": jax.random.normal(keys[0], (4, 6)),
        "b": jnp.full((6,), 0.1),
        "s": jnp.linspace(0.5, 1.5, 6),
        "v": jax.random.normal(keys[1], (6, 10)),
    }
    x = jax.random.normal(keys[2], (7, 4))
    return ng.Model(apply, ng.Gaussian(scale=1.0)), params, x


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_exact_fisher_rows_taken_in_chunks_give_the_same_factors_and_update(approximation):
    """Chunks of 3 of the 10 rows (the last one padded) against all rows at once."""
    model, params, x = _many_output_model()
    results = [
        _kronecker_update(model, params, x, ng.Kronecker(approximation, chunk_rows=chunk))
        for chunk in (None, 3)
    ]
    (whole, whole_state), (chunked, chunked_state) = results
    for got, want in zip(jax.tree.leaves(chunked_state), jax.tree.leaves(whole_state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    for got, want in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10)

    def measured(params):
        batch = CurvatureBatch(model, params, x, "exact")
        measurement = ng.Kronecker(chunk_rows=3).measured(batch, jnp.float64)
        return measurement.factors, measurement.diagonals

    scans = equations(jax.make_jaxpr(measured)(params).jaxpr, "scan")
    assert [e.params["length"] for e in scans] == [4]  # ⌈10 / 3⌉ chunks


def test_exact_diagonal_from_rows_in_chunks_is_the_dense_fishers_diagonal():
    """``ng.Diagonal`` takes the 10 exact rows 3 at a time (4 chunks, one scan) and gets
    diag(F) of the dense Fisher, including the elementwise-scaled leaf."""
    model, params, x = _many_output_model()
    want = np.diag(ng.fisher(model, params, x))

    def diagonal(params, chunk_rows):
        batch = CurvatureBatch(model, params, x, "exact")
        solver = ng.Diagonal(chunk_rows=chunk_rows)
        state = solver.init(params, jnp.float64)
        return ravel_pytree(solver.measure(state, batch, 0.0, True).diagonal)[0]

    for chunk_rows in (None, 3):
        np.testing.assert_allclose(diagonal(params, chunk_rows), want, rtol=1e-12, atol=1e-14)
    scans = equations(jax.make_jaxpr(lambda p: diagonal(p, 3))(params).jaxpr, "scan")
    assert [e.params["length"] for e in scans] == [4]


def test_auto_on_a_large_captured_network_is_kfac_rescaled_by_the_exact_fisher(monkeypatch):
    """Above ``KRONECKER_MIN_PARAMS`` (lowered here) ``"auto"`` takes K-FAC's direction d
    from this batch, its factors from one Monte-Carlo label per example (this exact
    Fisher has 40 rows per example), and the step α d with α = gᵀd / dᵀ(F + λI)d from
    the dense exact Fisher F."""
    likelihood, outputs, statistics = ng.Gaussian(scale=0.7), 40, "monte_carlo"
    from natgrad_jax._solvers import auto

    monkeypatch.setattr(auto, "KRONECKER_MIN_PARAMS", 50)
    params = init_mlp(jax.random.PRNGKey(0), [4, 8, outputs])
    model = ng.Model(mlp, likelihood)
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
    y = likelihood.sample(jax.random.PRNGKey(2), mlp(params, x))
    g = jax.grad(model.nll)(params, x, y)
    assert "picks kronecker" in ng.describe(model, params, x)

    def update(**options):
        tx = ng.scale_by_natural_gradient(model, damping=0.1, **options)
        return tx.update(g, tx.init(params), params, inputs=x, targets=y)[0]

    chosen = ravel_pytree(update(solver="auto", rescale=None))[0]
    d = ravel_pytree(update(solver="kronecker", fisher=statistics))[0]
    flat_g = ravel_pytree(g)[0]
    damped = ng.fisher(model, params, x) + 0.1 * jnp.eye(d.size)
    alpha = (flat_g @ d) / (d @ damped @ d)
    np.testing.assert_allclose(chosen, alpha * d, rtol=1e-10)
    assert not np.allclose(alpha, 1.0, rtol=1e-3)  # the rescaling is not a no-op here


def _auto_against_explicit_kronecker(steps, auto_cadence, explicit_cadence):
    """Runs ``"auto"`` (with ``auto_cadence``) and an explicit Monte-Carlo
    ``solver="kronecker"`` (with ``explicit_cadence``) on the same changing batches;
    asserts at every step that auto's K-FAC factors and inverses equal the explicit
    ones, and returns which steps changed them (after the first) and auto's last state."""
    params = init_mlp(jax.random.PRNGKey(0), [4, 8, 3])
    model = ng.Model(mlp, ng.Categorical())
    explicit = ng.scale_by_natural_gradient(
        model, fisher="monte_carlo", solver="kronecker", damping=0.1, **explicit_cadence
    )
    chosen = ng.scale_by_natural_gradient(model, damping=0.1, **auto_cadence)
    states = [explicit.init(params), chosen.init(params)]
    history = []
    for step in range(steps):
        x = jax.random.normal(jax.random.PRNGKey(10 + step), (6, 4))
        y = jax.random.randint(jax.random.PRNGKey(20 + step), (6,), 0, 3)
        g = jax.grad(model.nll)(params, x, y)
        states = [
            tx.update(g, state, params, inputs=x, targets=y)[1]
            for tx, state in zip((explicit, chosen), states, strict=True)
        ]
        want, got = states[0].curvature, states[1].curvature.kronecker
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        history.append(ravel_pytree(got)[0])
    changed = [not np.allclose(a, b) for a, b in itertools.pairwise(history)]
    return changed, states[1]


def test_auto_keeps_kfac_factors_and_refreshes_them_every_five_kfac_steps(monkeypatch):
    """On a network where it picks K-FAC, ``"auto"`` holds K-FAC's factors: over seven
    steps on changing batches they equal those of an explicit Monte-Carlo
    ``solver="kronecker"`` with ``decay=0.95, refresh_every=5`` (same keys), so they are
    refreshed at the first and sixth steps only."""
    from natgrad_jax._solvers import auto

    monkeypatch.setattr(auto, "KRONECKER_MIN_PARAMS", 50)
    changed, state = _auto_against_explicit_kronecker(7, {}, dict(decay=0.95, refresh_every=5))
    assert int(state.curvature.kronecker_steps) == 7
    assert changed == [False, False, False, False, True, False]


def test_auto_takes_refresh_every_and_decay_as_its_kfac_cadence(monkeypatch):
    """``natural_gradient(model, lr, refresh_every=3, decay=0.5)`` with ``"auto"``: its
    K-FAC factors equal an explicit ``solver="kronecker"`` with that cadence over four
    steps (refreshed at the first and fourth), and ``refresh_every=1`` refreshes them at
    every step."""
    from natgrad_jax._solvers import auto

    monkeypatch.setattr(auto, "KRONECKER_MIN_PARAMS", 50)
    for every, decay, refreshed in ((3, 0.5, [False, False, True]), (1, 0.0, [True, True])):
        cadence = dict(refresh_every=every, decay=decay)
        changed, _ = _auto_against_explicit_kronecker(len(refreshed) + 1, cadence, cadence)
        assert changed == refreshed


def test_a_factor_over_twice_the_block_size_is_kept_and_solved_block_by_block():
    """A 14-input dense layer with ``block_size=4``: A is kept as its four diagonal
    blocks over inputs 0–2, 3–6, 7–9 and 10–13 (stacked as (4, 4, 4), the sides-3 ones
    zero-padded), each the block of 1/N Σ x xᵀ (the definition); π from the whole
    factor's trace over its 14 inputs; and the update solves
    (blockdiag(A) + π√λ I) ΔW (G + √λ/π I) = V exactly. The bias and its 1×1 A are
    unchanged by the blocks."""
    params = init_mlp(jax.random.PRNGKey(0), [14, 3])
    model = ng.Model(mlp, ng.Categorical())
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (20, 14)))
    y = jax.random.randint(jax.random.PRNGKey(2), (20,), 0, 3)
    g = jax.grad(model.nll)(params, x, y)
    damping = 0.05
    tx = ng.scale_by_natural_gradient(model, damping=damping, solver=ng.Kronecker(block_size=4))
    updates, state = tx.update(g, tx.init(params), params, inputs=x)
    weight = state.curvature.leaves[1]  # [b, w]
    assert weight.left.shape == weight.left_inverse.shape == (4, 4, 4)
    second_moment = x.T @ x / len(x)
    ranges = [(0, 3), (3, 7), (7, 10), (10, 14)]
    for block, (start, stop) in zip(np.asarray(weight.left), ranges, strict=True):
        side = stop - start
        np.testing.assert_allclose(
            block[:side, :side], second_moment[start:stop, start:stop], rtol=1e-12
        )
        np.testing.assert_array_equal(block[side:], 0.0)
        np.testing.assert_array_equal(block[:, side:], 0.0)
    right = np.asarray(weight.right)
    pi = np.sqrt((np.trace(second_moment) / 14) / (np.trace(right) / 3))
    left_damping, right_damping = pi * np.sqrt(damping), np.sqrt(damping) / pi
    blockdiag = scipy.linalg.block_diag(*(second_moment[a:b, a:b] for a, b in ranges))
    left = blockdiag + left_damping * np.eye(14)
    update = np.asarray(updates[0]["w"])
    np.testing.assert_allclose(
        left @ update @ (right + right_damping * np.eye(3)), g[0]["w"], rtol=1e-10, atol=1e-13
    )
    whole = ng.scale_by_natural_gradient(model, damping=damping, solver="kronecker")
    whole_updates, _ = whole.update(g, whole.init(params), params, inputs=x)
    np.testing.assert_allclose(updates[0]["b"], whole_updates[0]["b"], rtol=1e-12)
    assert not np.allclose(update, whole_updates[0]["w"])  # the blocks are visible


def test_describe_names_the_blocks_of_a_large_factor():
    params = init_mlp(jax.random.PRNGKey(0), [2048, 10], jnp.float32)
    text = ng.describe(ng.Model(mlp, ng.Categorical()), params, jnp.zeros((4, 2048)))
    assert "A ⊗ G: 2048×2048 in 8 blocks of 256 ⊗ 10×10" in text
