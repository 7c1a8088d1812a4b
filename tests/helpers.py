"""Small models shared by the tests, written as plain JAX pytrees."""

import dataclasses
import importlib
import itertools
import pathlib
import sys

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng
from natgrad_jax import _vectors as vectors
from natgrad_jax._capture import Capture, Layer, operand_of, probed_forward


def optional_import(name):
    """The module ``name``, or a skip naming the reason if importing it fails in any way
    (absent, or installed but broken on this jax: pytest.importorskip only catches
    ImportError)."""
    try:
        return importlib.import_module(name)
    except Exception as error:
        pytest.skip(
            f"{name} is not usable here: {type(error).__name__}: {error}",
            allow_module_level=True,
        )


BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"


def benchmark_module(name: str):
    """The module of ``benchmarks/<name>.py`` (its models, data and ``main``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def as_leaves(params, flat) -> tuple:
    """A flat (P,) vector as the transform holds vectors: one array per leaf, in its shape."""
    return vectors.ravel(jax.tree.leaves(params))[1](jnp.asarray(flat))


def as_flat(leaves) -> np.ndarray:
    """The flat (P,) vector of one held leaf by leaf."""
    return np.asarray(ravel_pytree(leaves)[0])


def init_mlp(key, sizes, dtype=jnp.float64):
    """Parameters of a tanh MLP as a list of {"w", "b"} dicts."""
    params = []
    keys = jax.random.split(key, len(sizes) - 1)
    for k, (fan_in, fan_out) in zip(keys, itertools.pairwise(sizes), strict=True):
        w = jax.random.normal(k, (fan_in, fan_out), dtype) / jnp.sqrt(fan_in)
        b = 0.1 * jnp.ones((fan_out,), dtype)
        params.append({"w": w, "b": b})
    return params


def dense_output_fisher(likelihood, outputs):
    """F_out as a dense matrix: ``fisher_product`` applied to every basis vector."""
    flat, unravel = ravel_pytree(outputs)

    def column(e):
        return ravel_pytree(likelihood.fisher_product(outputs, unravel(e)))[0]

    return jax.vmap(column)(jnp.eye(flat.size, dtype=flat.dtype))


def mlp(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def heteroscedastic_mlp(params, x):
    """Outputs (mean, log_scale) for ng.Gaussian(): the last layer is split in two."""
    out = mlp(params, x)
    half = out.shape[-1] // 2
    return out[:, :half], 0.3 * out[:, half:]


def squeeze_mlp(params, x):
    """A scalar output per example, for Bernoulli and Poisson likelihoods."""
    return mlp(params, x)[:, 0]


def mlp_models():
    """(name, model, output size) for every likelihood family, on a small MLP."""
    return [
        ("categorical", ng.Model(mlp, ng.Categorical()), 3),
        ("bernoulli", ng.Model(squeeze_mlp, ng.Bernoulli()), 1),
        ("gaussian", ng.Model(mlp, ng.Gaussian(scale=0.7)), 2),
        ("heteroscedastic", ng.Model(heteroscedastic_mlp, ng.Gaussian()), 4),
        ("poisson", ng.Model(squeeze_mlp, ng.Poisson()), 1),
    ]


def mlp_problem(name, num_examples=6, in_size=3, hidden=4, seed=0):
    """(model, params, inputs, targets) with targets sampled from the model itself."""
    model, out_size = {n: (m, k) for n, m, k in mlp_models()}[name]
    k_params, k_inputs, k_targets = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = init_mlp(k_params, [in_size, hidden, out_size])
    inputs = jax.random.normal(k_inputs, (num_examples, in_size))
    targets = model.likelihood.sample(k_targets, model.apply_fn(params, inputs))
    return model, params, inputs, targets


MLP_NAMES = [name for name, _, _ in mlp_models()]


def assert_resumes_identically(model, params, x, y, save_and_restore, steps=4):
    """Training interrupted halfway, saved, restored and resumed ends where an
    uninterrupted run ends, to the last bit (Monte-Carlo keys and EMA in the state)."""
    optimizer = ng.natural_gradient(model, 0.5, fisher="monte_carlo", solver="kronecker", decay=0.5)

    @jax.jit
    def step(params, state):
        g = jax.grad(model.nll)(params, x, y)
        updates, state = optimizer.update(g, state, params, inputs=x, targets=y)
        return optax.apply_updates(params, updates), state

    def run(params, state, count):
        for _ in range(count):
            params, state = step(params, state)
        return params, state

    uninterrupted, _ = run(params, optimizer.init(params), steps)
    halfway = run(params, optimizer.init(params), steps // 2)
    restored = save_and_restore(halfway)
    assert jax.tree.structure(restored) == jax.tree.structure(halfway)
    resumed, _ = run(*restored, steps - steps // 2)
    np.testing.assert_array_equal(ravel_pytree(resumed)[0], ravel_pytree(uninterrupted)[0])


def first_step_key(seed):
    """The key of the Monte-Carlo labels at a transform's first update with ``seed``."""
    return jax.random.split(jax.random.PRNGKey(seed))[1]


