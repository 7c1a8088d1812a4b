r"""Layer capture: the inputs a and output-gradients g of every matmul on a parameter leaf.

For a parameter W used as ``y = dot_general(W, x)`` (or ``dot_general(x, W)``), the
gradient of example i is built from the layer's input x restricted to that example and
the gradient g of the loss w.r.t. y restricted to that example; for a dense layer it is
the outer product xᵢ gᵢᵀ. Kronecker factors, exact diagonals and Woodbury kernels all
follow from a and g, so they never need the (N, P) matrix of per-example gradients.

How a and g are obtained, with public JAX APIs only (no tagging, no special layers):

1. ``jax.make_jaxpr(apply_fn)`` is read equation by equation. A variable *derives from
   leaf ℓ* if it is the leaf or comes from it through dtype/layout operations
   (convert_element_type, reshape, transpose, copy, squeeze, expand_dims). A **layer**
   is an equation with exactly one such operand that is

   * a ``dot_general`` with no batch dimensions on it (dense layers, attention
     projections, MLPs applied per token),
   * a ``conv_general_dilated`` with the leaf as its kernel and one feature group
     (KFC, Grosse & Martens 2016: the kernel multiplies the input's patches),
   * a ``gather`` of whole rows of a (V, D) table (embeddings: the table multiplies
     one-hot rows of the indices),
   * an ``add`` of a (broadcast) bias, or a ``mul`` by a (broadcast) elementwise scale
     (LayerNorm/RMSNorm scales, BatchNorm in inference mode): their per-example
     gradients are g and g ⊙ x summed over the broadcast axes. A scale first multiplied
     by a value c computed without the inputs (BatchNorm's running 1/σ) is followed
     through that product; its layer input is x ⊙ c.

   Nested ``jit`` calls are entered recursively. Leaves concatenated (then passed
   through layout operations) before a ``dot_general`` along one of its free axes, or
   before an ``add``, are a layer each: the same input, their slice of the output
   (flax's ``OptimizedLSTMCell`` joins its four gates' kernels for one matmul).
   Equations whose results are never used (dead code) are skipped.
2. A leaf is **captured** if every use of it is such a layer (one layer per leaf); any
   other leaf (weights inside custom derivatives, tied weights, a weight multiplied by
   a computed value before its matmul) is
   left to the **fallback**: ``jax.vmap`` of per-example gradients restricted to those
   leaves. Nothing is silently approximated: ``describe`` lists both sets.
3. The example axis of each layer's input is the axis whose size follows the batch
   size: the function is traced a second time with N + 1 examples and the shapes
   compared. A layer whose input has no such axis is left to the fallback.
4. The jaxpr is then evaluated by a small interpreter that adds a zero "probe" to the
   output of every captured layer and returns the layer inputs: the gradient w.r.t. a
   probe is g, from one batched backward pass. Inside ``shard_map`` the function is
   first traced again on the device-varying values and its layers found again there
   (``_traced_here``), so that its primitives get the casts JAX requires.

Assumes examples do not interact (no batch normalisation across the batch), as every
per-example Fisher does.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np

from natgrad_jax._cache import FifoCache
from natgrad_jax._eager import is_traced
from natgrad_jax._fisher import varying_axes
from natgrad_jax._independence import abstract_leaf, grown_batch, inner_tainted
from natgrad_jax._jaxpr import inner_jaxpr, scan_counts

PyTree = Any

LAYOUT_OPS = frozenset(
    {"convert_element_type", "reshape", "transpose", "copy", "copy_p", "squeeze", "expand_dims"}
)
# A bias may also reach its add through a broadcast.
BIAS_OPS = LAYOUT_OPS | {"broadcast_in_dim"}
CALL_OPS = frozenset({"pjit", "jit", "closed_call", "core_call"})


@dataclasses.dataclass(frozen=True)
class Layer:
    """One captured use of a parameter leaf and how its per-example gradients follow.

    ``kind == "dot"``: y = dot_general(W, x) (either order); the gradient needs the
    layer input x and the output-gradient g. ``kind == "conv"``: y = conv(x, W); the
    same, with x's patches as inputs. ``kind == "embed"``: y = W[x] (rows of a table);
    the same, with one-hot rows of the indices x as inputs. ``kind == "add"``: y = x + b
    (a bias, broadcast); the gradient is g summed over the broadcast axes.
    ``kind == "mul"``: y = x ⊙ s (an elementwise scale, broadcast); the gradient is
    g ⊙ x summed over the broadcast axes.
    """

    kind: str  # "dot", "conv", "embed", "add" or "mul"
    leaf: int  # index of the parameter leaf in jax.tree.leaves(params)
    eqn: int  # index of the equation in traversal order
    param_operand: int  # 0 if the parameter is the first operand, 1 if the second
    dimension_numbers: Any  # of the dot_general (None for an add)
    chain: tuple  # (primitive, params) from the leaf to the operand
    input_example_axis: int | None  # axis of the layer input x that indexes examples
    output_example_axis: int  # axis of the layer output that indexes examples
    input_shape: tuple | None  # shape of x for the traced batch (None for an add)
    output_shape: tuple  # shape of the layer output for the traced batch
    output_dtype: Any  # its dtype (the probe's: g comes back in it)
    operand_shape: tuple  # shape of the parameter operand (after the chain)
    primitive: Any = None  # the equation's primitive and parameters (convolutions)
    primitive_params: Any = None
    # Lengths of the scans the layer is inside (outermost first): its inputs and
    # output-gradients are stacked over their steps, which count as positions.
    scan_lengths: tuple = ()
    # A "mul" whose scale was first multiplied by a value c that is the same for every
    # example (BatchNorm's running 1/σ): (equation, operand) where c is read and the
    # layout operations that bring it to the operand's shape. The layer input is x ⊙ c.
    constant_factor: tuple | None = None
    # A leaf concatenated with others before its layer (flax's OptimizedLSTMCell joins its
    # gates' kernels for one matmul): (output axis, start, full size) of its slice of the
    # layer's output. Its own layer is that slice: the same input, its share of g.
    part: tuple | None = None
    # A bias added to the output of a matmul or convolution that nothing else reads
    # (directly, or through transposes read once each): (leaf of that layer, the axes
    # of its output the add's other operand has, in order). Its output-gradients g are
    # then this bias's, transposed; K-FAC checks the layouts agree and shares G.
    follows: tuple | None = None

    @property
    def probe_shape(self) -> tuple:
        """Shape of the layer's output, stacked over the steps of its scans."""
        return (*self.scan_lengths, *self.output_shape)

    @property
    def summary(self) -> str:
        """How the leaf's per-example gradients are formed, for ``describe``."""
        steps = "".join(f", inside a scan of {length} steps" for length in self.scan_lengths)
        joined = ", concatenated with other leaves" if self.part else ""
        return self._summary_of_one_step + joined + steps

    @property
    def _summary_of_one_step(self) -> str:
        return {
            "dot": f"matmul, input {self.input_shape}",
            "conv": f"convolution, input {self.input_shape}",
            "embed": f"embedding lookup, indices {self.input_shape}",
            "add": f"bias add, output {self.output_shape}",
            "mul": f"elementwise scale, output {self.output_shape}"
            + (", times a constant" if self.constant_factor else ""),
        }[self.kind]


