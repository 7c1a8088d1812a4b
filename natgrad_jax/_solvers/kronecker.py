r"""The Kronecker-factored representation (K-FAC) for captured layers, no tagging needed.

For a captured matmul layer with inputs a and output-gradients g, the Fisher block of
its weight (as a K×D matrix) is approximated by

    F_W ≈ E[a aᵀ] ⊗ E[g gᵀ] = A ⊗ G,

exact for a single example and for deep linear networks with a Gaussian likelihood (g
does not depend on the example there). A bias is a layer with a = 1, so its block is
E[g gᵀ] — exact when each bias is used once per example; added straight to its
weight's output, it has the weight's g, and shares its G and π
(``shared_output_factors``). The damped solve uses
factored Tikhonov ("π") damping (Martens & Grosse 2015, section 6.3):

    ΔW = (A + π√λ I)⁻¹ V (G + √λ/π I)⁻¹,  π = √((tr A / K) / (tr G / D)).

Parameters are plain pytrees from flax (linen, nnx), equinox, haiku or hand-written
code: layers are found by ``capture``. A bias or scale of several axes whose 1 × size
view is not the shape its factors are kept in gets tensor-normal factors of its score
rows as matrices (``_tensor_normal``). A leaf that capture does not explain, or a
layer's whose K×D view is not a reshape of the leaf (nor a bias or scale), falls back
to the exact diagonal of its block.

Factors are stored per leaf as a "left" (m×m, m = product of the leading axes) and a
"right" (n×n, n = product of the trailing axes) matrix, split after the first or before
the last axis, whichever gives the smaller factors (``split_shape``), so the state's
shapes follow from the parameters alone; for equinox's (out, in) weights left is G and
right is A.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from natgrad_jax import _vectors as vectors
from natgrad_jax._blocks import block_layout, block_matmul, blocked_shape, is_blocked
from natgrad_jax._cache import FifoCache
from natgrad_jax._capture import capture
from natgrad_jax._linalg import batched_inverses, damped_reciprocal, moving_average
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._solvers.factored import (
    DEFAULT_MAX_EXACT_ROWS,
    RowSizes,
    check_max_exact_rows,
    leaf_to_matrix,
    output_layout,
    summed_over_rows,
)
from natgrad_jax._solvers.solver import Solver


class KroneckerLeafState(NamedTuple):
    """Arrays of one parameter leaf. A side longer than ``Kronecker.max_factor_size`` keeps
    its factor's diagonal only: (m,) instead of (m, m); one over twice its ``block_size``
    its diagonal blocks, (B, b, b) (``_blocks``)."""

    left: jax.Array  # (m, m), (m,) or (B, b, b) float: factor over the leading axes
    right: jax.Array  # (n, n), (n,) or (B, b, b) float: factor over the trailing axes
    left_inverse: jax.Array  # like left: damped inverse at the last refresh
    right_inverse: jax.Array  # like right: damped inverse at the last refresh
    diagonal: jax.Array  # float, the leaf's shape: exact diagonal, used when it is not factored


class KroneckerState(NamedTuple):
    """Arrays of the Kronecker solver: one ``KroneckerLeafState`` per leaf."""

    leaves: tuple


class Measurement(NamedTuple):
    """One batch's statistics, from ``Kronecker.measured``."""

    rows: object  # the FactoredRows, or None where the rows were taken in chunks
    factors: dict  # {factored leaf: (left, right) factors}
    diagonals: tuple  # per leaf: its exact diagonal (zeros where it is factored)
    also: object  # the sum of ``measured``'s ``also`` over the rows, or None


def split_shape(shape) -> tuple[int, int]:
    """(m, n): the leaf as an m×n matrix, split after its first or before its last axis,
    whichever gives the smaller factors (least m² + n²).

    A (in, out) kernel is in × out; a DenseGeneral/attention kernel (in, heads, head_dim)
    is in × heads·head_dim and (heads, head_dim, out) is heads·head_dim × out; a conv
    kernel (h, w, in, out) is h·w·in × out and equinox's (out, in, h, w) is out × in·h·w
    (its transpose is the layer's K×D view). A vector is 1 × n.
    """
    if len(shape) < 2:
        return 1, math.prod(shape)
    first = (shape[0], math.prod(shape[1:]))  # (out, in...) or (in, heads, head_dim)
    last = (math.prod(shape[:-1]), shape[-1])  # (in..., out)
    return min(last, first, key=lambda split: split[0] ** 2 + split[1] ** 2)


