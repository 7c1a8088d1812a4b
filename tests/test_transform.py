"""scale_by_natural_gradient / natural_gradient: exact numbers, trust region, optax rules."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng
from tests.helpers import init_mlp, leaf_slices, mlp, mlp_problem


def _logistic_problem(n=40, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.ones((n, 1)), rng.normal(size=(n, d - 1))], axis=1)
    w_true = rng.normal(size=d)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-x @ w_true))).astype(float)
    return ng.Model(lambda w, x: x @ w, ng.Bernoulli()), x, y


def _gradient(model, params, x, y):
    return jax.grad(model.nll)(params, x, y)


def _dense_reference(model, params, x, y, *, kind="exact", damping, key=None, num_samples=1):
    if kind == "exact":
        f = ng.fisher(model, params, x)
    elif kind == "empirical":
        f = ng.empirical_fisher(model, params, x, y)
    else:
        f = ng.monte_carlo_fisher(model, params, x, key, num_samples)
    flat_g = ravel_pytree(_gradient(model, params, x, y))[0]
    return f + damping * jnp.eye(len(f)), flat_g


# --- exact numbers ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["exact", "empirical", "monte_carlo"])
@pytest.mark.parametrize("name", ["categorical", "heteroscedastic"])
def test_update_is_damped_fisher_solve(kind, name):
    model, params, x, y = mlp_problem(name)
    damping, seed = 0.05, 3
    tx = ng.scale_by_natural_gradient(
        model,
        fisher=kind,
        damping=damping,
        seed=seed,
        num_samples=2 if kind == "monte_carlo" else None,
    )
    g = _gradient(model, params, x, y)
    updates, _ = jax.jit(tx.update)(g, tx.init(params), params, inputs=x, targets=y)
    # The state's key is split at every update and the second half labels the batch.
    step_key = jax.random.split(jax.random.PRNGKey(seed))[1]
    a, flat_g = _dense_reference(
        model, params, x, y, kind=kind, damping=damping, key=step_key, num_samples=2
    )
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    np.testing.assert_allclose(
        ravel_pytree(updates)[0], jnp.linalg.solve(a, flat_g), rtol=1e-8, atol=1e-12
    )


def test_undamped_update_on_rank_deficient_fisher_is_finite_pseudo_inverse():
    model, params, x, y = mlp_problem("categorical", num_examples=2)  # rank ≤ 4 < P = 31
    g = _gradient(model, params, x, y)
    tx = ng.scale_by_natural_gradient(model, damping=0.0)
    updates, _ = tx.update(g, tx.init(params), params, inputs=x)
    d = ravel_pytree(updates)[0]
    assert jnp.all(jnp.isfinite(d))
    f = ng.fisher(model, params, x)
    np.testing.assert_allclose(
        d, jnp.linalg.pinv(f, hermitian=True, rtol=1e-10) @ ravel_pytree(g)[0], rtol=1e-6, atol=1e-8
    )


# --- the KL trust region ------------------------------------------------------------


@pytest.mark.parametrize("max_kl", [1e-4, 1e-2, 10.0])
def test_trust_region_bounds_quadratic_kl_with_equality_when_active(max_kl):
    model, params, x, y = mlp_problem("categorical")
    damping = 1e-3
    g = _gradient(model, params, x, y)
    a, flat_g = _dense_reference(model, params, x, y, damping=damping)
    unconstrained = jnp.linalg.solve(a, flat_g)
    tx = ng.scale_by_natural_gradient(model, damping=damping, max_kl=max_kl)
    d = ravel_pytree(tx.update(g, tx.init(params), params, inputs=x)[0])[0]
    kl = 0.5 * d @ a @ d
    if 0.5 * unconstrained @ a @ unconstrained > max_kl:
        np.testing.assert_allclose(kl, max_kl, rtol=1e-9)
        np.testing.assert_allclose(
            d / jnp.linalg.norm(d), unconstrained / jnp.linalg.norm(unconstrained), rtol=1e-9
        )
    else:
        np.testing.assert_allclose(d, unconstrained, rtol=1e-10)
    assert max_kl != 1e-4 or kl == pytest.approx(max_kl)  # the smallest bound is active


@pytest.mark.parametrize("fisher", ["monte_carlo", "empirical"])
@pytest.mark.parametrize("solver", ["cg", "woodbury", "kronecker", "diagonal"])
def test_max_kl_bounds_the_kl_of_the_exact_fisher_whatever_fisher_the_solve_uses(fisher, solver):
    """A Gaussian of 8 outputs: one sampled (or observed) label per example shows the
    solve one direction of each example's outputs, and its step moves the others. The
    trust region scales the unconstrained step to ½ dᵀ(F + λI)d = ε with F the exact
    Fisher (written out densely here), and the step's measured KL is then about ε."""
    model = ng.Model(mlp, ng.Gaussian(scale=0.5))
    params = init_mlp(jax.random.PRNGKey(0), [4, 6, 8])
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
    y = model.likelihood.sample(jax.random.PRNGKey(2), model.apply_fn(params, x))
    g = _gradient(model, params, x, y)
    damping, max_kl = 1e-4, 1e-3

    def step(max_kl):
        tx = ng.scale_by_natural_gradient(
            model, fisher=fisher, solver=solver, damping=damping, max_kl=max_kl
        )
        return ravel_pytree(tx.update(g, tx.init(params), params, inputs=x, targets=y)[0])[0]

    size = ravel_pytree(g)[0].size
    exact = ng.fisher(model, params, x) + damping * jnp.eye(size)
    unconstrained, d = step(None), step(max_kl)
    assert 0.5 * unconstrained @ exact @ unconstrained > 10 * max_kl  # the bound is active
    np.testing.assert_allclose(0.5 * d @ exact @ d, max_kl, rtol=1e-8)
    scale = jnp.sqrt(2 * max_kl / (unconstrained @ exact @ unconstrained))
    np.testing.assert_allclose(d, scale * unconstrained, rtol=1e-8, atol=1e-12 / size)
    _, unravel = ravel_pytree(params)
    moved = jax.tree.map(jnp.subtract, params, unravel(d))
    assert float(ng.kl_divergence(model, params, moved, x)) == pytest.approx(max_kl, rel=0.05)


