"""Levenberg–Marquardt damping: the rule, the reduction ratio, and training from bad λ."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import natgrad_jax as ng
from natgrad_jax._damping import reduction_ratio
from tests.helpers import as_leaves, init_mlp, mlp


def test_rule_decreases_after_good_and_increases_after_poor_steps():
    rule = ng.LevenbergMarquardt(initial=1.0, min_damping=1e-3, max_damping=10.0)
    assert float(rule.adapt(1.0, 0.9)) == pytest.approx(2 / 3)
    assert float(rule.adapt(1.0, 0.1)) == pytest.approx(1.5)
    assert float(rule.adapt(1.0, 0.5)) == 1.0
    assert float(rule.adapt(0.1, -0.5)) == pytest.approx(1.0)  # a rejected step: ×10
    assert float(rule.adapt(0.1, -jnp.inf)) == pytest.approx(1.0)
    assert float(rule.adapt(0.1, jnp.nan)) == pytest.approx(1.0)  # NaN counts as rejected
    assert bool(rule.accepts(0.1)) and not bool(rule.accepts(-0.1))
    assert float(rule.adapt(1e-3, 0.99)) == 1e-3  # bounded below
    assert float(rule.adapt(10.0, -1.0)) == 10.0  # and above


def test_reduction_ratio():
    assert float(reduction_ratio(jnp.array(-1.0), jnp.array(-2.0))) == 0.5
    assert float(reduction_ratio(jnp.array(-1.0), jnp.array(1.0))) == -np.inf
    assert float(reduction_ratio(jnp.array(jnp.nan), jnp.array(-1.0))) == -np.inf


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decrease": 1.0},
        {"increase": 0.5},
        {"initial": -1.0},
        {"low": 0.8, "high": 0.5},
        {"max_damping": np.inf},
    ],
)
def test_rule_validates_its_parameters(kwargs):
    with pytest.raises(ValueError, match="LevenbergMarquardt"):
        ng.LevenbergMarquardt(**kwargs)


def _steps(model, params, x, y, damping, steps, solver="dense", learning_rate=1.0):
    optimizer = ng.natural_gradient(model, learning_rate, damping=damping, solver=solver)
    return _train(model, params, x, y, optimizer, steps)


def _train(model, params, x, y, optimizer, steps):
    """(λ after each step, full-batch loss before and after each step)."""
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        g = jax.grad(model.nll)(params, x, y)
        updates, state = optimizer.update(g, state, params, inputs=x, targets=y)
        return optax.apply_updates(params, updates), state

    dampings, losses = [], [float(model.nll(params, x, y))]
    for _ in range(steps):
        params, state = step(params, state)
        dampings.append(float(state[0].damping))
        losses.append(float(model.nll(params, x, y)))
    return dampings, losses


def test_damping_decreases_on_an_exact_quadratic():
    # Linear regression: the loss is exactly the quadratic model, so ρ = 1 every step.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(40, 1))
    model = ng.Model(lambda w, x: x @ w, ng.Gaussian(scale=1.0))
    dampings, _ = _steps(model, jnp.zeros((3, 1)), x, y, ng.LevenbergMarquardt(initial=1.0), 3)
    np.testing.assert_allclose(dampings, [(2 / 3) ** k for k in (1, 2, 3)], rtol=1e-12)


def test_damping_increases_when_the_quadratic_model_overshoots():
    # Rosenbrock residuals far from the valley with almost no damping: the Gauss–Newton
    # step predicts a decrease, the loss goes up; the step is rejected and λ grows ×10.
    def residuals(p, x):
        return jnp.broadcast_to(jnp.stack([1 - p[0], 10 * (p[1] - p[0] ** 2)]), (x.shape[0], 2))

    model = ng.Model(residuals, ng.Gaussian(scale=1.0))
    x, y = jnp.zeros((1, 1)), jnp.zeros((1, 2))
    rule = ng.LevenbergMarquardt(initial=1e-6, min_damping=1e-8)
    optimizer = ng.natural_gradient(model, 1.0, damping=rule, solver="dense")
    params, state = jnp.array([-1.2, 1.0]), optimizer.init(jnp.array([-1.2, 1.0]))
    grads = jax.grad(model.nll)(params, x, y)
    updates, state = optimizer.update(grads, state, params, inputs=x, targets=y)
    np.testing.assert_array_equal(updates, jnp.zeros(2))
    report = ng.diagnostics(state)
    assert float(report.damping) == pytest.approx(1e-5)
    assert (int(report.rejected_no_decrease), int(report.rejected_non_finite)) == (1, 0)
    assert int(report.steps) == 1


def _nan_at(step: int, grads):
    return jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads) if step else grads


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"solver": "kronecker", "refresh_every": 3},
        {"solver": "ekfac", "refresh_every": 3, "momentum": True},
        {"solver": "cg", "fisher": "monte_carlo"},
        {"solver": "diagonal", "refresh_every": 2, "rescale": False},
        {"kronecker_min_params": 50, "refresh_every": 3},
    ],
    ids=["defaults", "kronecker", "ekfac", "cg", "diagonal-unmodelled", "auto-kfac"],
)
@pytest.mark.parametrize("where", ["gradient", "inputs"])
def test_a_non_finite_step_is_skipped_counted_and_leaves_the_trajectory_unchanged(
    options, where, monkeypatch
):
    """The defaults (Levenberg–Marquardt) given a NaN at step 2 (in the gradient, or in
    the batch's inputs and so in the gradient and the Fisher): the parameters do not
    move, ``diagnostics`` counts one non-finite rejection and no other, and the next
    steps are those of a run that never saw the bad batch (cadences, λ, curvature and
    momentum all as they were; "auto" on a network where it picks K-FAC, whose factors
    it refreshes in its own cadence, too)."""
    from natgrad_jax._solvers import auto

    options = dict(options)
    monkeypatch.setattr(auto, "KRONECKER_MIN_PARAMS", options.pop("kronecker_min_params", 10**9))
    model = ng.Model(mlp, ng.Categorical())
    params = init_mlp(jax.random.PRNGKey(0), [4, 8, 3])
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 4))
    y = jnp.argmax(x[:, :3] + 0.5 * x[:, 3:], axis=1)
    optimizer = ng.natural_gradient(model, 1.0, **options)

    @jax.jit
    def step(params, state, bad):
        inputs = jnp.where(bad & (where == "inputs"), jnp.nan, x)
        grads = jax.grad(model.nll)(params, inputs, y)
        if where == "gradient":
            grads = jax.tree.map(lambda g: jnp.where(bad, jnp.nan, g), grads)
        updates, state = optimizer.update(grads, state, params, inputs=inputs, targets=y)
        return optax.apply_updates(params, updates), state

    def train(bad_steps):
        trajectory, state, current = [], optimizer.init(params), params
        for bad in bad_steps:
            current, state = step(current, state, bad)
            trajectory.append(current)
        return trajectory, state

    with_nan, state = train([False, False, True, False, False, False, False])
    without, clean_state = train([False, False, False, False, False, False])
    for a, b in zip(with_nan[1], with_nan[2], strict=True):
        np.testing.assert_array_equal(a["w"], b["w"])
    for a, b in zip(with_nan[3:], without[2:], strict=True):
        np.testing.assert_allclose(
            jax.flatten_util.ravel_pytree(a)[0], jax.flatten_util.ravel_pytree(b)[0], rtol=1e-12
        )
    report, clean = ng.diagnostics(state), ng.diagnostics(clean_state)
    assert int(report.rejected_non_finite) == 1 and int(clean.rejected_non_finite) == 0
    assert int(report.rejected_no_decrease) == int(clean.rejected_no_decrease)
    assert int(report.steps) == int(clean.steps) == 6
    assert float(report.damping) == float(clean.damping)
    assert model.nll(with_nan[-1], x, y) < model.nll(params, x, y)


def test_a_non_finite_gradient_with_fixed_damping_is_passed_on_and_counted():
    """With a fixed damping the transform behaves as optax's own (NaN in, NaN out; skip
    with ``optax.apply_if_finite``), and ``diagnostics`` still counts the update."""
    model = ng.Model(lambda w, x: x @ w, ng.Bernoulli())
    optimizer = ng.natural_gradient(model, 1.0, damping=1e-2)
    w, x = jnp.zeros(2), jnp.ones((3, 2))
    updates, state = optimizer.update(jnp.array([jnp.nan, 1.0]), optimizer.init(w), w, inputs=x)
    assert bool(jnp.all(jnp.isnan(updates)))
    report = ng.diagnostics(state)
    assert (int(report.rejected_non_finite), int(report.rejected_no_decrease)) == (1, 0)
    np.testing.assert_allclose(report.damping, 1e-2)


@pytest.mark.parametrize("solver", ["dense", "kronecker", "ekfac", "diagonal", "block_diagonal"])
def test_statistics_that_are_not_finite_leave_the_averaged_curvature_as_it_was(solver):
    """A refresh on inputs holding a NaN (the gradient finite, the damping fixed, so
    nothing skips the step) averages nothing in: the averaged statistics and what is
    factorised from them equal those before it, array for array, instead of a NaN that
    every later average would keep (EKFAC's scales, which each refresh measures afresh
    in its new basis, excepted); the next finite batch is averaged in as usual."""
    model = ng.Model(mlp, ng.Categorical())
    params = init_mlp(jax.random.PRNGKey(0), [4, 8, 3])
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 4))
    y = jnp.argmax(x[:, :3] + 0.5 * x[:, 3:], axis=1)
    g = jax.grad(model.nll)(params, x, y)
    tx = ng.scale_by_natural_gradient(model, solver=solver, damping=0.1, decay=0.5)
    state = tx.update(g, tx.init(params), params, inputs=x, targets=y)[1]
    poisoned = x.at[0, 0].set(jnp.nan)
    after = tx.update(g, state, params, inputs=poisoned, targets=y)[1]

    def averaged(curvature):  # EKFAC's scales are measured afresh in each new basis
        if solver == "ekfac":
            return [leaf._replace(scaling=None) for leaf in curvature.leaves]
        return curvature

    for before, kept in zip(
        jax.tree.leaves(averaged(state.curvature)),
        jax.tree.leaves(averaged(after.curvature)),
        strict=True,
    ):
        np.testing.assert_array_equal(kept, before)
    again = tx.update(g, after, params, inputs=2 * x, targets=y)[1]
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(again.curvature))
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), again.curvature, after.curvature)
    assert any(jax.tree.leaves(moved))


def test_diagnostics_needs_exactly_one_natural_gradient_state():
    model = ng.Model(lambda w, x: x @ w, ng.Bernoulli())
    one = ng.natural_gradient(model, 1.0, damping=1e-2)
    two = optax.chain(one, ng.natural_gradient(model, 1.0, damping=1e-2))
    assert int(ng.diagnostics(one.init(jnp.zeros(2))).steps) == 0
    for state in (optax.adam(1e-3).init(jnp.zeros(2)), two.init(jnp.zeros(2))):
        with pytest.raises(ValueError, match="one natural-gradient"):
            ng.diagnostics(state)


@pytest.mark.parametrize("initial", [1e-8, 1e3])
@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_training_an_mlp_from_a_poor_initial_damping_does_not_diverge(initial, solver):
    key_params, key_x = jax.random.split(jax.random.PRNGKey(0))
    params = init_mlp(key_params, [4, 8, 3])
    x = jax.random.normal(key_x, (64, 4))
    y = jnp.argmax(x[:, :3] + 0.5 * x[:, 3:], axis=1)
    model = ng.Model(mlp, ng.Categorical())
    rule = ng.LevenbergMarquardt(initial=initial, min_damping=1e-8, max_damping=1e4)
    dampings, losses = _steps(model, params, x, y, rule, 30, solver=solver)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]
    # Steps that would raise the loss are rejected: it never goes up.
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(losses))
    if initial == 1e3:
        assert dampings[-1] < 1e2  # it learned to trust the model more
    else:
        assert dampings[-1] >= 1e-8


def test_adaptive_damping_needs_targets():
    model = ng.Model(lambda w, x: x @ w, ng.Bernoulli())
    tx = ng.scale_by_natural_gradient(model, damping=ng.LevenbergMarquardt())
    w, x = jnp.zeros(2), jnp.ones((3, 2))
    with pytest.raises(ValueError, match="targets"):
        tx.update(jnp.ones(2), tx.init(w), w, inputs=x)


def _relu_classifier():
    """A 16-64-10 ReLU MLP (He initialisation) and a 10-class teacher problem."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = [
        {"w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), "b": jnp.zeros(n)}
        for k, m, n in zip(keys[:2], (16, 64), (64, 10), strict=True)
    ]
    x = jax.random.normal(keys[2], (256, 16))
    y = jnp.argmax(x @ jax.random.normal(keys[3], (16, 10)), axis=1)

    def relu_mlp(params, x):
        hidden = jax.nn.relu(x @ params[0]["w"] + params[0]["b"])
        return hidden @ params[1]["w"] + params[1]["b"]

    return ng.Model(relu_mlp, ng.Categorical()), params, x, y


