r"""Score rows in factored form: (a, g) per captured layer, dense rows for the rest.

The score matrix S (rows = examples × output-Fisher rows, F = SᵀS/N) restricted to a
captured layer is never formed. For a matmul layer with inputs a_{it} ∈ ℝᴷ and
output-gradients g_{rit} ∈ ℝᴰ (t runs over positions sharing the weight, e.g. tokens),
row (r, i) of S is vec(Σ_t a_{it} g_{rit}ᵀ), so

* S v       = Σ_t a_{it}ᵀ V g_{rit}                       (V: v as a K×D matrix),
* Sᵀ u      = Σ_{r,i,t} u_{ri} a_{it} g_{rit}ᵀ,
* S Sᵀ      = Σ_{t,u} (a_{it}·a_{ju}) (g_{rit}·g_{sju})    ((AAᵀ)⊙(GGᵀ) when T = 1),
* diag(SᵀS) = Σ_{r,i} (a_i ⊙ a_i)(g_{ri} ⊙ g_{ri})ᵀ       (T = 1),
* Kronecker factors E[aaᵀ] and E[ggᵀ].

A convolution is a matmul of its kernel (K = input channels × window, D = output
channels) with the input's patches, positions = output sites (KFC, Grosse & Martens
2016). A bias added to a layer's output is a layer with a = 1 (K = 1); an elementwise
scale s in y = x ⊙ s is one with a = 1 and output-gradient g ⊙ x. Leaves that capture
could not explain keep dense per-example rows from ``jax.vmap``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from natgrad_jax import _vectors as vectors
from natgrad_jax._blocks import block_ranges, stacked
from natgrad_jax._capture import (
    Capture,
    Layer,
    capture,
    operand_of,
)
from natgrad_jax._capture.convolution import convolution
from natgrad_jax._fisher import (
    batch_size,
    device_varying,
    varying_axes,
)

PyTree = Any


# --- the K×D layout of a captured leaf ---------------------------------------------------


def _dot_dims(layer: Layer):
    """(W contracting, W free, x contracting, x positions) axes of a captured matmul."""
    (lhs_contract, rhs_contract), _ = layer.dimension_numbers
    w_contract, x_contract = (
        (lhs_contract, rhs_contract) if layer.param_operand == 0 else (rhs_contract, lhs_contract)
    )
    w_free = [d for d in range(len(layer.operand_shape)) if d not in w_contract]
    x_free = [d for d in range(len(layer.input_shape)) if d not in x_contract]
    return list(w_contract), w_free, list(x_contract), x_free


def output_layout(layer: Layer):
    """(example axis, position axes, feature axes) of the layer's output."""
    if layer.kind == "conv":
        spec = layer.primitive_params["dimension_numbers"].out_spec
        return spec[0], list(spec[2:]), [spec[1]]
    if layer.kind == "embed":
        offsets = layer.primitive_params["dimension_numbers"].offset_dims
        example = layer.output_example_axis
        positions = [d for d in range(len(layer.output_shape)) if d not in (example, *offsets)]
        return example, positions, [offsets[-1]]
    if layer.kind in ("add", "mul"):
        out, operand = layer.output_shape, layer.operand_shape
        example = layer.output_example_axis
        positions = [d for d in range(len(out)) if d != example and operand[d] == 1 and out[d] != 1]
        features = [d for d in range(len(out)) if d != example and operand[d] == out[d]]
        return example, positions, features
    _, w_free, _, x_free = _dot_dims(layer)
    x_positions = [len(w_free) + k if layer.param_operand == 0 else k for k in range(len(x_free))]
    w_positions = [k if layer.param_operand == 0 else len(x_free) + k for k in range(len(w_free))]
    example = layer.output_example_axis
    return example, [d for d in x_positions if d != example], w_positions


def _normalise_gradient(layer: Layer, g):
    """g (leading row axis, then the scan steps and the layer's output) → (R, N, T, D);
    positions T are the scan steps, then the output's own position axes."""
    example, positions, features = output_layout(layer)
    steps = len(layer.scan_lengths)
    body = [1 + steps + d for d in range(g.ndim - 1 - steps)]
    order = [body[example], *range(1, 1 + steps), *(body[d] for d in (*positions, *features))]
    rest = [a for a in body if a not in order]  # axes of size one
    g = jnp.transpose(g, (0, *order, *rest))
    t = math.prod(g.shape[2 : 2 + steps + len(positions)])
    return g.reshape(g.shape[0], g.shape[1], t, -1)


