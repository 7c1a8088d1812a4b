"""Every curvature representation against the dense reference (issue: scale)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng
from natgrad_jax._solvers.conjugate_gradient import conjugate_gradient as ng_cg
from natgrad_jax._solvers.woodbury import woodbury_solve
from tests.helpers import as_leaves, first_step_key, init_mlp, leaf_blocks, mlp, mlp_problem

KINDS = ["exact", "monte_carlo", "empirical"]
SEED = 5


def _reference_fisher(model, params, x, y, kind, num_samples=1):
    step_key = first_step_key(SEED)
    if kind == "exact":
        return ng.fisher(model, params, x)
    if kind == "empirical":
        return ng.empirical_fisher(model, params, x, y)
    return ng.monte_carlo_fisher(model, params, x, step_key, num_samples)


def _update(model, params, x, y, kind, solver, damping, **kwargs):
    tx = ng.scale_by_natural_gradient(
        model, fisher=kind, damping=damping, solver=solver, seed=SEED, **kwargs
    )
    g = jax.grad(model.nll)(params, x, y)
    updates, state = jax.jit(tx.update)(g, tx.init(params), params, inputs=x, targets=y)
    return ravel_pytree(g)[0], ravel_pytree(updates)[0], state


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_examples", [2, 20], ids=["rows<P", "rows>P"])
@pytest.mark.parametrize("solver", ["woodbury", "cg", "dense"])
def test_exact_solvers_match_dense_solve(kind, num_examples, solver):
    model, params, x, y = mlp_problem("categorical", num_examples=num_examples)
    damping = 1e-2
    if solver == "cg":
        solver = ng.ConjugateGradient(tol=1e-12, max_iters=200)
    g, d, _ = _update(model, params, x, y, kind, solver, damping)
    f = _reference_fisher(model, params, x, y, kind)
    np.testing.assert_allclose(
        d, np.linalg.solve(f + damping * np.eye(len(f)), g), rtol=1e-6, atol=1e-10
    )


@pytest.mark.parametrize("kind", KINDS)
def test_diagonal_solver_uses_the_exact_diagonal(kind):
    model, params, x, y = mlp_problem("heteroscedastic")
    g, d, state = _update(model, params, x, y, kind, "diagonal", 0.1)
    f = _reference_fisher(model, params, x, y, kind)
    diagonal = ravel_pytree(state.curvature.diagonal)[0]
    np.testing.assert_allclose(diagonal, np.diag(f), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(d, g / (np.diag(f) + 0.1), rtol=1e-10)
    # Not the squared batch gradient (optax's deprecated fisher_diag).
    assert not np.allclose(diagonal, g**2, rtol=0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_block_diagonal_solver_uses_the_per_leaf_blocks(kind):
    model, params, x, y = mlp_problem("categorical", num_examples=8)
    g, d, _ = _update(model, params, x, y, kind, "block_diagonal", 0.05)
    blocks = leaf_blocks(np.asarray(_reference_fisher(model, params, x, y, kind)), params)
    np.testing.assert_allclose(
        d, np.linalg.solve(blocks + 0.05 * np.eye(len(blocks)), g), rtol=1e-8
    )


def test_woodbury_keeps_the_component_outside_the_rows_span():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(3, 10))
    v = rng.normal(size=10)  # not in the span of the three rows
    damping = 0.3
    expected = np.linalg.solve(rows.T @ rows / 3 + damping * np.eye(10), v)
    np.testing.assert_allclose(
        woodbury_solve(jnp.asarray(rows), 3, jnp.asarray(v), damping), expected, rtol=1e-10
    )
    # With λ = 0 it is the pseudo-inverse.
    pinv = np.linalg.pinv(rows.T @ rows / 3, hermitian=True) @ v
    np.testing.assert_allclose(
        woodbury_solve(jnp.asarray(rows), 3, jnp.asarray(v), 0.0), pinv, rtol=1e-7, atol=1e-9
    )


def test_woodbury_in_float32_is_stable():
    model, params, x, y = mlp_problem("categorical", num_examples=4)
    params32, x32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x))
    _g64, d64, _ = _update(model, params, x, y, "exact", "woodbury", 1e-3)
    _, d32, _ = _update(model, params32, x32, y, "exact", "woodbury", 1e-3)
    assert d32.dtype == jnp.float32
    np.testing.assert_allclose(d32, d64, rtol=2e-2, atol=2e-3 * np.abs(d64).max())


def test_cg_converges_within_p_iterations_and_stops_at_tolerance():
    # Linear regression, P = 12: in exact arithmetic CG terminates in ≤ P iterations.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 12)), rng.normal(size=(50, 1))
    model = ng.Model(lambda w, x: x @ w, ng.Gaussian(scale=1.0))
    params = jnp.asarray(rng.normal(size=(12, 1)))
    cg = ng.ConjugateGradient(tol=1e-10, max_iters=1000)
    g, d, state = _update(model, params, x, y, "exact", cg, 0.0)
    assert 0 < int(state.curvature.iterations) <= 12
    f = x.T @ x / 50
    np.testing.assert_allclose(d, np.linalg.solve(f, g), rtol=1e-8)
    # A loose tolerance stops early, with the residual at the tolerance.
    _, loose, loose_state = _update(
        model, params, x, y, "exact", ng.ConjugateGradient(tol=1e-1), 0.0
    )
    assert np.linalg.norm(f @ loose - g) <= 1e-1 * np.linalg.norm(g) * (1 + 1e-9)
    assert int(loose_state.curvature.iterations) < int(state.curvature.iterations)


def _numpy_cg_model_values(a, b, iterations):
    """Textbook CG from 0 on A x = b: the iterates x_i and m(x_i) = ½ x_iᵀAx_i − bᵀx_i."""
    x, r = np.zeros_like(b), b.copy()
    p, iterates = r.copy(), [np.zeros_like(b)]
    for _ in range(iterations):
        ap = a @ p
        alpha = (r @ r) / (p @ ap)
        x, r_new = x + alpha * p, r - alpha * ap
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
        iterates.append(x.copy())
    values = [0.5 * x @ a @ x - b @ x for x in iterates]
    return iterates, values


def test_cg_progress_tolerance_stops_where_martens_rule_first_holds():
    # Eigenvalues over three decades: the residual falls slowly, the model value fast.
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(300, 300)))
    a = (q * np.logspace(-3, 0, 300)) @ q.T
    b = rng.normal(size=300)
    epsilon = 5e-4
    iterates, values = _numpy_cg_model_values(a, b, 300)
    # Martens 2010: stop at the first i > k with (m_i − m_{i−k}) / m_i < k·ε, k = max(10, i/10).
    expected = next(
        i
        for i in range(1, 301)
        if i > max(10, i // 10)
        and (values[i] - values[i - max(10, i // 10)]) / values[i] < max(10, i // 10) * epsilon
    )
    solve = jax.jit(
        lambda b: ng_cg(
            lambda v: jnp.asarray(a) @ v,
            b,
            jnp.zeros_like(b),
            tol=1e-12,
            max_iters=300,
            progress_tol=epsilon,
        )
    )
    x, _, iterations = solve(jnp.asarray(b))
    assert 10 < int(iterations) == expected < 150
    scale = np.abs(iterates[expected]).max()  # the two CGs round differently
    np.testing.assert_allclose(x, iterates[expected], rtol=0, atol=1e-7 * scale)
    # Without it, CG runs on towards the residual tolerance.
    _, _, plain = jax.jit(
        lambda b: ng_cg(
            lambda v: jnp.asarray(a) @ v, b, jnp.zeros_like(b), tol=1e-12, max_iters=300
        )
    )(jnp.asarray(b))
    assert int(plain) > 2 * expected
    with pytest.raises(ValueError, match="progress_tol"):
        ng.ConjugateGradient(progress_tol=0.0)


def test_cg_warm_start_reuses_the_previous_solution():
    model, params, x, y = mlp_problem("categorical")
    tx = ng.scale_by_natural_gradient(model, damping=1e-2, solver=ng.ConjugateGradient(tol=1e-8))
    g = jax.grad(model.nll)(params, x, y)
    state = tx.init(params)
    _, state = tx.update(g, state, params, inputs=x)
    first = int(state.curvature.iterations)
    _, state = tx.update(g, state, params, inputs=x)  # same problem: already solved
    assert first > 0 and int(state.curvature.iterations) == 0
    cold = ng.scale_by_natural_gradient(
        model, damping=1e-2, solver=ng.ConjugateGradient(tol=1e-8, warm_start=False)
    )
    cold_state = cold.update(
        g, cold.update(g, cold.init(params), params, inputs=x)[1], params, inputs=x
    )[1]
    assert int(cold_state.curvature.iterations) == first


def test_cg_reports_its_residual_and_the_quadratic_form_of_its_step():
    model, params, x, y = mlp_problem("categorical")
    damping = 1e-2
    g, d, state = _update(model, params, x, y, "exact", ng.ConjugateGradient(tol=1e-3), damping)
    a = np.asarray(ng.fisher(model, params, x)) + damping * np.eye(len(g))
    np.testing.assert_allclose(
        state.curvature.residual, np.linalg.norm(a @ d - g) / np.linalg.norm(g), rtol=1e-6
    )
    np.testing.assert_allclose(state.curvature.quadratic, d @ a @ d, rtol=1e-10)
    assert not bool(state.curvature.fell_back)


def _badly_conditioned_problem():
    """An MLP with P = 147 and a Monte-Carlo Fisher of rank ≤ 3."""
    model, params, x, y = mlp_problem("categorical", num_examples=3, in_size=8, hidden=12)
    return model, params, x, y


@pytest.mark.parametrize("max_iters", [100, 2], ids=["default", "truncated"])
def test_cg_on_a_rank_deficient_fisher_never_goes_uphill_nor_past_the_trust_region(max_iters):
    """A stale warm start (another step's solution) must not make the step unsafe: the
    step decreases the quadratic model and its measured KL stays within max_kl."""
    model, params, x, y = _badly_conditioned_problem()
    damping, max_kl = 1e-6, 1e-3
    cg = ng.ConjugateGradient(max_iters=max_iters)
    tx = ng.scale_by_natural_gradient(
        model, fisher="monte_carlo", damping=damping, solver=cg, max_kl=max_kl, seed=SEED
    )
    g = jax.grad(model.nll)(params, x, y)
    flat_g = ravel_pytree(g)[0]
    identity = damping * np.eye(len(flat_g))
    a = np.asarray(_reference_fisher(model, params, x, y, "monte_carlo")) + identity
    exact = np.asarray(_reference_fisher(model, params, x, y, "exact")) + identity
    state = tx.init(params)
    for stale in (1e3, -1e3, 1e-2):  # warm starts far uphill, and one nearby
        warm = as_leaves(params, stale * jax.random.normal(jax.random.PRNGKey(2), flat_g.shape))
        state = state._replace(curvature=state.curvature._replace(solution=warm))
        updates, _ = tx.update(g, state, params, inputs=x, targets=y)
        d = np.asarray(ravel_pytree(updates)[0])
        assert 0.5 * d @ a @ d - flat_g @ d < 0  # downhill on the quadratic model
        # max_kl bounds the KL's quadratic with the exact Fisher (the sampled one's rank
        # is 3 here: the step is large where it is blind).
        assert 0.5 * d @ exact @ d <= max_kl * (1 + 1e-6)


def test_kl_measure_solver_bounds_the_kl_of_the_fisher_the_solve_used():
    """``kl_measure="solver"``: ½ dᵀ(F̂ + λI)d = max_kl with F̂ the sampled Fisher the
    solve used (a dense reference), where the exact Fisher's KL of the same step is
    larger (the sampled Fisher is blind in most directions: the reason "exact" is the
    default)."""
    model, params, x, y = _badly_conditioned_problem()
    damping, max_kl = 1e-3, 1e-3
    steps = {}
    for measure in ("solver", "exact"):
        flat_g, steps[measure], _ = _update(
            model, params, x, y, "monte_carlo", "dense", damping, max_kl=max_kl, kl_measure=measure
        )
    identity = damping * np.eye(len(flat_g))
    sampled = np.asarray(_reference_fisher(model, params, x, y, "monte_carlo")) + identity
    exact = np.asarray(_reference_fisher(model, params, x, y, "exact")) + identity
    unclipped = np.linalg.solve(sampled, flat_g)
    assert 0.5 * unclipped @ sampled @ unclipped > max_kl  # the bound is active
    np.testing.assert_allclose(0.5 * steps["solver"] @ sampled @ steps["solver"], max_kl, rtol=1e-9)
    np.testing.assert_allclose(
        steps["solver"] / np.linalg.norm(steps["solver"]),
        unclipped / np.linalg.norm(unclipped),
        atol=1e-9,
    )
    np.testing.assert_allclose(0.5 * steps["exact"] @ exact @ steps["exact"], max_kl, rtol=1e-9)
    assert 0.5 * steps["solver"] @ exact @ steps["solver"] > 10 * max_kl


def test_kl_measure_solver_clips_kfac_by_its_own_quadratic():
    """K-FAC solves with its own matrix K exactly, so ½ (c·d)ᵀK(c·d) = ½ c² gᵀd: the
    clipped step is the unclipped one times c = √(2ε / gᵀd) (Ba et al. 2017)."""
    model, params, x, y = mlp_problem("categorical", num_examples=16, in_size=6, hidden=8)
    problem = (model, params, x, y, "monte_carlo", "kronecker", 1e-2)
    flat_g, d, _ = _update(*problem)
    quadratic = float(flat_g @ d)
    max_kl = 0.01 * quadratic
    _, step, _ = _update(*problem, max_kl=max_kl, kl_measure="solver")
    np.testing.assert_allclose(step, np.sqrt(2 * max_kl / quadratic) * d, rtol=1e-9)


@pytest.mark.parametrize("solver", ["kronecker", "diagonal"])
def test_max_kl_of_an_approximate_solve_is_measured_with_the_exact_fisher(solver):
    """With the exact Fisher but an approximate solve and no quadratic model, the solve's
    own gᵀd is its approximation's: the default measure must still bound the *exact*
    Fisher's ½ dᵀ(F + λI)d (a dense reference), and "solver" the approximation's."""
    model, params, x, y = mlp_problem("categorical", num_examples=16, in_size=6, hidden=8)
    damping = 1e-2
    problem = (model, params, x, y, "exact", solver, damping)
    flat_g, d, _ = _update(*problem, rescale=False, momentum=False)
    exact = np.asarray(ng.fisher(model, params, x)) + damping * np.eye(len(flat_g))
    own, true = float(flat_g @ d), float(d @ exact @ d)
    assert not np.isclose(own, true, rtol=0.05)  # the approximation's KL is not the KL
    max_kl = 0.01 * min(own, true)
    for measure, quadratic in (("exact", true), ("solver", own)):
        _, step, _ = _update(
            *problem, rescale=False, momentum=False, max_kl=max_kl, kl_measure=measure
        )
        np.testing.assert_allclose(step, np.sqrt(2 * max_kl / quadratic) * d, rtol=1e-9)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(max_kl=0.1, kl_measure="sampled"), "kl_measure must be one of"),
        (dict(kl_measure="solver"), "pass max_kl"),
    ],
)
def test_kl_measure_is_checked(options, message):
    model, *_ = _badly_conditioned_problem()
    with pytest.raises(ValueError, match=message):
        ng.natural_gradient(model, 1.0, **options)


def test_cauchy_point_minimises_the_quadratic_model_along_the_gradient():
    from natgrad_jax._solvers.conjugate_gradient import cauchy_point

    rng = np.random.default_rng(1)
    root = rng.normal(size=(5, 5))
    a, g = root @ root.T + 0.1 * np.eye(5), rng.normal(size=5)
    step, quadratic = cauchy_point(lambda v: a @ v, jnp.asarray(g))
    alphas = np.linspace(0, 2, 2001) * float(step[0] / g[0])
    model = [0.5 * t**2 * g @ a @ g - t * g @ g for t in alphas]
    assert float(step[0] / g[0]) == pytest.approx(alphas[int(np.argmin(model))], rel=2e-3)
    np.testing.assert_allclose(quadratic, step @ a @ step, rtol=1e-12)


def test_cg_with_monte_carlo_fisher_and_trust_region_trains_an_autoencoder_in_float32():
    """The run that used to diverge (NLL 68.7 → 10²⁴): digits autoencoder 64-128-16-128-64,
    default CG, damping 1e-4, max_kl 1e-2, batch 128, float32. Bounded by the sampled
    Fisher's quadratic, its first step still took the full-data NLL to 413 (the exact
    Fisher's KL of that step was 804, not 0.01); bounded by the exact Fisher's, the NLL
    falls at every one of the first ten steps, and by 8 of its 9.7 above the Gaussian's
    log-normaliser (32 log 2π = 58.8) in 100."""
    from sklearn.datasets import load_digits

    data = jnp.asarray(load_digits().data / 16.0, jnp.float32)
    params = init_mlp(jax.random.PRNGKey(0), [64, 128, 16, 128, 64], dtype=jnp.float32)
    model = ng.Model(mlp, ng.Gaussian(scale=1.0))
    optimizer = ng.natural_gradient(
        model, 1.0, fisher="monte_carlo", solver="cg", damping=1e-4, max_kl=1e-2
    )

    @jax.jit
    def step(params, state, batch):
        g = jax.grad(model.nll)(params, batch, batch)
        updates, state = optimizer.update(g, state, params, inputs=batch, targets=batch)
        return jax.tree.map(jnp.add, params, updates), state

    full_nll = jax.jit(lambda p: model.nll(p, data, data))
    history = [float(full_nll(params))]
    state = optimizer.init(params)
    rng = np.random.default_rng(0)
    for count in range(1, 101):
        params, state = step(params, state, data[rng.choice(len(data), 128, replace=False)])
        if count <= 10 or count == 100:
            history.append(float(full_nll(params)))
    assert history[0] == pytest.approx(68.54, abs=0.01)
    assert all(np.diff(history[:11]) < 0), history
    assert history[-1] < history[0] - 8.0, history


@pytest.mark.parametrize("kind", ["monte_carlo", "empirical"])
def test_fisher_operator_matches_dense_matrices(kind):
    model, params, x, y = mlp_problem("heteroscedastic")
    key = jax.random.PRNGKey(2)
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.PRNGKey(9), flat.shape)
    product = ng.fisher_operator(model, params, x, kind=kind, targets=y, key=key, num_samples=3)(
        unravel(v)
    )
    dense = (
        ng.empirical_fisher(model, params, x, y)
        if kind == "empirical"
        else ng.monte_carlo_fisher(model, params, x, key, num_samples=3)
    )
    np.testing.assert_allclose(ravel_pytree(product)[0], dense @ v, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("solver", ["diagonal", "block_diagonal"])
def test_decay_and_refresh_work_for_stateful_representations(solver):
    model, params, x, y = mlp_problem("categorical")
    other = jax.tree.map(lambda p: p - 0.2, params)
    tx = ng.scale_by_natural_gradient(model, damping=0.1, solver=solver, decay=0.5, refresh_every=2)
    g = jax.grad(model.nll)(params, x, y)
    state = tx.init(params)
    _, state = tx.update(g, state, params, inputs=x)
    _, state = tx.update(g, state, other, inputs=x)  # no refresh: curvature unchanged
    _, state = tx.update(g, state, other, inputs=x)  # refresh: averaged with `other`'s
    averaged = 0.5 * ng.fisher(model, params, x) + 0.5 * ng.fisher(model, other, x)
    if solver == "diagonal":
        diagonal = ravel_pytree(state.curvature.diagonal)[0]
        np.testing.assert_allclose(diagonal, np.diag(averaged), rtol=1e-10)
    else:
        first_block = state.curvature.blocks[0]
        n = first_block.shape[0]
        np.testing.assert_allclose(first_block, averaged[:n, :n], rtol=1e-10)


@pytest.mark.parametrize("solver", ["woodbury", "cg"])
def test_stateless_representations_refuse_decay_and_refresh(solver):
    model, params, _, _ = mlp_problem("categorical")
    with pytest.raises(ValueError, match="keeps no curvature"):
        ng.scale_by_natural_gradient(model, solver=solver, decay=0.9).init(params)
    with pytest.raises(ValueError, match="keeps no curvature"):
        ng.scale_by_natural_gradient(model, solver=solver, refresh_every=3).init(params)


def test_choose_solver_compares_estimated_costs():
    # Few parameters: forming and factorising P×P is cheapest.
    assert ng.choose_solver(50, 200)[0] == "dense"
    # Many parameters, few rows, a captured kernel of M²·(K + D): Woodbury ...
    captured_kernel = 64**2 * 2_000
    assert ng.choose_solver(10**6, 64, 64, woodbury_kernel=captured_kernel)[0] == "woodbury"
    # ... unless the damping is 0 (it divides by λ), or the kernel is formed from dense rows
    # of a million parameters: then Fisher-vector products.
    no_woodbury = ng.choose_solver(10**6, 64, 64, allow_woodbury=False)
    assert no_woodbury[0] == "cg"
    assert ng.choose_solver(10**6, 4096, 4096)[0] == "cg"
    # A memory budget rules out what does not fit, whatever its cost.
    assert ng.choose_solver(100, 1_000)[0] == "dense"  # P² + M·P = 110,000 floats
    assert ng.choose_solver(100, 1_000, max_floats=1e5)[0] == "cg"
    _, reason = ng.choose_solver(50, 200)
    assert reason.startswith("least estimated cost, P = 50, M = 200: dense 5.4e+05")
    assert "woodbury" not in no_woodbury[1]
    assert ng.choose_solver(10)[0] == "dense, woodbury or cg"
    # A model that cannot run on one example: no dense rows of per-example gradients.
    assert ng.choose_solver(50, 200, per_example=False)[0] == "woodbury"
    assert ng.choose_solver(50, 200, allow_woodbury=False, per_example=False)[0] == "cg"


def test_auto_refuses_decay_and_refresh_where_it_never_picks_kfac():
    """Below 5,000 parameters ``"auto"`` keeps no curvature across steps: a cadence
    would do nothing, so it is refused (explicitly passing the neutral values is not)."""
    model = ng.Model(mlp, ng.Categorical())
    params = init_mlp(jax.random.PRNGKey(0), [2, 3])
    for cadence in ({"decay": 0.9}, {"refresh_every": 3}):
        with pytest.raises(ValueError, match="'auto' keeps curvature across steps only as K-FAC"):
            ng.scale_by_natural_gradient(model, **cadence).init(params)
    ng.scale_by_natural_gradient(model, decay=0.0, refresh_every=1).init(params)


def test_auto_solver_on_a_large_model_uses_woodbury_and_matches_dense():
    params = init_mlp(jax.random.PRNGKey(0), [60, 64, 3])  # P = 4099 > 4096
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 60))
    model = ng.Model(mlp, ng.Categorical())
    y = jnp.array([0, 1, 2, 0])
    assert ng.choose_solver(ravel_pytree(params)[0].size, 12)[0] == "woodbury"
    g, d, state = _update(model, params, x, y, "exact", "auto", 1e-2)
    # One state type whatever the network: CG's warm start, and no K-FAC factors here.
    cg_state = ng.ConjugateGradient().init(params, jnp.float64)
    assert isinstance(state.curvature.cg, type(cg_state)) and state.curvature.kronecker is None
    f = ng.fisher(model, params, x)
    np.testing.assert_allclose(
        d, np.linalg.solve(f + 1e-2 * np.eye(len(f)), g), rtol=1e-6, atol=1e-10
    )
    # The trust region reads this step's quadratic (a stale CG one let it diverge).
    for max_kl in (1e-6, 1e-1):
        tx = ng.scale_by_natural_gradient(model, solver="auto", damping=1e-2, max_kl=max_kl)
        state = tx.init(params)
        for _ in range(2):
            step, state = tx.update(unravel_like(params, g), state, params, inputs=x)
            step = ravel_pytree(step)[0]
            quadratic = step @ (f + 1e-2 * np.eye(len(f))) @ step
            assert 0.5 * quadratic <= max_kl * (1 + 1e-9)
            if max_kl == 1e-6:
                np.testing.assert_allclose(0.5 * quadratic, max_kl, rtol=1e-7)


def unravel_like(params, flat):
    return ravel_pytree(params)[1](flat)


def test_memory_guard_raises_before_allocating():
    huge = {"w": jax.ShapeDtypeStruct((300_000,), jnp.float32)}
    model = ng.Model(lambda p, x: x * p["w"][:1], ng.Gaussian(scale=1.0))
    tx = ng.scale_by_natural_gradient(model, solver="dense")
    with pytest.raises(ValueError, match=r"solver='auto', 'kronecker', 'cg' or 'diagonal'"):
        jax.eval_shape(tx.init, huge)  # 2·(3·10⁵)² floats: refused before any allocation
    model_small, params, x, y = mlp_problem("categorical")
    tx = ng.scale_by_natural_gradient(model_small, solver="woodbury", max_curvature_bytes=1000)
    g = jax.grad(model_small.nll)(params, x, y)
    with pytest.raises(ValueError, match="max_curvature_bytes"):
        tx.update(g, tx.init(params), params, inputs=x)