def test_natural_gradient_defaults_are_safe_at_learning_rate_one():
    """A fixed small λ with η = 1 overshoots on a ReLU network (the loss explodes); the
    default adaptive damping decreases the loss at every step from the same start."""
    model, params, x, y = _relu_classifier()
    _, fixed = _steps(model, params, x, y, 1e-3, 10, solver="cg")
    assert max(fixed) > 3 * fixed[0]  # the failure the default exists for

    dampings, losses = _train(model, params, x, y, ng.natural_gradient(model, 1.0), 10)
    assert len(set(dampings)) > 1  # adapted
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(losses))
    assert losses[-1] < 0.5 * losses[0]


def test_default_damping_asks_for_targets_or_a_fixed_value():
    model = ng.Model(lambda w, x: x @ w, ng.Bernoulli())
    tx = ng.natural_gradient(model, 1.0)
    w, x = jnp.zeros(2), jnp.ones((3, 2))
    with pytest.raises(ValueError, match=r"targets=.*or pass a fixed damping"):
        tx.update(jnp.ones(2), tx.init(w), w, inputs=x)


def _rosenbrock():
    """Rosenbrock residuals far from the valley: the first full step overshoots."""

    def residuals(p, x):
        return jnp.broadcast_to(jnp.stack([1 - p[0], 10 * (p[1] - p[0] ** 2)]), (x.shape[0], 2))

    model = ng.Model(residuals, ng.Gaussian(scale=1.0))
    return model, jnp.array([-1.2, 1.0]), jnp.zeros((1, 1)), jnp.zeros((1, 2))


