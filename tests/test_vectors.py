"""Vectors held leaf by leaf against the same algebra on one flat (P,) array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from natgrad_jax import _vectors as vectors


def _vector(seed, shapes=((3, 4), (4,), (2, 3, 2))):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=shape)) for shape in shapes)


def _flat(v):
    return np.asarray(ravel_pytree(v)[0])


def test_algebra_equals_the_flat_vectors():
    u, v, w = _vector(0), _vector(1), _vector(2)
    np.testing.assert_allclose(vectors.vdot(u, v), _flat(u) @ _flat(v), rtol=1e-6)
    np.testing.assert_allclose(vectors.norm(u), np.linalg.norm(_flat(u)), rtol=1e-6)
    np.testing.assert_allclose(_flat(vectors.add(u, v)), _flat(u) + _flat(v))
    np.testing.assert_allclose(_flat(vectors.subtract(u, v)), _flat(u) - _flat(v))
    np.testing.assert_allclose(_flat(vectors.scale(-2.5, u)), -2.5 * _flat(u), rtol=1e-6)
    np.testing.assert_allclose(
        _flat(vectors.add_scaled(u, 3.0, v)), _flat(u) + 3.0 * _flat(v), rtol=1e-6
    )
    np.testing.assert_allclose(
        _flat(vectors.combination([2.0, -1.0, 0.5], [u, v, w])),
        2.0 * _flat(u) - _flat(v) + 0.5 * _flat(w),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(_flat(vectors.where(False, u, v)), _flat(v))
    np.testing.assert_array_equal(_flat(vectors.where(True, u, 0.0)), _flat(u))
    np.testing.assert_array_equal(_flat(vectors.where(False, u, 0.0)), 0.0)


@pytest.mark.parametrize(("rows", "columns"), [(1, 1), (2, 2), (3, 1)])
def test_inner_products_equal_numpy(rows, columns):
    """On vectors held leaf by leaf and on plain arrays (the rows of a 2-D array)."""
    span, others = [_vector(k) for k in range(rows)], [_vector(10 + k) for k in range(columns)]
    expected = np.stack([_flat(u) for u in span]) @ np.stack([_flat(v) for v in others]).T
    products = vectors.inner_products(span, others)
    assert products.shape == (rows, columns)
    np.testing.assert_allclose(products, expected, rtol=1e-5)
    flat_rows = jnp.asarray(np.stack([_flat(u) for u in span]))
    np.testing.assert_allclose(
        vectors.inner_products(flat_rows, [_flat(v) for v in others]), expected, rtol=1e-5
    )


def test_all_finite_sees_every_leaf():
    u = _vector(0)
    assert bool(vectors.all_finite(u))
    for k in range(len(u)):
        broken = list(u)
        broken[k] = broken[k].at[(0,) * broken[k].ndim].set(jnp.nan)
        assert not bool(vectors.all_finite(tuple(broken)))


def test_ravel_is_ravel_pytree_and_unravel_its_inverse():
    u = _vector(3)
    flat, unravel = vectors.ravel(u)
    np.testing.assert_array_equal(flat, _flat(u))
    back = unravel(flat)
    assert [leaf.shape for leaf in back] == [leaf.shape for leaf in u]
    jax.tree.map(np.testing.assert_array_equal, back, u)


def test_moved_adds_the_step_in_each_parameter_dtype():
    params = {"w": jnp.ones((2, 2), jnp.bfloat16), "b": jnp.zeros(2, jnp.float32)}
    step = (jnp.full(2, 0.5, jnp.float64), jnp.full((2, 2), 0.25, jnp.float64))  # b, w order
    moved = vectors.moved(params, step)
    assert moved["w"].dtype == jnp.bfloat16 and moved["b"].dtype == jnp.float32
    np.testing.assert_allclose(moved["w"].astype(float), 1.25)
    np.testing.assert_allclose(moved["b"], 0.5)
