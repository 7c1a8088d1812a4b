"""Sharding in types: natgrad's computations on a mesh whose axes are ``Explicit``.

On such a mesh (``jax.make_mesh(shape, names, axis_types=(AxisType.Explicit, ...))``)
every array's type names its sharding, and an operation whose result's sharding its
operands leave open is an error. A Fisher computation is made of those: statistics
summed over a sharded example axis (Σᵢ aᵢ aᵢᵀ), kernels of sharded rows (S Sᵀ). Rather
than name a sharding at each, natgrad runs them with the mesh's axes automatic
(``jax.sharding.auto_axes``), where XLA places every intermediate as under plain
``jax.jit``, and gives its results back with the shardings the caller's types ask
for: an update as its gradient's, a state as the state it was given. The model itself
runs as written in there (``jax.sharding.explicit_axes``, its parameters and inputs
typed as given), so that its own placements (a gather, a row-parallel matmul's
``out_sharding``) hold.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from natgrad_jax._eager import join_arrays, split_arrays

PyTree = Any


def _has_explicit_axes(mesh) -> bool:
    return any(kind == AxisType.Explicit for kind in getattr(mesh, "axis_types", ()))


def explicit_mesh_of_type(aval):
    """The mesh with explicit axes that ``aval`` (an abstract value or an array's type) is
    typed on, or None."""
    mesh = getattr(getattr(aval, "sharding", None), "mesh", None)
    return mesh if _has_explicit_axes(mesh) else None


def context_explicit_mesh():
    """The mesh with explicit axes that ``jax.set_mesh`` sets, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh if _has_explicit_axes(mesh) else None


def explicit_mesh(tree: PyTree):
    """The mesh with explicit axes that the context sets (``jax.set_mesh``) or that an
    array of ``tree`` is typed on; None where there is none."""
    mesh = context_explicit_mesh()
    if mesh is not None:
        return mesh
    for leaf in split_arrays(tree)[2]:
        mesh = explicit_mesh_of_type(jax.typeof(leaf))
        if mesh is not None:
            return mesh
    return None


def sharding_of(value) -> PartitionSpec:
    """The spec of ``value``'s type (a ``PartitionSpec`` is returned as it is)."""
    if isinstance(value, PartitionSpec):
        return value
    return jax.typeof(value).sharding.spec


def replicated(**arguments) -> PartitionSpec:
    """Results on every device (a matrix summed over the batch, a scalar)."""
    del arguments
    return PartitionSpec()


def by_examples(inputs: PyTree, **arguments) -> PartitionSpec:
    """Results whose leading axis indexes the examples, sharded as the inputs' is."""
    del arguments
    spec = sharding_of(jax.tree.leaves(inputs)[0])
    return PartitionSpec(spec[0] if len(spec) else None)


def placed_like(tree: PyTree, like: PyTree) -> PyTree:
    """``tree`` moved to the shardings of ``like`` (same structure) on an explicit mesh, so
    that a tangent meets its primal's type; as it is elsewhere."""
    mesh = explicit_mesh((tree, like))
    if mesh is None:
        return tree
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.tree.map(lambda a, b: jax.sharding.reshard(a, sharding_of(b)), tree, like)


@contextlib.contextmanager
def _set(variable: contextvars.ContextVar, value):
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


# The fewest columns of a spread matrix a device holds: a factor of a few columns per
# device saves nothing worth the gathers its factorisation then needs.
MIN_COLUMNS_A_DEVICE = 16


def spread_columns(tree: PyTree) -> PyTree:
    """A curvature state spread over the explicit mesh that ``jax.set_mesh`` sets.

    Each replicated matrix or stack of matrices is split along its last axis that gives
    every device of the mesh ``MIN_COLUMNS_A_DEVICE`` or more, over all the mesh's axes;
    vectors, scalars, arrays laid out as a leaf and small matrices stay as they are. The
    update gives its state back as it was given, so a K-FAC factor stays 1/D on each of
    D devices from step to step, and XLA moves columns where a step needs them (on
    the 2×4 mesh of ``tests/_sharded_checks.py``, K-FAC's step held 30 MiB a device
    against 87 MiB with its state replicated, the model's gathers left to XLA).
    Without an explicit mesh in the context (arrays typed on one outside
    ``jax.set_mesh`` cannot be placed anew): ``tree``.
    """
    mesh = context_explicit_mesh()
    if mesh is None:
        return tree

    def spreads(size: int) -> bool:
        return size % mesh.size == 0 and size // mesh.size >= MIN_COLUMNS_A_DEVICE

    def spread(leaf):
        shape = jax.typeof(leaf).shape
        if len(shape) < 2 or any(axes is not None for axes in sharding_of(leaf)):
            return leaf
        axis = next((a for a in reversed(range(len(shape))) if spreads(shape[a])), None)
        if axis is None:
            return leaf
        return jax.sharding.reshard(leaf, PartitionSpec(*[None] * axis, mesh.axis_names))

    return jax.tree.map(spread, tree)


# While ``on_automatic_axes`` runs a computation: the explicit mesh, and the specs its
# parameters (arguments named ``params``, ``params_*`` or ``frozen``) and inputs were
# given with, by the leaves' paths.
_GIVEN_TYPES: contextvars.ContextVar = contextvars.ContextVar("given_types", default=None)
_given_types_set = functools.partial(_set, _GIVEN_TYPES)


def _specs_by_path(tree) -> dict:
    """{path: (shape, spec)} of the arrays of ``tree`` typed on a mesh."""
    return {
        jax.tree_util.keystr(path): (jax.typeof(leaf).shape, sharding_of(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if isinstance(leaf, jax.Array)
    }


def _given_types(arguments: dict) -> tuple[dict, dict]:
    params = {}
    for name, value in arguments.items():
        if name == "frozen" or name.startswith("params"):
            params = {**_specs_by_path(value), **params}
    return params, _specs_by_path(arguments.get("inputs"))


def _specs_as_given(tree, given: dict):
    """The spec of each leaf of ``tree``: the one its path was given with (same shape),
    else replicated (a batch of another size, a vmapped example)."""

    def spec(path, leaf):
        shape, given_spec = given.get(jax.tree_util.keystr(path), (None, None))
        return given_spec if shape == jnp.shape(leaf) else PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, tree)


def _as_written(apply_fn):
    """``apply_fn`` run as written for the explicit mesh, from inside ``on_automatic_axes``
    (``jax.sharding.explicit_axes``): its own placements (``reshard`` of activations,
    ``out_sharding=`` of a row-parallel matmul) name the mesh's axes, which are
    automatic around it. Outside that: ``apply_fn`` itself."""

    @functools.wraps(apply_fn)
    def typed(params, inputs):
        given = _GIVEN_TYPES.get()
        if given is None:
            return apply_fn(params, inputs)
        mesh, (given_params, given_inputs) = given
        in_sharding = (_specs_as_given(params, given_params), _specs_as_given(inputs, given_inputs))
        run = jax.sharding.explicit_axes(apply_fn, axes=mesh.explicit_axes, in_sharding=in_sharding)
        return run(params, inputs)

    typed.runs_as_written = True
    return typed


_TYPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def as_written(model):
    """``model`` with its ``apply_fn`` run as written on a mesh with explicit axes
    (``_as_written``; one wrapper per function, so that caches keyed on it still hit):
    the same model anywhere else."""
    if getattr(model.apply_fn, "runs_as_written", False):  # wrapped already
        return model
    try:
        typed = _TYPED.setdefault(model.apply_fn, _as_written(model.apply_fn))
    except TypeError:  # not weakly referable
        typed = _as_written(model.apply_fn)
    return dataclasses.replace(model, apply_fn=typed)


def _with_typed_model(leaf):
    """``as_written(leaf)`` for a model among a function's arguments; other leaves as
    they are."""
    return as_written(leaf) if _is_model(leaf) else leaf


def _is_model(leaf) -> bool:
    return (
        dataclasses.is_dataclass(leaf) and hasattr(leaf, "apply_fn") and hasattr(leaf, "likelihood")
    )


def on_automatic_axes(results_like: Callable[..., PyTree]):
    """Decorates ``fn`` to run with a mesh's explicit axes automatic.

    ``results_like(**arguments)``, given ``fn``'s arguments by name, returns values (or
    ``PartitionSpec``s, a prefix of the results' tree allowed) whose shardings ``fn``'s
    results come back with. Without an explicit mesh ``fn`` runs as it is. Arguments
    that are not arrays (Python numbers, functions) pass through unchanged, but a model
    runs as written (``as_written``; a transform's options hold one already), given the
    types of the arguments named ``params``, ``params_*``, ``frozen`` and ``inputs``.
    """

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            mesh = explicit_mesh((args, kwargs))
            if mesh is None:
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            shardings = jax.tree.map(
                sharding_of,
                results_like(**bound.arguments),
                is_leaf=lambda leaf: isinstance(leaf, PartitionSpec),
            )
            given = _given_types(bound.arguments)
            treedef, static, arrays = split_arrays((args, kwargs))
            static = tuple(_with_typed_model(leaf) for leaf in static)

            def on_arrays(arrays):
                args, kwargs = join_arrays(treedef, static, arrays)
                with _given_types_set((mesh, given)):
                    return fn(*args, **kwargs)

            with jax.sharding.use_abstract_mesh(mesh):
                return jax.sharding.auto_axes(on_arrays, out_sharding=shardings)(arrays)

        return wrapped

    return decorate