def test_a_rejected_step_refactorises_with_the_larger_damping_before_the_next_refresh():
    """With refresh_every=5 the dense inverse is due again at step 5 only; after the
    rejected first step (λ 0.1 → 1) the second update must already use the new λ: the
    same update as refactorising at every step (the parameters did not move)."""
    model, params, x, y = _rosenbrock()
    rule = ng.LevenbergMarquardt(initial=0.1)

    def second_update(refresh_every):
        tx = ng.scale_by_natural_gradient(
            model, damping=rule, solver="dense", refresh_every=refresh_every
        )
        state = tx.init(params)
        g = jax.grad(model.nll)(params, x, y)
        first, state = tx.update(g, state, params, inputs=x, targets=y)
        assert not np.any(first) and float(state.damping) == pytest.approx(1.0)
        return tx.update(g, state, params, inputs=x, targets=y)

    every_step, _ = second_update(1)
    amortised, state = second_update(5)
    assert np.all(amortised != 0)  # taken with λ = 1
    np.testing.assert_allclose(amortised, every_step, rtol=1e-10)
    assert float(state.factorised_damping) == pytest.approx(1.0)


def test_with_rescale_a_moved_damping_waits_for_the_next_refresh():
    """With rescale the factorisation keeps λ of its refresh (0.1) while two rejected
    steps raise λ to 10; the third update is α d, d = (F + 0.1 I)⁻¹ g, with α from the
    quadratic model at λ = 10: α = gᵀd / dᵀ(F + 10 I)d."""
    model, params, x, y = _rosenbrock()
    tx = ng.scale_by_natural_gradient(
        model,
        damping=ng.LevenbergMarquardt(initial=0.1),
        solver="dense",
        refresh_every=5,
        rescale=True,
    )
    state = tx.init(params)
    g = jax.grad(model.nll)(params, x, y)
    for _ in range(2):
        rejected, state = tx.update(g, state, params, inputs=x, targets=y)
        assert not np.any(rejected)
    assert float(state.damping) == pytest.approx(10.0)
    third, state = tx.update(g, state, params, inputs=x, targets=y)

    fisher = ng.fisher(model, params, x)
    d = jnp.linalg.solve(fisher + 0.1 * jnp.eye(2), g)
    alpha = (g @ d) / (d @ (fisher + 10.0 * jnp.eye(2)) @ d)
    assert np.all(third != 0)
    np.testing.assert_allclose(third, alpha * d, rtol=1e-10)
    assert float(state.factorised_damping) == pytest.approx(0.1)


