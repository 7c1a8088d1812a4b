r"""The one assumption of every per-example Fisher: examples do not interact.

The Fisher of a batch is the mean of per-example terms, F = 1/N Σᵢ Jᵢᵀ F_out Jᵢ, where Jᵢ
is the Jacobian of example i's outputs. That needs example i's outputs to depend on
example i's input alone. Batch normalisation in training mode (statistics of the batch)
breaks it: every output depends on every input, and the per-example Fisher, the KL
Hessian and the capture-based solvers then all describe different matrices.

``check_independent_examples`` tests the assumption once per model and shapes: a
forward-mode derivative with respect to example 0's input, at random parameters and
inputs, must leave the outputs of the other examples unchanged. It is exact for
independent examples (their tangents are exact zeros) and cheap (one jvp, cached).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from natgrad_jax._cache import FifoCache
from natgrad_jax._eager import is_traced
from natgrad_jax._jaxpr import scan_counts

PyTree = Any

INTERACTING_MSG = (
    "The model's outputs for one example depend on the inputs of other examples: "
    "changing example 0's input changed the outputs of examples {examples}. The Fisher "
    "(and every solver of natgrad_jax) is a mean of per-example terms and needs "
    "independent examples. This is what batch normalisation in training mode does (batch "
    "statistics); measure the curvature with the running statistics instead (flax: "
    "BatchNorm(use_running_average=True); equinox: inference mode), or use a per-example "
    "normalisation (LayerNorm, GroupNorm)."
)
_RELATIVE_TOLERANCE = 1e-6


def abstract_leaf(leaf) -> jax.ShapeDtypeStruct:
    """Shape, dtype and weak type of an array, a tracer, a struct or a Python number."""
    weak_type = bool(getattr(leaf, "weak_type", False))
    return jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf), weak_type=weak_type)


def added_examples() -> int:
    """How many examples ``grown_batch`` adds: one, or under a mesh (``jax.set_mesh``)
    its device count, so that a batch the model splits over some of the mesh's axes (an
    ``out_sharding`` naming them) still splits evenly."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.size


def grown_batch(inputs: PyTree) -> PyTree:
    """The abstract ``inputs`` with ``added_examples()`` more (axis 0 of every leaf)."""
    extra = added_examples()

    def grow(leaf):
        struct = abstract_leaf(leaf)
        shape = (struct.shape[0] + extra, *struct.shape[1:])
        return jax.ShapeDtypeStruct(shape, struct.dtype, weak_type=struct.weak_type)

    return jax.tree.map(grow, inputs)


def one_example_failure(apply_fn, params: PyTree, inputs: PyTree) -> str | None:
    """Why ``apply_fn`` cannot run on one example (a fixed batch size, placements that
    split the examples over a mesh's devices), or None where it can. Shapes only: the
    per-example gradients of the dense and block-diagonal solvers, and of every leaf the
    capture cannot read, evaluate the model so."""
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *np.shape(a)[1:]), a.dtype), inputs)
    try:
        jax.eval_shape(apply_fn, params, one)
    except Exception as error:  # the model's own error, named by its type
        return type(error).__name__
    return None


def _probe_value(leaf, key):
    """A random array for a floating leaf; the leaf itself (or zeros) otherwise."""
    dtype = jnp.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.floating):
        return 0.5 * jax.random.normal(key, np.shape(leaf), dtype)
    if is_traced(leaf) or isinstance(leaf, jax.ShapeDtypeStruct):
        return jnp.zeros(np.shape(leaf), dtype)
    return jnp.asarray(leaf)


def _random_like(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves)) if leaves else []
    values = [_probe_value(a, k) for a, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, values)


def _first_example_tangent(inputs, key):
    """Random tangents on example 0 of every floating input leaf, zeros elsewhere."""

    def tangent(leaf, k):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return np.zeros(leaf.shape, jax.dtypes.float0)
        mask = (jnp.arange(leaf.shape[0]) == 0).reshape(-1, *([1] * (leaf.ndim - 1)))
        return jnp.where(mask, jax.random.normal(k, leaf.shape, leaf.dtype), 0.0)

    leaves, treedef = jax.tree.flatten(inputs)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [tangent(a, k) for a, k in zip(leaves, keys, strict=True)])


def _is_array(leaf) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic | float | int | complex) or (
        isinstance(leaf, jax.ShapeDtypeStruct)
    )


def _split_static(params):
    """(array leaves, rebuild): non-array leaves (equinox's functions) stay fixed."""
    leaves, treedef = jax.tree.flatten(params)
    arrays = [leaf for leaf in leaves if _is_array(leaf)]

    def rebuild(array_leaves):
        it = iter(array_leaves)
        return jax.tree.unflatten(treedef, [next(it) if _is_array(a) else a for a in leaves])

    return arrays, rebuild


