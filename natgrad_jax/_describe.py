"""``ng.describe``: how each solver forms the curvature of each parameter leaf, and why."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from natgrad_jax._capture import capture
from natgrad_jax._fisher import exact_rows_per_example
from natgrad_jax._independence import check_independent_examples, one_example_failure
from natgrad_jax._memory import (
    DEFAULT_MAX_CURVATURE_BYTES,
    SOLVERS,
    Problem,
    exact_rows_refusal,
    in_units,
    refusal,
)
from natgrad_jax._model import Model
from natgrad_jax._parameters import on_trainable
from natgrad_jax._sharding_types import MIN_COLUMNS_A_DEVICE, context_explicit_mesh
from natgrad_jax._solvers.auto import Auto, auto_choice
from natgrad_jax._solvers.kronecker import kronecker_route, shared_output_factors

PyTree = Any

# The solvers a user names to ``ng.natural_gradient`` (``describe`` gives their
# verdicts); ``"eigenbasis_adam"`` is ``ng.eigenbasis_adam``'s, with Monte-Carlo
# statistics and Adam's ε for a damping.
NAMED_SOLVERS = tuple(name for name in SOLVERS if name not in ("auto", "eigenbasis_adam"))

COLUMNS = (
    "leaf",
    "shape",
    "per-example gradients (woodbury, diagonal)",
    "kronecker",
)


def _table(rows) -> list[str]:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(row[k]) for row in rows) + 2 for k in range(len(rows[0]))]
    return ["".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def describe(
    model: Model,
    params: PyTree,
    inputs: PyTree,
    *,
    max_curvature_bytes: float | None = DEFAULT_MAX_CURVATURE_BYTES,
) -> str:
    """Each parameter leaf's route through the solvers, and ``"auto"``'s choice.

    For every trainable leaf: how its per-example gradients are formed — from the
    inputs and output-gradients of a layer that capture found in the traced model
    (matmul, convolution, bias add, elementwise scale), or by ``jax.vmap`` (with the
    reason) — which Woodbury and the diagonal use; and whether Kronecker factors it
    (A ⊗ G, with the factors' sizes; a bias of several axes: tensor-normal L ⊗ R; a bias
    added straight to its weight's output shares that weight's G and π) or uses the
    exact diagonal (with the reason).
    ``"dense"``, ``"block_diagonal"`` and ``"cg"`` do not depend on capture: they use
    vmap-ed score rows or Fisher-vector products. The last lines say what
    ``solver="auto"`` picks for the exact Fisher of this batch, with its estimates of
    the multiply-adds of one update (see ``ng.choose_solver``), where its work lives
    when the parameters are sharded over devices (leaf by leaf on each leaf's sharding,
    or gathered into one P-vector; K-FAC's factors are factorised whole on every
    device, or each on one with the transform's ``mesh=``), and the memory the
    memory guard estimates for that update against ``max_curvature_bytes``: whether it
    fits, or the refusal an update would raise, with the remedies that fit. Then each
    solver a user may name (``solver="..."`` with the exact Fisher, the transform's
    default): whether an update runs it, or refuses it for its memory (with the
    estimate) or for the output-Fisher rows of an example that its statistics would
    back-propagate one by one (over ``max_exact_rows``).

    Args:
      model: an ``ng.Model``.
      params: its parameters (arrays or ``jax.ShapeDtypeStruct``).
      inputs: a batch of inputs (arrays or ``jax.ShapeDtypeStruct``).
      max_curvature_bytes: the budget to check against, as the transform's
        (``None``: not checked).

    Returns:
      The table as a string.

    Example:
      >>> import jax.numpy as jnp, natgrad_jax as ng
      >>> model = ng.Model(lambda p, x: x @ p["w"] + p["b"], ng.Categorical())
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> print(ng.describe(model, params, jnp.zeros((8, 3))))
      leaf   shape   per-example gradients (woodbury, diagonal)  kronecker
      ['b']  (2,)    captured: bias add, output (8, 2)           A ⊗ G: 1×1 ⊗ 2×2 (G and π of ['w'])
      ['w']  (3, 2)  captured: matmul, input (8, 3)              A ⊗ G: 3×3 ⊗ 2×2
      solver="auto" picks dense:
        least estimated cost, P = 8, M = 16: dense 1.2e+03, woodbury 3.7e+03, cg 3.0e+07
        placement: dense gathers the P-vector; its P×P Fisher on every device
      memory: about 0.0 MiB an update, within max_curvature_bytes = 4.00 GiB
      solver="..." by name, fisher="exact":
        runs: dense, woodbury, cg, diagonal, block_diagonal, kronecker, ekfac
    """
    check_independent_examples(model.apply_fn, params, inputs)
    model, params = on_trainable(model, params)
    captured = capture(model.apply_fn, params, inputs)
    rows = [COLUMNS]
    leaves = zip(captured.leaf_names, captured.leaf_shapes, strict=True)
    shared = shared_output_factors(captured, captured.leaf_shapes)
    for leaf, (name, shape) in enumerate(leaves):
        kronecker = kronecker_route(captured.layer_of(leaf), shape)
        if leaf in shared:
            kronecker += f" (G and π of {captured.leaf_names[shared[leaf]]})"
        rows.append((name, str(shape), captured.route(leaf), kronecker))
    num_examples = jax.tree.leaves(inputs)[0].shape[0]
    num_rows = num_examples * exact_rows_per_example(model, params, inputs)
    one_example = one_example_failure(model.apply_fn, params, inputs)
    solver, reason = auto_choice(
        captured, captured.leaf_shapes, num_rows, num_examples, per_example=one_example is None
    )
    lines = [*_table(rows), f'solver="auto" picks {solver}:', f"  {reason}"]
    lines.append(f"  {_placement(solver, params)}")
    leaf_dtypes = (getattr(leaf, "dtype", leaf) for leaf in jax.tree.leaves(params))
    dtype = jnp.result_type(*leaf_dtypes, jnp.float32)  # a leaf may be a Python float
    problem = Problem(
        captured.leaf_shapes,
        jnp.dtype(dtype).itemsize,
        captured,
        num_rows,
        num_examples,
        kind="exact",
    )
    if max_curvature_bytes is not None:
        lines.append(f"  {_memory_verdict(problem, max_curvature_bytes)}")
    lines += _named_verdicts(problem, max_curvature_bytes, one_example)
    return "\n".join(lines)


# Solvers that take per-example gradients by evaluating the model one example at a
# time: always, and every solver but CG wherever a leaf is left to the fallback.
ONE_EXAMPLE_SOLVERS = ("dense", "block_diagonal")


def _placement(solver: str, params: PyTree) -> str:
    """One line: where the solver's work lives, and over how many devices the
    parameters are (concrete arrays only)."""
    devices = {
        device
        for leaf in jax.tree.leaves(params)
        if isinstance(leaf, jax.Array)
        for device in leaf.sharding.device_set
    }
    where = f" (parameters on {len(devices)} devices)" if len(devices) > 1 else ""
    mesh = context_explicit_mesh()
    spread = (
        ""
        if mesh is None
        else f"; on this mesh with explicit axes, init splits each state matrix of "
        f"{MIN_COLUMNS_A_DEVICE * mesh.size} or more columns over its {mesh.size} devices"
    )
    if SOLVERS[solver].per_leaf:
        line = f"placement{where}: {solver} works leaf by leaf, on each leaf's sharding"
        if solver == "kronecker":  # XLA gathers each factor for its factorisation
            line += (
                "; it factorises each Kronecker factor whole, on every device (on one with mesh=)"
            )
        return line + spread
    held = "P×P Fisher" if solver == "dense" else "M×M kernel"
    return f"placement{where}: {solver} gathers the P-vector; its {held} on every device" + spread


def _memory_verdict(problem: Problem, max_bytes: float) -> str:
    """One line: the guard's estimate for ``"auto"``, and whether it would refuse."""
    refused = refusal(Auto(), problem, max_bytes)
    if refused is not None:
        return f"memory: an update would be refused: {refused}"
    needed = problem.bytes_for(Auto())
    return (
        f"memory: about {in_units(needed)} an update, within max_curvature_bytes = "
        f"{in_units(max_bytes)}"
    )


def _named_verdicts(problem: Problem, max_bytes: float | None, one_example=None) -> list[str]:
    """Lines: the solvers an update runs when named (``solver="..."``, the exact
    Fisher), and those it refuses, grouped by the guard that refuses them (the row
    limit first, as the transform checks it); and those that would fail evaluating the
    model on one example, where ``one_example`` says why it cannot run there."""
    runs, over_rows, over_memory, fail = [], [], [], []
    one_example_solvers = (
        ONE_EXAMPLE_SOLVERS
        if not problem.captured.fallback
        else tuple(name for name in NAMED_SOLVERS if name != "cg")
    )
    for name in NAMED_SOLVERS:
        solver = SOLVERS[name]()
        if one_example is not None and name in one_example_solvers:
            fail.append(name)
        elif exact_rows_refusal(solver, problem) is not None:
            over_rows.append((name, solver.exact_rows_limit()))
        elif max_bytes is not None and (needed := problem.bytes_for(solver)) > max_bytes:
            over_memory.append(f"{name} (about {in_units(needed)})")
        else:
            runs.append(name)
    lines = ['solver="..." by name, fisher="exact":']
    if runs:
        lines.append("  runs: " + ", ".join(runs))
    if over_memory:
        lines.append("  refused, over max_curvature_bytes: " + ", ".join(over_memory))
    if fail:
        lines.append(
            f"  fail, as apply_fn fails on one example ({one_example}), which their "
            "per-example gradients evaluate: " + ", ".join(fail)
        )
    if over_rows:
        rows = problem.num_rows // problem.num_examples
        names = ", ".join(name for name, _ in over_rows)
        limits = {limit for _, limit in over_rows}
        limit = f"{limits.pop():,}" if len(limits) == 1 else "their"
        lines.append(
            f"  refused, {rows:,} output-Fisher rows an example over max_exact_rows = "
            f"{limit} (fisher='monte_carlo' takes one): {names}"
        )
    return lines