def test_the_reduction_ratio_is_the_same_from_a_reused_fisher_product():
    """With rescale, the adaptive damping reuses the quadratic model's dᵀFd (forward-mode
    products); its prediction must equal the one from a fresh Fisher-vector product."""
    from jax.flatten_util import ravel_pytree

    from natgrad_jax import _vectors as vectors
    from natgrad_jax._solvers.batch import CurvatureBatch
    from natgrad_jax._transform import _levenberg_marquardt, _quadratic_model

    params = init_mlp(jax.random.PRNGKey(0), [3, 6, 2])
    model = ng.Model(mlp, ng.Gaussian(scale=0.5))
    x = jax.random.normal(jax.random.PRNGKey(1), (9, 3))
    y = jax.random.normal(jax.random.PRNGKey(2), (9, 2))
    batch = CurvatureBatch(model, params, x, "exact", targets=y)
    flat_g = ravel_pytree(jax.grad(model.nll)(params, x, y))[0]
    g = as_leaves(params, flat_g)
    rule = ng.LevenbergMarquardt(initial=0.3)
    for flat in (flat_g, jnp.cos(jnp.arange(flat_g.size, dtype=flat_g.dtype))):
        candidate = as_leaves(params, flat)
        coefficients, fisher_quadratic, _ = _quadratic_model(batch, g, [candidate], 0.3)
        direction = vectors.combination(coefficients, [candidate])
        reused = _levenberg_marquardt(rule, batch, g, direction, 0.3, fisher_quadratic)
        fresh = _levenberg_marquardt(rule, batch, g, direction, 0.3)
        np.testing.assert_allclose(reused[0], fresh[0], rtol=1e-12)
        assert bool(reused[1]) == bool(fresh[1])


