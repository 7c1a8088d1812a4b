"""Each step of the transform's pipeline against its definition (float64, dense Fishers).

The steps are called one by one on a small categorical MLP, with the Fisher of the batch
formed densely by ``ng.fisher`` as the reference: the cadence, the direction (solve and
quadratic model), the trust region, the damping rule and the rejection counters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._solvers.solver import solve_on_leaves
from natgrad_jax._state import RejectedSteps
from natgrad_jax._transform import (
    _adapt_damping,
    _advance_curvature,
    _count_rejections,
    _init,
    _quadratic_model,
    _shaped_step,
    _StepPlan,
    _Taken,
    _trust_region,
    _validated_options,
)
from tests.helpers import as_flat, as_leaves, mlp_problem

DEFAULTS = {
    "fisher": "exact",
    "damping": 1e-2,
    "solver": "dense",
    "max_kl": None,
    "kl_measure": "exact",
    "decay": None,
    "refresh_every": None,
    "statistics_every": None,
    "adapt_every": None,
    "num_samples": None,
    "seed": 0,
    "max_curvature_bytes": None,
    "axis_name": None,
    "mesh": None,
    "precision": None,
    "rescale": False,
    "momentum": False,
}
PLAIN = _StepPlan(rescaled=False, with_momentum=False)


def _problem(seed=0):
    model, params, x, y = mlp_problem("categorical", num_examples=8, seed=seed)
    gradient = ravel_pytree(jax.grad(model.nll)(params, x, y))[0]
    return model, params, x, y, gradient


def _options(model, **changes):
    return _validated_options(model=model, **{**DEFAULTS, **changes})


def _batch(model, params, x, y, fisher="exact"):
    return CurvatureBatch(model, params, x, fisher, targets=y, key=jax.random.PRNGKey(3))


def _damped(model, params, x, damping):
    fisher = np.asarray(ng.fisher(model, params, x))
    return fisher, fisher + damping * np.eye(len(fisher))


# --- the cadence ---------------------------------------------------------------------


def test_the_curvature_is_refreshed_every_refresh_every_steps_and_averaged_with_decay():
    model, params, x, y, _ = _problem()
    x_other = jax.random.normal(jax.random.PRNGKey(9), x.shape)
    options = _options(model, refresh_every=3, decay=0.5)
    state = _init(options, params)
    batch, other = _batch(model, params, x, y), _batch(model, params, x_other, y)
    fisher, damped = _damped(model, params, x, 1e-2)
    fisher_other = np.asarray(ng.fisher(model, params, x_other))

    first, _ = _advance_curvature(options, state, batch, 1e-2, PLAIN)  # count 0: replaced
    np.testing.assert_allclose(first.fisher, fisher, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(first.inverse, np.linalg.inv(damped), rtol=1e-8, atol=1e-10)

    state = state._replace(curvature=first, count=jnp.int32(1))
    kept, _ = _advance_curvature(options, state, other, 1e-2, PLAIN)  # count 1: not due
    np.testing.assert_array_equal(kept.fisher, first.fisher)

    state = state._replace(count=jnp.int32(3))
    due, _ = _advance_curvature(options, state, other, 1e-2, PLAIN)  # count 3: averaged
    average = 0.5 * fisher + 0.5 * fisher_other
    np.testing.assert_allclose(due.fisher, average, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(
        due.inverse, np.linalg.inv(average + 1e-2 * np.eye(len(average))), rtol=1e-8, atol=1e-10
    )


def test_statistics_every_step_and_factorisation_every_third():
    model, params, x, y, _ = _problem()
    x_other = jax.random.normal(jax.random.PRNGKey(9), x.shape)
    options = _options(model, refresh_every=3, statistics_every=1, decay=0.5)
    state = _init(options, params)
    first, _ = _advance_curvature(options, state, _batch(model, params, x, y), 1e-2, PLAIN)
    state = state._replace(curvature=first, count=jnp.int32(1))
    measured, _ = _advance_curvature(options, state, _batch(model, params, x_other, y), 1e-2, PLAIN)
    average = 0.5 * np.asarray(ng.fisher(model, params, x))
    average += 0.5 * np.asarray(ng.fisher(model, params, x_other))
    np.testing.assert_allclose(measured.fisher, average, rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(measured.inverse, first.inverse)  # not refactorised


def test_adaptive_damping_refactorises_between_refreshes_once_lambda_moved():
    """Without the quadratic model the step's length is the factorisation's: at count 1
    (no refresh due) with λ moved from 0.1 to 1 since, the inverse is redone with λ = 1
    and the state records it; with the quadratic model it is left alone."""
    model, params, x, y, _ = _problem()
    options = _options(model, damping=ng.LevenbergMarquardt(initial=0.1), refresh_every=5)
    state = _init(options, params)
    batch = _batch(model, params, x, y)
    first, factorised = _advance_curvature(options, state, batch, 0.1, PLAIN)
    assert float(factorised) == pytest.approx(0.1)
    moved = state._replace(
        curvature=first, count=jnp.int32(1), damping=jnp.asarray(1.0), factorised_damping=factorised
    )
    redone, factorised = _advance_curvature(options, moved, batch, 1.0, PLAIN)
    np.testing.assert_allclose(
        redone.inverse, np.linalg.inv(_damped(model, params, x, 1.0)[1]), rtol=1e-8, atol=1e-10
    )
    assert float(factorised) == pytest.approx(1.0)
    modelled = _StepPlan(rescaled=True, with_momentum=False)
    kept, factorised = _advance_curvature(options, moved, batch, 1.0, modelled)
    np.testing.assert_array_equal(kept.inverse, first.inverse)
    assert float(factorised) == pytest.approx(0.1)


# --- the direction -------------------------------------------------------------------


def _shaped(options, state, curvature, batch, gradient, plan, previous=None):
    """The solve's direction and the step ``_shaped_step`` makes of it (fixed λ 1e-2)."""
    direction, curvature = solve_on_leaves(options.solver, curvature, batch, gradient, 1e-2)
    state = state._replace(previous_direction=previous)
    step = _shaped_step(options, state, batch, curvature, gradient, direction, 1e-2, plan)
    return direction, step