@dataclasses.dataclass(frozen=True)
class Capture:
    """What ``capture`` found: the captured layers and the leaves left to the fallback."""

    layers: tuple[Layer, ...]
    fallback: tuple[int, ...]  # leaf indices handled by vmap-ed per-example gradients
    leaf_names: tuple[str, ...]
    leaf_shapes: tuple[tuple[int, ...], ...]
    jaxpr: Any = None  # the traced apply_fn whose equations the layer indices refer to
    reasons: dict = dataclasses.field(default_factory=dict)  # fallback leaf → why

    def layer_of(self, leaf: int) -> Layer | None:
        """The captured layer of leaf ``leaf``, or None if it uses the fallback."""
        return next((layer for layer in self.layers if layer.leaf == leaf), None)

    def route(self, leaf: int) -> str:
        """How the per-example gradients of leaf ``leaf`` are formed."""
        layer = self.layer_of(leaf)
        if layer is None:
            return f"vmap: {self.reasons.get(leaf, 'not captured')}"
        return f"captured: {layer.summary}"


# --- reading the jaxpr --------------------------------------------------------------------


def _bind(eqn, args):
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    # jax ≤ 0.9 returns (subfuns, params); newer releases return the params alone.
    subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    out = eqn.primitive.bind(*subfuns, *args, **params)
    return out if eqn.primitive.multiple_results else [out]