def test_the_reduction_ratio_without_the_quadratic_model_is_its_definition():
    """Without the quadratic model the rule measures dᵀFd itself: ρ equals
    (L(θ − d) − L(θ)) / (−gᵀd + ½ dᵀFd) with F the dense ``ng.fisher`` (exact and
    Monte-Carlo and empirical), to 1e-9: a rule whose threshold sits 1e-9 below ρ decreases λ, one
    1e-9 above does not."""
    from jax.flatten_util import ravel_pytree

    from natgrad_jax._solvers.batch import CurvatureBatch
    from natgrad_jax._transform import _levenberg_marquardt

    params = init_mlp(jax.random.PRNGKey(0), [3, 6, 2])
    model = ng.Model(mlp, ng.Gaussian(scale=0.5))
    x = jax.random.normal(jax.random.PRNGKey(1), (9, 3))
    y = jax.random.normal(jax.random.PRNGKey(2), (9, 2))
    flat_g, unravel = ravel_pytree(jax.grad(model.nll)(params, x, y))
    g = as_leaves(params, flat_g)
    key = jax.random.PRNGKey(3)
    dense = {
        "exact": ng.fisher(model, params, x),
        "monte_carlo": ng.monte_carlo_fisher(model, params, x, key),
        "empirical": ng.empirical_fisher(model, params, x, y),
    }
    for kind, fisher in dense.items():
        batch = CurvatureBatch(model, params, x, kind, targets=y, key=key)
        wiggle = jnp.sin(jnp.arange(flat_g.size, dtype=flat_g.dtype))
        along = flat_g + 0.1 * jnp.linalg.norm(flat_g) * wiggle
        best = (flat_g @ along) / (along @ fisher @ along)  # the model's minimiser
        for scale in (0.25 * best, 0.75 * best):
            flat_d = scale * along
            actual = model.nll(unravel(ravel_pytree(params)[0] - flat_d), x, y) - model.nll(
                params, x, y
            )
            predicted = -flat_g @ flat_d + 0.5 * flat_d @ fisher @ flat_d
            ratio = actual / predicted
            assert predicted < 0 and 0 < ratio < 10, (kind, scale / best, predicted, ratio)
            d = as_leaves(params, flat_d)
            for shift, decreases in ((-1e-9, True), (1e-9, False)):
                rule = ng.LevenbergMarquardt(initial=0.3, low=-1e9, high=float(ratio) + shift)
                damping, accepted = _levenberg_marquardt(rule, batch, g, d, 0.3)
                assert bool(accepted), (kind, scale, float(ratio))
                assert (float(damping) < 0.3) == decreases, (kind, scale, shift, float(ratio))
