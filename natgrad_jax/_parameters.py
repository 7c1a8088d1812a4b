"""Which leaves of a parameter pytree the Fisher is over: its floating-point arrays.

A parameter pytree may hold more than trainable weights: integer counters or indices,
boolean masks, or, in an equinox module, activation functions. The Fisher is taken with
respect to the **trainable** leaves only — arrays (or Python scalars) of a floating or
complex dtype — and every other leaf is a constant of the model. Dense matrices are laid
out in ``ravel_pytree`` order of the trainable leaves; the transform leaves the update of
every other leaf as it came in (a ``float0`` gradient of an integer leaf, from
``jax.grad(..., allow_int=True)``, becomes a zero of the leaf's own dtype, so that
``optax.apply_updates`` keeps the leaf and its dtype).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def is_trainable(leaf: Any) -> bool:
    """Whether the Fisher is taken with respect to ``leaf``: a floating or complex array."""
    if not isinstance(leaf, jax.Array | np.ndarray | np.generic | float | complex):
        return False
    return bool(jnp.issubdtype(jnp.result_type(leaf), jnp.inexact))


def _is_none(value: Any) -> bool:
    return value is None


def partition(tree: PyTree) -> tuple[PyTree, PyTree]:
    """``(trainable, frozen)``: ``tree`` with ``None`` in place of the other part's leaves."""
    trainable = jax.tree.map(lambda leaf: leaf if is_trainable(leaf) else None, tree)
    frozen = jax.tree.map(lambda leaf: None if is_trainable(leaf) else leaf, tree)
    return trainable, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
    """The inverse of ``partition``."""
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=_is_none)


def _apply_with_frozen(apply_fn, frozen, trainable, inputs):
    return apply_fn(combine(trainable, frozen), inputs)


def with_frozen(model, frozen: PyTree):
    """``model`` as a function of the trainable leaves alone, ``frozen`` held fixed."""
    if not jax.tree.leaves(frozen):
        return model
    apply_fn = functools.partial(_apply_with_frozen, model.apply_fn, frozen)
    return dataclasses.replace(model, apply_fn=apply_fn)


# flax's collections of variables that are state, not parameters of the likelihood.
STATE_COLLECTIONS = ("batch_stats", "cache", "intermediates")


def check_no_state_collections(params: PyTree) -> None:
    """Refuses flax's whole ``variables`` dict: its running statistics would get
    natural-gradient updates as if they were weights."""
    if not isinstance(params, Mapping):
        return
    found = [name for name in STATE_COLLECTIONS if name in params]
    if found:
        raise ValueError(
            f"params holds flax's {found[0]!r} collection, which is model state, not "
            "parameters: the Fisher is over the weights only, and these entries must not "
            "get natural-gradient updates. Pass variables['params'] as params and close "
            "over the rest in apply_fn, e.g. apply_fn = lambda p, x: module.apply("
            "{'params': p, 'batch_stats': batch_stats}, x)."
        )


def trainable_and_frozen(params: PyTree) -> tuple[PyTree, PyTree]:
    """``partition(params)``, refusing a pytree without a single trainable leaf or with
    flax's state collections (see ``check_no_state_collections``)."""
    check_no_state_collections(params)
    trainable, frozen = partition(params)
    if not jax.tree.leaves(trainable):
        kinds = sorted({type(leaf).__name__ for leaf in jax.tree.leaves(params)})
        raise ValueError(
            "params has no floating-point leaves, so there is nothing to take the Fisher "
            f"with respect to (its leaves are: {', '.join(kinds) or 'none'})."
        )
    return trainable, frozen


def on_trainable(model, params: PyTree):
    """``(model, trainable)``: the model as a function of the trainable leaves alone."""
    trainable, frozen = trainable_and_frozen(params)
    return with_frozen(model, frozen), trainable


def trainable_part(tree: PyTree, params: PyTree) -> PyTree:
    """The entries of ``tree`` (updates, a vector) at the trainable leaves of ``params``.

    ``tree`` has the structure of ``params``, or ``None`` where ``params`` holds a
    non-array leaf (as ``equinox.filter_grad`` returns); ``None`` at every other leaf.
    """

    def pick(path, leaf, entry):
        if not is_trainable(leaf):
            return None
        if entry is None or not is_trainable(entry):
            raise ValueError(
                f"The entry for the trainable leaf {jax.tree_util.keystr(path) or 'params'} "
                f"is {entry!r}; pass a floating array for every floating leaf of params "
                "(for updates: the gradient of the loss with respect to params)."
            )
        return entry

    return jax.tree_util.tree_map_with_path(pick, params, tree, is_leaf=_is_none)


def merge_updates(directions: PyTree, updates: PyTree, params: PyTree) -> PyTree:
    """``updates`` with the trainable leaves replaced by ``directions``.

    Every other leaf keeps the update that came in; a ``float0`` one (the gradient of an
    integer leaf) becomes a zero of the parameter's dtype.
    """

    def merge(leaf, update, direction):
        if is_trainable(leaf):
            return direction
        if update is not None and jnp.result_type(update) == jax.dtypes.float0:
            return jnp.zeros(jnp.shape(leaf), jnp.result_type(leaf))
        return update

    return jax.tree.map(merge, params, updates, directions, is_leaf=_is_none)