def leaf_slices(params) -> list[slice]:
    """Each leaf's range of the flat parameter vector (ravel_pytree order)."""
    edges = np.cumsum([0] + [leaf.size for leaf in jax.tree.leaves(params)])
    return [slice(lo, hi) for lo, hi in itertools.pairwise(edges)]


def leaf_blocks(matrix, params):
    """``matrix`` (ravel_pytree order) with everything off the per-leaf diagonal blocks zeroed."""
    out = np.zeros_like(matrix)
    for leaf in leaf_slices(params):
        out[leaf, leaf] = matrix[leaf, leaf]
    return out


def assert_ekfac_is_exact_in_its_eigenbasis(leaves, fisher, params, gradient, update, damping):
    """For each leaf's EKFAC state: its basis U = U_left ⊗ U_right is orthogonal (the leaf
    is factored), its scalings are diag(Uᵀ F_ℓ U) for the leaf's block F_ℓ of ``fisher``,
    and its piece of the flat ``update`` solves (U diag(s) Uᵀ + λI) d = g."""
    for leaf, where in zip(leaves, leaf_slices(params), strict=True):
        basis = np.kron(leaf.left_basis, leaf.right_basis)
        np.testing.assert_allclose(basis.T @ basis, np.eye(len(basis)), atol=1e-10)
        scaling = np.asarray(leaf.scaling).ravel()
        block = np.asarray(fisher)[where, where]
        np.testing.assert_allclose(scaling, np.diag(basis.T @ block @ basis), rtol=1e-9, atol=1e-12)
        approx = basis @ np.diag(scaling) @ basis.T + damping * np.eye(len(basis))
        np.testing.assert_allclose(
            update[where], np.linalg.solve(approx, gradient[where]), rtol=1e-8
        )


def vmap_gradients(apply, params, x, cotangent):
    """Per-example pullbacks of ``cotangent`` through ``apply``, one example at a time."""

    def one(xi, ci):
        _, pullback = jax.vjp(lambda p: apply(p, xi[None]), params)
        return pullback(ci[None])[0]

    return jax.vmap(one)(x, cotangent)


def layer_inputs_and_gradients(apply_fn, captured: Capture, params, inputs, cotangent_rows):
    """One forward and one (row-batched) backward pass: (outputs, a per layer, g per layer).

    ``cotangent_rows`` is a pytree shaped like the outputs with a leading axis of R rows;
    g[k] has a leading R axis, then the shape of layer k's output.
    """
    forward = probed_forward(apply_fn, captured, params, inputs)
    return forward.outputs, forward.layer_inputs, forward.layer_gradients(cotangent_rows)