def _is_literal(var) -> bool:
    return isinstance(var, jex_core.Literal)


@dataclasses.dataclass
class _Use:
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
    factor: tuple | None = None  # _Origin.factor of the parameter operand
    part: tuple | None = None  # Layer.part
    follows: tuple | None = None  # Layer.follows


class _Origin(NamedTuple):
    """How a variable derives from a parameter leaf."""

    leaf: int
    chain: tuple  # (primitive, params) of the layout operations from the leaf
    broadcast: bool  # whether the chain holds a broadcast_in_dim
    # (equation, operand, chain length) of a multiplication by a value that is the same
    # for every example (BatchNorm's running 1/σ), or None.
    factor: tuple | None = None


class _Concatenation(NamedTuple):
    """A variable concatenated from parameter-derived parts along one axis."""

    parts: tuple  # (_Origin, start, size) of each part, its chain resized to the part
    axis: int  # the concatenation's axis, followed through later layout operations
    shape: tuple  # the variable's shape


def _leaves(derived) -> list[int]:
    if isinstance(derived, _Concatenation):
        return [origin.leaf for origin, _, _ in derived.parts]
    return [derived.leaf]


def _live_equations(jaxpr) -> list[bool]:
    """Whether each equation feeds the jaxpr's outputs or has effects. A use by dead code
    is no use: flax's ``nn.RNN`` traces its cell once outside the scan, for shapes."""
    needed = {v for v in jaxpr.outvars if not _is_literal(v)}
    live = [False] * len(jaxpr.eqns)
    for k in reversed(range(len(jaxpr.eqns))):
        eqn = jaxpr.eqns[k]
        if eqn.effects or any(v in needed for v in eqn.outvars):
            live[k] = True
            needed.update(v for v in eqn.invars if not _is_literal(v))
    return live