def _orientation(layer, shape) -> str | None:
    """'left_is_inputs' if the K×D view is the leaf as m×n, 'left_is_outputs' if it is the
    transpose of it; else 'tensor_normal' for a bias or scale (the factors of its score
    rows as m×n matrices), None for other layers (the leaf then uses its diagonal).

    Found by viewing the leaf's entry indices, once per layer description and shape (a
    Layer's repr names everything ``leaf_to_matrix`` reads; an update asks several times).
    """
    key = (repr(layer), tuple(shape))
    return _ORIENTATIONS.get(key, lambda: _measured_orientation(layer, shape))


_ORIENTATIONS = FifoCache(size=1024)


# Layout primitives and their NumPy equivalents, for ``_numpy_view``.
_NUMPY_LAYOUT = {
    "transpose": lambda x, params: np.transpose(x, params["permutation"]),
    "reshape": lambda x, params: np.reshape(x, params["new_sizes"]),
    "squeeze": lambda x, params: np.squeeze(x, tuple(params["dimensions"])),
    "convert_element_type": lambda x, params: x,
    "copy": lambda x, params: x,
    "copy_p": lambda x, params: x,
}


def _numpy_view(layer, index: np.ndarray) -> np.ndarray | None:
    """``leaf_to_matrix`` of a NumPy array, evaluated with NumPy from its jaxpr when that
    holds layout primitives only (a dense layer's transpose and reshape, a bias's
    reshape); None otherwise. Evaluating it with jax compiles each of its operations for
    the leaf's shape: that took 0.4–0.6 s of the first trace of the 2.8M-parameter
    autoencoder's default step, this 0.04 s."""
    jaxpr = jax.make_jaxpr(lambda leaf: leaf_to_matrix(layer, leaf))(index).jaxpr
    if any(e.primitive.name not in _NUMPY_LAYOUT or len(e.invars) != 1 for e in jaxpr.eqns):
        return None
    values = {jaxpr.invars[0]: index}
    for equation in jaxpr.eqns:
        layout = _NUMPY_LAYOUT[equation.primitive.name]
        values[equation.outvars[0]] = layout(values[equation.invars[0]], equation.params)
    return values[jaxpr.outvars[0]]


def _measured_orientation(layer, shape) -> str | None:
    m, n = split_shape(shape)
    index = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    view = _numpy_view(layer, index)
    if view is None:
        with jax.ensure_compile_time_eval():
            view = np.asarray(leaf_to_matrix(layer, jnp.asarray(index)))
    as_matrix = index.reshape(m, n)
    if view.shape == as_matrix.shape and np.array_equal(view, as_matrix):
        return "left_is_inputs"
    if view.shape == as_matrix.T.shape and np.array_equal(view, as_matrix.T):
        return "left_is_outputs"
    return "tensor_normal" if layer.kind in ("add", "mul") else None


def _tensor_normal(left, right):
    """Tensor-normal factors (Ren & Goldfarb 2021) of score rows G viewed as m×n
    matrices, from (E[G Gᵀ], E[GᵀG]): L ⊗ R with L = E[G Gᵀ] and R = E[GᵀG] / E‖G‖²,
    whose trace is the block's, E‖G‖². Exact for rank-one rows u vᵀ of one example, as
    A ⊗ G is for a dense layer's a gᵀ. For a bias of several axes (an attention bias
    (heads, head_dim), a positional table) whose layer view (1 × size) is not the shape
    its factors are kept in."""
    return left, right / jnp.maximum(_trace(left), jnp.finfo(right.dtype).tiny)


def _trace(factor):
    """The trace of a factor kept as a matrix, its diagonal blocks (their padding is
    zero) or its diagonal. Summed from the diagonal: ``jnp.trace`` masks all n² entries
    first, an n×n pass per factor."""
    return jnp.sum(factor if factor.ndim == 1 else jnp.diagonal(factor, axis1=-2, axis2=-1))


