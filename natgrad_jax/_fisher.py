r"""Fisher information matrices of a ``Model``: dense, per-example and matrix-free.

Every Fisher here is the **mean over the examples of a batch** (it matches the loss
``model.nll``, the mean negative log-likelihood) and dense matrices are laid out in
``jax.flatten_util.ravel_pytree(params)`` order. Three matrices are named apart:

* exact Fisher  F = 1/N Σᵢ E_{y~p(·|xᵢ,θ)}[sᵢ sᵢᵀ] = 1/N Σᵢ Jᵢᵀ F_out(xᵢ) Jᵢ,
* Monte-Carlo Fisher: the same expectation estimated with labels sampled from the
  model (an unbiased estimate of the exact one),
* empirical Fisher 1/N Σᵢ sᵢ sᵢᵀ with the labels of the data — a different matrix
  (Kunstner, Hennig & Balles 2019), not an approximation of the exact one,

where sᵢ = ∇θ log p(yᵢ | xᵢ, θ) is the score of example i.

All three are written as F = SᵀS / N for a matrix S of "score rows" (``score_rows``),
which is what dense, low-rank and factorised representations are built from.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from natgrad_jax._eager import compiled_when_eager
from natgrad_jax._independence import check_independent_examples
from natgrad_jax._model import Model, check_model, per_example
from natgrad_jax._parameters import check_no_state_collections, on_trainable, trainable_part
from natgrad_jax._precision import exact_matmuls
from natgrad_jax._sharding_types import by_examples, on_automatic_axes, placed_like, replicated

PyTree = Any
FisherKind = Literal["exact", "monte_carlo", "empirical"]
FISHER_KINDS: tuple[str, ...] = ("exact", "monte_carlo", "empirical")


def batch_size(inputs: PyTree) -> int:
    """The number of examples N: the common leading axis of every leaf of ``inputs``."""
    leaves = jax.tree.leaves(inputs)
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        keys = any(_is_random_key(leaf) for leaf in leaves)
        raise ValueError(
            "inputs must be a batch: every leaf needs the same leading (example) axis, got "
            f"leading sizes {sorted(map(str, sizes))}."
            + (SHARED_KEY_HINT if keys else SHARED_VALUE_HINT)
        )
    return sizes.pop()


SHARED_VALUE_HINT = (
    " A value the same for every example (a temperature, a causal mask) is no example's "
    "input: close over it in apply_fn, or give it the example axis (jnp.broadcast_to)."
)

SHARED_KEY_HINT = (
    " A random key among the inputs (dropout) must be one key per example: pass "
    "jax.random.split(key, N) and draw each example's mask from its own key (jax.vmap "
    "over the keys and examples), so that an example evaluated alone keeps its mask."
)


def _is_random_key(leaf) -> bool:
    """A typed PRNG key array, or a raw uint32 key (its last axis of 2)."""
    dtype = jnp.result_type(leaf)
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return dtype == jnp.uint32 and jnp.shape(leaf)[-1:] == (2,)


def check_same_batch(inputs: PyTree, targets: PyTree) -> int:
    """N, after checking that ``inputs`` and ``targets`` hold the same number of examples."""
    num_inputs, num_targets = batch_size(inputs), batch_size(targets)
    if num_inputs != num_targets:
        raise ValueError(
            f"inputs hold {num_inputs} examples but targets hold {num_targets}: pass one "
            "target per example (the leading axis of both is the batch)."
        )
    return num_inputs


def check_kind(kind: str, targets: PyTree | None, key: jax.Array | None) -> None:
    """Raises a ValueError if ``kind`` is unknown or lacks what it needs."""
    if kind not in FISHER_KINDS:
        raise ValueError(f"Unknown Fisher kind {kind!r}; choose one of {FISHER_KINDS}.")
    if kind == "monte_carlo" and key is None:
        raise ValueError("The Monte-Carlo Fisher needs a PRNG key: pass key=...")
    if kind == "empirical" and targets is None:
        raise ValueError(
            "The empirical Fisher uses the data's labels: pass targets=... "
            '(or use fisher="exact" or "monte_carlo", which need none).'
        )


def check_num_samples(num_samples: Any) -> int:
    """Returns ``num_samples`` as a Python int ≥ 1, or raises a ValueError saying why."""
    try:
        value = operator.index(num_samples)
    except TypeError:
        raise ValueError(
            f"num_samples must be a Python int ≥ 1 (it fixes array shapes), got "
            f"{num_samples!r}; with optax.inject_hyperparams list it in static_args."
        ) from None
    if value < 1:
        raise ValueError(f"num_samples must be ≥ 1, got {value}.")
    return value


#: Default ``max_bytes`` of the dense functions: what they may allocate before refusing.
DEFAULT_MAX_BYTES = 4 * 2**30


def _outputs_per_example(model: Model, params: PyTree, inputs: PyTree) -> int:
    """The number of output entries of one example (abstract evaluation, no FLOPs)."""
    outputs = jax.eval_shape(model.apply_fn, params, inputs)
    return sum(math.prod(leaf.shape[1:]) for leaf in jax.tree.leaves(outputs))


def parameter_count(params: PyTree) -> int:
    """P, the number of scalars in a parameter pytree."""
    return sum(jnp.size(leaf) for leaf in jax.tree.leaves(params))


def exact_rows_per_example(model: Model, params: PyTree, inputs: PyTree) -> int:
    """R, the rows of the output Fisher's square root of one example (abstract)."""
    outputs = jax.eval_shape(model.apply_fn, params, inputs)
    # Shapes only: placed on a mesh with explicit axes, the outputs' types could make
    # the square root's algebra ambiguous (a class axis split over devices).
    outputs = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), outputs)
    return jax.tree.leaves(jax.eval_shape(model.likelihood.fisher_sqrt, outputs))[0].shape[0]