def _analyse(closed_jaxpr, origins, uses, counter, tainted, scan_lengths=()):
    """Walks a jaxpr, following parameter-derived variables.

    ``origins`` maps a variable to its ``_Origin``; ``tainted`` holds the variables
    computed from the inputs. Every equation gets the next index of ``counter`` (the
    evaluation pass numbers them the same way). ``scan_lengths`` are the lengths of the
    ``scan`` bodies we are inside: a layer there is applied once per step, with the
    weight entering the scan as a constant.
    """
    env = dict(origins)
    live = _live_equations(closed_jaxpr.jaxpr)
    layer_outputs = _LayerOutputs(closed_jaxpr.jaxpr, live)
    for eqn, is_live in zip(closed_jaxpr.jaxpr.eqns, live, strict=True):
        index = counter[0]
        counter[0] += 1 + (0 if is_live else _nested_equations(eqn))
        if not is_live:
            continue
        name = eqn.primitive.name
        derived = [None if _is_literal(v) else env.get(v) for v in eqn.invars]
        sides = [k for k in range(len(derived)) if derived[k] is not None]
        from_inputs = any(not _is_literal(v) and v in tainted for v in eqn.invars)
        if from_inputs:
            tainted.update(eqn.outvars)
        if name == "transpose":
            layer_outputs.transpose(eqn)
        if name == "pvary":  # inside shard_map: the same values, marked device-varying
            env.update((v, d) for v, d in zip(eqn.outvars, derived, strict=True) if d is not None)
            continue
        if any(isinstance(derived[k], _Concatenation) for k in sides):
            found = len(uses)
            _follow_concatenation(eqn, index, sides, derived, env, uses, scan_lengths)
            layer_outputs.link(eqn, uses[found:])
            continue
        layer = _layer_kind(eqn, sides, derived)
        if name == "concatenate" and _concatenates_leaves(derived):
            env[eqn.outvars[0]] = _concatenation(eqn, derived)
        elif name == "mul" and len(sides) == 1 and not from_inputs and _is_factor(eqn, derived):
            origin = derived[sides[0]]
            factor = (index, 1 - sides[0], len(origin.chain))
            env[eqn.outvars[0]] = origin._replace(factor=factor)
        elif layer is not None:
            use = _layer_use(layer, index, derived[sides[0]], sides[0], eqn, scan_lengths)
            layer_outputs.link(eqn, [use])
            uses.append(use)
        elif name in BIAS_OPS and sides == [0] and len(eqn.invars) == 1:
            origin = derived[0]
            env[eqn.outvars[0]] = origin._replace(
                chain=(*origin.chain, (eqn.primitive, eqn.params)),
                broadcast=origin.broadcast or name == "broadcast_in_dim",
            )
        elif name in CALL_OPS and inner_jaxpr(eqn) is not None:
            inner = inner_jaxpr(eqn)
            _analyse(
                inner,
                _inner_origins(inner, derived),
                uses,
                counter,
                inner_tainted(eqn, inner.jaxpr, tainted),
                scan_lengths,
            )
        elif name == "scan":
            body, (num_consts, _) = inner_jaxpr(eqn), scan_counts(eqn)
            carried = [k for k in sides if k >= num_consts]
            where = "scan, as a carry or scanned input"
            uses.extend(
                _Use(leaf, None, primitive_name=where)
                for k in carried
                for leaf in _leaves(derived[k])
            )
            _analyse(
                body,
                _inner_origins(body, derived[:num_consts]),
                uses,
                counter,
                inner_tainted(eqn, body.jaxpr, tainted),
                (*scan_lengths, eqn.params["length"]),
            )
        else:
            uses.extend(
                _Use(leaf, None, primitive_name=name) for k in sides for leaf in _leaves(derived[k])
            )
    for var in closed_jaxpr.jaxpr.outvars:
        if not _is_literal(var) and var in env:
            uses.extend(_Use(leaf, None, primitive_name="output") for leaf in _leaves(env[var]))


class _LayerOutputs:
    """The outputs of a jaxpr's matmul and convolution layers that one equation reads
    (directly, or through transposes read once each), for ``Layer.follows``: a bias
    added to one of them has that layer's output-gradients g, transposed."""

    def __init__(self, jaxpr, live):
        read = [
            v for eqn, is_live in zip(jaxpr.eqns, live, strict=True) if is_live for v in eqn.invars
        ]
        self._readers = collections.Counter(
            v for v in (*read, *jaxpr.outvars) if not _is_literal(v)
        )
        # variable -> ({Layer.part: leaf} of the layer, the layer output's axes it has)
        self._outputs = {}

    def _read_once(self, var) -> bool:
        return not _is_literal(var) and var in self._outputs and self._readers[var] == 1

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


def _inner_origins(inner, derived) -> dict:
    """The origins of a nested jaxpr's leading inputs (those ``derived`` describes)."""
    return {v: d for v, d in zip(inner.jaxpr.invars, derived, strict=False) if d is not None}


def _layer_kind(eqn, sides, derived) -> str | None:
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


def _concatenates_leaves(derived) -> bool:
    """A concatenation of distinct leaves only, each through layout operations."""
    if not derived or any(not isinstance(d, _Origin) for d in derived):
        return False
    plain = all(not d.broadcast and d.factor is None for d in derived)
    return plain and len({d.leaf for d in derived}) == len(derived)


def _concatenation(eqn, derived) -> _Concatenation:
    axis = eqn.params["dimension"]
    sizes = [v.aval.shape[axis] for v in eqn.invars]
    starts = np.cumsum([0, *sizes[:-1]]).tolist()
    parts = tuple(zip(derived, starts, sizes, strict=True))
    return _Concatenation(parts, axis, tuple(eqn.outvars[0].aval.shape))