def _kernel_output_axis(layer: Layer) -> int:
    return layer.primitive_params["dimension_numbers"].rhs_spec[0]


def _conv_patches(layer: Layer, x):
    """x's patches as (N, T, K): row (n, t) is what the kernel, viewed as K×D by
    ``leaf_to_matrix``, multiplies at output site t. Sliced out of x where the
    convolution neither dilates its input nor groups its features (``_sliced_patches``),
    else computed by the same convolution with a one-hot kernel, so that strides,
    padding, dilations and layouts all carry over."""
    sliced = _sliced_patches(layer, x)
    if sliced is not None:
        return sliced
    shape = layer.operand_shape
    out_axis = _kernel_output_axis(layer)
    window = [shape[d] for d in range(len(shape)) if d != out_axis]
    k = math.prod(window)
    one_hot = jnp.moveaxis(jnp.eye(k, dtype=x.dtype).reshape(k, *window), 0, out_axis)
    exact = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    params = dict(layer.primitive_params, precision=exact, preferred_element_type=None)
    patches = convolution(params, x, _varying_like(one_hot, x))  # in XLA's fast layout
    spec = layer.primitive_params["dimension_numbers"].out_spec
    patches = jnp.transpose(patches, (spec[0], *spec[2:], spec[1]))
    return patches.reshape(patches.shape[0], -1, k)