def check_dense_memory(
    name: str, params: PyTree, num_rows: int, square: bool, max_bytes: int | None
) -> None:
    """Refuses, before anything is allocated, a dense result over ``max_bytes``.

    Counts the (num_rows, P) score rows and, if ``square``, the (P, P) matrix.
    ``max_bytes=None`` disables the check.
    """
    if max_bytes is None:
        return
    flat_size = parameter_count(params)
    dtype = jnp.promote_types(jnp.result_type(*jax.tree.leaves(params)), jnp.float32)
    needed = (num_rows * flat_size + (flat_size**2 if square else 0)) * jnp.dtype(dtype).itemsize
    if needed > max_bytes:
        raise ValueError(
            f"ng.{name} would allocate about {needed / 2**30:.2f} GiB (P = {flat_size} "
            f"parameters, {num_rows} score rows), over max_bytes = {max_bytes / 2**30:.2f} GiB. "
            "Use the matrix-free ng.fisher_vector_product / ng.fisher_operator, or "
            "ng.natural_gradient with solver='cg', 'kronecker' or 'diagonal'; or pass "
            "max_bytes=None (or a larger budget) to build it anyway."
        )


def trainable_model(model: Model, params: PyTree, inputs: PyTree) -> tuple[Model, PyTree]:
    """The checked model as a function of the trainable (floating) leaves of ``params``,
    and those leaves (see ``natgrad_jax._parameters``); refuses models whose examples
    interact (see ``natgrad_jax._independence``)."""
    model = check_model(model)
    check_no_state_collections(params)
    check_independent_examples(model.apply_fn, params, inputs)
    return on_trainable(model, params)


def _check_target_values(model, params, inputs, targets, **_):
    """The targets' values, checked on concrete arrays before a compilation hides them."""
    restricted, trainable = trainable_model(model, params, inputs)
    check_same_batch(inputs, targets)
    restricted.check_targets(trainable, inputs, targets)


ONE_EXAMPLE_NOTE = (
    "natgrad_jax was evaluating the model one example at a time here (per-example "
    "gradients, each example a batch of one): if apply_fn assumes a batch size (a fixed "
    "number, or placements that split the examples over a mesh's devices, which one "
    "example cannot be), make it run on any, or use solver='cg', whose products take the "
    "whole batch (on a mesh also 'woodbury', 'kronecker', 'ekfac' or 'diagonal', whose "
    "statistics take the whole batch wherever the capture reads every layer)."
)