def test_the_direction_is_the_solve_without_the_quadratic_model():
    model, params, x, y, gradient = _problem()
    options = _options(model)
    state = _init(options, params)
    batch = _batch(model, params, x, y)
    curvature, _ = _advance_curvature(options, state, batch, 1e-2, PLAIN)
    leaves = as_leaves(params, gradient)
    direction, step = _shaped(options, state, curvature, batch, leaves, PLAIN)
    _, damped = _damped(model, params, x, 1e-2)
    np.testing.assert_allclose(as_flat(direction), np.linalg.solve(damped, gradient), rtol=1e-8)
    np.testing.assert_array_equal(as_flat(step.direction), as_flat(direction))


def test_the_quadratic_model_rescales_the_direction_and_adds_the_previous_update():
    """With ``rescaled``: α d, α = gᵀd / dᵀ(F + λI)d. With momentum too: the minimiser of
    the model over the plane of d and the previous update p (a 2×2 system); each with
    its dᵀFd."""
    model, params, x, y, gradient = _problem()
    options = _options(model, solver="diagonal")
    state = _init(options, params)
    batch = _batch(model, params, x, y)
    fisher, damped = _damped(model, params, x, 1e-2)
    curvature, _ = _advance_curvature(options, state, batch, 1e-2, PLAIN)
    d = gradient / (np.diag(fisher) + 1e-2)

    rescaled = _StepPlan(rescaled=True, with_momentum=False)
    leaves = as_leaves(params, gradient)
    _, step = _shaped(options, state, curvature, batch, leaves, rescaled)
    alpha = (gradient @ d) / (d @ damped @ d)
    np.testing.assert_allclose(as_flat(step.direction), alpha * d, rtol=1e-8)
    (got_alpha,), quadratic, _ = _quadratic_model(batch, leaves, [as_leaves(params, d)], 1e-2)
    np.testing.assert_allclose(got_alpha, alpha, rtol=1e-8)
    np.testing.assert_allclose(quadratic, (alpha * d) @ fisher @ (alpha * d), rtol=1e-8)

    previous = np.asarray(jax.random.normal(jax.random.PRNGKey(4), d.shape))
    both = _StepPlan(rescaled=True, with_momentum=True)
    _, step = _shaped(options, state, curvature, batch, leaves, both, as_leaves(params, previous))
    basis = np.stack([d, previous], axis=1)
    coefficients = np.linalg.solve(basis.T @ damped @ basis, basis.T @ gradient)
    expected = basis @ coefficients
    np.testing.assert_allclose(as_flat(step.direction), expected, rtol=1e-7)
    span = [as_leaves(params, d), as_leaves(params, previous)]
    got, quadratic, _ = _quadratic_model(batch, leaves, span, 1e-2)
    np.testing.assert_allclose(got, coefficients, rtol=1e-7)
    np.testing.assert_allclose(quadratic, expected @ fisher @ expected, rtol=1e-7)