@pytest.mark.parametrize("learning_rate", [0.5, optax.linear_schedule(0.9, 0.1, 3)])
def test_natural_gradient_bounds_the_final_step_whatever_the_learning_rate(learning_rate):
    model, params, x, y = mlp_problem("categorical")
    damping, max_kl = 1e-3, 1e-3
    optimizer = ng.natural_gradient(model, learning_rate, damping=damping, max_kl=max_kl)
    state = optimizer.init(params)
    for step in range(3):
        g = _gradient(model, params, x, y)
        a, flat_g = _dense_reference(model, params, x, y, damping=damping)
        updates, state = optimizer.update(g, state, params, inputs=x)
        delta = ravel_pytree(updates)[0]
        eta = learning_rate(jnp.int32(step)) if callable(learning_rate) else learning_rate
        # DESIGN §2: step length min(η, √(2ε / gᵀA⁻¹g)) along −A⁻¹g.
        natural = jnp.linalg.solve(a, flat_g)
        expected = -min(eta, float(jnp.sqrt(2 * max_kl / (flat_g @ natural)))) * natural
        np.testing.assert_allclose(delta, expected, rtol=1e-9)
        assert 0.5 * delta @ a @ delta <= max_kl * (1 + 1e-9)
        params = optax.apply_updates(params, updates)


# --- NGD = Fisher scoring = IRLS ------------------------------------------------------


def _irls(x, y, mean_fn, variance_fn, steps):
    """Textbook IRLS for a canonical-link GLM, in numpy (independent of JAX)."""
    w = np.zeros(x.shape[1])
    iterates = []
    for _ in range(steps):
        eta = x @ w
        weights = variance_fn(eta)
        z = eta + (y - mean_fn(eta)) / weights
        w = np.linalg.solve(x.T @ (weights[:, None] * x), x.T @ (weights * z))
        iterates.append(w.copy())
    return iterates