def _follow_concatenation(eqn, index, sides, derived, env, uses, scan_lengths):
    """A concatenation of leaves passed through a layout operation (each part's chain
    gets the operation, resized to the part) or used by a layer (a use per part)."""
    concatenation = derived[sides[0]]
    followed = None
    if len(sides) == 1 and len(eqn.invars) == 1:
        followed = _after_layout(concatenation, eqn)
    if followed is not None:
        env[eqn.outvars[0]] = followed
        return
    parts = _part_uses(concatenation, index, sides, eqn, scan_lengths)
    if parts is None:
        name = f"{eqn.primitive.name} of a concatenation"
        parts = [_Use(leaf, None, primitive_name=name) for leaf in _leaves(concatenation)]
    uses.extend(parts)


def _after_layout(concatenation: _Concatenation, eqn) -> _Concatenation | None:
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
    return _Concatenation(tuple(parts), new_axis, new_shape)


def _part_uses(concatenation: _Concatenation, index, sides, eqn, scan_lengths):
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
        use = _layer_use(kind, index, origin, side, eqn, scan_lengths)
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


def _is_factor(eqn, derived) -> bool:
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
        not _is_literal(other)
        and len(other.aval.shape) == len(out)
        and all(a in (1, b) for a, b in zip(other.aval.shape, out, strict=True))
    )


def _layer_use(kind, index, origin: _Origin, side, eqn, scan_lengths):
    other = eqn.invars[1 - side]
    return _Use(
        origin.leaf,
        index,
        kind,
        side,
        eqn.params.get("dimension_numbers"),
        origin.chain,
        None if kind == "add" else other.aval,
        eqn.outvars[0].aval,
        eqn.invars[side].aval,
        eqn.primitive,
        dict(eqn.params),
        scan_lengths=scan_lengths,
        factor=origin.factor,
    )


def _trace(apply_fn, params, inputs):
    return jax.make_jaxpr(apply_fn)(params, inputs)


def _layer_uses(apply_fn, params, inputs):
    closed = _trace(apply_fn, params, inputs)
    return closed, _uses(closed, len(jax.tree.leaves(params)))


def _uses(closed, num_leaves) -> list[_Use]:
    """Every use of the first ``num_leaves`` inputs (the parameter leaves) of a jaxpr."""
    origins = {v: _Origin(k, (), False) for k, v in enumerate(closed.jaxpr.invars[:num_leaves])}
    uses: list[_Use] = []
    _analyse(closed, origins, uses, [0], set(closed.jaxpr.invars[num_leaves:]))
    return uses


def _example_axis(shape, grown_shape):
    changed = [k for k, (a, b) in enumerate(zip(shape, grown_shape, strict=True)) if a + 1 == b]
    unchanged = all(a == b for a, b in zip(shape, grown_shape, strict=True) if a + 1 != b)
    return changed[0] if len(changed) == 1 and unchanged else None


def _signature(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((s.shape, str(s.dtype), s.weak_type) for s in map(abstract_leaf, leaves))


def capture(apply_fn, params: PyTree, inputs: PyTree) -> Capture:
    """Finds the parameter leaves of ``apply_fn`` whose per-example gradients come from (a, g).

    The analysis depends only on shapes and dtypes and is cached on them (and on the
    default matmul precision, which the traced matmuls record).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` on a batch.
      params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
      inputs: a batch of inputs (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      A ``Capture``; ``ng.describe`` prints what was found.
    """
    precision = jax.config.jax_default_matmul_precision
    key = (apply_fn, _signature(params), _signature(inputs), precision)
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
    closed, uses = _layer_uses(apply_fn, params, inputs)
    try:
        _, grown = _layer_uses(apply_fn, params, grown_batch(inputs))
    except Exception:  # a model that only runs at one batch size: nothing is captured
        grown = []
    grown_by_eqn = {(u.eqn, u.leaf): u for u in grown if u.eqn is not None}

    by_leaf: dict[int, list[_Use]] = {}
    for use in uses:
        by_leaf.setdefault(use.leaf, []).append(use)
    layers, reasons = [], {}
    for leaf in range(len(shapes)):
        found = _layer_of_leaf(leaf, by_leaf.get(leaf, []), grown_by_eqn, shapes[leaf])
        if isinstance(found, Layer):
            layers.append(found)
        else:
            reasons[leaf] = found
    fallback = tuple(sorted(reasons))
    return Capture(tuple(layers), fallback, names, shapes, closed, reasons)


def _unbroadcast(use: _Use, leaf_shape) -> _Use:
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


def _layer_of_leaf(leaf, uses, grown_by_eqn, leaf_shape) -> Layer | str:
    """The captured layer of ``leaf``, or why it has none."""
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
        return "its layer changes with the batch size"
    twin = _unbroadcast(twin, leaf_shape)
    output_axis = _example_axis(use.output_aval.shape, twin.output_aval.shape)
    input_axis = None
    no_example_axis = "its layer has no axis that indexes the examples"
    if use.kind in ("dot", "conv", "embed"):
        input_axis = _example_axis(use.input_aval.shape, twin.input_aval.shape)
        if input_axis is None:
            return no_example_axis
        if use.kind == "conv" and (input_axis, output_axis) != _conv_batch_axes(use):
            return "its convolution's batch axis is not the examples' axis"
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
        constant_factor=_constant_factor(uses[0]),
        part=use.part,
        follows=use.follows,
    )