# --- the trust region -----------------------------------------------------------------


@pytest.mark.parametrize("fisher_kind", ["exact", "monte_carlo"])
def test_the_trust_region_bounds_the_kl_of_the_exact_fisher(fisher_kind):
    model, params, x, y, gradient = _problem()
    _, damped = _damped(model, params, x, 1e-2)
    d = np.linalg.solve(damped, gradient)
    unconstrained = 0.5 * d @ damped @ d
    for max_kl, active in ((0.1 * unconstrained, True), (10 * unconstrained, False)):
        options = _options(model, fisher=fisher_kind, max_kl=float(max_kl))
        state = _init(options, params)
        batch = _batch(model, params, x, y, fisher_kind)
        curvature, _ = _advance_curvature(options, state, batch, 1e-2, PLAIN)
        direction, _ = _trust_region(
            options,
            state.count,
            batch,
            curvature,
            as_leaves(params, gradient),
            as_leaves(params, d),
            1e-2,
            None,
        )
        direction = as_flat(direction)
        if active:
            np.testing.assert_allclose(0.5 * direction @ damped @ direction, max_kl, rtol=1e-8)
            np.testing.assert_allclose(direction / np.linalg.norm(direction), d / np.linalg.norm(d))
        else:
            np.testing.assert_allclose(direction, d, rtol=1e-12)
    options = _options(model)  # no max_kl: nothing to do
    assert _trust_region(options, 0, None, None, gradient, d, 1e-2, None) == (d, None)


# --- the damping rule and the rejection counters -------------------------------------


def test_levenberg_marquardt_follows_the_reduction_ratio_of_the_batch_loss():
    """ρ = (L(θ − d) − L(θ)) / (−gᵀd + ½ dᵀFd) from the dense Fisher and the model's own
    loss (−∞ where the model predicts no decrease); λ' = rule.adapt(λ, ρ). A step that
    would raise the loss is zeroed; a non-finite one too, and counted apart."""
    model, params, x, y, gradient = _problem()
    rule = ng.LevenbergMarquardt(initial=1e-2)
    options = _options(model, damping=rule)
    batch = _batch(model, params, x, y)
    fisher, damped = _damped(model, params, x, 1e-2)
    flat, unravel = ravel_pytree(params)
    for scale in (0.5, 3.0, 40.0):  # short, long, and predicted to raise the loss
        d = scale * np.linalg.solve(damped, gradient)
        direction, next_damping, taken = _adapt_damping(
            options, batch, as_leaves(params, gradient), as_leaves(params, d), 1e-2, None
        )
        direction = as_flat(direction)
        actual = model.nll(unravel(flat - d), x, y) - model.nll(params, x, y)
        predicted = -gradient @ d + 0.5 * d @ fisher @ d
        ratio = actual / predicted if predicted < 0 else -np.inf
        np.testing.assert_allclose(next_damping, rule.adapt(1e-2, ratio), rtol=1e-10)
        assert bool(taken.finite) and bool(taken.accepted) == bool(ratio >= 0)
        np.testing.assert_array_equal(direction, d if ratio >= 0 else np.zeros_like(d))
    assert scale == 40.0 and ratio < 0  # the long step was rejected
    nan_gradient = gradient.at[0].set(jnp.nan)
    direction, _, taken = _adapt_damping(
        options, batch, as_leaves(params, nan_gradient), as_leaves(params, d), 1e-2, None
    )
    assert not bool(taken.finite)
    np.testing.assert_array_equal(as_flat(direction), np.zeros_like(d))


def test_a_fixed_damping_passes_the_step_and_lambda_through():
    model, params, x, y, gradient = _problem()
    options = _options(model, damping=0.3)
    direction, next_damping, taken = _adapt_damping(
        options, _batch(model, params, x, y), gradient, -gradient, 0.3, None
    )
    np.testing.assert_array_equal(direction, -gradient)
    assert float(next_damping) == 0.3 and bool(taken.finite) and bool(taken.accepted)


@pytest.mark.parametrize(
    ("finite", "accepted", "counts"),
    [(True, True, (0, 0)), (True, False, (0, 1)), (False, True, (1, 0)), (False, False, (1, 0))],
)
def test_rejections_are_counted_by_reason(finite, accepted, counts):
    start = RejectedSteps(jnp.int32(2), jnp.int32(5))
    counted = _count_rejections(start, _Taken(jnp.asarray(finite), jnp.asarray(accepted)))
    assert (int(counted.non_finite) - 2, int(counted.no_decrease) - 5) == counts
