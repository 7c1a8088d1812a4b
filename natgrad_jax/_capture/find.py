"""``capture``: which parameter leaves are layers whose per-example gradients follow
from (a, g), and why the others are not."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from natgrad_jax._cache import FifoCache
from natgrad_jax._capture.layer import Capture, Layer
from natgrad_jax._capture.uses import Use
from natgrad_jax._capture.walk import trace_uses
from natgrad_jax._eager import is_traced
from natgrad_jax._independence import abstract_leaf, added_examples, grown_batch

PyTree = Any


def _example_axis(shape, grown_shape, added):
    """The axis that grew by the ``added`` examples, if it is the only one that changed."""
    pairs = list(zip(shape, grown_shape, strict=True))
    changed = [k for k, (a, b) in enumerate(pairs) if a + added == b]
    unchanged = all(a == b for a, b in pairs if a + added != b)
    return changed[0] if len(changed) == 1 and unchanged else None


def _signature(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((s.shape, str(s.dtype), s.weak_type) for s in map(abstract_leaf, leaves))


def capture(apply_fn, params: PyTree, inputs: PyTree) -> Capture:
    """Finds the parameter leaves of ``apply_fn`` whose per-example gradients come from (a, g).

    The analysis depends only on shapes and dtypes and is cached on them (and on the
    default matmul precision, which the traced matmuls record, and the context's mesh,
    whose placements ``jax.sharding.reshard`` records).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` on a batch.
      params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
      inputs: a batch of inputs (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      A ``Capture``; ``ng.describe`` prints what was found.
    """
    precision = jax.config.jax_default_matmul_precision
    mesh = jax.sharding.get_abstract_mesh()
    key = (apply_fn, _signature(params), _signature(inputs), precision, mesh)
    if key in _CAPTURED:
        return _CAPTURED[key]
    found = _analyse_capture(apply_fn, *jax.tree.map(abstract_leaf, (params, inputs)))
    # An apply_fn that closes over traced values (frozen leaves inside jit) holds them
    # in the jaxpr: valid in this trace only, so not kept.
    if not is_traced(found.jaxpr.consts):
        _CAPTURED.put(key, found)
    return found


_CAPTURED = FifoCache(size=64)


def _conv_batch_axes(use) -> tuple[int, int]:
    """(input, output) axes a convolution treats as its batch."""
    dimension_numbers = use.primitive_params["dimension_numbers"]
    return dimension_numbers.lhs_spec[0], dimension_numbers.out_spec[0]


def _analyse_capture(apply_fn, params, inputs) -> Capture:
    leaves_with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
    names = tuple(jax.tree_util.keystr(path) or "params" for path, _ in leaves_with_paths)
    shapes = tuple(tuple(np.shape(leaf)) for _, leaf in leaves_with_paths)
    closed, uses = trace_uses(apply_fn, params, inputs)
    added, grown_failure = added_examples(), None
    try:
        _, grown = trace_uses(apply_fn, params, grown_batch(inputs))
    except Exception as error:  # a model that only runs at one batch size: nothing is captured
        grown = []
        grown_failure = f"apply_fn fails on N + {added} examples ({type(error).__name__})"
    grown_by_eqn = {(u.eqn, u.leaf): u for u in grown if u.eqn is not None}

    by_leaf: dict[int, list[Use]] = {}
    for use in uses:
        by_leaf.setdefault(use.leaf, []).append(use)
    layers, reasons = [], {}
    for leaf in range(len(shapes)):
        uses_of_leaf = by_leaf.get(leaf, [])
        found = _layer_of_leaf(
            leaf, uses_of_leaf, (grown_by_eqn, added), shapes[leaf], grown_failure
        )
        if isinstance(found, Layer):
            layers.append(found)
        else:
            reasons[leaf] = found
    fallback = tuple(sorted(reasons))
    return Capture(tuple(layers), fallback, names, shapes, closed, reasons)


def _unbroadcast(use: Use, leaf_shape) -> Use:
    """A bias or scale broadcast to the whole batch (``jnp.broadcast_to``, as haiku does)
    seen before its broadcast: the operand keeps the broadcast axes with size one."""
    chain = list(use.chain)
    if use.kind not in ("add", "mul") or not chain or chain[-1][0].name != "broadcast_in_dim":
        return use
    shape = tuple(leaf_shape)
    for primitive, params in chain[:-1]:
        struct = jax.ShapeDtypeStruct(shape, jnp.float32)
        shape = jax.eval_shape(lambda a, p=primitive, q=params: p.bind(a, **q), struct).shape
    _, params = chain.pop()
    if chain and chain[-1][0].name == "broadcast_in_dim":
        return use  # two broadcasts in a row: left to the fallback
    dims = tuple(params["broadcast_dimensions"])
    kept = tuple(shape[dims.index(d)] if d in dims else 1 for d in range(len(params["shape"])))
    operand = jax.ShapeDtypeStruct(kept, use.operand_aval.dtype)
    return dataclasses.replace(use, chain=tuple(chain), operand_aval=operand)


def _layer_of_leaf(leaf, uses, grown, leaf_shape, grown_failure=None) -> Layer | str:
    """The captured layer of ``leaf``, or why it has none. ``grown``: the uses traced with
    more examples, by (equation, leaf), and how many more; ``grown_failure``: why the
    model could not be traced so, if it could not."""
    grown_by_eqn, added = grown
    if not uses:
        return "not used by apply_fn"
    if len(uses) != 1:
        return f"used by {len(uses)} operations (tied or reused)"
    use = _unbroadcast(uses[0], leaf_shape)
    if use.factor is not None and use.kind != "mul":
        return f"multiplied by a computed value before its {use.kind}"
    if use.eqn is None:
        if use.primitive_name == "output":
            return "returned by apply_fn itself"
        return f"used by {use.primitive_name}, which capture does not read"
    twin = grown_by_eqn.get((use.eqn, leaf))
    if twin is None or twin.kind != use.kind:
        return grown_failure or "its layer changes with the batch size"
    twin = _unbroadcast(twin, leaf_shape)
    output_axis = _example_axis(use.output_aval.shape, twin.output_aval.shape, added)
    input_axis = None
    no_example_axis = "its layer has no axis that indexes the examples"
    if use.kind in ("dot", "conv", "embed"):
        input_axis = _example_axis(use.input_aval.shape, twin.input_aval.shape, added)
        if input_axis is None:
            return no_example_axis
        if use.kind == "conv" and (input_axis, output_axis) != _conv_batch_axes(use):
            return "its convolution's batch axis is not the examples' axis"
    elif len(use.operand_aval.shape) != len(use.output_aval.shape):
        return f"its {use.kind} operand has fewer axes than its output (a broadcast scalar)"
    elif use.operand_aval.shape != twin.operand_aval.shape or (
        output_axis is not None and use.operand_aval.shape[output_axis] != 1
    ):
        return f"its {use.kind} operand is not the same for every example"
    elif use.kind == "mul":
        input_axis = output_axis
        if output_axis is None or use.input_aval.shape[output_axis] == 1:
            return "it multiplies a value that is the same for every example"
    if output_axis is None:
        return no_example_axis
    is_conv = use.kind in ("conv", "embed")  # evaluated again through their primitive
    return Layer(
        kind=use.kind,
        leaf=leaf,
        eqn=use.eqn,
        param_operand=use.param_operand,
        dimension_numbers=use.dimension_numbers,
        chain=use.chain,
        input_example_axis=input_axis,
        output_example_axis=output_axis,
        input_shape=None if use.input_aval is None else tuple(use.input_aval.shape),
        output_shape=tuple(use.output_aval.shape),
        output_dtype=use.output_aval.dtype,
        operand_shape=tuple(use.operand_aval.shape),
        primitive=use.primitive if is_conv else None,
        primitive_params=use.primitive_params if is_conv else None,
        scan_lengths=use.scan_lengths,
        constant_factor=constant_factor(uses[0]),
        part=use.part,
        follows=use.follows,
    )


def constant_factor(use: Use) -> tuple | None:
    if use.factor is None:
        return None
    eqn, operand, chain_length = use.factor
    return eqn, operand, use.chain[chain_length:]