def _constant_factor(use: _Use) -> tuple | None:
    if use.factor is None:
        return None
    eqn, operand, chain_length = use.factor
    return eqn, operand, use.chain[chain_length:]


# --- evaluating with probes ----------------------------------------------------------------


def _evaluate(closed_jaxpr, args, probes, activations, counter):
    """Runs a jaxpr with the probes of ``probes[k] = [(layer, probe), ...]`` added to the
    output of equation k (several where leaves were concatenated); ``activations``
    receives each probed equation's layer input (and, under ``("factor", k)``, the
    constant factors of BatchNorm-like scales)."""
    factors = {
        layer.constant_factor[0]: layer.constant_factor[1]
        for pairs in probes.values()
        for layer, _ in pairs
        if layer.constant_factor is not None
    }
    env = dict(zip(closed_jaxpr.jaxpr.constvars, closed_jaxpr.consts, strict=True))
    env.update(zip(closed_jaxpr.jaxpr.invars, args, strict=True))

    def read(var):
        return var.val if _is_literal(var) else env[var]

    for eqn in closed_jaxpr.jaxpr.eqns:
        index = counter[0]
        counter[0] += 1
        values = [read(v) for v in eqn.invars]
        if eqn.primitive.name in CALL_OPS and inner_jaxpr(eqn) is not None:
            outs = _evaluate(inner_jaxpr(eqn), values, probes, activations, counter)
        elif eqn.primitive.name == "scan":
            outs = _evaluate_scan(eqn, values, probes, activations, counter)
        else:
            outs = _bind(eqn, values)
            if index in factors:
                factor = values[factors[index]]
                activations["factor", index] = jnp.broadcast_to(factor, outs[0].shape)
            if index in probes:
                activations[index] = _layer_input(probes[index][0][0], values, activations)
                outs = [outs[0] + _equation_probe(probes[index]).astype(outs[0].dtype)]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in closed_jaxpr.jaxpr.outvars]


def _equation_probe(pairs):
    """The probe added to an equation's output: its layer's, or the probes of the parts
    of a concatenated operand, each padded with zeros to its place."""
    if pairs[0][0].part is None:
        return pairs[0][1]
    total = 0
    for layer, probe in pairs:
        axis, start, size = layer.part
        widths = [(0, 0)] * probe.ndim
        widths[axis] = (start, size - start - probe.shape[axis])
        total = total + jnp.pad(probe, widths)
    return total


def _layer_input(layer: Layer, values, activations):
    """The input a of a layer: its non-parameter operand (times the constant factor)."""
    value = values[1 - layer.param_operand]
    if layer.constant_factor is None:
        return value
    eqn, _, chain = layer.constant_factor
    factor = activations["factor", eqn]
    for primitive, params in chain:
        factor = primitive.bind(factor, **params)
    return value * factor.astype(value.dtype)


def _count_equations(closed_jaxpr) -> int:
    """How many indices ``_analyse`` gives a jaxpr's equations, nested ones included."""
    return sum(1 + _nested_equations(eqn) for eqn in closed_jaxpr.jaxpr.eqns)


