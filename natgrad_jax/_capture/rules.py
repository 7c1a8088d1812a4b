"""One rule per primitive family: what an equation does to the parameter-derived values
it reads, looked up by the walk in ``RULES``:

* ``dot_general``, ``conv_general_dilated``, ``gather``, ``add``: a layer of the one leaf
  it reads (a matmul, a convolution, an embedding lookup, a bias), if it is one;
* ``mul``: an elementwise scale, or a leaf scaled by a value the same for every example
  (BatchNorm's running 1/σ), followed to its layer;
* layout operations (reshape, transpose, casts, broadcast): the leaf, one step on;
* ``concatenate``: leaves joined for one layer (``follow_concatenation`` then follows
  them);
* calls (``pjit``, ``closed_call``, ``jax.checkpoint``) and ``scan``: their bodies,
  walked in turn;
* ``pvary``: the same values, marked device-varying inside ``shard_map``;
* anything else (``use_as_other``): a use capture does not read, so the leaf goes to
  the fallback.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import numpy as np

from natgrad_jax._capture.uses import (
    BIAS_OPS,
    CALL_OPS,
    REMAT_OPS,
    Concatenation,
    Origin,
    Use,
    is_literal,
    layer_use,
    leaves_of,
    output_uses,
)
from natgrad_jax._independence import inner_tainted
from natgrad_jax._jaxpr import inner_jaxpr, scan_counts

if TYPE_CHECKING:
    from natgrad_jax._capture.walk import Walk


class Read(NamedTuple):
    """An equation as a rule sees it: its index in the walk's numbering, how each of its
    operands derives from a parameter leaf (None: not at all), and whether it reads the
    inputs."""

    eqn: object
    index: int
    derived: list
    from_inputs: bool

    @property
    def sides(self) -> list[int]:
        """The operands that derive from a parameter leaf."""
        return [k for k, d in enumerate(self.derived) if d is not None]


def use_as_other(walk: Walk, read: Read) -> None:
    """A primitive capture does not read: each leaf it reads has a use that is no layer."""
    name = read.eqn.primitive.name
    walk.uses.extend(
        Use(leaf, None, primitive_name=name)
        for k in read.sides
        for leaf in leaves_of(read.derived[k])
    )


def _pass_through(walk: Walk, read: Read) -> None:
    """``pvary`` inside ``shard_map``: the same values, marked device-varying."""
    outputs = zip(read.eqn.outvars, read.derived, strict=True)
    walk.env.update((v, d) for v, d in outputs if d is not None)


def _layer(walk: Walk, read: Read) -> None:
    """A matmul, convolution, embedding lookup, bias add or elementwise scale of one leaf."""
    kind = layer_kind(read.eqn, read.sides, read.derived)
    if kind is None:
        use_as_other(walk, read)
        return
    side = read.sides[0]
    use = layer_use(kind, read.index, read.derived[side], side, read.eqn, walk.scan_lengths)
    walk.layer_outputs.link(read.eqn, [use])
    walk.uses.append(use)


def _scale(walk: Walk, read: Read) -> None:
    """A leaf times a value the same for every example (followed to its layer, the
    factor recorded), or an elementwise scale layer."""
    eqn, sides, derived = read.eqn, read.sides, read.derived
    if len(sides) == 1 and not read.from_inputs and is_factor(eqn, derived):
        origin = derived[sides[0]]
        factor = (read.index, 1 - sides[0], len(origin.chain))
        walk.env[eqn.outvars[0]] = origin._replace(factor=factor)
    else:
        _layer(walk, read)


def _layout(walk: Walk, read: Read) -> None:
    """A cast, reshape, transpose or broadcast of one leaf: the leaf, one step on."""
    eqn = read.eqn
    if eqn.primitive.name == "transpose":
        walk.layer_outputs.transpose(eqn)
    if read.sides != [0] or len(eqn.invars) != 1:
        use_as_other(walk, read)
        return
    origin = read.derived[0]
    walk.env[eqn.outvars[0]] = origin._replace(
        chain=(*origin.chain, (eqn.primitive, eqn.params)),
        broadcast=origin.broadcast or eqn.primitive.name == "broadcast_in_dim",
    )


def _concatenate(walk: Walk, read: Read) -> None:
    """Distinct leaves joined along one axis (their layer comes later), or other use."""
    if concatenates_leaves(read.derived):
        walk.env[read.eqn.outvars[0]] = concatenation_of(read.eqn, read.derived)
    else:
        use_as_other(walk, read)


def _call(walk: Walk, read: Read) -> None:
    """A nested ``jit``, closed call or ``jax.checkpoint``: its body is walked with its
    operands' origins, and a leaf it returns (``nnx.remat`` returns the module's
    parameters) is followed on in this walk like any other value."""
    inner = inner_jaxpr(read.eqn)
    if inner is None:
        use_as_other(walk, read)
        return
    tainted = inner_tainted(read.eqn, inner.jaxpr, walk.tainted)
    outputs = walk.enter(inner, read.derived, tainted, walk.scan_lengths)
    walk.env.update((v, d) for v, d in zip(read.eqn.outvars, outputs, strict=True) if d is not None)


def _scan(walk: Walk, read: Read) -> None:
    """A ``scan``: a leaf among its constants is walked into the body (applied at every
    step); one carried or scanned is a use capture does not read."""
    eqn, derived = read.eqn, read.derived
    body, (num_consts, num_carry) = inner_jaxpr(eqn), scan_counts(eqn)
    carried = "scan, as a carry"
    # Layers stacked over a scan (flax's nn.scan): unrolled, each would be captured.
    sliced = "scan, a slice each step (stacked layers: unroll them to capture each)"
    walk.uses.extend(
        Use(leaf, None, primitive_name=carried if k < num_consts + num_carry else sliced)
        for k in read.sides
        if k >= num_consts
        for leaf in leaves_of(derived[k])
    )
    tainted = inner_tainted(eqn, body.jaxpr, walk.tainted)
    lengths = (*walk.scan_lengths, eqn.params["length"])
    walk.uses.extend(output_uses(walk.enter(body, derived[:num_consts], tainted, lengths)))


def layer_kind(eqn, sides, derived) -> str | None:
    """The kind of layer ``eqn`` is for its one parameter-derived operand, if any."""
    name = eqn.primitive.name
    if len(sides) != 1:
        return None
    side, origin = sides[0], derived[sides[0]]
    if name == "dot_general" and not origin.broadcast:
        (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"][1]
        return None if lhs_batch or rhs_batch else "dot"
    if name == "conv_general_dilated" and side == 1 and not origin.broadcast:
        return "conv" if _is_plain_conv(eqn) else None
    if name == "gather" and side == 0 and not origin.broadcast:
        return "embed" if _is_row_lookup(eqn) else None
    if name == "add":
        return "add"
    if name == "mul" and _scales_elementwise(eqn, side):
        return "mul"
    return None


def concatenates_leaves(derived) -> bool:
    """A concatenation of distinct leaves only, each through layout operations."""
    if not derived or any(not isinstance(d, Origin) for d in derived):
        return False
    plain = all(not d.broadcast and d.factor is None for d in derived)
    return plain and len({d.leaf for d in derived}) == len(derived)


def concatenation_of(eqn, derived) -> Concatenation:
    axis = eqn.params["dimension"]
    sizes = [v.aval.shape[axis] for v in eqn.invars]
    starts = np.cumsum([0, *sizes[:-1]]).tolist()
    parts = tuple(zip(derived, starts, sizes, strict=True))
    return Concatenation(parts, axis, tuple(eqn.outvars[0].aval.shape))


def follow_concatenation(walk: Walk, read: Read) -> None:
    """A concatenation of leaves passed through a layout operation (each part's chain
    gets the operation, resized to the part) or used by a layer (a use per part)."""
    eqn, sides = read.eqn, read.sides
    if eqn.primitive.name == "pvary":  # inside shard_map: the same values
        _pass_through(walk, read)
        return
    concatenation = read.derived[sides[0]]
    followed = None
    if len(sides) == 1 and len(eqn.invars) == 1:
        followed = _after_layout(concatenation, eqn)
    if followed is not None:
        walk.env[eqn.outvars[0]] = followed
        return
    parts = _part_uses(concatenation, read.index, sides, eqn, walk.scan_lengths)
    if parts is None:
        name = f"{eqn.primitive.name} of a concatenation"
        parts = [Use(leaf, None, primitive_name=name) for leaf in leaves_of(concatenation)]
    else:
        walk.layer_outputs.link(eqn, parts)
    walk.uses.extend(parts)


def _after_layout(concatenation: Concatenation, eqn) -> Concatenation | None:
    """The concatenation after layout operation ``eqn``, or None where its axis does not
    stay one axis of the result."""
    name, params = eqn.primitive.name, dict(eqn.params)
    shape, axis = concatenation.shape, concatenation.axis
    new_shape = tuple(eqn.outvars[0].aval.shape)
    resized = None  # the parameter that holds the result's shape
    if name in ("convert_element_type", "copy", "copy_p"):
        new_axis = axis
    elif name == "transpose":
        new_axis = list(params["permutation"]).index(axis)
    elif name == "squeeze":
        new_axis = axis - sum(d < axis for d in params["dimensions"])
    elif name == "broadcast_in_dim":
        new_axis, resized = params["broadcast_dimensions"][axis], "shape"
    elif name == "reshape" and params.get("dimensions") is None:
        leading = math.prod(shape[:axis])
        same = [
            b
            for b in range(len(new_shape))
            if math.prod(new_shape[:b]) == leading and new_shape[b] == shape[axis]
        ]
        if not same:
            return None
        new_axis, resized = same[0], "new_sizes"
    else:
        return None
    parts = []
    for origin, start, size in concatenation.parts:
        part_params = dict(params)
        if resized is not None:
            part_params[resized] = tuple(
                size if b == new_axis else s for b, s in enumerate(new_shape)
            )
        chain = (*origin.chain, (eqn.primitive, part_params))
        parts.append((origin._replace(chain=chain), start, size))
    return Concatenation(tuple(parts), new_axis, new_shape)


def _part_uses(concatenation: Concatenation, index, sides, eqn, scan_lengths):
    """One layer use per part of a concatenated operand: a matmul on it along one of its
    free axes, or an add. None for anything else."""
    if len(sides) != 1:
        return None
    side, name = sides[0], eqn.primitive.name
    output = eqn.outvars[0].aval
    if name == "dot_general":
        (contracting, batch) = eqn.params["dimension_numbers"]
        if batch[0] or batch[1] or concatenation.axis in contracting[side]:
            return None
        lhs_free = eqn.invars[0].aval.ndim - len(contracting[0])
        free = [d for d in range(eqn.invars[side].aval.ndim) if d not in contracting[side]]
        kind, output_axis = "dot", (lhs_free if side else 0) + free.index(concatenation.axis)
    elif name == "add" and eqn.invars[side].aval.ndim == output.ndim:
        kind, output_axis = "add", concatenation.axis
    else:
        return None
    uses = []
    for origin, start, size in concatenation.parts:
        use = layer_use(kind, index, origin, side, eqn, scan_lengths)
        uses.append(
            dataclasses.replace(
                use,
                output_aval=_resized(output, output_axis, size),
                operand_aval=_resized(eqn.invars[side].aval, concatenation.axis, size),
                part=(output_axis, start, output.shape[output_axis]),
            )
        )
    return uses


def _resized(aval, axis, size):
    shape = tuple(size if k == axis else s for k, s in enumerate(aval.shape))
    return jax.ShapeDtypeStruct(shape, aval.dtype)


def is_factor(eqn, derived) -> bool:
    """A mul of a parameter-derived value by one that does not depend on the inputs
    (a scalar or the same shape): the value is scaled, not yet used by a layer."""
    side = next(k for k, d in enumerate(derived) if d is not None)
    other, out = eqn.invars[1 - side], eqn.outvars[0].aval.shape
    return derived[side].factor is None and np.shape(other.aval) in ((), out)


def _is_plain_conv(eqn) -> bool:
    return eqn.params["feature_group_count"] == 1 and eqn.params["batch_group_count"] == 1


def _is_row_lookup(eqn) -> bool:
    """A gather of whole rows of a (V, D) table: an embedding lookup."""
    table = eqn.invars[0].aval.shape
    dimension_numbers = eqn.params["dimension_numbers"]
    return (
        len(table) == 2
        and tuple(eqn.params["slice_sizes"]) == (1, table[1])
        and not dimension_numbers.operand_batching_dims
    )


def _scales_elementwise(eqn, side) -> bool:
    """A mul whose other operand x broadcasts to the output along axes of size one (the
    scale may be multiplied by a per-example factor first, as LayerNorm's 1/σ)."""
    other, out = eqn.invars[1 - side], eqn.outvars[0].aval.shape
    return (
        not is_literal(other)
        and len(other.aval.shape) == len(out)
        and all(a in (1, b) for a, b in zip(other.aval.shape, out, strict=True))
    )


RULES = {
    **dict.fromkeys(("dot_general", "conv_general_dilated", "gather", "add"), _layer),
    "mul": _scale,
    **dict.fromkeys(BIAS_OPS, _layout),
    "concatenate": _concatenate,
    **dict.fromkeys(CALL_OPS | REMAT_OPS, _call),
    "scan": _scan,
    "pvary": _pass_through,
}