def _breast_cancer():
    """Logistic regression on mean radius, texture and smoothness, plus an intercept."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    features = data.data[:, [0, 1, 4]]
    features = (features - features.mean(0)) / features.std(0)
    return np.concatenate([np.ones((len(features), 1)), features], axis=1), data.target.astype(
        float
    )


def _poisson_data(n=200, seed=1):
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.ones((n, 1)), rng.normal(size=(n, 3)) * 0.5], axis=1)
    y = rng.poisson(np.exp(x @ np.array([0.5, 0.3, -0.6, 0.2]))).astype(float)
    return x, y


def _run(optimizer, model, params, x, y, steps):
    state = optimizer.init(params)
    iterates = []

    @jax.jit
    def step(params, state):
        g = jax.grad(model.nll)(params, x, y)
        updates, state = optimizer.update(g, state, params, inputs=x, targets=y)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
        iterates.append(np.asarray(params))
    return iterates


@pytest.mark.parametrize(
    "data, likelihood, mean_fn, variance_fn",
    [
        (
            _breast_cancer,
            ng.Bernoulli(),
            lambda e: 1 / (1 + np.exp(-e)),
            lambda e: np.exp(e) / (1 + np.exp(e)) ** 2,
        ),
        (_poisson_data, ng.Poisson(), np.exp, np.exp),
    ],
    ids=["logistic", "poisson"],
)
def test_natural_gradient_reproduces_irls_iterates(data, likelihood, mean_fn, variance_fn):
    x, y = data()
    model = ng.Model(lambda w, x: x @ w, likelihood)
    steps = 8
    ngd = _run(
        ng.natural_gradient(model, 1.0, damping=0.0), model, jnp.zeros(x.shape[1]), x, y, steps
    )
    irls = _irls(x, y, mean_fn, variance_fn, steps)
    for ours, theirs in zip(ngd, irls, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=1e-10)
    # Converged to the MLE within a handful of steps: the gradient vanishes.
    assert np.linalg.norm(jax.grad(model.nll)(jnp.asarray(ngd[-1]), x, y)) < 1e-11


def test_linear_regression_converges_in_one_step():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    y = (x @ rng.normal(size=4) + 0.3 * rng.normal(size=50))[:, None]
    model = ng.Model(lambda w, x: x @ w, ng.Gaussian(scale=0.3))
    (w,) = _run(ng.natural_gradient(model, 1.0, damping=0.0), model, jnp.zeros((4, 1)), x, y, 1)
    np.testing.assert_allclose(w, np.linalg.lstsq(x, y, rcond=None)[0], rtol=1e-10)


# --- invariance to parametrisation --------------------------------------------------


def _gaussian_models():
    """One model, two parametrisations: (μ, variance) and (μ, precision)."""

    def broadcast(mean, log_scale, x):
        return jnp.full((x.shape[0], 1), mean), jnp.full((x.shape[0], 1), log_scale)

    by_variance = ng.Model(lambda p, x: broadcast(p[0], 0.5 * jnp.log(p[1]), x), ng.Gaussian())
    by_precision = ng.Model(lambda p, x: broadcast(p[0], -0.5 * jnp.log(p[1]), x), ng.Gaussian())
    return by_variance, by_precision


def _gaussian_paths(optimizer_fn, eta, steps):
    """(μ, σ²) along the paths of both parametrisations, from N(0, 0.5)."""
    y = np.random.default_rng(0).normal(1.0, 2.0, size=(64, 1))
    x = np.zeros((64, 1))
    by_variance, by_precision = _gaussian_models()
    path_v = _run(optimizer_fn(by_variance, eta), by_variance, jnp.array([0.0, 0.5]), x, y, steps)
    path_p = _run(optimizer_fn(by_precision, eta), by_precision, jnp.array([0.0, 2.0]), x, y, steps)
    as_variance = [np.array([p[0], 1 / p[1]]) for p in path_p]
    return np.array(path_v), np.array(as_variance)


def test_natural_gradient_is_invariant_to_variance_vs_precision():
    ngd = functools.partial(ng.natural_gradient, damping=0.0)
    gd = lambda model, eta: optax.sgd(eta)
    ngd_gaps, gd_gaps = {}, {}
    for eta in (1e-2, 1e-3):
        ngd_gaps[eta] = np.abs(np.subtract(*_gaussian_paths(ngd, eta, steps=1))).max()
        gd_gaps[eta] = np.abs(np.subtract(*_gaussian_paths(gd, eta, steps=1))).max()
    # One NGD step differs between the parametrisations by O(η²): a tenth of the step,
    # a hundredth of the gap. Gradient descent differs at first order, O(η).
    np.testing.assert_allclose(ngd_gaps[1e-2] / ngd_gaps[1e-3], 100, rtol=0.15)
    np.testing.assert_allclose(gd_gaps[1e-2] / gd_gaps[1e-3], 10, rtol=0.15)
    assert ngd_gaps[1e-3] < 1e-4 < 1e-3 < gd_gaps[1e-3]
    # Whole paths of 100 steps: NGD's stay together, gradient descent's drift apart.
    ngd_gap = np.abs(np.subtract(*_gaussian_paths(ngd, 1e-2, steps=100))).max()
    gd_gap = np.abs(np.subtract(*_gaussian_paths(gd, 1e-2, steps=100))).max()
    assert ngd_gap < 0.05 and gd_gap > 10 * ngd_gap


def test_undamped_step_transforms_contravariantly_under_affine_reparametrisation():
    model, x, y = _logistic_problem()
    a = np.array([[2.0, 0.3, 0.0], [0.1, 0.5, -0.4], [0.0, 1.0, 3.0]])
    model_phi = ng.Model(lambda phi, x: x @ (a @ phi), ng.Bernoulli())
    phi = jnp.array([0.2, -0.1, 0.4])
    (theta_next,) = _run(ng.natural_gradient(model, 1.0, damping=0.0), model, a @ phi, x, y, 1)
    (phi_next,) = _run(ng.natural_gradient(model_phi, 1.0, damping=0.0), model_phi, phi, x, y, 1)
    np.testing.assert_allclose(phi_next - phi, np.linalg.solve(a, theta_next - a @ phi), rtol=1e-10)


# --- options: damping schedule, EMA, refresh period --------------------------------


def test_damping_schedule_is_evaluated_at_the_step_count():
    model, params, x, y = mlp_problem("categorical")
    schedule = optax.exponential_decay(1.0, transition_steps=1, decay_rate=0.1)
    tx = ng.scale_by_natural_gradient(model, damping=schedule)
    state = tx.init(params)
    g = _gradient(model, params, x, y)
    for step in range(3):
        updates, state = tx.update(g, state, params, inputs=x)
        a, flat_g = _dense_reference(model, params, x, y, damping=schedule(jnp.int32(step)))
        np.testing.assert_allclose(ravel_pytree(updates)[0], jnp.linalg.solve(a, flat_g), rtol=1e-8)


def test_decay_averages_fishers_across_steps():
    model, params, x, y = mlp_problem("categorical")
    other = jax.tree.map(lambda p: p + 0.3, params)
    tx = ng.scale_by_natural_gradient(model, damping=0.1, solver="dense", decay=0.75)
    state = tx.init(params)
    g = _gradient(model, params, x, y)
    _, state = tx.update(g, state, params, inputs=x)
    updates, state = tx.update(g, state, other, inputs=x)
    averaged = 0.75 * ng.fisher(model, params, x) + 0.25 * ng.fisher(model, other, x)
    np.testing.assert_allclose(state.curvature.fisher, averaged, rtol=1e-12)
    expected = jnp.linalg.solve(averaged + 0.1 * jnp.eye(len(averaged)), ravel_pytree(g)[0])
    np.testing.assert_allclose(ravel_pytree(updates)[0], expected, rtol=1e-8)


def test_refresh_every_reuses_the_last_factorisation_in_between():
    model, params, x, y = mlp_problem("categorical")
    moved = [jax.tree.map(lambda p, s=s: p + 0.1 * s, params) for s in range(4)]
    tx = ng.scale_by_natural_gradient(model, damping=0.1, solver="dense", refresh_every=2)
    update = jax.jit(tx.update)
    state = tx.init(params)
    g = _gradient(model, params, x, y)
    for step, p in enumerate(moved):
        updates, state = update(g, state, p, inputs=x)
        measured_at = moved[step - step % 2]
        a, _ = _dense_reference(model, measured_at, x, y, damping=0.1)
        np.testing.assert_allclose(
            ravel_pytree(updates)[0], jnp.linalg.solve(a, ravel_pytree(g)[0]), rtol=1e-8
        )


def test_statistics_every_step_and_factorisation_every_k_dense():
    """statistics_every=1, refresh_every=2: the Fisher is the EMA of every step's exact
    Fisher (computed independently), the inverse is refreshed at steps 0 and 2 only."""
    model, params, x, y = mlp_problem("categorical")
    moved = [jax.tree.map(lambda p, s=s: p + 0.1 * s, params) for s in range(4)]
    damping, decay = 0.1, 0.5
    tx = ng.scale_by_natural_gradient(
        model, damping=damping, solver="dense", decay=decay, refresh_every=2, statistics_every=1
    )
    update = jax.jit(tx.update)
    state = tx.init(params)
    g = _gradient(model, params, x, y)
    average = None
    for step, p in enumerate(moved):
        measured = ng.fisher(model, p, x)
        average = measured if average is None else decay * average + (1 - decay) * measured
        if step % 2 == 0:
            factorised = average
        updates, state = update(g, state, p, inputs=x)
        np.testing.assert_allclose(state.curvature.fisher, average, rtol=1e-10)
        expected = jnp.linalg.solve(
            factorised + damping * jnp.eye(len(factorised)), ravel_pytree(g)[0]
        )
        np.testing.assert_allclose(ravel_pytree(updates)[0], expected, rtol=1e-8)


def test_statistics_every_step_and_factorisation_every_k_kronecker():
    """The factors follow every step (as with refresh_every=1); the inverses change
    only at the refactorisation steps 0 and 3."""
    model, params, x, y = mlp_problem("categorical")
    moved = [jax.tree.map(lambda p, s=s: p + 0.1 * s, params) for s in range(4)]
    options = {"damping": 0.1, "solver": "kronecker", "decay": 0.5}
    cadenced = ng.scale_by_natural_gradient(model, refresh_every=3, statistics_every=1, **options)
    every_step = ng.scale_by_natural_gradient(model, **options)
    states = [cadenced.init(params), every_step.init(params)]
    g = _gradient(model, params, x, y)
    inverses_at = {}
    for step, p in enumerate(moved):
        states = [
            jax.jit(tx.update)(g, s, p, inputs=x)[1]
            for tx, s in zip((cadenced, every_step), states, strict=True)
        ]
        cadenced_leaves, reference_leaves = (s.curvature.leaves for s in states)
        for got, expected in zip(cadenced_leaves, reference_leaves, strict=True):
            np.testing.assert_allclose(got.left, expected.left, rtol=1e-10)
            np.testing.assert_allclose(got.right, expected.right, rtol=1e-10)
        inverses_at[step] = [leaf.left_inverse for leaf in cadenced_leaves]
        if step % 3 == 0:
            for got, expected in zip(cadenced_leaves, reference_leaves, strict=True):
                np.testing.assert_allclose(got.left_inverse, expected.left_inverse, rtol=1e-8)
    for step in (1, 2):  # no refactorisation: the inverses of step 0, bit for bit
        for got, kept in zip(inverses_at[step], inverses_at[0], strict=True):
            np.testing.assert_array_equal(got, kept)
    assert not np.allclose(inverses_at[3][-1], inverses_at[0][-1])


def test_separate_cadences_need_a_representation_that_splits_them():
    model, params, _, _ = mlp_problem("categorical")
    with pytest.raises(ValueError, match="cannot measure and factorise on separate cadences"):
        ng.scale_by_natural_gradient(model, solver="cg", statistics_every=2).init(params)
    with pytest.raises(ValueError, match="statistics_every must be a Python int"):
        ng.scale_by_natural_gradient(model, solver="dense", statistics_every=1.5)


# --- optax composition under jit -------------------------------------------------------


def _one_update(tx, params, x, y, **extra):
    g = _gradient(ng.Model(lambda w, x: x @ w, ng.Bernoulli()), params, x, y)
    state = tx.init(params)
    updates, state = jax.jit(functools.partial(tx.update, **extra))(
        g, state, params, inputs=x, targets=y
    )
    return g, updates, state


def _natural_direction(model, params, x, g, damping):
    f = ng.fisher(model, params, x)
    return jnp.linalg.solve(f + damping * jnp.eye(len(f)), g)


def test_chain_with_clipping_and_weight_decay():
    model, x, y = _logistic_problem()
    params = jnp.array([0.1, -0.2, 0.3])
    tx = optax.chain(
        optax.clip_by_global_norm(0.05),
        ng.scale_by_natural_gradient(model, damping=1e-2),
        optax.add_decayed_weights(1e-3),
        optax.scale(-0.5),
    )
    g, updates, _ = _one_update(tx, params, x, y)
    clipped = g * min(1.0, 0.05 / float(jnp.linalg.norm(g)))
    expected = -0.5 * (_natural_direction(model, params, x, clipped, 1e-2) + 1e-3 * params)
    assert float(jnp.linalg.norm(g)) > 0.05  # clipping is active
    np.testing.assert_allclose(updates, expected, rtol=1e-10)


def test_a_chain_with_the_damping_rule_takes_natural_gradients_steps():
    """The docstring's advice: ``scale_by_natural_gradient`` with Levenberg–Marquardt
    damping and the quadratic model's defaults, then the learning rate, is
    ``natural_gradient``: the same parameters after four steps on an MLP classifier."""
    params = init_mlp(jax.random.PRNGKey(0), [4, 8, 3])
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 4))
    y = jnp.arange(16) % 3
    model = ng.Model(mlp, ng.Categorical())
    rule = ng.LevenbergMarquardt()
    optimizers = [
        optax.chain(
            ng.scale_by_natural_gradient(model, damping=rule, rescale=None, momentum=None),
            optax.scale_by_learning_rate(0.5),
        ),
        ng.natural_gradient(model, 0.5),
    ]
    trained = []
    for optimizer in optimizers:
        p, state = params, optimizer.init(params)
        for _ in range(4):
            g = jax.grad(model.nll)(p, x, y)
            updates, state = optimizer.update(g, state, p, inputs=x, targets=y)
            p = optax.apply_updates(p, updates)
        trained.append(ravel_pytree(p)[0])
    assert float(model.nll(p, x, y)) < 0.9 * float(model.nll(params, x, y))
    np.testing.assert_allclose(trained[0], trained[1], rtol=1e-12, atol=1e-14)


def test_learning_rate_schedule():
    model, x, y = _logistic_problem()
    schedule = optax.linear_schedule(1.0, 0.25, transition_steps=2)
    params = jnp.zeros(3)
    optimizer = ng.natural_gradient(model, schedule, damping=1e-3)
    state = optimizer.init(params)
    for step in range(3):
        g = _gradient(model, params, x, y)
        updates, state = optimizer.update(g, state, params, inputs=x)
        expected = -schedule(step) * _natural_direction(model, params, x, g, 1e-3)
        np.testing.assert_allclose(updates, expected, rtol=1e-9)
        params = params + updates


def test_backtracking_linesearch_with_model_nll_as_value_fn():
    model, x, y = _logistic_problem()
    params = jnp.zeros(3)
    tx = optax.chain(
        ng.scale_by_natural_gradient(model, damping=1e-3),
        optax.scale(-1.0),
        optax.scale_by_backtracking_linesearch(max_backtracking_steps=15),
    )
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        value, g = jax.value_and_grad(model.nll)(params, x, y)
        updates, state = tx.update(
            g, state, params, value=value, grad=g, value_fn=model.nll, inputs=x, targets=y
        )
        return optax.apply_updates(params, updates), state

    values = [float(model.nll(params, x, y))]
    for _ in range(6):
        params, state = step(params, state)
        values.append(float(model.nll(params, x, y)))
    # Non-increasing, up to round-off once the minimum is reached.
    assert all(b <= a + 1e-14 for a, b in itertools.pairwise(values))
    assert np.linalg.norm(jax.grad(model.nll)(params, x, y)) < 1e-8


def test_inject_hyperparams_gives_the_unwrapped_result():
    model, x, y = _logistic_problem()
    params = jnp.array([0.1, -0.2, 0.3])
    injected = optax.inject_hyperparams(ng.natural_gradient, static_args=("model",))(
        model=model, learning_rate=0.1, damping=1e-2
    )
    _, got, state = _one_update(injected, params, x, y)
    _, expected, _ = _one_update(ng.natural_gradient(model, 0.1, damping=1e-2), params, x, y)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert float(state.hyperparams["damping"]) == pytest.approx(1e-2)
    # A traced damping works too: change it in the state and the update follows.
    state.hyperparams["damping"] = jnp.asarray(0.5)
    g = _gradient(model, params, x, y)
    got, _ = jax.jit(injected.update)(g, state, params, inputs=x, targets=y)
    np.testing.assert_allclose(got, -0.1 * _natural_direction(model, params, x, g, 0.5), rtol=1e-9)


def test_inject_hyperparams_with_the_defaults_in_float32():
    """Without ``jax_enable_x64`` every numeric default becomes an int32 or float32
    array: the 4 GiB memory budget among them (2³² overflows an int32)."""
    jax.config.update("jax_enable_x64", False)  # the autouse fixture restores it
    model, x, y = _logistic_problem()
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    params = jnp.array([0.1, -0.2, 0.3], jnp.float32)
    injected = optax.inject_hyperparams(ng.natural_gradient, static_args=("model",))(
        model=model, learning_rate=0.1
    )
    state = injected.init(params)
    assert float(state.hyperparams["max_curvature_bytes"]) == 4 * 2**30
    g = jax.grad(model.nll)(params, x, y)
    got, _ = jax.jit(injected.update)(g, state, params, inputs=x, targets=y)
    plain = ng.natural_gradient(model, 0.1)
    expected, _ = plain.update(g, plain.init(params), params, inputs=x, targets=y)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_inject_hyperparams_num_samples_must_be_static():
    model, x, y = _logistic_problem()
    factory = optax.inject_hyperparams(ng.natural_gradient, static_args=("model", "num_samples"))
    optimizer = factory(model=model, learning_rate=0.1, fisher="monte_carlo", num_samples=3)
    _, updates, _ = _one_update(optimizer, jnp.zeros(3), x, y)
    assert jnp.all(jnp.isfinite(updates))
    unwrapped = optax.inject_hyperparams(ng.natural_gradient, static_args=("model",))
    with pytest.raises(ValueError, match="static_args"):
        _one_update(
            unwrapped(model=model, learning_rate=0.1, fisher="monte_carlo", num_samples=3),
            jnp.zeros(3),
            x,
            y,
        )


def test_multi_steps_accumulates_then_preconditions_the_mean_gradient():
    model, x, y = _logistic_problem()
    params = jnp.array([0.1, -0.2, 0.3])
    optimizer = optax.MultiSteps(ng.natural_gradient(model, 1.0, damping=1e-2), every_k_schedule=2)
    state = optimizer.init(params)
    halves = [(x[:20], y[:20]), (x[20:], y[20:])]
    grads = [_gradient(model, params, xb, yb) for xb, yb in halves]
    update = jax.jit(optimizer.update)
    first, state = update(grads[0], state, params, inputs=halves[0][0], targets=halves[0][1])
    np.testing.assert_array_equal(first, jnp.zeros(3))
    second, state = update(grads[1], state, params, inputs=halves[1][0], targets=halves[1][1])
    mean_grad = (grads[0] + grads[1]) / 2
    # MultiSteps accumulates the gradients in float32, hence the tolerance.
    np.testing.assert_allclose(
        second, -_natural_direction(model, params, halves[1][0], mean_grad, 1e-2), rtol=1e-6
    )


def test_apply_if_finite_skips_non_finite_gradients():
    model, x, y = _logistic_problem()
    params = jnp.array([0.1, -0.2, 0.3])
    optimizer = optax.apply_if_finite(
        ng.natural_gradient(model, 1.0, damping=1e-2), max_consecutive_errors=3
    )
    state = optimizer.init(params)
    bad = jnp.array([jnp.nan, 0.0, 1.0])
    updates, state = optimizer.update(bad, state, params, inputs=x)
    np.testing.assert_array_equal(updates, jnp.zeros(3))
    assert int(state.notfinite_count) == 1
    g = _gradient(model, params, x, y)
    updates, state = optimizer.update(g, state, params, inputs=x)
    np.testing.assert_allclose(updates, -_natural_direction(model, params, x, g, 1e-2), rtol=1e-9)
    assert int(state.inner_state[0].count) == 1  # the skipped step left the inner state alone


def test_masked_transforms_compose_and_masking_ngd_itself_is_refused():
    model, params, x, y = mlp_problem("categorical")
    mask = [{"w": True, "b": False}, {"w": True, "b": False}]
    tx = optax.chain(
        ng.scale_by_natural_gradient(model, damping=1e-2),
        optax.masked(optax.add_decayed_weights(0.1), mask),
    )
    g = _gradient(model, params, x, y)
    updates, _ = jax.jit(tx.update)(g, tx.init(params), params, inputs=x)
    direction = ng.scale_by_natural_gradient(model, damping=1e-2).update(
        g, tx.init(params)[0], params, inputs=x
    )[0]
    for layer, d, p in zip(updates, direction, params, strict=True):
        np.testing.assert_allclose(layer["w"], d["w"] + 0.1 * p["w"], rtol=1e-10)
        np.testing.assert_allclose(layer["b"], d["b"], rtol=1e-10)
    masked_ngd = optax.masked(ng.scale_by_natural_gradient(model), mask)
    with pytest.raises(ValueError, match=r"optax\.masked"):
        masked_ngd.update(g, masked_ngd.init(params), params, inputs=x)


# --- optax's generic checks --------------------------------------------------------------


def test_converges_on_a_parabola():
    target = jnp.array([[1.0, -2.0, 3.0]])
    model = ng.Model(lambda p, x: jnp.broadcast_to(p, (x.shape[0], 3)), ng.Gaussian(scale=1.0))
    x, y = jnp.zeros((1, 1)), target
    (params,) = _run(ng.natural_gradient(model, 1.0, damping=0.0), model, jnp.zeros(3), x, y, 1)
    np.testing.assert_allclose(params, target[0], rtol=1e-12)


def test_converges_on_rosenbrock_as_gauss_newton():
    # ½‖r‖² with r = (1 − a, 10 (b − a²)) is Rosenbrock's function over two; Fisher = JᵀJ.
    def residuals(p, x):
        return jnp.broadcast_to(jnp.stack([1 - p[0], 10 * (p[1] - p[0] ** 2)]), (x.shape[0], 2))

    model = ng.Model(residuals, ng.Gaussian(scale=1.0))
    x, y = jnp.zeros((1, 1)), jnp.zeros((1, 2))
    path = _run(
        ng.natural_gradient(model, 1.0, damping=1e-8), model, jnp.array([-1.2, 1.0]), x, y, 10
    )
    np.testing.assert_allclose(path[-1], [1.0, 1.0], rtol=1e-8)
    adam = _run(optax.adam(0.1), model, jnp.array([-1.2, 1.0]), x, y, 10)
    assert np.linalg.norm(adam[-1] - 1.0) > 0.5  # Adam is nowhere near after 10 steps


def test_no_recompilation_on_second_update():
    model, params, x, y = mlp_problem("categorical")
    traces = []

    def counting_apply(p, inputs):
        traces.append(1)
        return model.apply_fn(p, inputs)

    counted = ng.Model(counting_apply, model.likelihood)
    tx = ng.natural_gradient(counted, 0.1, fisher="monte_carlo", damping=1e-3)
    update = jax.jit(tx.update)
    state = tx.init(params)
    g = _gradient(model, params, x, y)
    _, state = update(g, state, params, inputs=x)
    after_first = len(traces)
    _, state = update(g, state, params, inputs=x)
    assert after_first > 0 and len(traces) == after_first


@pytest.mark.parametrize("kind", ["exact", "monte_carlo", "empirical"])
def test_state_types_identical_under_lax_cond(kind):
    model, params, x, y = mlp_problem("categorical")
    tx = ng.natural_gradient(
        model, 0.1, fisher=kind, solver="dense", decay=0.5, refresh_every=2, max_kl=1e-2
    )
    state = tx.init(params)
    g = _gradient(model, params, x, y)

    @jax.jit
    def maybe_update(state, flag):
        return jax.lax.cond(
            flag, lambda s: tx.update(g, s, params, inputs=x, targets=y)[1], lambda s: s, state
        )

    new_state = maybe_update(state, True)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state) == jax.tree.map(
        lambda a: (a.shape, a.dtype), state
    )
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(new_state))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_update_dtype_matches_gradient_dtype(dtype):
    model, params, x, y = mlp_problem("categorical")
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    x = x.astype(dtype)
    tx = ng.natural_gradient(model, 0.1, damping=1e-2, solver="dense")
    state = tx.init(params)
    g = jax.grad(model.nll)(params, x, y)
    updates, state = jax.jit(tx.update)(g, state, params, inputs=x)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.dtype == dtype and u.shape == p.shape
        assert jnp.all(jnp.isfinite(u))
    assert state[0].curvature.fisher.dtype == jnp.float32  # solved in at least float32


def test_accepts_unknown_extra_args_and_params_by_keyword():
    model, params, x, y = mlp_problem("categorical")
    tx = ng.natural_gradient(model, 0.1, damping=1e-3)
    state = tx.init(params)
    g = _gradient(model, params, x, y)
    positional, _ = tx.update(g, state, params, inputs=x, unexpected_arg=123)
    keyword, _ = tx.update(g, state, params=params, inputs=x, targets=y)
    np.testing.assert_allclose(ravel_pytree(positional)[0], ravel_pytree(keyword)[0], rtol=1e-12)


# --- errors ------------------------------------------------------------------------


def test_update_errors_name_what_to_pass():
    model, params, x, y = mlp_problem("categorical")
    g = _gradient(model, params, x, y)
    tx = ng.scale_by_natural_gradient(model)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(g, state, inputs=x)
    with pytest.raises(ValueError, match="inputs="):
        tx.update(g, state, params)
    empirical = ng.scale_by_natural_gradient(model, fisher="empirical")
    with pytest.raises(ValueError, match="targets="):
        empirical.update(g, empirical.init(params), params, inputs=x)
    with pytest.raises(ValueError, match="same pytree structure"):
        tx.update(g[:1], state, params, inputs=x)
    with pytest.raises(ValueError, match="one target per example"):
        tx.update(g, state, params, inputs=x, targets=y[:-1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"damping": -1.0}, "damping"),
        ({"max_kl": 0.0}, "max_kl"),
        ({"max_kl": -1.0}, "max_kl"),
        ({"decay": 1.0}, "decay"),
        ({"refresh_every": 0}, "refresh_every"),
        ({"refresh_every": 1.5}, "refresh_every"),
        ({"fisher": "true"}, "fisher"),
        ({"solver": "magic"}, "solver"),
        ({"fisher": "monte_carlo", "num_samples": 0}, "num_samples"),
        ({"num_samples": 2}, "monte_carlo"),
    ],
)
def test_factory_validates_hyperparameters(kwargs, match):
    model, _, _, _ = mlp_problem("categorical")
    with pytest.raises(ValueError, match=match):
        ng.natural_gradient(model, 0.1, **kwargs)


def test_natural_gradient_takes_the_transforms_keywords_and_shows_them():
    import inspect

    transform = inspect.signature(ng.scale_by_natural_gradient).parameters
    optimizer = inspect.signature(ng.natural_gradient).parameters
    assert list(optimizer) == ["model", "learning_rate", *list(transform)[1:]]
    assert optimizer["damping"].default == ng.LevenbergMarquardt()
    assert optimizer["rescale"].default is None and transform["rescale"].default is False
    assert optimizer["solver"].default == transform["solver"].default == "auto"
    model, _, _, _ = mlp_problem("categorical")
    with pytest.raises(TypeError, match="refresh_evry"):
        ng.natural_gradient(model, 0.1, refresh_evry=2)


def test_factory_rejects_a_non_model():
    with pytest.raises(TypeError, match=r"ng\.Model"):
        ng.scale_by_natural_gradient(lambda p, x: x)


@pytest.mark.parametrize("solver", ["kronecker", "dense"])
def test_rescale_scales_the_direction_to_the_minimiser_of_the_exact_quadratic_model(solver):
    model, params, x, y = mlp_problem("categorical", num_examples=8)
    damping = 1e-2
    g = jax.grad(model.nll)(params, x, y)

    def direction(rescale):
        tx = ng.scale_by_natural_gradient(model, solver=solver, damping=damping, rescale=rescale)
        return ravel_pytree(tx.update(g, tx.init(params), params, inputs=x, targets=y)[0])[0]

    plain, rescaled = direction(False), direction(True)
    # α minimises m(−αd) = −α gᵀd + ½ α² dᵀ(F + λI)d with the dense exact Fisher.
    damped = ng.fisher(model, params, x) + damping * jnp.eye(plain.size)
    flat_g = ravel_pytree(g)[0]
    alpha = (flat_g @ plain) / (plain @ damped @ plain)
    np.testing.assert_allclose(rescaled, alpha * plain, rtol=1e-10, atol=1e-14)
    if solver == "dense":  # an exact solve is already the minimiser
        np.testing.assert_allclose(alpha, 1.0, rtol=1e-10)
    else:
        assert abs(alpha - 1.0) > 1e-3
    default = ng.natural_gradient(model, 1.0, solver=solver, damping=damping)
    updates, _ = default.update(g, default.init(params), params, inputs=x, targets=y)
    expected = rescaled if solver != "dense" else plain  # on for approximate solvers only
    np.testing.assert_allclose(-ravel_pytree(updates)[0], expected, rtol=1e-10, atol=1e-14)


# --- a solver written outside the library ------------------------------------------------


class _ScaledIdentity(ng.Solver):
    """F ≈ c·I with c = tr(F)/P of the batch's Fisher, through the base class alone."""

    name = "scaled_identity"
    approximate = True

    def init(self, params, dtype):
        return ()

    def memory(self, num_params, num_rows, leaf_shapes=(), rows=None):
        return num_rows * num_params

    def solve(self, state, batch, vector, damping):
        rows = batch.score_rows()
        scale = batch.device_sum(jnp.sum(rows**2)) / (batch.num_examples * vector.size)
        return vector / (scale + damping), state