def _nested_equations(eqn) -> int:
    """How many indices the equations nested in ``eqn`` (a call or a scan) take."""
    if eqn.primitive.name in CALL_OPS and inner_jaxpr(eqn) is not None:
        return _count_equations(inner_jaxpr(eqn))
    if eqn.primitive.name == "scan":
        return _count_equations(inner_jaxpr(eqn))
    return 0


def _evaluate_scan(eqn, values, probes, activations, counter):
    """A scan whose body holds probed layers: rerun as ``lax.scan`` with the probes as
    extra scanned inputs and the layers' inputs as extra stacked outputs."""
    body = inner_jaxpr(eqn)
    start = counter[0]
    counter[0] += _count_equations(body)
    inside = sorted(k for k in probes if start <= k < counter[0])
    if not inside:
        return _bind(eqn, values)
    num_consts, num_carry = scan_counts(eqn)
    consts, carry = values[:num_consts], values[num_consts : num_consts + num_carry]
    xs = values[num_consts + num_carry :]

    def step(carry, scanned):
        xs_t, probes_t = scanned
        step_probes = {
            k: [(layer, p) for (layer, _), p in zip(probes[k], ps, strict=True)]
            for k, ps in zip(inside, probes_t, strict=True)
        }
        # Reads fall back to the values stashed before the scan (constant factors).
        step_inputs = collections.ChainMap({}, activations)
        outs = _evaluate(body, [*consts, *carry, *xs_t], step_probes, step_inputs, [start])
        return outs[:num_carry], (outs[num_carry:], [step_inputs[k] for k in inside])

    carry, (ys, stacked_inputs) = jax.lax.scan(
        step,
        carry,
        (xs, [[p for _, p in probes[k]] for k in inside]),
        length=eqn.params["length"],
        reverse=eqn.params["reverse"],
        unroll=eqn.params["unroll"],
    )
    activations.update(zip(inside, stacked_inputs, strict=True))
    return [*carry, *ys]


def probed_apply(apply_fn, captured: Capture, params, inputs, probes):
    """``apply_fn`` with ``probes[k]`` added to the output of captured layer k.

    Returns ``(outputs, inputs_of_layers)``: the gradient of a function of the outputs
    w.r.t. ``probes[k]`` is the output-gradient g of layer k, and ``inputs_of_layers[k]``
    its input a.
    """
    closed, layers = _traced_here(apply_fn, captured, params, inputs)
    args = [*jax.tree.leaves(params), *jax.tree.leaves(inputs)]
    by_eqn = collections.defaultdict(list)
    for layer, probe in zip(layers, probes, strict=True):
        by_eqn[layer.eqn].append((layer, probe))
    activations: dict[int, jax.Array] = {}
    flat_outputs = _evaluate(closed, args, by_eqn, activations, [0])
    outputs = jax.tree.unflatten(
        jax.tree.structure(jax.eval_shape(apply_fn, params, inputs)), flat_outputs
    )
    return outputs, [activations[layer.eqn] for layer in layers]


def _traced_here(apply_fn, captured: Capture, params, inputs):
    """The jaxpr to evaluate and the captured layers at its equations.

    Inside ``shard_map`` (values varying over mapped axes) ``apply_fn`` is traced again
    on the values themselves: a primitive there needs its operands to vary alike (a
    literal 0 and the examples in a ReLU, a replicated kernel and a sharded batch), and
    tracing inserts the casts (``pvary``) that the analysis's jaxpr, traced on shapes
    alone, lacks. Its layers are found again, leaf by leaf.
    """
    if not any(varying_axes(value) for value in jax.tree.leaves((params, inputs))):
        return captured.jaxpr, captured.layers
    closed = jax.make_jaxpr(apply_fn)(params, inputs)
    uses = _uses(closed, len(jax.tree.leaves(params)))
    found = {(use.leaf, use.part): use for use in uses if use.eqn is not None}
    layers = []
    for layer in captured.layers:
        use = found.get((layer.leaf, layer.part))
        if use is None:
            name = captured.leaf_names[layer.leaf]
            raise ValueError(
                f"apply_fn traced on device-varying values (inside shard_map) does not use "
                f"{name} as the layer it is traced on shapes alone: {layer.summary}."
            )
        layers.append(
            dataclasses.replace(layer, eqn=use.eqn, constant_factor=_constant_factor(use))
        )
    return closed, tuple(layers)