DEFAULT_MAX_FACTOR_SIZE = 4096
# Blocks of 256, not 512 (2-core CPU, jax 0.10.2, same session, `--only` runs of the
# benchmarks): the CNN of benchmarks/cnn.py (a 2,048-wide head) refreshed in 21–22
# against 30–31 ms, stepped at 2.8× AdamW's amortised against 3.7× and reached 0.0157
# against 0.0242 at 20 s; the 2.8M-parameter autoencoder (1000-wide layers, whole at
# 512) stepped at 4.7× Adam's amortised against 6.5× and reached Adam's best loss in
# 12.3 s (50 steps) against 12.7 s (40). Eigenbasis Adam gains more (an
# eigendecomposition costs several Cholesky factorisations): its CNN refresh 35–37
# against 74–77 ms, the autoencoder's step 4.0× Adam's against 7.5×, as good a loss.
DEFAULT_BLOCK_SIZE = 256


def kronecker_route(
    layer,
    shape,
    max_factor_size: int | None = DEFAULT_MAX_FACTOR_SIZE,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
) -> str:
    """How K-FAC treats a leaf, with the reason when it falls back to the diagonal."""
    if layer is None:
        return "exact diagonal (not captured)"
    if len(shape) == 0:
        return "exact diagonal (a scalar)"
    view = jax.eval_shape(
        lambda leaf: leaf_to_matrix(layer, leaf), jax.ShapeDtypeStruct(shape, jnp.float32)
    )
    k, d = view.shape
    m, n = split_shape(shape)
    orientation = _orientation(layer, shape)
    if orientation is None:
        return (
            f"exact diagonal: its {k}×{d} layer view is not the leaf as {m}×{n} (the "
            "shapes its factors are kept in) or its transpose"
        )

    def side(s):
        if max_factor_size is not None and s > max_factor_size:
            return f"diag({s})"
        if is_blocked(s, block_size):
            count, block = block_layout(s, block_size)
            return f"{s}×{s} in {count} blocks of {block}"
        return f"{s}×{s}"

    if orientation == "tensor_normal":
        return f"L ⊗ R of its rows as {m}×{n} (tensor-normal): {side(m)} ⊗ {side(n)}"
    return f"A ⊗ G: {side(k)} ⊗ {side(d)}"


def factored_leaves(captured, shapes) -> dict:
    """{leaf index: (layer index, orientation)} of the leaves K-FAC factors, from what
    ``capture`` found and the leaves' shapes."""
    factored = {}
    for index, layer in enumerate(captured.layers):
        orientation = _orientation(layer, shapes[layer.leaf])
        if orientation is not None and len(shapes[layer.leaf]) > 0:
            factored[layer.leaf] = (index, orientation)
    return factored


def output_side(orientation: str) -> int:
    """Where a weight's G sits in its (left, right) factors: 1 when left is A (flax's
    (in, out) kernels), 0 when left is G (equinox's (out, in) weights)."""
    return {"left_is_inputs": 1, "left_is_outputs": 0}[orientation]


def shared_output_factors(captured, shapes) -> dict:
    """{bias leaf: weight leaf} of the biases whose output factor is their weight's G.

    A bias added to the output of a factored matmul or convolution that nothing else
    reads (``Layer.follows``) has that layer's output-gradients g, so when its output
    features are the weight's, in the same order, its factor over them equals the
    weight's G, statistics and all. K-FAC then keeps one: the bias is damped with its
    weight's π, as the weight's homogeneous coordinate is in Martens & Grosse (2015),
    with the cross terms between weight and bias left out,

        Δb = (A_b + π√λ)⁻¹ (G + √λ/π I)⁻¹ v_b,  π = π of the weight,

    so that the bias needs no factorisation of its own (A_b, 1×1, is inverted as a
    scalar).
    """
    factored = factored_leaves(captured, shapes)
    layers = {layer.leaf: layer for layer in captured.layers}
    shared = {}
    for leaf, (_, orientation) in factored.items():
        bias = layers[leaf]
        weight = None if bias.follows is None else bias.follows[0]
        weight_orientation = factored[weight][1] if weight in factored else None
        if orientation != "left_is_inputs" or weight_orientation in (None, "tensor_normal"):
            continue
        outputs = split_shape(shapes[weight])[output_side(weight_orientation)]
        if split_shape(shapes[leaf]) == (1, outputs) and _same_g(bias, layers[weight]):
            shared[leaf] = weight
    return shared


