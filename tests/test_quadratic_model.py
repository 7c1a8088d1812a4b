"""The step's quadratic model: rescaling and momentum against a dense reference.

m(−δ) = −gᵀδ + ½ δᵀ(F + λI)δ with F the batch's dense Fisher (``ng.fisher``); the
minimiser over a span of vectors V solves Vᵀ(F + λI)V c = Vᵀg, written here with numpy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._transform import _quadratic_model
from tests.helpers import as_flat, as_leaves, init_mlp, mlp

DAMPING = 0.1


def _problem(seed=0):
    params = init_mlp(jax.random.PRNGKey(seed), [3, 5, 4])
    model = ng.Model(mlp, ng.Categorical())
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (7, 3))
    y = model.likelihood.sample(jax.random.PRNGKey(seed + 2), mlp(params, x))
    return model, params, x, y


def _plane_minimiser(fisher, g, vectors):
    vectors = np.asarray(vectors)
    damped = fisher + DAMPING * np.eye(len(g))
    coefficients = np.linalg.solve(vectors @ damped @ vectors.T, vectors @ g)
    return coefficients, coefficients @ vectors


def test_the_minimiser_over_a_plane_solves_the_two_by_two_model():
    model, params, x, y = _problem()
    batch = CurvatureBatch(model, params, x, "exact", targets=y)
    fisher = np.asarray(ng.fisher(model, params, x))
    g = ravel_pytree(jax.grad(model.nll)(params, x, y))[0]
    d = g  # the plain gradient, and near the natural gradient a previous update p
    natural = np.linalg.solve(fisher + DAMPING * np.eye(g.size), g)
    p = jnp.asarray(natural) + 0.1 * jax.random.normal(jax.random.PRNGKey(9), g.shape)
    coefficients, want = _plane_minimiser(fisher, np.asarray(g), [d, p])
    assert min(abs(coefficients)) > 0.01 * max(abs(coefficients))  # both matter here
    leaves = functools.partial(as_leaves, params)
    got, fisher_quadratic, _ = _quadratic_model(batch, leaves(g), [leaves(d), leaves(p)], DAMPING)
    np.testing.assert_allclose(got, coefficients, rtol=1e-9)
    np.testing.assert_allclose(fisher_quadratic, want @ fisher @ want, rtol=1e-9)
    # along d alone: α = gᵀd / dᵀ(F + λI)d
    (alpha,), want_line = _plane_minimiser(fisher, np.asarray(g), [d])
    line, _, _ = _quadratic_model(batch, leaves(g), [leaves(d)], DAMPING)
    np.testing.assert_allclose(line * d, want_line, rtol=1e-9)
    # a previous update of 0 (first step, rejected step) or parallel to d: d alone
    for degenerate in (jnp.zeros_like(d), -2.0 * d):
        span = [leaves(d), leaves(degenerate)]
        plane, _, _ = _quadratic_model(batch, leaves(g), span, DAMPING)
        np.testing.assert_allclose(plane, [alpha, 0.0], rtol=1e-9)


def test_momentum_steps_are_the_dense_plane_minimisers_of_each_batch():
    """Two steps of the diagonal solver (exact diagonal, fixed λ) on two batches: step 1
    is α d₁; step 2 the minimiser of batch 2's model over the plane of d₂ and step 1."""
    model, params, x1, y1 = _problem()
    _, _, x2, y2 = _problem(seed=5)
    tx = ng.scale_by_natural_gradient(model, solver="diagonal", damping=DAMPING, momentum=True)
    state = tx.init(params)
    previous, steps = None, []
    for x, y in ((x1, y1), (x2, y2)):
        g = jax.grad(model.nll)(params, x, y)
        updates, state = tx.update(g, state, params, inputs=x, targets=y)
        fisher = np.asarray(ng.fisher(model, params, x))
        flat_g = np.asarray(ravel_pytree(g)[0])
        d = flat_g / (np.diag(fisher) + DAMPING)
        span = [d] if previous is None else [d, previous]
        coefficients, want = _plane_minimiser(fisher, flat_g, span)
        got = ravel_pytree(updates)[0]
        np.testing.assert_allclose(got, want, rtol=1e-8)
        np.testing.assert_allclose(as_flat(state.previous_direction), got, rtol=1e-12)
        previous = want
        steps.append(coefficients)
        params = optax.apply_updates(params, jax.tree.map(lambda u: -u, updates))
    assert abs(steps[1][1]) > 1e-3  # the second step does use the first


@pytest.mark.parametrize("momentum", [False, True])
def test_momentum_trains_a_classifier_with_adaptive_damping(momentum):
    """With Levenberg–Marquardt damping a rejected step leaves no momentum behind, and
    the loss falls."""
    model, params, x, y = _problem()
    optimizer = ng.natural_gradient(model, 1.0, solver="diagonal", momentum=momentum)
    state = optimizer.init(params)
    start = model.nll(params, x, y)
    for _ in range(15):
        g = jax.grad(model.nll)(params, x, y)
        updates, state = optimizer.update(g, state, params, inputs=x, targets=y)
        params = optax.apply_updates(params, updates)
    assert model.nll(params, x, y) < 0.7 * start