def layer_inputs_and_gradients(apply_fn, captured: Capture, params, inputs, cotangent_rows):
    """One forward and one (row-batched) backward pass: (outputs, a per layer, g per layer).

    ``cotangent_rows`` is a pytree shaped like the outputs with a leading axis of R rows;
    g[k] has a leading R axis, then the shape of layer k's output.
    """
    forward = probed_forward(apply_fn, captured, params, inputs)
    return forward.outputs, forward.layer_inputs, forward.layer_gradients(cotangent_rows)


class ForwardPass(NamedTuple):
    """One forward pass of a model through its captured layers, and its linearisation.

    Everything the loss gradient and the curvature statistics of one batch need,
    computed once (see ``ng.value_and_grad``): the outputs, the input a of every
    captured layer, and the pullback of ``(params, probes) ↦ (outputs, a)``. A pytree of
    arrays (the pullback holds the forward's residuals), so it can be passed through
    ``jax.jit`` like any other argument.
    """

    outputs: PyTree
    layer_inputs: list  # a of captured layer k, as the model computed it
    pullback: Callable  # (output cotangent, a cotangents) -> (params cotangent, g per layer)

    def _pull(self, output_cotangent):
        zero_inputs = [jnp.zeros_like(a) for a in self.layer_inputs]
        return self.pullback((output_cotangent, zero_inputs))

    def parameter_gradient(self, output_cotangent):
        """Jᵀc: the gradient w.r.t. the parameters of ⟨c, outputs⟩."""
        return self._pull(output_cotangent)[0]

    def layer_gradients(self, cotangent_rows):
        """g per captured layer for each of the R cotangent rows (leading axis R)."""
        return jax.vmap(lambda row: self._pull(row)[1])(cotangent_rows)

    def jvp(self, tangent):
        """J v: the outputs' tangent along a parameter tangent v, without a new forward
        pass (the transpose of the linear pullback)."""
        _, probes = jax.eval_shape(self._pull, self.outputs)
        zeros = _zero_probes(probes, jax.tree.leaves(self.outputs)[0])
        return jax.linear_transpose(self._pull, self.outputs)((tangent, zeros))[0]


def _zero_probes(shapes, batch_like) -> list:
    """Zeros of the probes' ``shapes``; inside shard_map varying like ``batch_like`` (a
    batch array), or their cotangents (the g) would be summed over the devices."""
    zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    for axis in sorted(varying_axes(batch_like)):
        zeros = [jax.lax.pcast(z, axis, to="varying") for z in zeros]
    return zeros


def probed_forward(apply_fn, captured: Capture, params, inputs) -> ForwardPass:
    """One forward pass of ``apply_fn`` with a zero probe on every captured layer."""
    shapes = [
        jax.ShapeDtypeStruct(layer.probe_shape, layer.output_dtype) for layer in captured.layers
    ]
    zeros = _zero_probes(shapes, jax.tree.leaves(inputs)[0])

    def forward(params, probes):
        return probed_apply(apply_fn, captured, params, inputs, probes)

    (outputs, layer_inputs), pullback = jax.vjp(forward, params, zeros)
    return ForwardPass(outputs, layer_inputs, pullback)


def operand_of(layer: Layer, leaf):
    """The layer's parameter operand computed from the leaf, through its chain of casts
    and layout operations (a bias or scale: with its broadcast axes of size one)."""
    for primitive, params in layer.chain:
        leaf = primitive.bind(leaf, **params)
    return leaf.reshape(layer.operand_shape) if layer.kind in ("add", "mul") else leaf


def per_example_gradient(layer: Layer, activation, gradient, leaf_value):
    """The (N, *leaf.shape) per-example gradients of one captured leaf from its a and g.

    Exactly the vjp of the layer restricted to each example: used to check capture
    against ``jax.vmap`` of ``jax.grad``; the curvature code uses a and g directly.
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