def test_a_solver_written_against_the_base_class_plugs_into_the_transform():
    """A scaled identity written here: the transform solves with it, and, as it declares
    itself approximate, ``natural_gradient`` scales its direction d to the minimiser of
    the batch's exact quadratic model, α = gᵀd / dᵀ(F + λI)d (F the dense Fisher)."""
    model, params, x, y = mlp_problem("categorical")
    g = _gradient(model, params, x, y)
    flat_g = ravel_pytree(g)[0]
    fisher = ng.fisher(model, params, x)
    damping = 1e-2
    d = flat_g / (np.trace(fisher) / len(fisher) + damping)

    plain = ng.scale_by_natural_gradient(model, solver=_ScaledIdentity(), damping=damping)
    updates, _ = plain.update(g, plain.init(params), params, inputs=x)
    np.testing.assert_allclose(ravel_pytree(updates)[0], d, rtol=1e-10)

    rescaled = ng.natural_gradient(model, 1.0, solver=_ScaledIdentity(), damping=damping)
    updates, _ = jax.jit(rescaled.update)(g, rescaled.init(params), params, inputs=x, targets=y)
    alpha = (flat_g @ d) / (d @ (fisher + damping * np.eye(len(fisher))) @ d)
    assert abs(alpha - 1) > 0.5  # the rescale is visible
    np.testing.assert_allclose(ravel_pytree(updates)[0], -alpha * d, rtol=1e-8)