def _same_g(bias, weight) -> bool:
    """Whether the bias's g, normalised to (rows, examples, positions, features), is the
    weight's: the axes of the bias's output, taken back through ``follows`` to the
    weight's output, hold its examples, positions and features (in order) there too.
    Axes of size one are left out: they do not change the flattened features."""
    if bias.scan_lengths != weight.scan_lengths:
        return False
    axes = bias.follows[1]
    size = lambda d: weight.output_shape[d]
    example, positions, features = output_layout(bias)
    weight_example, weight_positions, weight_features = output_layout(weight)
    return (
        axes[example] == weight_example
        and [axes[d] for d in features if size(axes[d]) > 1]
        == [d for d in weight_features if size(d) > 1]
        and sorted(axes[d] for d in positions if size(axes[d]) > 1)
        == sorted(d for d in weight_positions if size(d) > 1)
    )


def factored_share(captured, shapes) -> float:
    """The share of the parameters that sit in leaves K-FAC factors (the rest get their
    exact diagonal)."""
    sizes = [math.prod(shape) for shape in shapes]
    return sum(sizes[k] for k in factored_leaves(captured, shapes)) / max(sum(sizes), 1)


def _mean_eigenvalue(factor, size: int):
    return _trace(factor) / size


def unused_diagonal(diagonal, leaf):
    """The diagonal a factored leaf keeps but never uses (its zeros from ``init``), tied
    to the leaf (``_vectors.sharded_like``) so that on sharded parameters XLA lays it out
    as the leaf instead of replicating it."""
    return vectors.sharded_like(diagonal, leaf)


def _pi_dampings(left, right, damping, sizes):
    """(π√λ, √λ/π), π from the factors' mean eigenvalues (Martens & Grosse 2015, 6.3);
    ``sizes`` (m, n) their sides."""
    eps = jnp.finfo(left.dtype).tiny
    left_mean, right_mean = _mean_eigenvalue(left, sizes[0]), _mean_eigenvalue(right, sizes[1])
    pi = jnp.sqrt(jnp.maximum(left_mean, eps) / jnp.maximum(right_mean, eps))
    root = jnp.sqrt(jnp.asarray(damping, left.dtype))
    return pi * root, root / pi


def _precondition(left_inverse, matrix, right_inverse):
    """left_inverse @ matrix @ right_inverse, a vector standing for a diagonal and a
    (B, b, b) stack for its block-diagonal matrix (the inverses are symmetric)."""
    if left_inverse.ndim == 1:
        matrix = left_inverse[:, None] * matrix
    else:
        matrix = block_matmul(left_inverse, matrix)
    if right_inverse.ndim == 1:
        return matrix * right_inverse
    if right_inverse.ndim == 2:
        return matrix @ right_inverse
    return block_matmul(right_inverse, matrix.T).T


APPROXIMATIONS = ("expand", "reduce")


