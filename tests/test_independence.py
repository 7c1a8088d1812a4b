"""Models whose examples interact (batch statistics) are refused; flax's state collections
are never taken for parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natgrad_jax as ng
from natgrad_jax._independence import interacting_examples
from tests.helpers import optional_import

N = 6


def _inputs():
    return jax.random.normal(jax.random.PRNGKey(0), (N, 3))


def _flax_batch_norm_mlp(train):
    nn = optional_import("flax.linen")

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
            return nn.Dense(3)(nn.tanh(x))

    module = Mlp()
    variables = module.init(jax.random.PRNGKey(1), _inputs())
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
    stats = variables["batch_stats"]

    def apply(p, x):
        if train:
            return module.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])[0]
        return module.apply({"params": p, "batch_stats": stats}, x)

    return ng.Model(apply, ng.Categorical()), variables


def _centred(axis):
    """x @ w, centred over the batch (axis 0: examples interact) or over features (1)."""

    def apply(p, x):
        h = x @ p["w"]
        return h - jnp.mean(h, axis=axis, keepdims=True)

    return ng.Model(apply, ng.Categorical()), {"w": jnp.linspace(-1.0, 1.0, 9).reshape(3, 3)}


def test_batch_statistics_are_detected_and_per_example_ones_are_not():
    model, params = _centred(axis=0)
    assert interacting_examples(model.apply_fn, params, _inputs()) == tuple(range(1, N))
    model, params = _centred(axis=1)
    assert interacting_examples(model.apply_fn, params, _inputs()) == ()


ENTRY_POINTS = {
    "fisher": lambda model, p, x: ng.fisher(model, p, x),
    "fisher_vector_product": lambda model, p, x: ng.fisher_vector_product(model, p, x, p),
    "describe": lambda model, p, x: ng.describe(model, p, x),
    "jitted_fisher": lambda model, p, x: jax.jit(lambda p, x: ng.fisher(model, p, x))(p, x),
    "update_cg": lambda model, p, x: _update(model, p, x, "cg"),
    "update_kronecker": lambda model, p, x: _update(model, p, x, "kronecker"),
}


def _update(model, params, x, solver):
    tx = ng.scale_by_natural_gradient(model, damping=1e-2, solver=solver)
    return tx.update(params, tx.init(params), params, inputs=x)


@pytest.mark.parametrize("entry", ENTRY_POINTS.values(), ids=ENTRY_POINTS.keys())
def test_train_mode_batch_norm_is_refused_everywhere(entry):
    model, variables = _flax_batch_norm_mlp(train=True)
    with pytest.raises(ValueError, match="batch normalisation in training mode"):
        entry(model, variables["params"], _inputs())


def test_inference_mode_batch_norm_gives_the_kl_hessian():
    model, variables = _flax_batch_norm_mlp(train=False)
    params, x = variables["params"], _inputs()
    np.testing.assert_allclose(
        ng.fisher(model, params, x), ng.fisher_hessian(model, params, x), rtol=1e-10, atol=1e-12
    )


def test_flax_state_collections_are_never_taken_for_parameters():
    model, variables = _flax_batch_norm_mlp(train=False)
    x = _inputs()
    tx = ng.natural_gradient(model, 0.1)
    with pytest.raises(ValueError, match=r"'batch_stats' collection.*variables\['params'\]"):
        ng.fisher(model, variables, x)
    with pytest.raises(ValueError, match="'batch_stats' collection"):
        tx.init(variables)
    state = tx.init(variables["params"])
    with pytest.raises(ValueError, match="'batch_stats' collection"):
        tx.update(variables, state, variables, inputs=x)
