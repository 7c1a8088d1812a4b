"""Eager calls that run compiled: one ``jax.jit`` compilation instead of op-by-op dispatch.

Called outside any trace, a Fisher function or an update would dispatch its hundreds of
primitives one by one, each compiled for its shapes on first use: seconds for a small
model. ``compiled_when_eager`` runs such a function under ``jax.jit`` instead — its array
leaves traced, every other leaf (the model, Python numbers, functions) static — so a
call costs one compilation per shapes and milliseconds after. Inside a trace (the
user's ``jit``, ``shard_map``, ``vmap``) the function runs as it is.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

_ARRAY = object()  # marks where an array leaf goes among the static leaves


def is_traced(tree) -> bool:
    """Whether any leaf of ``tree`` is a tracer (we are inside a JAX transformation)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _is_array(leaf) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic)


def split_arrays(tree):
    """``(treedef, static, arrays)``: ``static`` holds every leaf with ``_ARRAY`` in place of
    the array leaves, which are ``arrays``."""
    leaves, treedef = jax.tree.flatten(tree)
    static = tuple(_ARRAY if _is_array(leaf) else leaf for leaf in leaves)
    return treedef, static, [leaf for leaf in leaves if _is_array(leaf)]


def join_arrays(treedef, static, arrays):
    """The inverse of ``split_arrays``."""
    arrays = iter(arrays)
    return jax.tree.unflatten(treedef, [next(arrays) if s is _ARRAY else s for s in static])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _call_on_arrays(fn, treedef, static, arrays):
    return fn(*join_arrays(treedef, static, arrays))


def eval_shape(fn, *args):
    """``jax.eval_shape(fn, *args)`` with the leaves of ``args`` that are not arrays (an
    equinox module's activation functions, Python numbers) held static, as
    ``equinox.filter_eval_shape`` does: shapes and dtypes of the result, no FLOPs. Like
    ``jax.eval_shape``, a second call with the same ``fn`` and shapes does not trace
    ``fn`` again."""
    treedef, static, arrays = split_arrays(args)
    if all(leaf is _ARRAY for leaf in static):
        return jax.eval_shape(fn, *args)
    try:
        hash(static)
    except TypeError:
        return jax.eval_shape(lambda arrays: fn(*join_arrays(treedef, static, arrays)), arrays)
    return jax.eval_shape(functools.partial(_call_on_arrays, fn, treedef, static), arrays)


def compiled_when_eager(fn=None, *, eager_checks=None):
    """``fn(*args, **kwargs)``, run under ``jax.jit`` when no argument is traced.

    ``eager_checks(*args, **kwargs)``, if given, runs first on the concrete arguments:
    checks of *values* (targets outside the support) that compilation would hide.
    Falls back to calling ``fn`` directly when a static leaf cannot be hashed (a bound
    method of an unhashable object as ``apply_fn``, say).
    """
    if fn is None:
        return functools.partial(compiled_when_eager, eager_checks=eager_checks)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(treedef, static, arrays):
        args, kwargs = join_arrays(treedef, static, arrays)
        return fn(*args, **kwargs)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if is_traced((args, kwargs)):
            return fn(*args, **kwargs)
        if eager_checks is not None:
            eager_checks(*args, **kwargs)
        treedef, static, arrays = split_arrays((args, kwargs))
        try:
            hash(static)
        except TypeError:
            return fn(*args, **kwargs)
        return run(treedef, static, arrays)

    return wrapped
