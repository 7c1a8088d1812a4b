"""Parameter pytrees users really have: integer/boolean leaves, float0 gradients, equinox
modules passed as they are, and a transform that compiles itself when used eagerly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng
from tests.helpers import optional_import

N = 6


def _apply(params, x):
    """A masked linear Categorical model with an integer leaf that selects a column."""
    weights = params["w"] * params["mask"][:, None]
    logits = x @ weights + params["b"]
    return logits.at[:, params["column"]].add(params["shift"])


def _problem():
    key_w, key_x, key_y = jax.random.split(jax.random.PRNGKey(3), 3)
    params = {
        "w": jax.random.normal(key_w, (3, 4), jnp.float64),
        "b": jnp.zeros(4, jnp.float64),
        "shift": jnp.float64(0.3),
        "mask": jnp.array([True, False, True]),
        "column": jnp.int32(2),
        "steps": jnp.int32(7),
    }
    x = jax.random.normal(key_x, (N, 3), jnp.float64)
    y = jax.random.randint(key_y, (N,), 0, 4)
    return ng.Model(_apply, ng.Categorical()), params, x, y


FLOATING = ("b", "shift", "w")  # ravel_pytree order of the floating leaves


def _floating(params):
    return {name: params[name] for name in FLOATING}


def _closed_model(params):
    """The same model written by hand as a function of the floating leaves alone."""
    frozen = {k: v for k, v in params.items() if k not in FLOATING}
    return ng.Model(lambda p, x: _apply({**p, **frozen}, x), ng.Categorical())


@jax.jit
def _kl_hessian(params, x):
    """The definition: Hessian of the mean KL over the floating leaves (written here)."""
    flat, unravel = ravel_pytree(_floating(params))
    frozen = {k: v for k, v in params.items() if k not in FLOATING}

    def kl(f):
        p = jax.nn.log_softmax(_apply(params, x))
        q = jax.nn.log_softmax(_apply({**unravel(f), **frozen}, x))
        return jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1))

    return jax.hessian(kl)(flat)


def _compiled(function):
    """``function(model, params, ...)`` jitted with the model static (the integer leaves
    are traced inside)."""
    return jax.jit(function, static_argnums=0)


def test_fisher_is_over_the_floating_leaves_only():
    model, params, x, y = _problem()
    want = _kl_hessian(params, x)
    assert want.shape == (3 * 4 + 4 + 1,) * 2
    np.testing.assert_allclose(ng.fisher(model, params, x), want, rtol=1e-10, atol=1e-14)
    hessian = _compiled(ng.fisher_hessian)(model, params, x)
    np.testing.assert_allclose(hessian, want, rtol=1e-10, atol=1e-14)
    closed, floating = _closed_model(params), _floating(params)
    for function, arguments in [
        (ng.empirical_fisher, (x, y)),
        (ng.per_example_scores, (x, y)),
        (lambda *a: ng.monte_carlo_fisher(*a, jax.random.key(1), 3), (x,)),
    ]:
        np.testing.assert_allclose(
            _compiled(function)(model, params, *arguments),
            _compiled(function)(closed, floating, *arguments),
            rtol=1e-12,
        )
    product = ng.fisher_vector_product(model, params, x, params)
    assert product["column"] is None and product["mask"] is None
    np.testing.assert_allclose(
        ravel_pytree(product)[0], want @ ravel_pytree(floating)[0], rtol=1e-10
    )


@pytest.mark.parametrize("solver", ["dense", "woodbury", "cg", "kronecker", "diagonal"])
def test_update_passes_non_floating_leaves_through(solver):
    model, params, x, y = _problem()
    grads = jax.grad(model.nll, allow_int=True)(params, x, y)
    assert grads["column"].dtype == jax.dtypes.float0
    tx = ng.scale_by_natural_gradient(model, solver=solver, damping=1e-2)
    updates, _ = tx.update(grads, tx.init(params), params, inputs=x)
    closed_tx = ng.scale_by_natural_gradient(_closed_model(params), solver=solver, damping=1e-2)
    floating = _floating(params)
    want, _ = closed_tx.update(_floating(grads), closed_tx.init(floating), floating, inputs=x)
    for name in FLOATING:
        np.testing.assert_allclose(updates[name], want[name], rtol=1e-9, atol=1e-12)
        assert updates[name].dtype == jnp.float64
    for name in ("mask", "column", "steps"):  # float0 in, a zero of the leaf's dtype out
        assert updates[name].dtype == params[name].dtype
        assert not np.any(updates[name])
    if solver == "dense":  # the definition: (F + λI)⁻¹ g over the floating leaves
        fisher = _kl_hessian(params, x)
        direction = np.linalg.solve(
            fisher + 1e-2 * np.eye(len(fisher)), ravel_pytree(_floating(grads))[0]
        )
        np.testing.assert_allclose(ravel_pytree(_floating(updates))[0], direction, rtol=1e-9)


def test_integer_updates_keep_their_value_and_dtype():
    model, params, x, y = _problem()
    grads = jax.grad(model.nll, allow_int=True)(params, x, y)
    grads = {**grads, "steps": jnp.int32(1), "mask": jnp.zeros(3, bool), "column": jnp.int32(0)}
    tx = ng.scale_by_natural_gradient(model)
    updates, _ = tx.update(grads, tx.init(params), params, inputs=x)
    assert updates["steps"].dtype == jnp.int32 and int(updates["steps"]) == 1


def _assert_trains(step, params, state, loss, steps=5):
    """Runs ``step`` and checks the loss fell by at least 20 %; returns the parameters."""
    start = loss(params)
    for _ in range(steps):
        params, state = step(params, state)
    assert loss(params) < 0.8 * start
    return params


def test_a_pytree_with_integer_leaves_trains_under_jit():
    model, params, x, y = _problem()
    optimizer = ng.natural_gradient(model, 1.0, damping=1e-3, max_kl=0.05)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(model.nll, allow_int=True)(params, x, y)
        updates, state = optimizer.update(grads, state, params, inputs=x)
        return optax.apply_updates(params, updates), state

    params = _assert_trains(step, params, state, lambda p: model.nll(p, x, y))
    assert params["column"].dtype == jnp.int32 and int(params["column"]) == 2
    assert params["mask"].dtype == jnp.bool_ and params["mask"].tolist() == [True, False, True]


def test_bad_parameter_trees_raise_clear_errors():
    model, params, x, y = _problem()
    tx = ng.scale_by_natural_gradient(model)
    with pytest.raises(ValueError, match="no floating-point leaves"):
        tx.init({"n": jnp.int32(1)})
    with pytest.raises(ValueError, match="no floating-point leaves"):
        ng.fisher(model, {"n": jnp.int32(1)}, x)
    grads = jax.grad(model.nll, allow_int=True)(params, x, y)
    with pytest.raises(ValueError, match=r"(?s)\['w'\].*floating array"):
        tx.update({**grads, "w": jnp.zeros((3, 4), jnp.int32)}, tx.init(params), params, inputs=x)
    with pytest.raises(ValueError, match="same pytree structure"):
        tx.update({"w": grads["w"]}, tx.init(params), params, inputs=x)


def test_eager_updates_compile_once():
    """Called outside jit, update compiles at its first call and then reuses it."""
    traces = []

    def apply_fn(w, x):
        traces.append(1)
        return x @ w

    model = ng.Model(apply_fn, ng.Bernoulli())
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 3))
    y = (x[:, 0] > 0).astype(jnp.float32)
    optimizer = ng.natural_gradient(model, 1.0, damping=1e-3, max_kl=0.1)
    w = jnp.zeros(3)
    state = optimizer.init(w)
    counts = []
    for _ in range(4):
        updates, state = optimizer.update(jnp.ones(3), state, w, inputs=x, targets=y)
        w = optax.apply_updates(w, updates)
        counts.append(len(traces))
    assert counts[0] == counts[1] == counts[2] == counts[3]  # compiled once, then reused
    jitted = jax.jit(lambda w, s: optimizer.update(jnp.ones(3), s, w, inputs=x, targets=y))
    np.testing.assert_allclose(
        jitted(w, state)[0],
        optimizer.update(jnp.ones(3), state, w, inputs=x, targets=y)[0],
        rtol=1e-6,
    )


# --- equinox modules ----------------------------------------------------------------------


def test_eager_updates_of_a_whole_equinox_module_trace_it_once():
    """The defaults on a module passed whole (functions among its leaves): the target
    check and the compiled update trace the network at the first call only."""
    eqx, mlp, _, x, y = _equinox_problem()
    traces = []

    def apply_fn(module, x):
        traces.append(1)
        return jax.vmap(module)(x)

    model = ng.Model(apply_fn, ng.Categorical())
    optimizer = ng.natural_gradient(model, 1.0)
    state, counts = optimizer.init(mlp), []
    for _ in range(3):
        grads = eqx.filter_grad(model.nll)(mlp, x, y)
        updates, state = optimizer.update(grads, state, mlp, inputs=x, targets=y)
        mlp = eqx.apply_updates(mlp, updates)
        counts.append(len(traces))
    assert counts[1] - counts[0] == counts[2] - counts[1] == 1  # filter_grad's own trace


def _equinox_problem():
    eqx = optional_import("equinox")
    mlp = eqx.nn.MLP(3, 4, 5, 1, key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (N, 3))
    y = jax.random.randint(jax.random.PRNGKey(2), (N,), 0, 4)
    model = ng.Model(lambda m, x: jax.vmap(m)(x), ng.Categorical())
    return eqx, mlp, model, x, y


def test_equinox_module_fisher_equals_the_partitioned_one():
    eqx, mlp, model, x, _ = _equinox_problem()
    arrays, static = eqx.partition(mlp, eqx.is_inexact_array)
    partitioned = ng.Model(lambda p, x: model.apply_fn(eqx.combine(p, static), x), model.likelihood)
    np.testing.assert_allclose(
        ng.fisher(model, mlp, x), ng.fisher(partitioned, arrays, x), rtol=1e-6, atol=1e-9
    )
    table = ng.describe(model, mlp, x)
    assert "activation" not in table and ".layers[0].weight" in table


def test_equinox_module_trains_with_filter_grad():
    eqx, mlp, model, x, y = _equinox_problem()
    arrays, static = eqx.partition(mlp, eqx.is_inexact_array)
    optimizer = ng.natural_gradient(model, 1.0, damping=1e-2, max_kl=0.05)
    state = optimizer.init(mlp)
    grads = eqx.filter_grad(model.nll)(mlp, x, y)
    updates, _ = optimizer.update(grads, state, mlp, inputs=x)
    partitioned = ng.Model(lambda p, x: model.apply_fn(eqx.combine(p, static), x), model.likelihood)
    reference = ng.natural_gradient(partitioned, 1.0, damping=1e-2, max_kl=0.05)
    want, _ = reference.update(
        eqx.filter(grads, eqx.is_inexact_array), reference.init(arrays), arrays, inputs=x
    )
    np.testing.assert_allclose(
        ravel_pytree(eqx.filter(updates, eqx.is_inexact_array))[0], ravel_pytree(want)[0], rtol=1e-5
    )

    @eqx.filter_jit
    def step(mlp, state):
        grads = eqx.filter_grad(model.nll)(mlp, x, y)
        updates, state = optimizer.update(grads, state, mlp, inputs=x)
        return eqx.apply_updates(mlp, updates), state

    _assert_trains(step, mlp, state, lambda m: model.nll(m, x, y))
