"""What the walk over a jaxpr records: how variables derive from parameter leaves
(``Origin``, ``Concatenation``) and where they are used (``Use``)."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, NamedTuple

import jax.extend.core as jex_core

# Operations that place a value on devices and leave it unchanged (``jax.sharding.reshard``
# of an FSDP model's weights, ``jax.lax.with_sharding_constraint``): kept in a chain so
# that the operand is placed as the model placed it.
SHARDING_OPS = frozenset({"reshard", "sharding_constraint", "mesh_cast"})

LAYOUT_OPS = (
    frozenset(
        {"convert_element_type", "reshape", "transpose", "copy", "copy_p", "squeeze", "expand_dims"}
    )
    | SHARDING_OPS
)

BIAS_OPS = LAYOUT_OPS | {"broadcast_in_dim"}

CALL_OPS = frozenset({"pjit", "jit", "closed_call", "core_call"})

# ``jax.checkpoint`` (remat): a call whose body the backward pass recomputes; the walk
# reads it as a call, and the probed forward pass keeps it a checkpoint.
REMAT_OPS = frozenset({"remat2", "checkpoint"})


def is_literal(var) -> bool:
    return isinstance(var, jex_core.Literal)


@dataclasses.dataclass
class Use:
    """Where a parameter-derived value was consumed."""

    leaf: int
    eqn: int | None  # the equation index if the use is a layer, else None
    kind: str | None = None
    param_operand: int | None = None
    dimension_numbers: Any = None
    chain: tuple = ()
    input_aval: Any = None
    output_aval: Any = None
    operand_aval: Any = None
    primitive: Any = None
    primitive_params: Any = None
    primitive_name: str = ""
    scan_lengths: tuple = ()
    factor: tuple | None = None  # Origin.factor of the parameter operand
    part: tuple | None = None  # Layer.part
    follows: tuple | None = None  # Layer.follows


class Origin(NamedTuple):
    """How a variable derives from a parameter leaf."""

    leaf: int
    chain: tuple  # (primitive, params) of the layout operations from the leaf
    broadcast: bool  # whether the chain holds a broadcast_in_dim
    # (equation, operand, chain length) of a multiplication by a value that is the same
    # for every example (BatchNorm's running 1/σ), or None.
    factor: tuple | None = None


class Concatenation(NamedTuple):
    """A variable concatenated from parameter-derived parts along one axis."""

    parts: tuple  # (Origin, start, size) of each part, its chain resized to the part
    axis: int  # the concatenation's axis, followed through later layout operations
    shape: tuple  # the variable's shape


def leaves_of(derived) -> list[int]:
    if isinstance(derived, Concatenation):
        return [origin.leaf for origin, _, _ in derived.parts]
    return [derived.leaf]


def output_uses(derived_outputs) -> list[Use]:
    """A use by no layer for each leaf that reaches an output unchanged but for layout."""
    return [
        Use(leaf, None, primitive_name="output")
        for derived in derived_outputs
        if derived is not None
        for leaf in leaves_of(derived)
    ]


def layer_use(kind, index, origin: Origin, side, eqn, scan_lengths) -> Use:
    """The use of ``origin``'s leaf as operand ``side`` of layer equation ``eqn``."""
    other = eqn.invars[1 - side]
    return Use(
        leaf=origin.leaf,
        eqn=index,
        kind=kind,
        param_operand=side,
        dimension_numbers=eqn.params.get("dimension_numbers"),
        chain=origin.chain,
        input_aval=None if kind == "add" else other.aval,
        output_aval=eqn.outvars[0].aval,
        operand_aval=eqn.invars[side].aval,
        primitive=eqn.primitive,
        primitive_params=dict(eqn.params),
        scan_lengths=scan_lengths,
        factor=origin.factor,
    )


class LayerOutputs:
    """The outputs of a jaxpr's matmul and convolution layers that one equation reads
    (directly, or through transposes read once each), for ``Layer.follows``: a bias
    added to one of them has that layer's output-gradients g, transposed."""

    def __init__(self, jaxpr, live):
        read = [
            v for eqn, is_live in zip(jaxpr.eqns, live, strict=True) if is_live for v in eqn.invars
        ]
        self._readers = collections.Counter(v for v in (*read, *jaxpr.outvars) if not is_literal(v))
        # variable -> ({Layer.part: leaf} of the layer, the layer output's axes it has)
        self._outputs = {}

    def _read_once(self, var) -> bool:
        return not is_literal(var) and var in self._outputs and self._readers[var] == 1

    def transpose(self, eqn):
        if self._read_once(eqn.invars[0]):
            leaves, axes = self._outputs[eqn.invars[0]]
            permuted = tuple(axes[p] for p in eqn.params["permutation"])
            self._outputs[eqn.outvars[0]] = (leaves, permuted)

    def link(self, eqn, uses):
        """Records the output of a matmul or convolution layer's ``uses`` (one per part
        of concatenated leaves), or sets ``follows`` on the uses of a bias ``add``."""
        if uses and all(use.kind in ("dot", "conv") for use in uses):
            axes = tuple(range(eqn.outvars[0].aval.ndim))
            self._outputs[eqn.outvars[0]] = ({use.part: use.leaf for use in uses}, axes)
        for use in uses:
            if use.kind == "add":
                use.follows = self._followed(eqn, use)

    def _followed(self, eqn, use) -> tuple | None:
        """The leaf of the layer whose output (or a transpose of it, read once) the add
        takes as it is (same shape and dtype) and alone, with that part of it the
        bias's part is, and the axes; the gradient w.r.t. that output is then the add's
        output-gradient."""
        other, out = eqn.invars[1 - use.param_operand], eqn.outvars[0]
        if not self._read_once(other):
            return None
        if other.aval.shape != out.aval.shape or other.aval.dtype != out.aval.dtype:
            return None
        leaves, axes = self._outputs[other]
        part = None if use.part is None else (axes[use.part[0]], *use.part[1:])
        return (leaves[part], axes) if part in leaves else None