def _map_examples(fn, *batches):
    """vmap ``fn`` over the examples of ``batches``, each example kept as a batch of one.
    An error raised there says so (``ONE_EXAMPLE_NOTE``, on Python ≥ 3.11)."""
    try:
        return jax.vmap(lambda *example: fn(*jax.tree.map(lambda a: a[None], example)))(*batches)
    except Exception as error:
        if hasattr(error, "add_note"):
            error.add_note(ONE_EXAMPLE_NOTE)
        raise


@compiled_when_eager(eager_checks=_check_target_values)
@exact_matmuls
@on_automatic_axes(by_examples)
def per_example_scores(
    model: Model,
    params: PyTree,
    inputs: PyTree,
    targets: PyTree,
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> jax.Array:
    r"""Per-example scores sᵢ = ∇θ log p(yᵢ | xᵢ, θ), as an (N, P) matrix.

    Rows are in ``ravel_pytree(params)`` order; computed with ``jax.vmap`` of
    ``jax.grad`` over the examples. Note the sign: this is the gradient of the
    log-likelihood, so the mean of the rows is −∇ ``model.nll``.

    Args:
      model: the ``Model``.
      params: the parameter pytree θ.
      inputs: a batch of N inputs (pytree with leading axis N).
      targets: the N targets yᵢ.
      max_bytes: refuse (ValueError naming the matrix-free alternatives) before
        allocating more than this many bytes; ``None``: no limit.

    Returns:
      An (N, P) array.

    Example:
      >>> import jax.numpy as jnp, natgrad_jax as ng
      >>> model = ng.Model(lambda w, x: x @ w, ng.Gaussian(scale=1.0))
      >>> x, y = jnp.array([[1.0], [2.0]]), jnp.array([[1.0], [1.0]])
      >>> ng.per_example_scores(model, jnp.zeros((1, 1)), x, y)   # xᵢ (yᵢ − 0)
      Array([[1.],
             [2.]], dtype=float32)
    """
    model, params = trainable_model(model, params, inputs)
    num_examples = check_same_batch(inputs, targets)
    model.check_targets(params, inputs, targets)
    check_dense_memory("per_example_scores", params, num_examples, False, max_bytes)
    return _scores(model.log_likelihood, params, inputs, targets)


def rows_of_leaves(leaves) -> jax.Array:
    """Score rows held leaf by leaf (one (M, *leaf shape) array each) as one (M, P)
    matrix, columns in ``ravel_pytree`` order."""
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def _scores(log_likelihood, params, inputs, targets):
    """(N, P) gradients of ``log_likelihood(params, x, y)`` for each example."""
    return rows_of_leaves(_scores_by_leaf(log_likelihood, params, inputs, targets))


def scores_by_leaf(model: Model, params: PyTree, inputs: PyTree, targets: PyTree) -> tuple:
    """The per-example scores of the data's labels leaf by leaf: (N, *leaf shape) each."""
    return _scores_by_leaf(model.log_likelihood, params, inputs, targets)


def _scores_by_leaf(log_likelihood, params, inputs, targets) -> tuple:
    """``_scores`` leaf by leaf: an (N, *leaf shape) array per trainable leaf."""

    def score(x, y):
        return jax.grad(lambda p: log_likelihood(p, x, y)[0])(params)

    return tuple(jax.tree.leaves(_map_examples(score, inputs, targets)))


def exact_score_rows(model: Model, params: PyTree, inputs: PyTree) -> jax.Array:
    """Rows Jᵢᵀ c_{i,r} with F_out(xᵢ) = Σ_r c_{i,r} c_{i,r}ᵀ; shape (N·R, P)."""
    return rows_of_leaves(exact_score_rows_by_leaf(model, params, inputs))


def exact_score_rows_by_leaf(model: Model, params: PyTree, inputs: PyTree) -> tuple:
    """``exact_score_rows`` leaf by leaf: an (N·R, *leaf shape) array per trainable leaf."""

    def rows(x):
        outputs, pullback = jax.vjp(lambda p: model.apply_fn(p, x), params)
        cotangents = model.likelihood.fisher_sqrt(outputs)
        return jax.vmap(lambda c: pullback(c)[0])(cotangents)

    per_example = jax.tree.leaves(_map_examples(rows, inputs))  # (N, R, *leaf shape) each
    return tuple(leaf.reshape(-1, *leaf.shape[2:]) for leaf in per_example)


def sample_targets(model: Model, params: PyTree, inputs: PyTree, key: jax.Array, num_samples: int):
    """``num_samples`` draws of the targets from the model's predictive distribution."""
    return sample_labels(model.likelihood, model.apply_fn(params, inputs), key, num_samples)


def sample_labels(likelihood, outputs: PyTree, key: jax.Array, num_samples: int):
    """``num_samples`` draws of the targets from the distribution with these outputs."""
    outputs = jax.lax.stop_gradient(outputs)
    keys = jax.random.split(key, num_samples)
    return jax.vmap(lambda k: likelihood.sample(k, outputs))(keys)


def monte_carlo_score_rows(model, params, inputs, key, num_samples):
    """Scores at sampled labels, scaled by 1/√S so that SᵀS/N is the MC mean."""
    return rows_of_leaves(monte_carlo_score_rows_by_leaf(model, params, inputs, key, num_samples))


def monte_carlo_score_rows_by_leaf(model, params, inputs, key, num_samples) -> tuple:
    """``monte_carlo_score_rows`` leaf by leaf: an (S·N, *leaf shape) array per leaf."""
    sampled = sample_targets(model, params, inputs, key, num_samples)
    log_likelihood = model.sampled_log_likelihood
    scores = jax.vmap(lambda y: _scores_by_leaf(log_likelihood, params, inputs, y))(sampled)
    scale = lambda leaf: jnp.sqrt(jnp.asarray(num_samples, leaf.dtype))
    return tuple(leaf.reshape(-1, *leaf.shape[2:]) / scale(leaf) for leaf in scores)


def device_sum(value, axis_name: str | None):
    """Σ over the devices of ``axis_name`` (inside ``shard_map``); identity without one."""
    return value if axis_name is None else jax.lax.psum(value, axis_name)


def device_mean(value, axis_name: str | None):
    """Mean over the devices of ``axis_name``; identity without one."""
    return value if axis_name is None else jax.lax.pmean(value, axis_name)


def varying_axes(value) -> frozenset:
    """The mapped axes ``value`` varies over inside ``shard_map`` (empty outside).

    jax ≤ 0.9 names them ``aval.vma``; later releases ``aval.manual_axis_type.varying``.
    """
    aval = jax.typeof(value)
    if getattr(aval, "vma", None) is not None:
        return frozenset(aval.vma)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(manual, "varying", ()))