def test_natural_gradient_takes_momentum_where_the_solve_is_an_approximation(monkeypatch):
    """``momentum=None`` (natural_gradient's default) keeps the previous update for the
    approximate solvers and for "auto" on a network where it may pick K-FAC, and only
    there; ``scale_by_natural_gradient`` keeps none unless asked."""
    from natgrad_jax._solvers import auto

    model, params, _, _ = _problem()

    def holds_previous(solver, transform=ng.natural_gradient, **options):
        state = transform(model, 1.0, solver=solver, **options).init(params)
        is_ours = lambda s: isinstance(s, ng.NaturalGradientState)
        (ours,) = [s for s in jax.tree.leaves(state, is_leaf=is_ours) if is_ours(s)]
        return ours.previous_direction is not None

    assert holds_previous("kronecker") and holds_previous("diagonal")
    assert not holds_previous("dense") and not holds_previous("cg")
    assert not holds_previous("auto")
    monkeypatch.setattr(auto, "KRONECKER_MIN_PARAMS", 20)  # P = 44 here
    assert holds_previous("auto")
    assert not holds_previous("auto", damping=0.0)  # no K-FAC without damping

    def scale(model, _, **options):
        return ng.scale_by_natural_gradient(model, **options)

    assert not holds_previous("kronecker", scale)
    assert holds_previous("dense", scale, momentum=True)


@pytest.mark.parametrize("momentum", [False, True])
def test_adapt_every_reuses_the_measured_step_length_within_its_own_bound(momentum):
    """``adapt_every=3``, exact diagonal, fixed λ, five batches: steps 0 and 3 are the
    dense quadratic model's minimisers (over d, or the plane of d and the previous
    step); steps 1, 2 and 4 are α d with the α measured last along d alone, shortened
    where α² gᵀd would exceed its value at the measured step."""
    model, params, _, _ = _problem()
    tx = ng.scale_by_natural_gradient(
        model, solver="diagonal", damping=DAMPING, rescale=True, momentum=momentum, adapt_every=3
    )
    state = tx.init(params)
    previous, alpha, bound, scales = None, None, None, []
    for k in range(5):
        _, _, x, y = _problem(seed=10 + k)
        g = jax.grad(model.nll)(params, x, y)
        updates, state = tx.update(g, state, params, inputs=x, targets=y)
        fisher = np.asarray(ng.fisher(model, params, x))
        flat_g = np.asarray(ravel_pytree(g)[0])
        d = flat_g / (np.diag(fisher) + DAMPING)
        if k % 3 == 0:
            (alpha,), _ = _plane_minimiser(fisher, flat_g, [d])
            span = [d] if previous is None or not momentum else [d, previous]
            _, want = _plane_minimiser(fisher, flat_g, span)
            bound = alpha**2 * flat_g @ d
        else:
            scale = min(1.0, np.sqrt(bound / (alpha**2 * flat_g @ d)))
            want = alpha * scale * d
            scales.append(scale)
        np.testing.assert_allclose(ravel_pytree(updates)[0], want, rtol=1e-9)
        previous = want
        params = optax.apply_updates(params, jax.tree.map(lambda u: -0.5 * u, updates))
    assert min(scales) < 1.0  # the bound acts on some step


def test_adapt_every_adapts_damping_at_measured_steps_and_again_after_a_rejection():
    """Levenberg–Marquardt with ``adapt_every=3``: λ moves only at steps 0 and 3, except
    that a rejected step is measured again at the next update. An ascent direction
    passed as the gradient is rejected at each measurement (λ × 10); the descent
    gradient afterwards is accepted (λ × 2/3 at steps 2 and 3), and λ then holds."""
    model, params, x, y = _problem()
    rule = ng.LevenbergMarquardt(initial=1.0)
    tx = ng.scale_by_natural_gradient(model, solver="diagonal", damping=rule, adapt_every=3)
    state = tx.init(params)
    dampings, rejections = [], []
    for k in range(6):
        g = jax.grad(model.nll)(params, x, y)
        sign = -1.0 if k < 2 else 1.0  # two rejected steps: 0 (due) and 1 (its retry)
        given = jax.tree.map(lambda v, s=sign: s * v, g)
        updates, state = tx.update(given, state, params, inputs=x, targets=y)
        params = optax.apply_updates(params, jax.tree.map(lambda u: -u, updates))
        dampings.append(float(state.damping))
        rejections.append(int(state.rejected.no_decrease))
    np.testing.assert_allclose(dampings, [10, 100, 200 / 3, 400 / 9, 400 / 9, 400 / 9], rtol=1e-12)
    assert rejections == [1, 2, 2, 2, 2, 2]


@pytest.mark.parametrize("adapt_every", [0, -2, 1.5, True, "5"])
def test_adapt_every_refuses_what_is_not_a_positive_python_int(adapt_every):
    model, _, _, _ = _problem()
    with pytest.raises(ValueError, match="adapt_every"):
        ng.scale_by_natural_gradient(model, adapt_every=adapt_every)