def interacting_examples(apply_fn, params: PyTree, inputs: PyTree) -> tuple[int, ...]:
    """The examples other than 0 whose outputs move with example 0's input.

    Empty when the examples are independent, and when the check cannot run: a batch of
    one, no floating inputs, or an ``apply_fn`` that closes over traced values.
    """
    input_leaves = jax.tree.leaves(inputs)
    num_examples = np.shape(input_leaves[0])[0] if input_leaves and np.ndim(input_leaves[0]) else 0
    has_float = any(jnp.issubdtype(jnp.result_type(a), jnp.floating) for a in input_leaves)
    if num_examples < 2 or not has_float:
        return ()
    param_arrays, rebuild = _split_static(params)
    try:
        trace = jax.make_jaxpr(lambda p, x: apply_fn(rebuild(p), x))
        closed = trace(*jax.tree.map(abstract_leaf, (param_arrays, inputs)))
        grown = trace(jax.tree.map(abstract_leaf, param_arrays), grown_batch(inputs))
    except Exception:  # the computation that follows raises its own, clearer error
        return ()
    if is_traced(closed.consts) or not _reduces_over_examples(closed, grown, len(param_arrays)):
        return ()

    def moved_outputs(param_values, input_values, tangents):
        def outputs(input_values):
            return jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *param_values, *input_values)

        return jax.jvp(outputs, (input_values,), (tangents,))[1]

    with jax.ensure_compile_time_eval():
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        param_values = _random_like(param_arrays, keys[0])
        input_values = jax.tree.leaves(_random_like(inputs, keys[1]))
        tangents = jax.tree.leaves(_first_example_tangent(input_values, keys[2]))
        moved = jax.jit(moved_outputs)(param_values, input_values, tangents)
    interacting: set[int] = set()
    for tangent in map(np.asarray, moved):
        if tangent.ndim == 0 or tangent.shape[0] != num_examples:
            continue
        if not np.all(np.isfinite(tangent)):
            continue
        own = np.max(np.abs(tangent[0]), initial=0.0)
        others = np.max(np.abs(tangent[1:]).reshape(num_examples - 1, -1), axis=1, initial=0.0)
        threshold = _RELATIVE_TOLERANCE * max(own, float(jnp.finfo(tangent.dtype).tiny))
        interacting.update(1 + int(k) for k in np.flatnonzero(others > threshold))
    return tuple(sorted(interacting))


def _reduces_over_examples(closed, grown, num_params: int) -> bool:
    """Whether some value computed from the inputs has no axis that follows the batch
    size (traced with N and more examples, ``grown_batch``): a statistic of the batch.
    Only then is the numerical check run; independent models (no such value) skip its
    compilation."""
    inputs_of = set(closed.jaxpr.invars[num_params:])
    return _walk(closed.jaxpr, grown.jaxpr, inputs_of)


def inner_tainted(eqn, inner, tainted) -> set:
    """The variables of a nested jaxpr (jit, scan body) that carry the inputs."""
    outer = [None if isinstance(v, jax.extend.core.Literal) else v for v in eqn.invars]
    found = {v for v, o in zip(inner.invars, outer, strict=False) if o is not None and o in tainted}
    if eqn.primitive.name == "scan":  # the carry may pick up the inputs in a later step
        num_consts, num_carry = scan_counts(eqn)
        found |= set(inner.invars[num_consts : num_consts + num_carry])
    return found


def _walk(jaxpr, grown, tainted) -> bool:
    if len(jaxpr.eqns) != len(grown.eqns):
        return True  # the program changes with the batch size: check numerically
    for eqn, twin in zip(jaxpr.eqns, grown.eqns, strict=True):
        if not any(v in tainted for v in eqn.invars if not isinstance(v, jax.extend.core.Literal)):
            continue
        for name in ("jaxpr", "call_jaxpr"):
            if eqn.params.get(name) is not None:
                inner, inner_twin = (
                    getattr(e.params[name], "jaxpr", e.params[name]) for e in (eqn, twin)
                )
                if _walk(inner, inner_twin, inner_tainted(eqn, inner, tainted)):
                    return True
        for var, twin_var in zip(eqn.outvars, twin.outvars, strict=True):
            tainted.add(var)
            if var.aval.shape == twin_var.aval.shape:
                return True
    return False


def check_independent_examples(apply_fn, params: PyTree, inputs: PyTree) -> None:
    """Raises if the outputs of one example depend on another's input (cached per shapes)."""
    try:
        key = (apply_fn, jax.tree.structure((params, inputs)), _shapes(params), _shapes(inputs))
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _CHECKED:
        return
    examples = interacting_examples(apply_fn, params, inputs)
    if examples:
        shown = ", ".join(map(str, examples[:5])) + (", …" if len(examples) > 5 else "")
        raise ValueError(INTERACTING_MSG.format(examples=shown))
    if key is not None:
        _CHECKED.put(key, True)


def _shapes(tree):
    """Shapes and dtypes of the array leaves; the other leaves themselves."""
    return tuple(
        (np.shape(a), str(jnp.result_type(a))) if _is_array(a) else a for a in jax.tree.leaves(tree)
    )


_CHECKED = FifoCache(size=64)