def device_varying(params: PyTree, axis_name: str | None) -> PyTree:
    """``params`` marked as varying over ``axis_name`` inside ``shard_map``.

    Differentiating w.r.t. a replicated (device-invariant) value inside ``shard_map``
    sums the cotangents over the devices; per-example and per-device Fisher pieces must
    stay local until our own all-reduce, so they differentiate a varying copy.
    """
    if axis_name is None:
        return params

    def cast(leaf):
        if axis_name in varying_axes(leaf):
            return leaf
        return jax.lax.pcast(leaf, axis_name, to="varying")

    return jax.tree.map(cast, params)


def device_invariant(tree: PyTree, axis_name: str | None) -> PyTree:
    """``tree``'s leaves typed device-invariant: each averaged over ``axis_name`` where
    JAX sees it varying (``tree`` itself without ``axis_name``).

    Every device computes the same numbers from all-reduced statistics, but values
    that passed through device-varying intermediates keep that type; the mean of
    identical copies is the value itself.
    """
    if axis_name is None:
        return tree

    def invariant(leaf):
        if axis_name in varying_axes(leaf):
            return jax.lax.pmean(leaf, axis_name)
        return leaf

    return jax.tree.map(invariant, tree)


def global_batch_size(inputs: PyTree, axis_name: str | None) -> int:
    """N over all devices: the local batch times the size of the mapped axis."""
    local = batch_size(inputs)
    return local if axis_name is None else local * jax.lax.axis_size(axis_name)


