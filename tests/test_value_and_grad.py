"""ng.value_and_grad: the loss, gradient and natural-gradient update from one forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import natgrad_jax as ng
from natgrad_jax._solvers.batch import CurvatureBatch
from tests.helpers import as_flat, as_leaves, equations, init_mlp, mlp
from tests.test_capture_layers import _concatenated, _concatenated_params
from tests.test_kronecker import multi_axis_biases

SIZES = [3, 5, 5, 3]  # two tanh layers: a forward pass has two tanh equations
NUM_TANH_PER_FORWARD = len(SIZES) - 2


def problem(num_examples=7, seed=0):
    k_params, k_inputs, k_targets = jax.random.split(jax.random.PRNGKey(seed), 3)
    model = ng.Model(mlp, ng.Categorical())
    params = init_mlp(k_params, SIZES)
    x = jax.random.normal(k_inputs, (num_examples, SIZES[0]))
    y = jax.random.randint(k_targets, (num_examples,), 0, SIZES[-1])
    return model, params, x, y


def with_fallback_leaf(params, x):
    """An MLP with a gain that reaches its layer through ``sin``: capture leaves it to
    the per-example fallback."""
    hidden = jnp.tanh(x @ params["w"] * jnp.sin(params["gain"]))
    return hidden @ params["v"]


def train(optimizer, model, params, x, y, steps, one_pass):
    """Parameters, losses and gradients of ``steps`` updates, with or without the
    one-pass helper."""
    state = optimizer.init(params)
    losses, gradients = [], []
    one_pass_gradient = jax.jit(ng.value_and_grad(model))
    for _ in range(steps):
        if one_pass:
            (loss, forward), grads = one_pass_gradient(params, x, y)
            extra = {"forward_pass": forward}
        else:
            loss, grads = jax.value_and_grad(model.nll)(params, x, y)
            extra = {}
        updates, state = optimizer.update(grads, state, params, inputs=x, targets=y, **extra)
        params = optax.apply_updates(params, updates)
        losses.append(loss)
        gradients.append(grads)
    return params, losses, gradients


@pytest.mark.parametrize(
    ("solver", "fisher"),
    [
        ("kronecker", "exact"),
        ("kronecker", "monte_carlo"),
        ("ekfac", "empirical"),
        ("woodbury", "exact"),
        ("cg", "monte_carlo"),
        ("dense", "empirical"),
    ],
)
def test_one_pass_gives_the_loss_gradient_and_updates_of_the_two_pass_path(solver, fisher):
    model, params, x, y = problem()
    # The default adaptive damping uses the loss and a Fisher-vector product too.
    optimizer = ng.natural_gradient(model, 1.0, solver=solver, fisher=fisher, decay=0.0)
    one = train(optimizer, model, params, x, y, steps=2, one_pass=True)
    two = train(optimizer, model, params, x, y, steps=2, one_pass=False)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert not np.allclose(jax.tree.leaves(one[0])[0], jax.tree.leaves(params)[0])


def test_one_pass_agrees_with_a_leaf_left_to_the_fallback():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    params = {
        "w": jax.random.normal(k1, (3, 4)),
        "gain": jnp.linspace(0.5, 1.5, 4),
        "v": jax.random.normal(k2, (4, 3)) / 2,
    }
    model = ng.Model(with_fallback_leaf, ng.Categorical())
    x, y = jax.random.normal(k3, (6, 3)), jnp.array([0, 1, 2, 0, 1, 2])
    assert ng.describe(model, params, x).count("vmap") == 1
    optimizer = ng.natural_gradient(model, 1.0, solver="kronecker", damping=1e-2)
    one = train(optimizer, model, params, x, y, steps=1, one_pass=True)
    two = train(optimizer, model, params, x, y, steps=1, one_pass=False)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def _concatenated_kernels():
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
    return ng.Model(_concatenated, ng.Categorical()), _concatenated_params(), x


@pytest.mark.parametrize("make", [_concatenated_kernels, multi_axis_biases])
def test_one_pass_on_concatenated_kernels_and_biases_of_several_axes(make):
    """Probes assembled from concatenated leaves' parts, and tensor-normal factors: the
    one-pass update, and J v by the transposed pullback against jax.jvp."""
    model, params, x = make()
    y = jnp.arange(x.shape[0]) % 2
    optimizer = ng.natural_gradient(model, 1.0, solver="kronecker", damping=1e-2)
    one = train(optimizer, model, params, x, y, steps=1, one_pass=True)
    two = train(optimizer, model, params, x, y, steps=1, one_pass=False)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    (_, forward), _ = ng.value_and_grad(model)(params, x, y)
    tangent = jax.tree.map(jnp.ones_like, params)
    expected = jax.jvp(lambda p: model.apply_fn(p, x), (params,), (tangent,))[1]
    np.testing.assert_allclose(forward.jvp(tangent), expected, rtol=1e-12, atol=1e-12)


def test_loss_and_gradient_are_those_of_the_nll():
    model, params, x, y = problem()
    (loss, forward), grads = ng.value_and_grad(model)(params, x, y)
    np.testing.assert_allclose(loss, model.nll(params, x, y), rtol=1e-14)
    reference = jax.grad(model.nll)(params, x, y)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(forward.outputs, mlp(params, x), rtol=1e-14)
    # The linearisation: J v by the transposed pullback against jax.jvp.
    tangent = jax.tree.map(jnp.ones_like, params)
    np.testing.assert_allclose(
        forward.jvp(tangent), jax.jvp(lambda p: mlp(p, x), (params,), (tangent,))[1], rtol=1e-12
    )


@pytest.mark.parametrize("kind", ["exact", "monte_carlo", "empirical"])
def test_products_and_loss_of_a_forward_pass_are_the_fishers_and_the_nll(kind):
    """The Fisher-vector products and the loss taken from a ForwardPass (conjugate
    gradients, adaptive damping) against the dense Fishers and ``model.nll``."""
    model, params, x, y = problem()
    key = jax.random.PRNGKey(5)
    (_, forward), _ = ng.value_and_grad(model)(params, x, y)
    batch = CurvatureBatch(
        model, params, x, kind, targets=y, key=key, num_samples=3, forward=forward
    )
    dense = {
        "exact": lambda: ng.fisher(model, params, x),
        "monte_carlo": lambda: ng.monte_carlo_fisher(model, params, x, key, num_samples=3),
        "empirical": lambda: ng.empirical_fisher(model, params, x, y),
    }[kind]()
    vectors = jax.random.normal(jax.random.PRNGKey(6), (3, dense.shape[0]))
    for v in vectors:
        product = as_flat(batch.matvec(as_leaves(params, v)))
        np.testing.assert_allclose(product, dense @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(batch.nll(), model.nll(params, x, y), rtol=1e-14)


def count_forward_passes(step, *args):
    """Forward passes of the MLP in the jaxpr of ``step``: its tanh equations over the
    tanh equations of one forward pass (the derivative of tanh reuses its output)."""
    jaxpr = jax.make_jaxpr(step)(*args).jaxpr
    count = len(equations(jaxpr, "tanh"))
    assert count % NUM_TANH_PER_FORWARD == 0
    return count // NUM_TANH_PER_FORWARD


@pytest.mark.parametrize(
    ("solver", "fisher", "damping", "forward_passes"),
    [
        (ng.ConjugateGradient(tol=1e-13), "exact", 1e-3, 1),
        ("kronecker", "monte_carlo", 1e-3, 1),
        # The quadratic model linearises the model on its own.
        ("kronecker", "monte_carlo", 1e-3, 2),
        # Levenberg–Marquardt evaluates the loss at the moved parameters too.
        ("kronecker", "monte_carlo", ng.LevenbergMarquardt(), 3),
    ],
)
def test_a_train_step_with_the_helper_runs_the_model_forward_once_for_loss_gradient_and_curvature(
    solver, fisher, damping, forward_passes
):
    """One forward pass for the loss, the gradient and the curvature; the quadratic
    model's forward-mode products (``rescale`` and ``momentum``, here in the rows of 2
    and 3 passes) linearise the model themselves."""
    model, params, x, y = problem()
    modelled = forward_passes > 1
    optimizer = ng.natural_gradient(
        model,
        0.5,
        solver=solver,
        fisher=fisher,
        damping=damping,
        rescale=modelled,
        momentum=modelled,
    )
    state = optimizer.init(params)
    assert (state[0].previous_direction is not None) == modelled

    def one_pass_step(params, state):
        (_, forward), grads = ng.value_and_grad(model)(params, x, y)
        updates, state = optimizer.update(
            grads, state, params, inputs=x, targets=y, forward_pass=forward
        )
        return optax.apply_updates(params, updates), state

    def two_pass_step(params, state):
        grads = jax.grad(model.nll)(params, x, y)
        updates, state = optimizer.update(grads, state, params, inputs=x, targets=y)
        return optax.apply_updates(params, updates), state

    # (The numbers of both steps are compared in the tests above.)
    assert count_forward_passes(one_pass_step, params, state) == forward_passes
    assert count_forward_passes(two_pass_step, params, state) > forward_passes


@pytest.mark.parametrize(
    ("solver", "damping", "forward_passes"),
    [
        ("kronecker", 1e-3, 3),
        # Levenberg–Marquardt evaluates the loss at the moved parameters too.
        ("kronecker", ng.LevenbergMarquardt(), 4),
        ("ekfac", ng.LevenbergMarquardt(), 4),
    ],
)
def test_a_plain_step_with_the_quadratic_model_shares_its_forward_pass_with_the_loss(
    solver, damping, forward_passes
):
    """The quick start's step (``jax.grad``, then ``update``) where the quadratic model
    sets the step: ``jax.grad``'s forward pass, one in ``update`` shared by the model's
    forward-mode products and the damping rule's loss, the refresh's statistics' own (in
    their branch: sharing it kept two passes' residuals alive at once, sharded K-FAC's
    per-device memory 1.83× Adam's ratio against 1.75 on jax 0.10.2), and the loss at
    the moved parameters (before: 5 with Levenberg–Marquardt, the loss
    running the model again)."""
    model, params, x, y = problem()
    optimizer = ng.natural_gradient(model, 0.5, solver=solver, damping=damping)
    assert optimizer.init(params)[0].previous_direction is not None  # the model runs

    def plain_step(params, state):
        grads = jax.grad(model.nll)(params, x, y)
        updates, state = optimizer.update(grads, state, params, inputs=x, targets=y)
        return optax.apply_updates(params, updates), state

    assert count_forward_passes(plain_step, params, optimizer.init(params)) == forward_passes


def test_frozen_leaves_get_no_gradient_and_the_same_update():
    model, params, x, y = problem()
    params = {"layers": params, "step": jnp.array(3, jnp.int32)}
    frozen_model = ng.Model(lambda p, x: mlp(p["layers"], x), ng.Categorical())
    (loss, forward), grads = jax.jit(ng.value_and_grad(frozen_model))(params, x, y)
    assert grads["step"] is None
    np.testing.assert_allclose(loss, model.nll(params["layers"], x, y), rtol=1e-14)
    optimizer = ng.natural_gradient(frozen_model, 1.0, solver="kronecker", damping=1e-3)
    state = optimizer.init(params)
    updates, _ = optimizer.update(grads, state, params, inputs=x, targets=y, forward_pass=forward)
    reference = ng.natural_gradient(model, 1.0, solver="kronecker", damping=1e-3)
    reference_updates, _ = reference.update(
        jax.grad(model.nll)(params["layers"], x, y),
        reference.init(params["layers"]),
        params["layers"],
        inputs=x,
        targets=y,
    )
    for a, b in zip(
        jax.tree.leaves(updates["layers"]), jax.tree.leaves(reference_updates), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_a_forward_pass_of_other_parameters_or_batch_is_refused():
    model, params, x, y = problem()
    optimizer = ng.natural_gradient(model, 1.0, solver="kronecker", damping=1e-3)
    state = optimizer.init(params)
    grads = jax.grad(model.nll)(params, x, y)
    (_, other_batch), _ = ng.value_and_grad(model)(params, x[:5], y[:5])
    with pytest.raises(ValueError, match="does not belong to this model"):
        optimizer.update(grads, state, params, inputs=x, targets=y, forward_pass=other_batch)
    wider = init_mlp(jax.random.PRNGKey(2), [3, 6, 5, 3])
    (_, other_params), _ = ng.value_and_grad(model)(wider, x, y)
    with pytest.raises(ValueError, match="does not belong to this model"):
        optimizer.update(grads, state, params, inputs=x, targets=y, forward_pass=other_params)
    with pytest.raises(TypeError, match=r"ng\.value_and_grad"):
        optimizer.update(grads, state, params, inputs=x, targets=y, forward_pass=(1, 2))


def test_a_masked_per_token_model_with_an_embedding_gets_the_fishers_products():
    """Per-token (N, T, C) outputs with a padding mask, through an embedding (integer
    layer inputs): the forward pass's products against the dense Fishers, and its
    gradient against jax.grad."""
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    params = {"e": jax.random.normal(k[0], (6, 4)), "w": jax.random.normal(k[1], (4, 3))}

    def apply(p, inputs):
        tokens, mask = inputs
        return jnp.tanh(p["e"][tokens]) @ p["w"], mask

    model = ng.Model(apply, ng.Masked(ng.Categorical()))
    tokens = jax.random.randint(k[2], (5, 7), 0, 6)
    mask = (jnp.arange(7)[None] < jnp.array([7, 5, 3, 6, 2])[:, None]).astype(jnp.float64)
    x, y, key = (tokens, mask), jax.random.randint(k[3], (5, 7), 0, 3), jax.random.PRNGKey(5)
    (loss, forward), grads = ng.value_and_grad(model)(params, x, y)
    np.testing.assert_allclose(loss, model.nll(params, x, y), rtol=1e-14)
    reference = jax.grad(model.nll)(params, x, y)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    dense = {
        "exact": ng.fisher(model, params, x),
        "monte_carlo": ng.monte_carlo_fisher(model, params, x, key, num_samples=2),
        "empirical": ng.empirical_fisher(model, params, x, y),
    }
    v = jax.random.normal(k[4], (dense["exact"].shape[0],))
    for kind, matrix in dense.items():
        batch = CurvatureBatch(
            model, params, x, kind, targets=y, key=key, num_samples=2, forward=forward
        )
        product = as_flat(batch.matvec(as_leaves(params, v)))
        np.testing.assert_allclose(product, matrix @ v, rtol=1e-10, atol=1e-12)