def per_example_gradient(layer: Layer, activation, gradient, leaf_value):
    """The (N, *leaf.shape) per-example gradients of one captured leaf from its a and g.

    Exactly the vjp of the layer restricted to each example: checks capture against
    ``jax.vmap`` of ``jax.grad`` (the library uses a and g directly, never this).
    """

    def operand_from_leaf(leaf):
        return operand_of(layer, leaf)

    if layer.scan_lengths:  # a sum over the steps of the outermost scan
        step_layer = dataclasses.replace(layer, scan_lengths=layer.scan_lengths[1:])
        per_step = jax.vmap(
            lambda a, g: per_example_gradient(step_layer, a, g, leaf_value), in_axes=(0, 0)
        )(activation, gradient)
        return jnp.sum(per_step, axis=0)
    operand, operand_pullback = jax.vjp(operand_from_leaf, leaf_value)

    def one_example(x, g):
        g = jnp.expand_dims(g, layer.output_example_axis)
        dtype = g.dtype if x is None else jnp.result_type(x, g)
        if layer.kind != "add":
            x = jnp.expand_dims(x, layer.input_example_axis)

        def apply(w):
            if layer.kind == "add":
                return jnp.broadcast_to(w, g.shape)
            if layer.kind == "mul":
                return jnp.broadcast_to(w * x, g.shape)
            if layer.kind == "conv":
                return layer.primitive.bind(x, w, **layer.primitive_params)
            if layer.kind == "embed":
                return layer.primitive.bind(w, x, **layer.primitive_params)
            lhs, rhs = (w, x) if layer.param_operand == 0 else (x, w)
            return jax.lax.dot_general(lhs, rhs, layer.dimension_numbers)

        _, pullback = jax.vjp(apply, operand.astype(dtype))
        (grad_operand,) = pullback(g.astype(dtype))
        return operand_pullback(grad_operand.astype(operand.dtype))[0]

    if layer.kind == "add":
        return jax.vmap(lambda g: one_example(None, g), in_axes=layer.output_example_axis)(gradient)
    return jax.vmap(one_example, in_axes=(layer.input_example_axis, layer.output_example_axis))(
        activation, gradient
    )


def assert_capture_rebuilds_vmap_gradients(apply, captured, params, x, cotangent, **tolerance):
    """Per-example gradients rebuilt from the captured (a, g) equal ``vmap_gradients``,
    in the parameters' dtype."""
    _, activations, gradients = jax.jit(
        lambda p, x, c: layer_inputs_and_gradients(apply, captured, p, x, c[None])
    )(params, x, cotangent)
    expected = jax.tree.leaves(vmap_gradients(apply, params, x, cotangent))
    leaves = jax.tree.leaves(params)
    for layer, a, g in zip(captured.layers, activations, gradients, strict=True):
        got = per_example_gradient(layer, a, g[0], leaves[layer.leaf])
        assert got.dtype == leaves[layer.leaf].dtype
        np.testing.assert_allclose(got, expected[layer.leaf], **tolerance)


def classifier_nll_before_and_after(make_optimizer, steps, keys=None):
    """(start, end) NLL of a 4-16-3 tanh MLP trained by ``make_optimizer(model)`` for
    ``steps`` full-batch jitted steps on a fixed, learnable 3-class problem; ``keys``:
    the (parameters, inputs) PRNG keys (default: both split from key 0)."""
    key_params, key_x = keys if keys is not None else jax.random.split(jax.random.PRNGKey(0))
    params = init_mlp(key_params, [4, 16, 3])
    x = jax.random.normal(key_x, (128, 4))
    y = jnp.argmax(x[:, :3] + 0.5 * x[:, 3:], axis=1)
    model = ng.Model(mlp, ng.Categorical())
    optimizer = make_optimizer(model)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        g = jax.grad(model.nll)(params, x, y)
        updates, state = optimizer.update(g, state, params, inputs=x)
        return optax.apply_updates(params, updates), state

    start = float(model.nll(params, x, y))
    for _ in range(steps):
        params, state = step(params, state)
    return start, float(model.nll(params, x, y))


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _sub_jaxprs(item)


def equations(jaxpr, primitive_name: str) -> list:
    """Every equation of ``primitive_name`` in ``jaxpr`` and its sub-jaxprs (jit, cond,
    scan, ...), in order."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive_name:
            found.append(eqn)
        for value in eqn.params.values():
            for inner in _sub_jaxprs(value):
                found.extend(equations(inner, primitive_name))
    return found
