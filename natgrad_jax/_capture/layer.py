"""What capture finds: ``Layer``, one captured use of a parameter leaf, and ``Capture``."""

from __future__ import annotations

import dataclasses
from typing import Any

from natgrad_jax._capture.uses import SHARDING_OPS


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


def operand_of(layer: Layer, leaf):
    """The layer's parameter operand computed from the leaf, through its chain of casts
    and layout operations (a bias or scale: with its broadcast axes of size one)."""
    for primitive, params in layer.chain:
        if primitive.name not in SHARDING_OPS:  # placements of the traced model's mesh
            leaf = primitive.bind(leaf, **params)
    return leaf.reshape(layer.operand_shape) if layer.kind in ("add", "mul") else leaf
