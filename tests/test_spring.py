"""SPRING momentum of the Woodbury solver against its closed form (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng

N, D_IN, HIDDEN = 5, 3, 4


def _apply(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def _problem():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {
        "w1": jax.random.normal(keys[0], (D_IN, HIDDEN), jnp.float64),
        "w2": jax.random.normal(keys[1], (HIDDEN, 2), jnp.float64),
    }
    batches = jax.random.normal(keys[2], (3, N, D_IN), jnp.float64)
    return ng.Model(_apply, ng.Gaussian(scale=1.0)), params, batches


def _fisher(params, x):
    """JᵀJ/N for unit-variance Gaussian outputs, from a dense Jacobian (the definition)."""
    flat, unravel = ravel_pytree(params)
    jacobian = jax.jacobian(lambda f: _apply(unravel(f), x).reshape(-1))(flat)
    return jacobian.T @ jacobian / x.shape[0]


def _gradients(params):
    """Arbitrary incoming vectors (not in the rows' span), one per step."""
    size = ravel_pytree(params)[0].size
    return jax.random.normal(jax.random.PRNGKey(7), (3, size), jnp.float64)


@pytest.mark.parametrize("capture", [True, False])
@pytest.mark.parametrize("momentum, damping", [(0.9, 1e-3), (0.5, 1.0), (0.0, 1e-2)])
def test_spring_steps_equal_the_closed_form(capture, momentum, damping):
    model, params, batches = _problem()
    flat, unravel = ravel_pytree(params)
    tx = ng.scale_by_natural_gradient(
        model, damping=damping, solver=ng.Woodbury(capture=capture, spring=momentum)
    )
    state = tx.init(params)
    previous = np.zeros(flat.size)
    for x, g in zip(batches, _gradients(params), strict=True):
        d, state = tx.update(unravel(g), state, params, inputs=x)
        # argmin ½ dᵀFd − gᵀd + ½ λ ‖d − μ d₋‖²
        fisher = _fisher(params, x)
        want = np.linalg.solve(
            fisher + damping * np.eye(flat.size), g + damping * momentum * previous
        )
        np.testing.assert_allclose(ravel_pytree(d)[0], want, rtol=1e-8, atol=1e-10)
        previous = want


def test_zero_momentum_is_the_plain_woodbury_solve():
    model, params, batches = _problem()
    unravel = ravel_pytree(params)[1]
    spring = ng.scale_by_natural_gradient(model, damping=1e-2, solver=ng.Woodbury(spring=0.0))
    plain = ng.scale_by_natural_gradient(model, damping=1e-2, solver="woodbury")
    g = unravel(_gradients(params)[0])
    got, _ = spring.update(g, spring.init(params), params, inputs=batches[0])
    want, _ = plain.update(g, plain.init(params), params, inputs=batches[0])
    np.testing.assert_array_equal(ravel_pytree(got)[0], ravel_pytree(want)[0])


def test_spring_trust_region_uses_the_measured_quadratic():
    """With momentum d ≠ (F+λI)⁻¹g, so gᵀd is not the step's KL; the bound must hold anyway."""
    model, params, batches = _problem()
    flat, unravel = ravel_pytree(params)
    damping, max_kl = 1e-3, 1e-4
    tx = ng.scale_by_natural_gradient(
        model, damping=damping, max_kl=max_kl, solver=ng.Woodbury(spring=0.9)
    )
    state = tx.init(params)
    for x, g in zip(batches, _gradients(params), strict=True):
        d, state = tx.update(unravel(g), state, params, inputs=x)
        d = ravel_pytree(d)[0]
        quadratic = d @ (_fisher(params, x) + damping * np.eye(flat.size)) @ d
        assert 0.5 * quadratic <= max_kl * (1 + 1e-9)
        np.testing.assert_allclose(0.5 * quadratic, max_kl, rtol=1e-9)  # active here


def test_momentum_outside_its_range_is_refused():
    with pytest.raises(ValueError, match=r"spring.*\[0, 1\)"):
        ng.Woodbury(spring=1.0)
    with pytest.raises(ValueError, match=r"spring.*\[0, 1\)"):
        ng.Woodbury(momentum=-0.1)


def test_the_earlier_name_momentum_still_sets_spring():
    assert ng.Woodbury(momentum=0.9) == ng.Woodbury(spring=0.9)
    assert ng.Woodbury(momentum=0.9).spring == 0.9
