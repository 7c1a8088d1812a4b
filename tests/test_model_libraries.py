"""The Fisher functions and the transform on real model libraries' pytrees, unchanged.

flax linen and nnx (with a non-trainable variable held out), equinox (``eqx.filter``ed
arrays, static fields left out) and haiku; plus orbax checkpoints of the state.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng
from tests.helpers import assert_resumes_identically, optional_import

N, IN, OUT = 8, 3, 4


def _x():
    return jax.random.normal(jax.random.PRNGKey(1), (N, IN))


def linen_model():
    nn = optional_import("flax.linen")

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(OUT)(nn.tanh(nn.Dense(5)(x)))

    module = Mlp()
    return module.apply, module.init(jax.random.PRNGKey(0), _x())


def nnx_model_with_a_frozen_variable():
    nnx = optional_import("flax.nnx")

    class Scale(nnx.Variable):
        """Not a parameter: held fixed, outside the optimised state."""

    class Mlp(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(IN, 5, rngs=rngs)
            self.out = nnx.Linear(5, OUT, rngs=rngs)
            self.scale = Scale(jnp.array([1.0, 0.5, 2.0, 1.5]))

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x))) * self.scale[...]

    graphdef, params, frozen = nnx.split(Mlp(nnx.Rngs(0)), nnx.Param, ...)
    return (lambda p, x: nnx.merge(graphdef, p, frozen)(x)), params


def equinox_model():
    eqx = optional_import("equinox")
    net = eqx.nn.MLP(IN, OUT, 5, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(net, eqx.is_inexact_array)
    return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), params


def haiku_model():
    hk = optional_import("haiku")
    transformed = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([5, OUT])(x)))
    return transformed.apply, transformed.init(jax.random.PRNGKey(0), _x())


LIBRARIES = [linen_model, nnx_model_with_a_frozen_variable, equinox_model, haiku_model]


def _float64(params):
    return jax.tree.map(lambda a: a.astype(jnp.float64), params)


@pytest.mark.parametrize("make", LIBRARIES, ids=lambda f: f.__name__)
def test_fisher_functions_on_library_pytrees(make):
    apply, params = make()
    params = _float64(params)
    model = ng.Model(apply, ng.Categorical())
    x = _x()
    f = ng.fisher(model, params, x)
    np.testing.assert_allclose(ng.fisher_hessian(model, params, x), f, rtol=1e-8, atol=1e-12)
    v = jax.tree.map(jnp.ones_like, params)
    fv = ng.fisher_vector_product(model, params, x, v)
    assert jax.tree.structure(fv) == jax.tree.structure(params)
    np.testing.assert_allclose(ravel_pytree(fv)[0], f @ ravel_pytree(v)[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver", ["dense", "woodbury", "kronecker"])
@pytest.mark.parametrize("make", LIBRARIES, ids=lambda f: f.__name__)
def test_transform_on_library_pytrees(make, solver):
    apply, params = make()
    params = _float64(params)
    model = ng.Model(apply, ng.Categorical())
    x, y = _x(), jnp.arange(N) % OUT
    g = jax.grad(model.nll)(params, x, y)
    tx = ng.natural_gradient(model, 1.0, solver=solver, damping=1e-2)
    updates, _ = jax.jit(tx.update)(g, tx.init(params), params, inputs=x, targets=y)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    if solver != "kronecker":  # exact solvers: the dense reference
        f = ng.fisher(model, params, x)
        expected = -np.linalg.solve(f + 1e-2 * np.eye(len(f)), ravel_pytree(g)[0])
        np.testing.assert_allclose(ravel_pytree(updates)[0], expected, rtol=1e-6, atol=1e-10)
    else:
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_orbax_checkpoint_resumes_the_same_trajectory(tmp_path):
    ocp = optional_import("orbax.checkpoint")
    apply, params = linen_model()
    checkpointer = ocp.StandardCheckpointer()

    def save_and_restore(tree):
        checkpointer.save(tmp_path / "halfway", tree)
        checkpointer.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        return checkpointer.restore(tmp_path / "halfway", abstract)

    model = ng.Model(apply, ng.Categorical())
    assert_resumes_identically(model, params, _x(), jnp.arange(N) % OUT, save_and_restore)


def _equinox_module_whole_and_split():
    """(eqx, module, its arrays, the rest, a Model of the module, a Model of the arrays)."""
    eqx = optional_import("equinox")
    module = eqx.nn.MLP(IN, OUT, 5, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    module = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_array(a) else a, module)
    arrays, static = eqx.partition(module, eqx.is_inexact_array)
    whole = ng.Model(lambda m, x: jax.vmap(m)(x), ng.Categorical())
    split = ng.Model(lambda p, x: jax.vmap(eqx.combine(p, static))(x), ng.Categorical())
    return eqx, module, arrays, static, whole, split


@pytest.mark.parametrize("compile_with", ["eager", "filter_jit"])
def test_equinox_module_passed_whole_gets_the_update_of_its_arrays(compile_with):
    """The defaults (adaptive damping, targets, "auto") on an equinox module passed as it
    is, activation functions included, give the update its array leaves get when the
    module is split with ``eqx.partition`` and the rest closed over."""
    eqx, module, arrays, _, whole, split = _equinox_module_whole_and_split()
    x, y = _x(), jnp.arange(N) % OUT
    initial_loss = whole.nll(module, x, y)
    optimizer = ng.natural_gradient(whole, 1.0)
    reference = ng.natural_gradient(split, 1.0)
    update = optimizer.update if compile_with == "eager" else eqx.filter_jit(optimizer.update)

    state, reference_state = optimizer.init(module), reference.init(arrays)
    for _ in range(3):
        grads = eqx.filter_grad(whole.nll)(module, x, y)
        updates, state = update(grads, state, module, inputs=x, targets=y)
        expected, reference_state = reference.update(
            jax.grad(split.nll)(arrays, x, y), reference_state, arrays, inputs=x, targets=y
        )
        got, _ = eqx.partition(updates, eqx.is_inexact_array)
        chex.assert_trees_all_close(got, expected, rtol=1e-9, atol=1e-12)
        module, arrays = eqx.apply_updates(module, updates), optax.apply_updates(arrays, expected)
    assert whole.nll(module, x, y) < initial_loss


def test_equinox_module_passed_whole_to_the_fisher_functions():
    """The Fisher functions, ``value_and_grad`` and ``describe`` take the module as it is."""
    eqx, module, arrays, _, whole, split = _equinox_module_whole_and_split()
    x, y = _x(), jnp.arange(N) % OUT
    for fisher in (ng.fisher, ng.fisher_hessian):
        np.testing.assert_allclose(fisher(whole, module, x), fisher(split, arrays, x), rtol=1e-12)
    np.testing.assert_allclose(
        ng.empirical_fisher(whole, module, x, y), ng.empirical_fisher(split, arrays, x, y)
    )
    (loss, _), grads = ng.value_and_grad(whole)(module, x, y)
    np.testing.assert_allclose(loss, split.nll(arrays, x, y), rtol=1e-12)
    np.testing.assert_allclose(
        ravel_pytree(eqx.filter(grads, eqx.is_inexact_array))[0],
        ravel_pytree(jax.grad(split.nll)(arrays, x, y))[0],
        rtol=1e-12,
    )
    assert ng.describe(whole, module, x) == ng.describe(split, arrays, x)


def test_flax_nnx_model_trains_with_the_defaults_as_its_plain_jax_twin():
    """An ``nnx`` MLP split with ``nnx.split`` and rebuilt by ``nnx.merge`` in ``apply_fn``
    follows, step for step under the defaults, the trajectory of the same network written
    in plain JAX from the same weights."""
    nnx = optional_import("flax.nnx")

    class Mlp(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(IN, 5, rngs=rngs, param_dtype=jnp.float64)
            self.out = nnx.Linear(5, OUT, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    graphdef, params = nnx.split(Mlp(nnx.Rngs(0)))
    nnx_model = ng.Model(lambda p, x: nnx.merge(graphdef, p)(x), ng.Categorical())
    twin = ng.Model(lambda p, x: jnp.tanh(x @ p[0] + p[1]) @ p[2] + p[3], ng.Categorical())
    weights = [params["hidden"]["kernel"], params["hidden"]["bias"]]
    weights += [params["out"]["kernel"], params["out"]["bias"]]
    weights = [jnp.asarray(w[...]) for w in weights]
    x, y = _x(), jnp.arange(N) % OUT

    def train(model, params, steps=5):
        optimizer = ng.natural_gradient(model, 1.0)

        @jax.jit
        def step(params, state):
            updates, state = optimizer.update(
                jax.grad(model.nll)(params, x, y), state, params, inputs=x, targets=y
            )
            return optax.apply_updates(params, updates), state

        state = optimizer.init(params)
        for _ in range(steps):
            params, state = step(params, state)
        return params

    trained = train(nnx_model, params)
    trained_twin = train(twin, weights)
    np.testing.assert_allclose(
        np.asarray(trained["out"]["kernel"][...]), trained_twin[2], rtol=1e-8, atol=1e-12
    )
    np.testing.assert_allclose(
        nnx_model.nll(trained, x, y), twin.nll(trained_twin, x, y), rtol=1e-10
    )
    assert nnx_model.nll(trained, x, y) < 0.5 * nnx_model.nll(params, x, y)