@dataclasses.dataclass(frozen=True)
class Kronecker(Solver):
    """K-FAC: per captured layer A ⊗ G with π-damping; exact diagonal for other leaves.

    Args:
      approximation: for weights shared across positions (tokens, convolution sites),
        ``"expand"`` (positions count as examples; the default, and KFC for
        convolutions) or ``"reduce"`` (positions summed first); Eschenhagen et al.
        2023, see ``FactoredRows.kronecker_factors``. Both are the same without
        positions. Pass ``solver=ng.Kronecker("reduce")``.
      max_factor_size: a factor over more than this many entries of one side keeps only
        its diagonal (``None``: never). For an embedding table (V, D) the input factor
        is diagonal anyway (counts of the tokens), so a large vocabulary costs V floats
        instead of V²; for a dense layer wider than this it is an approximation.
      block_size: a factor of side over twice this is factorised as its diagonal blocks
        of at most this side (``None``: whole). A CNN's flattened head (8·8·32 = 2,048
        inputs) would otherwise make every refresh a 2,048³ factorisation and its
        inverse: about 160 ms on a 2-core CPU against 2.4 ms for an AdamW step of the
        whole network; as eight 256-blocks (the default), a 64th of the work. Such a factor is kept
        as its blocks (``_blocks``: statistics, inverses and products cost s·b
        against s²); the correlations across blocks are left out.
      statistics_positions: A and G of a layer from at most this many of its N·T
        positions (examples × tokens or convolution sites), drawn uniformly with
        replacement at every measurement (the same for A and G, from the step's PRNG
        key) and scaled so that each factor is an unbiased estimate of the whole
        batch's (``None``: every position; "expand" only). The products cost S·(K² +
        R·D²) instead of N·T·(K² + R·D²); the backward pass still forms every g.
      chunk_rows: the output-Fisher rows per example are taken this many at a time
        (``None``: all at once). The exact Fisher of a model with many outputs has as
        many rows (784 for a Gaussian image model) and each holds every layer's g; the
        output factors and diagonals are sums over rows, accumulated chunk by chunk
        with the same result.
      max_exact_rows: with ``fisher="exact"``, the most output-Fisher rows per
        example a refresh back-propagates (one backward pass each); the transform
        refuses a model with more (a per-token language model: positions × classes)
        and names the remedies. ``None``: no limit.

    Example:
      >>> import jax, jax.numpy as jnp, natgrad_jax as ng
      >>> model = ng.Model(lambda p, x: x @ p["w"] + p["b"], ng.Categorical())
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
      >>> tx = ng.natural_gradient(model, 1.0, solver="kronecker", decay=0.9)
      >>> g = jax.grad(model.nll)(params, x, y)
      >>> updates, state = tx.update(g, tx.init(params), params, inputs=x, targets=y)
      >>> [leaf.left.shape for leaf in state[0].curvature.leaves]   # b: 1×1, w: 3×3 (= A)
      [(1, 1), (3, 3)]
    """

    approximation: str = "expand"
    max_factor_size: int | None = DEFAULT_MAX_FACTOR_SIZE
    chunk_rows: int | None = 32
    block_size: int | None = DEFAULT_BLOCK_SIZE
    statistics_positions: int | None = None
    max_exact_rows: int | None = DEFAULT_MAX_EXACT_ROWS

    name = "kronecker"
    approximate = True
    averages = True
    per_leaf = True

    def __post_init__(self):
        check_max_exact_rows(self.max_exact_rows)
        if self.approximation not in APPROXIMATIONS:
            raise ValueError(
                f"approximation must be one of {APPROXIMATIONS}, got {self.approximation!r}."
            )
        if self.statistics_positions is not None:
            if not (isinstance(self.statistics_positions, int) and self.statistics_positions >= 1):
                raise ValueError(
                    "statistics_positions must be an int ≥ 1 or None, got "
                    f"{self.statistics_positions!r}."
                )
            if self.approximation != "expand":
                raise ValueError(
                    'statistics_positions subsamples the positions "expand" counts as '
                    'examples; with approximation="reduce" the positions are summed '
                    "first (leave statistics_positions=None)."
                )

    def memory(self, num_params: int, num_rows: int, leaf_shapes=(), rows=None) -> int:
        """Floats an update allocates, for the memory guard: six copies of each leaf's
        two factors (in the state with their inverses, and the batched factorisation's
        stacked inputs, Cholesky factors, inverses and fallback eigenvectors; XLA's memory
        analysis shows about seven), the diagonals, and the rows (``rows``, a
        ``RowSizes``: the layers' a and g, one chunk of rows at a time, and the
        per-example gradients of the layers it does not factor; else an estimate from
        the leaves' shapes)."""
        factors = sum(6 * sum(map(self.factor_floats, split_shape(shape))) for shape in leaf_shapes)
        return factors + self.statistics_memory(num_rows, leaf_shapes, rows) + 3 * num_params

    def statistics_memory(self, num_rows: int, leaf_shapes=(), rows=None) -> int:
        """Floats of the rows a measurement holds: the layers' a and g, one chunk of
        rows at a time, and the per-example gradients of the layers it does not factor
        (without ``rows``, an estimate from the leaves' shapes)."""
        if rows is None:
            rows = RowSizes(fallback_floats=num_rows * sum(sum(shape) for shape in leaf_shapes))
        elif self.chunk_rows is not None:
            rows = rows.in_chunks_of(self.chunk_rows)
        per_example = rows.per_example
        if rows.captured is not None:
            factored = factored_leaves(rows.captured, leaf_shapes)
            per_example = rows.per_example_except({index for index, _ in factored.values()})
        return rows.stored + per_example

    def state_floats(self, leaf_shapes) -> int:
        """Floats of the state ``init`` allocates (each leaf's two factors, their
        inverses and its diagonal), read from ``init`` itself."""
        params = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in leaf_shapes]
        state = jax.eval_shape(lambda p: self.init(p, jnp.float32), params)
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))

    def _is_diagonal(self, side: int) -> bool:
        return self.max_factor_size is not None and side > self.max_factor_size

    def side_shape(self, side: int) -> tuple[int, ...]:
        """The shape a factor over ``side`` entries is kept in: (s,) its diagonal, (s, s)
        whole, or (B, b, b) its diagonal blocks."""
        return (side,) if self._is_diagonal(side) else blocked_shape(side, self.block_size)

    def factor_floats(self, side: int) -> int:
        """Floats of a factor over ``side`` entries as it is kept (``side_shape``)."""
        return math.prod(self.side_shape(side))

    def init(self, params, dtype) -> KroneckerState:
        leaves = []
        for leaf in jax.tree.leaves(params):
            left, right = map(self.side_shape, split_shape(np.shape(leaf)))
            leaves.append(
                KroneckerLeafState(
                    left=jnp.zeros(left, dtype),
                    right=jnp.zeros(right, dtype),
                    left_inverse=jnp.zeros(left, dtype),
                    right_inverse=jnp.zeros(right, dtype),
                    diagonal=jnp.zeros_like(leaf, dtype=dtype),
                )
            )
        return KroneckerState(tuple(leaves))

    def factored_leaves(self, batch: CurvatureBatch) -> dict:
        """{leaf index: (layer index, orientation)} of the leaves K-FAC factors."""
        captured = capture(batch.model.apply_fn, batch.params, batch.inputs)
        return factored_leaves(captured, [np.shape(leaf) for leaf in jax.tree.leaves(batch.params)])

    def shared_output_factors(self, batch: CurvatureBatch) -> dict:
        """{bias leaf: weight leaf} of the biases that share their weight's G."""
        captured = capture(batch.model.apply_fn, batch.params, batch.inputs)
        shapes = [np.shape(leaf) for leaf in jax.tree.leaves(batch.params)]
        return shared_output_factors(captured, shapes)

    def measured(self, batch: CurvatureBatch, dtype, also=None) -> Measurement:
        """This batch's factors and exact diagonals (a ``Measurement``). ``also``, a
        function of ``FactoredRows`` that is a sum over the output-Fisher rows (EKFAC's
        second moments in a known basis), is summed in the same pass, chunk by chunk."""
        factored = self.factored_leaves(batch)
        leaves = jax.tree.leaves(batch.params)
        shared = self.shared_output_factors(batch)
        # Per factored leaf: its layer, and the shapes its input and output factors are
        # kept in (``side_shape``).
        plan, tensor_normal = {}, {}
        for k, (layer_index, orientation) in factored.items():
            shape = split_shape(np.shape(leaves[k]))
            left, right = map(self.side_shape, shape)
            if orientation == "tensor_normal":
                tensor_normal[k] = (layer_index, shape, (left, right))
                continue
            in_order = orientation == "left_is_inputs"
            plan[k] = (layer_index, *((left, right) if in_order else (right, left)))
        # The exact diagonal only where the leaf is not factored (zeros elsewhere).
        skip = {layer_index for layer_index, _ in factored.values()}

        sample = self._sample(batch)

        def summed(rows):  # statistics that are sums over the output-Fisher rows
            outputs = {
                k: rows.output_factor(layer_index, self.approximation, output_form, sample)
                for k, (layer_index, _, output_form) in plan.items()
                if k not in shared
            }
            outputs.update((bias, outputs[weight]) for bias, weight in shared.items())
            moments = {k: rows.tensor_normal_moments(*how) for k, how in tensor_normal.items()}
            return outputs, moments, rows.diagonal(skip), None if also is None else also(rows)

        (outputs, moments, diagonal, extra), rows, complete = summed_over_rows(
            batch, summed, self.chunk_rows, dtype
        )
        factors = {k: _tensor_normal(*pair) for k, pair in moments.items()}
        for k, (layer_index, input_form, _) in plan.items():
            inputs = rows.input_factor(layer_index, self.approximation, input_form, sample)
            pair = (inputs, outputs[k])
            factors[k] = pair if factored[k][1] == "left_is_inputs" else pair[::-1]
        diagonals = vectors.scale(1 / batch.num_examples, diagonal)
        return Measurement(rows if complete else None, factors, diagonals, extra)

    def _sample(self, batch: CurvatureBatch):
        """``(key, S)`` for ``FactoredRows.input_factor``, or None: every position. The
        batch's key, not a device's: a and g are the whole batch's on every device."""
        if self.statistics_positions is None:
            return None
        key = jax.random.PRNGKey(0) if batch.key is None else batch.key
        return jax.random.fold_in(key, 1), self.statistics_positions

    def measure(self, state: KroneckerState, batch: CurvatureBatch, decay, is_first):
        """Averages this batch's factors and diagonals into the state (no inverses)."""
        measurement = self.measured(batch, state.leaves[0].diagonal.dtype)
        factors, diagonals = measurement.factors, measurement.diagonals
        average = lambda old, new: moving_average(old, new, decay, is_first)
        new_leaves = []
        leaves = jax.tree.leaves(batch.params)
        for k, (old, diagonal) in enumerate(zip(state.leaves, diagonals, strict=True)):
            if k in factors:
                left, right = factors[k]
                new = old._replace(
                    left=average(old.left, left),
                    right=average(old.right, right),
                    diagonal=unused_diagonal(old.diagonal, leaves[k]),
                )
            else:
                new = old._replace(diagonal=average(old.diagonal, diagonal))
            new_leaves.append(new)
        return KroneckerState(tuple(new_leaves))

    def factorise(self, state: KroneckerState, batch: CurvatureBatch, damping):
        """The π-damped inverses of the factored leaves' current factors (same-size
        factors of all leaves in one batched factorisation); a bias that shares its
        weight's G (``shared_output_factors``) takes the weight's inverse of it."""
        factored = self.factored_leaves(batch)
        shared = self.shared_output_factors(batch)
        owned = sorted(set(factored) - set(shared))
        leaves = jax.tree.leaves(batch.params)
        dampings = {
            k: _pi_dampings(
                state.leaves[k].left, state.leaves[k].right, damping, split_shape(leaves[k].shape)
            )
            for k in owned
        }
        g_side = {k: output_side(factored[k][1]) for k in shared.values()}
        factors = [f for k in owned for f in (state.leaves[k].left, state.leaves[k].right)]
        factors += [state.leaves[bias].left for bias in shared]  # 1×1: no factorisation
        damping_of = [d for k in owned for d in dampings[k]]
        damping_of += [dampings[weight][1 - g_side[weight]] for weight in shared.values()]
        inverses = iter(batched_inverses(factors, damping_of, batch.mesh))
        new_leaves = list(state.leaves)
        for k in owned:
            new_leaves[k] = new_leaves[k]._replace(
                left_inverse=next(inverses), right_inverse=next(inverses)
            )
        for bias, weight in shared.items():
            inverses_of_weight = (new_leaves[weight].left_inverse, new_leaves[weight].right_inverse)
            g_inverse = inverses_of_weight[g_side[weight]]
            new_leaves[bias] = new_leaves[bias]._replace(
                left_inverse=next(inverses), right_inverse=g_inverse
            )
        return KroneckerState(tuple(new_leaves))

    def solve(self, state: KroneckerState, batch: CurvatureBatch, vector, damping):
        factored = self.factored_leaves(batch)
        solved = []
        for k, (leaf, piece) in enumerate(zip(state.leaves, vector, strict=True)):
            if k in factored:
                matrix = piece.reshape(split_shape(piece.shape))
                solved.append(
                    _precondition(leaf.left_inverse, matrix, leaf.right_inverse).reshape(
                        piece.shape
                    )
                )
            else:
                solved.append(piece * damped_reciprocal(leaf.diagonal, damping))
        return tuple(solved), state