def _sliced_patches(layer: Layer, x):
    """``_conv_patches`` as strided slices of the padded input, one per kernel window
    position, or None for a convolution that dilates its input or groups its features.
    Moving the patches costs N·T·K floats; the one-hot convolution multiplies as many
    by K: for the 3×3, 16-channel layer of ``benchmarks/cnn.py`` (K = 144) 3.9 ms of a
    refresh's 46 (2-core CPU, jax 0.10.2)."""
    params = layer.primitive_params
    grouped = params["feature_group_count"] != 1 or params["batch_group_count"] != 1
    if grouped or any(d != 1 for d in params["lhs_dilation"]):
        return None
    numbers = params["dimension_numbers"]
    lhs_spec, rhs_spec = numbers.lhs_spec, numbers.rhs_spec
    x = jnp.transpose(x, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # (N, spatial…, C)
    no_padding = (0, 0, 0)
    x = jax.lax.pad(
        x,
        jnp.zeros((), x.dtype),
        [no_padding, *((lo, hi, 0) for lo, hi in params["padding"]), no_padding],
    )
    window = [layer.operand_shape[d] for d in rhs_spec[2:]]
    strides, dilations = params["window_strides"], params["rhs_dilation"]
    sizes = [
        (size - dilation * (k - 1) - 1) // stride + 1
        for size, k, stride, dilation in zip(x.shape[1:-1], window, strides, dilations, strict=True)
    ]
    slices = [
        jax.lax.slice(
            x,
            (0, *(i * d for i, d in zip(offset, dilations, strict=True)), 0),
            (
                x.shape[0],
                *(
                    i * d + (o - 1) * s + 1
                    for i, d, o, s in zip(offset, dilations, sizes, strides, strict=True)
                ),
                x.shape[-1],
            ),
            (1, *strides, 1),
        )
        for offset in itertools.product(*map(range, window))
    ]
    patches = jnp.stack(slices, axis=-2).reshape(*x.shape[:1], *sizes, *window, x.shape[-1])
    # The window's axes (spatial…, C) in the kernel's own order of its input axes.
    canonical = {axis: i for i, axis in enumerate((*rhs_spec[2:], rhs_spec[1]))}
    order = [canonical[axis] for axis in range(len(rhs_spec)) if axis != rhs_spec[0]]
    leading = len(sizes) + 1
    patches = jnp.transpose(patches, (*range(leading), *(leading + i for i in order)))
    return patches.reshape(patches.shape[0], math.prod(sizes), -1)


def _embedding_rows(layer: Layer, indices):
    """One-hot rows (N, T, V) of the table rows an embedding lookup reads: the same
    gather on a table whose entries are their row numbers (none where it reads none)."""
    num_rows, width = layer.operand_shape
    numbers = jnp.broadcast_to(jnp.arange(num_rows, dtype=jnp.float32)[:, None], (num_rows, width))
    params = dict(layer.primitive_params)
    if params.get("fill_value") is not None or "FILL" in str(params.get("mode")):
        params["fill_value"] = -1.0  # out-of-range indices read no row
    rows = layer.primitive.bind(_varying_like(numbers, indices), indices, **params)
    example, positions, (feature,) = output_layout(layer)
    leading = (example, *positions, feature)  # the other axes have size one
    rows = jnp.moveaxis(rows, leading, range(len(leading)))
    rows = jnp.take(rows, 0, axis=len(positions) + 1)
    return jax.nn.one_hot(rows.reshape(rows.shape[0], -1).astype(jnp.int32), num_rows)


def _normalise_step_input(layer: Layer, x):
    """One step's layer input x → (N, T, K)."""
    if layer.kind == "conv":
        return _conv_patches(layer, x)
    if layer.kind == "embed":
        return _embedding_rows(layer, x)
    _, _, x_contract, x_free = _dot_dims(layer)
    example = layer.input_example_axis
    positions = [d for d in x_free if d != example]
    x = jnp.transpose(x, (example, *positions, *x_contract))
    k = math.prod(x.shape[1 + len(positions) :])
    return x.reshape(x.shape[0], -1, k)


def _normalise_input(layer: Layer, x):
    """x (stacked over the scan steps) → (N, T, K), positions ordered as in
    ``_normalise_gradient``; biases and scales have no input (a = 1)."""
    if layer.kind in ("add", "mul"):
        raise AssertionError("bias and scale layers have no input")
    normalise = functools.partial(_normalise_step_input, layer)
    for _ in layer.scan_lengths:
        normalise = jax.vmap(normalise)
    x = jnp.moveaxis(normalise(x), len(layer.scan_lengths), 0)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def leaf_to_matrix(layer: Layer, leaf) -> jax.Array:
    """The K×D matrix view of a leaf-shaped array (a permutation of its entries)."""
    operand = operand_of(layer, leaf)
    if layer.kind == "embed":
        return operand
    if layer.kind in ("add", "mul"):
        return operand.reshape(1, -1)
    if layer.kind == "conv":
        operand = jnp.moveaxis(operand, _kernel_output_axis(layer), -1)
        return operand.reshape(-1, operand.shape[-1])
    w_contract, w_free, _, _ = _dot_dims(layer)
    operand = jnp.transpose(operand, (*w_contract, *w_free))
    k = math.prod(operand.shape[: len(w_contract)])
    return operand.reshape(k, -1)


def _varying_like(value, like):
    """``value`` marked varying over the mapped axes ``like`` varies over (in shard_map)."""
    for axis in sorted(varying_axes(like) - varying_axes(value)):
        value = jax.lax.pcast(value, axis, to="varying")
    return value


def matrix_to_leaf(layer: Layer, matrix, leaf_template) -> jax.Array:
    """Inverse of ``leaf_to_matrix``: a K×D matrix back to the leaf's shape."""
    template = _varying_like(leaf_template.astype(matrix.dtype), matrix)
    view, pullback = jax.vjp(lambda leaf: leaf_to_matrix(layer, leaf), template)
    return pullback(matrix.astype(view.dtype))[0].astype(matrix.dtype)


# --- the factored rows ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FactoredRows:
    """S in factored form for one batch; see the module docstring for the algebra."""

    capture: Capture
    inputs: tuple  # per layer (N, T, K); None for biases (a = 1)
    gradients: tuple  # per layer (R, N, T, D)
    fallback_rows: jax.Array  # (R, N, P_fallback) dense rows of the other leaves
    leaf_templates: tuple  # zero arrays shaped like the leaves (for layout maps)
    num_examples: int
    # The examples are split over a mesh's devices (``mesh=``): second moments contract
    # the rows, examples and positions where they lie (``_second_moment``).
    spread: bool = False

    def layer_inputs(self, index):
        """a of layer ``index`` as (N, T, K); ones (K = 1) for a bias or a scale."""
        a = self.inputs[index]
        if a is None:
            g = self.gradients[index]
            return jnp.ones((g.shape[1], g.shape[2], 1), g.dtype)
        return a

    def _fallback_part(self, leaves):
        if not self.capture.fallback:
            return jnp.zeros((0,), self.fallback_rows.dtype)
        return jnp.concatenate([leaves[k].ravel() for k in self.capture.fallback])

    def _leaves(self, per_layer, fallback) -> tuple:
        """The vector (leaf by leaf) of per-layer K×D matrices and the fallback leaves'
        entries (flat, in ``capture.fallback`` order)."""
        leaves = [None] * len(self.leaf_templates)
        for layer, matrix in zip(self.capture.layers, per_layer, strict=True):
            leaves[layer.leaf] = matrix_to_leaf(layer, matrix, self.leaf_templates[layer.leaf])
        offset = 0
        for k in self.capture.fallback:
            size = self.leaf_templates[k].size
            leaves[k] = fallback[offset : offset + size].reshape(self.leaf_templates[k].shape)
            offset += size
        dtype = per_layer[0].dtype if per_layer else fallback.dtype
        return tuple(leaf.astype(dtype) for leaf in leaves)

    def matvec(self, leaves):
        """S v as an (R, N) array, for v leaf by leaf."""
        dtype = vectors.dtype_of(leaves)
        total = jnp.einsum("rnp,p->rn", self.fallback_rows, self._fallback_part(leaves))
        for index, layer in enumerate(self.capture.layers):
            v = leaf_to_matrix(layer, leaves[layer.leaf]).astype(dtype)
            a, g = self.layer_inputs(index), self.gradients[index]
            total = total + jnp.einsum("ntk,kd,rntd->rn", a, v, g)
        return total

    def rmatvec(self, weights):
        """Sᵀ u for u of shape (R, N), leaf by leaf."""
        per_layer = [
            jnp.einsum("rn,ntk,rntd->kd", weights, self.layer_inputs(index), self.gradients[index])
            for index in range(len(self.capture.layers))
        ]
        return self._leaves(per_layer, jnp.einsum("rn,rnp->p", weights, self.fallback_rows))

    def kernel(self):
        """S Sᵀ as an (R·N, R·N) matrix, rows ordered (r, i)."""
        r, n = self.fallback_rows.shape[:2]
        fallback = self.fallback_rows.reshape(r * n, -1)
        total = (fallback @ fallback.T).reshape(r, n, r, n)
        for index in range(len(self.capture.layers)):
            a, g = self.layer_inputs(index), self.gradients[index]
            if a.shape[1] == 1:
                inputs = a[:, 0] @ a[:, 0].T
                total = total + inputs[None, :, None, :] * jnp.einsum(
                    "rnd,smd->rnsm", g[:, :, 0], g[:, :, 0]
                )
            elif _per_example_is_smaller(a, g):
                per_example = jnp.einsum("ntk,rntd->rnkd", a, g)
                total = total + jnp.einsum("rnkd,smkd->rnsm", per_example, per_example)
            else:
                inputs = jnp.einsum("ntk,muk->ntmu", a, a)
                total = total + jnp.einsum("ntmu,rntd,smud->rnsm", inputs, g, g)
        return total.reshape(r * n, r * n)

    def diagonal(self, skip=()):
        """diag(SᵀS), leaf by leaf (zeros for the captured layers in ``skip``)."""
        per_layer = []
        for index in range(len(self.capture.layers)):
            a, g = self.layer_inputs(index), self.gradients[index]
            if index in skip:
                per_layer.append(jnp.zeros((a.shape[-1], g.shape[-1]), g.dtype))
            elif a.shape[1] == 1:
                per_layer.append(jnp.einsum("nk,rnd->kd", a[:, 0] ** 2, g[:, :, 0] ** 2))
            else:
                per_example = jnp.einsum("ntk,rntd->rnkd", a, g)
                per_layer.append(jnp.sum(per_example**2, axis=(0, 1)))
        return self._leaves(per_layer, jnp.sum(self.fallback_rows**2, axis=(0, 1)))

    def leaf_gradients(self, index, shape):
        """Score rows of bias or scale layer ``index`` (a = 1, positions summed) in its
        leaf's layout, as ``shape`` (the leaf's m×n): (R·N, m, n)."""
        layer = self.capture.layers[index]
        g = jnp.sum(self.gradients[index], axis=2)
        template = self.leaf_templates[layer.leaf]
        to_leaf = jax.vmap(lambda row: matrix_to_leaf(layer, row[None], template))
        return to_leaf(g.reshape(-1, g.shape[-1])).reshape(-1, *shape)

    def tensor_normal_moments(self, index, shape, forms=(None, None)):
        """(E[G Gᵀ], E[GᵀG]) of the score rows G of layer ``index`` as m×n matrices
        (``leaf_gradients``), sums over the rows / N; ``forms=(left, right)`` as in
        ``kronecker_factors``."""
        g = self.leaf_gradients(index, shape)  # (rows, m, n)
        left = _second_moment(jnp.swapaxes(g, 1, 2), forms[0], self.spread)  # Σ_{r,j} g gᵀ
        right = _second_moment(g, forms[1], self.spread)  # Σ_{r,i} over the columns
        return left / self.num_examples, right / self.num_examples

    def kronecker_factors(self, index, approximation: str = "expand", forms=(None, None)):
        """(A, G) of layer ``index``, whose Kronecker product approximates its block;
        ``forms=(for A, for G)`` the shape each is wanted in: None or (s, s) whole, (s,)
        its diagonal only, (B, b, b) its diagonal blocks (``_blocks``).

        With T positions sharing the weight (tokens, convolution sites; Eschenhagen et
        al. 2023):

        * ``"expand"``: positions count as examples,
          A = 1/N Σ_{n,t} a aᵀ and G = 1/(N·T) Σ_{r,n,t} g gᵀ;
        * ``"reduce"``: positions are summed first,
          A = 1/N Σ_n āₙāₙᵀ with āₙ = 1/T Σ_t a_{nt}, and G = 1/N Σ_{r,n} ĝ ĝᵀ with
          ĝ_{rn} = Σ_t g_{rnt}.

        Both are the same for T = 1; "reduce" is exact for one example whose inputs are
        the same at every position, "expand" when the positions' gradients are
        uncorrelated. G is a sum over the rows r (``output_factor``), A is not
        (``input_factor``).
        """
        return (
            self.input_factor(index, approximation, forms[0]),
            self.output_factor(index, approximation, forms[1]),
        )

    def input_factor(self, index, approximation: str = "expand", form=None, sample=None):
        """A of ``kronecker_factors``. ``sample=(key, S)`` ("expand" only): from S of
        the layer's N·T positions (``sampled_positions``), N·T/S · 1/N Σ over them, an
        unbiased estimate of A."""
        a = self.layer_inputs(index)
        if approximation == "reduce":
            a = jnp.mean(a, axis=1, keepdims=True)
        num_positions = a.shape[0] * a.shape[1]
        positions = sampled_positions(index, sample, num_positions)
        if positions is None:
            return _second_moment(a, form, self.spread) / self.num_examples
        scale = num_positions / positions.shape[0]
        sampled = a.reshape(num_positions, -1)[positions]
        return _second_moment(sampled, form, self.spread) * (scale / self.num_examples)

    def output_factor(self, index, approximation: str = "expand", form=None, sample=None):
        """G of ``kronecker_factors``: a sum over the output-Fisher rows. With
        ``sample`` (as ``input_factor``, the same positions) 1/S Σ over those positions
        of every row."""
        g = self.gradients[index]
        t = 1 if approximation == "reduce" else g.shape[2]
        if approximation == "reduce":
            g = jnp.sum(g, axis=2, keepdims=True)
        num_positions = g.shape[1] * g.shape[2]
        positions = sampled_positions(index, sample, num_positions)
        if positions is None:
            return _second_moment(g, form, self.spread) / (self.num_examples * t)
        sampled = g.reshape(g.shape[0], num_positions, -1)[:, positions]
        return _second_moment(sampled, form, self.spread) / positions.shape[0]


def sampled_positions(index, sample, num_positions: int):
    """S of a layer's ``num_positions`` positions, drawn uniformly with replacement, for
    ``sample=(key, S)``; the same for every call with that key and layer ``index``
    (inside a loop over chunks of rows too). None without a sample or with S ≥ N·T.

    With replacement: drawing without it (``jax.random.choice``) sorts a permutation of
    the N·T positions, which cost more than the products it saves (the LM benchmark's
    measurement took 1.4× the full one's; ``benchmarks/factor_subsampling.py``)."""
    if sample is None or num_positions <= sample[1]:
        return None
    key, count = sample
    layer_key = jax.random.fold_in(key, index)
    return jax.random.randint(layer_key, (count,), 0, num_positions)


def _is_diagonal(form) -> bool:
    return form is not None and len(form) == 1


def _second_moment(x, form=None, spread: bool = False):
    """Σ x xᵀ over all but the last axis of x, in ``form``: None or (s, s) whole, (s,)
    its diagonal Σ x ⊙ x, (B, b, b) its diagonal blocks (``_blocks``: B products of
    b columns, s·b work per row against s²).

    On one device the leading axes are merged into rows first, free for XLA's
    row-major layout; contracting them in place instead costs a transposed copy of x
    (a (10, 128, 1024, 32) statistic: 12 against 64 ms, 2-core CPU). With ``spread``
    (examples split over devices) they are contracted in place: merging the row axis
    with the split example axis would make XLA all-gather x (EKFAC's step on the 2×4
    mesh of docs/sharding.md: 16.6 MiB per device against 14.1).
    """
    leading = tuple(range(x.ndim - 1))
    if _is_diagonal(form):  # a reduction: no copy, whatever the layout
        return jnp.sum(x**2, axis=leading)
    if form is not None and len(form) == 3:
        ranges = block_ranges(x.shape[-1], form[0])
        return stacked([_second_moment(x[..., a:b], None, spread) for a, b in ranges])
    if spread:
        return jnp.tensordot(x, x, axes=(leading, leading))
    rows = x.reshape(-1, x.shape[-1])
    return rows.T @ rows


# A chunk of output-Fisher rows flows back through the network layer by layer, each
# layer's g reduced to its statistic as it comes: XLA's memory analysis of a chunked
# exact-Fisher K-FAC step on a transformer holds about four of the largest layer's g.
STREAMED_LAYERS = 4


class RowSizes(NamedTuple):
    """Floats of one batch's score rows as a solver forms them, for the memory guard:
    the captured layers' inputs a (``input_floats``), the dense rows of the leaves
    capture left out (``fallback_floats``; every leaf for ``dense_row_sizes``), and per
    captured layer its g (``g_layers``) and the per-example gradients a diagonal forms
    from a and g where the layer is shared across positions (``per_example_layers``; 0
    elsewhere). ``captured`` and ``num_examples`` are the capture and batch size they
    were computed from (``solver="auto"`` decides from them). ``streamed``: the rows
    are taken a chunk at a time inside a loop, whose body holds a few layers' g at once
    (``STREAMED_LAYERS``) rather than every layer's."""

    input_floats: int = 0
    fallback_floats: int = 0
    g_layers: tuple[int, ...] = ()
    per_example_layers: tuple[int, ...] = ()
    rows_per_example: int = 1
    captured: Capture | None = None
    num_examples: int = 0
    # a and one output row per example of every captured layer: about what a forward
    # pass linearised for Fisher-vector products keeps (CG).
    activations: int = 0
    streamed: bool = False

    def _held(self, per_layer, layers_at_once: int = STREAMED_LAYERS) -> int:
        total = sum(per_layer)
        if not self.streamed:
            return total
        return min(total, layers_at_once * max(per_layer, default=0))

    @property
    def row_floats(self) -> int:
        """The part proportional to the rows: g and the dense rows."""
        return self.fallback_floats + self._held(self.g_layers)

    @property
    def stored(self) -> int:
        """a, g and the dense rows."""
        return self.input_floats + self.row_floats

    @property
    def per_example(self) -> int:
        """The per-example gradients of every captured layer shared across positions
        (streamed: one layer's at a time, each squared and summed as it is formed)."""
        return self._held(self.per_example_layers, layers_at_once=1)

    def per_example_except(self, skip) -> int:
        """Those of the layers not in ``skip`` (K-FAC forms them only for the layers it
        does not factor, for their exact diagonal)."""
        kept = [f for k, f in enumerate(self.per_example_layers) if k not in skip]
        return self._held(kept, layers_at_once=1)

    def in_chunks_of(self, chunk_rows: int) -> RowSizes:
        """The sizes when the rows are taken ``chunk_rows`` per example at a time, in a
        loop: what is proportional to the rows (g, the per-example gradients) shrinks."""
        if chunk_rows >= self.rows_per_example:
            return self
        kept = lambda floats: floats * chunk_rows // self.rows_per_example
        return self._replace(
            fallback_floats=kept(self.fallback_floats),
            g_layers=tuple(map(kept, self.g_layers)),
            per_example_layers=tuple(map(kept, self.per_example_layers)),
            rows_per_example=chunk_rows,
            streamed=True,
        )


def dense_row_sizes(num_params: int, num_rows: int) -> RowSizes:
    """The (M, P) rows ``jax.vmap`` forms."""
    return RowSizes(fallback_floats=num_params * num_rows)


def captured_row_sizes(captured: Capture, leaf_shapes, num_rows: int, num_examples: int):
    """``RowSizes`` of ``factored_rows``: per captured K×D layer over T positions,
    a (N·T·K; none for biases and scales) and g (M·T·D; twice for a scale, g ⊙ x), plus
    M·K·D per-example gradients when T > 1; M rows of every leaf left to vmap."""
    fallback = num_rows * sum(math.prod(leaf_shapes[k]) for k in captured.fallback)
    input_floats, output_floats, g_layers, per_example = 0, 0, [], []
    for layer in captured.layers:
        template = jax.ShapeDtypeStruct(leaf_shapes[layer.leaf], jnp.float32)
        k, d = jax.eval_shape(lambda leaf, layer=layer: leaf_to_matrix(layer, leaf), template).shape
        traced_examples = layer.output_shape[layer.output_example_axis]
        t = max(math.prod(layer.probe_shape) // max(traced_examples * d, 1), 1)
        g_layers.append((1 + (layer.kind == "mul")) * num_rows * t * d)
        output_floats += (1 + (layer.kind == "mul")) * num_examples * t * d
        input_floats += 0 if layer.kind in ("add", "mul") else num_examples * t * k
        per_example.append(num_rows * k * d if t > 1 else 0)
    return RowSizes(
        input_floats=input_floats,
        fallback_floats=fallback,
        g_layers=tuple(g_layers),
        per_example_layers=tuple(per_example),
        rows_per_example=max(num_rows // max(num_examples, 1), 1),
        captured=captured,
        num_examples=num_examples,
        activations=input_floats + output_floats,
    )


def _per_example_is_smaller(a, g) -> bool:
    """Whether the per-example gradients (R·N·K·D) take less memory than the position
    Gram matrix (N·T)² of a layer shared across T positions (convolutions, tokens)."""
    (r, n, t, d), k = g.shape, a.shape[-1]
    return r * n * k * d < (n * t) ** 2


def _fallback_rows(batch, captured: Capture, cotangents, dtype):
    """(R, N, P_fallback) per-example rows of the leaves capture left out, via vmap."""
    leaves, treedef = jax.tree.flatten(batch.params)
    num_rows = jax.tree.leaves(cotangents)[0].shape[0]
    if not captured.fallback:  # this device's (empty) share, gathered by the caller
        return jnp.zeros((num_rows, batch_size(batch.inputs), 0), dtype)

    def with_fallback(fallback_leaves):
        merged = list(leaves)
        for k, leaf in zip(captured.fallback, fallback_leaves, strict=True):
            merged[k] = leaf
        return jax.tree.unflatten(treedef, merged)

    fallback_values = [leaves[k] for k in captured.fallback]

    def rows_of_example(x, cot):  # x: one example as a batch of one; cot: (R, 1, ...)
        _, pullback = jax.vjp(lambda f: batch.model.apply_fn(with_fallback(f), x), fallback_values)
        pulled = jax.vmap(lambda c: pullback(c)[0])(cot)
        return jnp.concatenate([p.reshape(num_rows, -1) for p in pulled], axis=1)

    example_cotangents = jax.tree.map(lambda c: jnp.moveaxis(c, 1, 0)[:, :, None], cotangents)
    per_example = jax.vmap(lambda x, c: rows_of_example(jax.tree.map(lambda a: a[None], x), c))(
        batch.inputs, example_cotangents
    )
    return jnp.moveaxis(per_example, 0, 1).astype(dtype)


# The exact Fisher's statistics back-propagate each of an example's R output-Fisher
# rows (R = the entries of its outputs: a per-token Categorical LM has positions ×
# classes), one backward pass each, where the Monte-Carlo Fisher takes one per sampled
# label. 1,024 admits a Gaussian model of 28×28 images (784 rows); the transformer LM of
# benchmarks/transformer_lm.py has 64 × 95 = 6,080: on a 2-core CPU its first EKFAC step
# (a refresh) took 482 s, and K-FAC's had not ended after 290 s (an AdamW step: 36 ms).
DEFAULT_MAX_EXACT_ROWS = 1024


def check_max_exact_rows(value) -> None:
    if value is not None and not (
        isinstance(value, int) and not isinstance(value, bool) and value >= 1
    ):
        raise ValueError(f"max_exact_rows must be an int ≥ 1 or None, got {value!r}.")


def factored_rows(batch, dtype=None) -> FactoredRows:
    """One forward and one row-batched backward pass: the factored score rows of ``batch``.

    With ``batch.axis_name`` each device computes (a, g) for its examples and gathers
    everyone's, so the rows — and all that is computed from them — are the whole batch's.
    """
    cotangent_rows, rows_of = rows_of_cotangents(batch, dtype)
    return rows_of(cotangent_rows())


def row_chunk(cotangents, index, chunk_rows: int):
    """Rows [index·chunk_rows, (index + 1)·chunk_rows) of the (R, ...) cotangent rows.

    The last chunk is the last ``chunk_rows`` rows with those an earlier chunk holds set
    to zero, which add nothing to a sum of products of g. Under ``jit`` the slice fuses
    with the elementwise formula of closed-form rows, so the R rows are never formed.
    """
    num_rows = jax.tree.leaves(cotangents)[0].shape[0]
    first = index * chunk_rows
    start = jnp.minimum(first, num_rows - chunk_rows)
    fresh = start + jnp.arange(chunk_rows) >= first

    def chunk(c):
        rows = jax.lax.dynamic_slice_in_dim(c, start, chunk_rows, axis=0)
        return rows * fresh.reshape((chunk_rows,) + (1,) * (c.ndim - 1)).astype(c.dtype)

    return jax.tree.map(chunk, cotangents)


def sum_over_chunks(rows_of, chunk_of, num_chunks: int, statistic):
    """Σ over k < ``num_chunks`` of ``statistic(rows_of(chunk_of(k)))``, one chunk of
    cotangent rows and their g at a time.

    For a statistic that is a sum over rows (K-FAC's output factors, exact diagonals)
    this equals ``statistic(rows_of(all rows))`` without holding every row: an exact
    Fisher with R rows per example (784 for a Gaussian image model, C for C classes)
    holds R·N·outputs cotangent floats, and R·N·T·D floats of g per layer, unchunked.
    """

    def add_chunk(total, index):
        return jax.tree.map(jnp.add, total, statistic(rows_of(chunk_of(index)))), None

    # zeros_like of the shapes keeps their varying manual axes (inside shard_map).
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: statistic(rows_of(chunk_of(0)))))
    return jax.lax.scan(add_chunk, zeros, jnp.arange(num_chunks))[0]


def summed_over_rows(batch, statistic, chunk_rows: int | None, dtype=None):
    """(``statistic`` of the batch's factored score rows, the rows, whether complete).

    ``statistic`` must be a sum over the output-Fisher rows (K-FAC's output factors,
    exact diagonals). With more than ``chunk_rows`` rows per example it is accumulated
    that many rows at a time (``sum_over_chunks``), each chunk's cotangent rows computed
    in the loop, and the rows returned are the first chunk's (their layer inputs a are
    every row's; their g are not): incomplete. ``chunk_rows=None``: all at once.
    """
    cotangent_rows, rows_of = rows_of_cotangents(batch, dtype)
    num_rows = jax.tree.leaves(jax.eval_shape(cotangent_rows))[0].shape[0]
    if chunk_rows is None or num_rows <= chunk_rows:
        rows = rows_of(cotangent_rows())
        return statistic(rows), rows, True

    def chunk_of(index):
        return row_chunk(cotangent_rows(loop_index=index), index, chunk_rows)

    num_chunks = -(-num_rows // chunk_rows)
    first = rows_of(chunk_of(0))
    return sum_over_chunks(rows_of, chunk_of, num_chunks, statistic), first, False


def rows_of_cotangents(batch, dtype=None):
    """(``cotangent_rows``, ``rows_of``) after one forward pass: ``cotangent_rows()``
    the batch's output-Fisher cotangent rows (``cotangent_rows(loop_index=k)`` inside a
    loop over chunks of them), and ``rows_of(rows)`` the ``FactoredRows`` of (some of)
    those rows."""
    captured = capture(batch.model.apply_fn, batch.params, batch.inputs)
    forward = batch.forward_pass()
    batch = dataclasses.replace(batch, params=device_varying(batch.params, batch.axis_name))
    activations = forward.layer_inputs
    dtype = dtype or jnp.result_type(*jax.tree.leaves(batch.params), jnp.float32)
    inputs = tuple(
        None
        if layer.kind in ("add", "mul")
        else batch.gather_examples(_normalise_input(layer, a).astype(dtype))
        for layer, a in zip(captured.layers, activations, strict=True)
    )
    templates = tuple(jnp.zeros(np.shape(leaf), dtype) for leaf in jax.tree.leaves(batch.params))

    def rows_of(cotangent_rows):
        gradients = [
            _normalise_gradient(layer, g * a if layer.kind == "mul" else g).astype(dtype)
            for layer, a, g in zip(
                captured.layers, activations, forward.layer_gradients(cotangent_rows), strict=True
            )
        ]
        fallback = _fallback_rows(batch, captured, cotangent_rows, dtype)
        return FactoredRows(
            capture=captured,
            inputs=inputs,
            gradients=tuple(batch.gather_examples(g, axis=1) for g in gradients),
            fallback_rows=batch.gather_examples(fallback, axis=1),
            leaf_templates=templates,
            num_examples=batch.num_examples,
            spread=batch.mesh is not None,
        )

    def cotangent_rows(loop_index=None):
        outputs = forward.outputs
        if loop_index is not None:
            # Ties the outputs to the loop's index, so that XLA forms the rows inside
            # the loop, where a slice of them fuses with their formula, instead of
            # hoisting all R rows out of it.
            outputs, _ = jax.lax.optimization_barrier((outputs, loop_index))
        return jax.lax.stop_gradient(batch.cotangent_rows(outputs))

    return cotangent_rows, rows_of