def test_a_solver_outside_the_base_class_or_without_its_methods_is_refused():
    class DuckTyped:
        name = "duck"

        def init(self, params, dtype): ...
        def refresh(self, state, batch, damping, decay, is_first): ...
        def solve(self, state, batch, vector, damping): ...
        def memory(self, num_params, num_rows, leaf_shapes=(), rows=None): ...

    class Incomplete(ng.Solver):
        name = "incomplete"

        def init(self, params, dtype):
            return ()

    model = ng.Model(lambda w, x: x @ w, ng.Bernoulli())
    with pytest.raises(TypeError, match=r"ng\.Solver"):
        ng.scale_by_natural_gradient(model, solver=DuckTyped())
    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
    with pytest.raises(ValueError, match="keeps no curvature"):
        ng.scale_by_natural_gradient(model, solver=_ScaledIdentity(), decay=0.9).init(jnp.zeros(2))


def test_a_solver_returning_a_misshapen_direction_is_named():
    class Halves(_ScaledIdentity):
        def solve(self, state, batch, vector, damping):
            return vector[: vector.size // 2], state

    model, params, x, _ = mlp_problem("categorical")
    optimizer = ng.scale_by_natural_gradient(model, solver=Halves())
    with pytest.raises(AssertionError, match="solve must return a direction shaped like"):
        optimizer.update(params, optimizer.init(params), params, inputs=x)


class UpdateWithAndWithoutJit(chex.TestCase):
    """The update solves its damped system whether the caller jits it or not (eager
    calls compile themselves: see ``natgrad_jax._eager``)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_dense_and_block_diagonal_updates_solve_their_damped_systems(self):
        model, params, x, y = mlp_problem("categorical")
        g = _gradient(model, params, x, y)
        flat_g, unravel = ravel_pytree(g)
        fisher = np.asarray(ng.fisher(model, params, x))
        in_a_block = np.zeros_like(fisher, dtype=bool)
        for block in leaf_slices(params):
            in_a_block[block, block] = True
        for solver, matrix in (("dense", fisher), ("block_diagonal", fisher * in_a_block)):
            optimizer = ng.scale_by_natural_gradient(model, damping=0.05, solver=solver)
            update = self.variant(
                lambda g, s, p, optimizer=optimizer: optimizer.update(g, s, p, inputs=x)
            )
            updates, state = update(g, optimizer.init(params), params)
            chex.assert_trees_all_equal_structs(updates, params)
            chex.assert_tree_all_finite(state)
            expected = unravel(np.linalg.solve(matrix + 0.05 * np.eye(len(matrix)), flat_g))
            chex.assert_trees_all_close(updates, expected, rtol=1e-8, atol=1e-12)