def device_key(key: jax.Array, axis_name: str | None) -> jax.Array:
    """A key of this device's own: devices must not sample the same labels."""
    return key if axis_name is None else jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def _gram(rows: jax.Array, inputs: PyTree, axis_name: str | None) -> jax.Array:
    num_examples = global_batch_size(inputs, axis_name)
    return device_sum(rows.T @ rows, axis_name) / num_examples


@compiled_when_eager
@exact_matmuls
@on_automatic_axes(replicated)
def fisher(
    model: Model,
    params: PyTree,
    inputs: PyTree,
    *,
    axis_name: str | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> jax.Array:
    r"""The exact Fisher information matrix, (P, P), mean over the batch.

    .. math::
      F = \frac1N \sum_i J_i^\top F_{\text{out}}(x_i) J_i,
      \qquad J_i = \partial \text{outputs}(x_i) / \partial θ,

    the generalised Gauss–Newton form, equal to E_{y~p}[s sᵀ] for every likelihood here
    (each is an exponential family in its outputs). Computed from per-example pullbacks
    of the square root of the output Fisher, without forming Jᵢ.

    Args:
      model: the ``Model``.
      params: the parameter pytree θ.
      inputs: a batch of N inputs.
      axis_name: name of the mapped axis the batch is split over inside ``shard_map``;
        the per-device results are all-reduced (``None``: one device).
      max_bytes: refuse (ValueError naming the matrix-free alternatives) before
        allocating more than this many bytes of rows and matrix; ``None``: no limit.

    Returns:
      A symmetric positive semi-definite (P, P) array in ``ravel_pytree`` order.

    **Which leaves.** Every Fisher here is over the floating-point leaves of ``params``;
    integer and boolean leaves and non-array leaves (an equinox module's activation
    functions) are constants of the model, so a module can be passed as it is. P counts
    the floating leaves and the layout is ``ravel_pytree`` of those alone.

    **Precision.** Every function here computes its matmuls at ``"highest"`` precision,
    also on GPUs whose float32 default is TF32 (see ``natgrad_jax._precision``).

    Example:
      >>> import jax.numpy as jnp, natgrad_jax as ng
      >>> model = ng.Model(lambda w, x: x @ w, ng.Gaussian(scale=2.0))
      >>> x = jnp.array([[1.0, 0.0], [1.0, 1.0]])
      >>> ng.fisher(model, jnp.zeros((2, 1)), x)          # XᵀX / (N σ²)
      Array([[0.25 , 0.125],
             [0.125, 0.125]], dtype=float32)

    References:
      Amari, 1998, Natural gradient works efficiently in learning.
      Martens, 2020, New insights and perspectives on the natural gradient method.
    """
    model, params = trainable_model(model, params, inputs)
    num_rows = batch_size(inputs) * exact_rows_per_example(model, params, inputs)
    check_dense_memory("fisher", params, num_rows, True, max_bytes)
    params = device_varying(params, axis_name)
    return _gram(exact_score_rows(model, params, inputs), inputs, axis_name)


@compiled_when_eager
@exact_matmuls
@on_automatic_axes(replicated)
def fisher_hessian(
    model: Model,
    params: PyTree,
    inputs: PyTree,
    *,
    axis_name: str | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> jax.Array:
    r"""The exact Fisher as ``jax.hessian`` of the expected negative log-likelihood.

    .. math::
      F(θ) = ∇²_{θ'} \frac1N \sum_i \mathbb E_{y\sim p(\cdot|x_i,θ)}
      [-\log p(y | x_i, θ')] \Big|_{θ'=θ}
      = ∇²_{θ'} \frac1N \sum_i \mathrm{KL}(p_θ(\cdot|x_i) \,\|\, p_{θ'}(\cdot|x_i))\Big|_{θ'=θ},

    the expectation taken under the fixed (stop-gradient) predictive distribution. The
    cross-entropy and the KL differ by the entropy of p_θ, which does not depend on θ',
    so the closed-form ``likelihood.kl`` is differentiated. An independent route to the
    matrix of ``fisher`` (costlier: use it for checks and small models).

    Args:
      model: the ``Model``.
      params: the parameter pytree θ.
      inputs: a batch of N inputs.
      axis_name: as in ``fisher`` (the mapped axis inside ``shard_map``).
      max_bytes: as in ``fisher`` (refuse before allocating more).

    Returns:
      A (P, P) array in ``ravel_pytree`` order.

    Example:
      >>> import jax.numpy as jnp, natgrad_jax as ng
      >>> model = ng.Model(lambda w, x: x @ w, ng.Bernoulli())
      >>> ng.fisher_hessian(model, jnp.zeros(1), jnp.ones((3, 1)))   # σ(0)(1−σ(0))
      Array([[0.25]], dtype=float32)
    """
    model, params = trainable_model(model, params, inputs)
    # forward-over-reverse carries P tangents through the batch's outputs
    num_rows = batch_size(inputs) * _outputs_per_example(model, params, inputs)
    check_dense_memory("fisher_hessian", params, num_rows, True, max_bytes)
    flat, unravel = ravel_pytree(params)
    fixed = jax.lax.stop_gradient(params)
    return jax.hessian(
        lambda f: kl_divergence(model, fixed, unravel(f), inputs, axis_name=axis_name)
    )(flat)


@compiled_when_eager
@exact_matmuls
@on_automatic_axes(replicated)
def monte_carlo_fisher(
    model: Model,
    params: PyTree,
    inputs: PyTree,
    key: jax.Array,
    num_samples: int = 1,
    *,
    axis_name: str | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> jax.Array:
    r"""Monte-Carlo estimate of the exact Fisher from labels sampled from the model.

    .. math::
      \hat F = \frac1{NS} \sum_i \sum_{s=1}^S s_i(\tilde y_{is}) s_i(\tilde y_{is})^\top,
      \qquad \tilde y_{is} \sim p(\cdot | x_i, θ),

    an unbiased estimate of ``fisher`` (rank ≤ N·S). Deterministic given ``key``.

    Args:
      model: the ``Model``.
      params: the parameter pytree θ.
      inputs: a batch of N inputs.
      key: a ``jax.random`` key for the sampled labels.
      num_samples: S, labels drawn per example (a Python int ≥ 1).
      axis_name: as in ``fisher`` (the mapped axis inside ``shard_map``).
      max_bytes: as in ``fisher`` (refuse before allocating more).

    Returns:
      A (P, P) array in ``ravel_pytree`` order.

    Example:
      >>> import jax, jax.numpy as jnp, natgrad_jax as ng
      >>> model = ng.Model(lambda w, x: x @ w, ng.Gaussian(scale=1.0))
      >>> f = ng.monte_carlo_fisher(model, jnp.zeros((1, 1)), jnp.ones((4, 1)),
      ...                           jax.random.key(0), num_samples=2)
      >>> f.shape
      (1, 1)
    """
    model, params = trainable_model(model, params, inputs)
    num_rows = batch_size(inputs) * check_num_samples(num_samples)
    check_dense_memory("monte_carlo_fisher", params, num_rows, True, max_bytes)
    key = device_key(key, axis_name)
    params = device_varying(params, axis_name)
    rows = monte_carlo_score_rows(model, params, inputs, key, check_num_samples(num_samples))
    return _gram(rows, inputs, axis_name)


@compiled_when_eager(eager_checks=_check_target_values)
@exact_matmuls
@on_automatic_axes(replicated)
def empirical_fisher(
    model: Model,
    params: PyTree,
    inputs: PyTree,
    targets: PyTree,
    *,
    axis_name: str | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> jax.Array:
    r"""The empirical Fisher 1/N Σᵢ sᵢ sᵢᵀ, scores at the data's own labels.

    Not an estimate of the exact Fisher: away from a well-specified optimum the two
    differ, and preconditioning by the empirical one can distort the step badly
    (Kunstner, Hennig & Balles 2019). Named apart for that reason.

    Args:
      model: the ``Model``.
      params: the parameter pytree θ.
      inputs: a batch of N inputs.
      targets: the N observed targets.
      axis_name: as in ``fisher`` (the mapped axis inside ``shard_map``).
      max_bytes: as in ``fisher`` (refuse before allocating more).

    Returns:
      A (P, P) array in ``ravel_pytree`` order.

    Example:
      >>> import jax.numpy as jnp, natgrad_jax as ng
      >>> model = ng.Model(lambda w, x: x @ w, ng.Gaussian(scale=1.0))
      >>> x, y = jnp.array([[1.0], [2.0]]), jnp.array([[1.0], [1.0]])
      >>> ng.empirical_fisher(model, jnp.zeros((1, 1)), x, y)   # (1² + 2²) / 2
      Array([[2.5]], dtype=float32)

    References:
      Kunstner, Hennig & Balles, 2019, Limitations of the empirical Fisher approximation
      for natural gradient descent.
    """
    model, params = trainable_model(model, params, inputs)
    check_dense_memory("empirical_fisher", params, batch_size(inputs), True, max_bytes)
    params = device_varying(params, axis_name)
    return _gram(
        per_example_scores(model, params, inputs, targets, max_bytes=None), inputs, axis_name
    )


@exact_matmuls
def fisher_operator(
    model: Model,
    params: PyTree,
    inputs: PyTree,
    *,
    kind: FisherKind = "exact",
    targets: PyTree | None = None,
    key: jax.Array | None = None,
    num_samples: int = 1,
    axis_name: str | None = None,
):
    r"""v ↦ F v for the Fisher named by ``kind``, matrix-free, linearised once.

    The network is linearised at ``params`` once; every call then costs one forward
    (jvp) and one backward (transpose) pass, which suits iterative solvers.

    * ``"exact"``: F v = 1/N Jᵀ F_out J v with the likelihood's output Fisher;
    * ``"empirical"`` / ``"monte_carlo"``: F v = 1/N Sᵀ(S v) where S v is the jvp of the
      per-example log-likelihoods (at the data's or at sampled labels) and Sᵀu its vjp,
      so no per-example gradient is ever formed.

    With ``axis_name`` (inside ``shard_map``, the batch split over that axis) the
    products are averaged over the devices. Returns a function from pytrees shaped like
    ``params`` to the same (``None`` at leaves that are not floating arrays: integer or
    boolean leaves and functions are constants of the model, see ``ng.fisher``).

    Example:
      >>> import jax.numpy as jnp, natgrad_jax as ng
      >>> model = ng.Model(lambda w, x: x @ w, ng.Gaussian(scale=1.0))
      >>> x, y = jnp.array([[1.0], [2.0]]), jnp.array([[1.0], [1.0]])
      >>> product = ng.fisher_operator(model, jnp.zeros((1, 1)), x, kind="empirical", targets=y)
      >>> product(jnp.ones((1, 1)))       # (1² + 2²) / 2, the empirical Fisher times 1
      Array([[2.5]], dtype=float32)
    """
    full_params = params
    model, params = trainable_model(model, params, inputs)
    check_kind(kind, targets, key)
    num_examples = batch_size(inputs)
    local_product = _local_fisher_operator(
        model,
        device_varying(params, axis_name),
        inputs,
        num_examples,
        kind,
        targets,
        device_key(key, axis_name) if key is not None else None,
        num_samples,
    )

    @exact_matmuls
    def product(vector):
        vector = placed_like(trainable_part(vector, full_params), params)
        return device_mean(local_product(device_varying(vector, axis_name)), axis_name)

    return product


def _local_fisher_operator(model, params, inputs, num_examples, kind, targets, key, num_samples):
    """The Fisher operator of this device's batch."""
    if kind == "exact":
        outputs, forward = jax.linearize(lambda p: model.apply_fn(p, inputs), params)
        backward = jax.linear_transpose(forward, params)

        def product(vector):
            (result,) = backward(model.likelihood.fisher_product(outputs, forward(vector)))
            return jax.tree.map(lambda leaf: leaf / num_examples, result)

        return product
    if kind == "empirical":
        labels = jax.tree.map(lambda t: t[None], targets)
        log_likelihood = model.log_likelihood
    else:
        labels = sample_targets(model, params, inputs, key, check_num_samples(num_samples))
        log_likelihood = model.sampled_log_likelihood
    num_rows = num_examples * jax.tree.leaves(labels)[0].shape[0]

    def log_likelihoods(p):
        return jax.vmap(lambda y: log_likelihood(p, inputs, y))(labels)

    _, forward = jax.linearize(log_likelihoods, params)
    backward = jax.linear_transpose(forward, params)

    def product(vector):
        (result,) = backward(forward(vector))
        return jax.tree.map(lambda leaf: leaf / num_rows, result)

    return product


def _like_vector(vector, **arguments):
    del arguments
    return vector


@compiled_when_eager
@exact_matmuls
@on_automatic_axes(_like_vector)
def fisher_vector_product(
    model: Model,
    params: PyTree,
    inputs: PyTree,
    vector: PyTree,
    *,
    axis_name: str | None = None,
) -> PyTree:
    r"""The exact Fisher times a vector, matrix-free: F v = 1/N Jᵀ F_out J v.

    One ``jax.linearize`` of ``apply_fn`` (the J v), the output Fisher applied per
    example, and the transpose of the linearisation (the Jᵀ); no P×P matrix is formed.
    ``fisher_operator`` gives the same product for the Monte-Carlo and empirical Fishers.

    Args:
      model: the ``Model``.
      params: the parameter pytree θ.
      inputs: a batch of N inputs.
      vector: a pytree with the structure of ``params``.
      axis_name: name of the mapped axis the batch is split over inside ``shard_map``;
        the per-device results are all-reduced (``None``: one device).
    Returns:
      F v as a pytree with the structure of ``params``.

    Example:
      >>> import jax.numpy as jnp, natgrad_jax as ng
      >>> model = ng.Model(lambda w, x: x @ w, ng.Gaussian(scale=1.0))
      >>> x = jnp.array([[1.0, 0.0], [1.0, 1.0]])
      >>> v = jnp.array([[1.0], [0.0]])
      >>> ng.fisher_vector_product(model, jnp.zeros((2, 1)), x, v)     # XᵀX v / N
      Array([[1. ],
             [0.5]], dtype=float32)
    """
    return fisher_operator(model, params, inputs, kind="exact", axis_name=axis_name)(vector)


@compiled_when_eager
@exact_matmuls
@on_automatic_axes(replicated)
def kl_divergence(
    model: Model,
    params_p: PyTree,
    params_q: PyTree,
    inputs: PyTree,
    *,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Mean KL divergence between the model's predictions at two parameters.

    .. math::
      \frac1N \sum_i \mathrm{KL}\big(p(\cdot|x_i,θ_p) \,\|\, p(\cdot|x_i,θ_q)\big)
      = \tfrac12 δ^\top F(θ_p) δ + O(\|δ\|^3), \quad δ = θ_q - θ_p,

    in closed form from ``likelihood.kl``.

    Args:
      model: the ``Model``.
      params_p: parameters of the first distribution.
      params_q: parameters of the second distribution.
      inputs: a batch of N inputs.
      axis_name: name of the mapped axis the batch is split over inside ``shard_map``;
        the per-device results are all-reduced (``None``: one device).
    Returns:
      A scalar.

    Example:
      >>> import jax.numpy as jnp, natgrad_jax as ng
      >>> model = ng.Model(lambda w, x: x @ w, ng.Gaussian(scale=1.0))
      >>> w_p, w_q = jnp.zeros((1, 1)), jnp.ones((1, 1))
      >>> float(ng.kl_divergence(model, w_p, w_q, jnp.ones((3, 1))))   # (1 − 0)² / 2
      0.5
    """
    model = check_model(model)
    batch_size(inputs)
    outputs_p = model.apply_fn(params_p, inputs)
    outputs_q = model.apply_fn(params_q, inputs)
    local = jnp.mean(per_example(model.likelihood.kl(outputs_p, outputs_q)))
    return device_mean(local, axis_name)
