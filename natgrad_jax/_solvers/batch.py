"""The data a curvature is measured on at one step: model, parameters, batch, Fisher kind."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from natgrad_jax import _vectors as vectors
from natgrad_jax._capture import ForwardPass, capture, probed_forward
from natgrad_jax._fisher import (
    FisherKind,
    batch_size,
    check_num_samples,
    device_key,
    device_mean,
    device_sum,
    device_varying,
    exact_rows_per_example,
    exact_score_rows_by_leaf,
    fisher_operator,
    global_batch_size,
    monte_carlo_score_rows_by_leaf,
    rows_of_leaves,
    sample_labels,
    scores_by_leaf,
)
from natgrad_jax._model import Model
from natgrad_jax._precision import model_precision

PyTree = Any


class Linearisation(NamedTuple):
    """The model's outputs on a batch and v ↦ J v at its parameters (``jax.linearize``):
    the loss and the quadratic model's forward-mode products from one forward pass."""

    outputs: PyTree
    jvp: Callable


@dataclasses.dataclass(frozen=True)
class CurvatureBatch:
    """Everything a solver may need to measure the Fisher of one batch.

    Built inside ``update`` (at trace time); solvers pick what they use:
    score rows for dense, diagonal and low-rank forms, products for matrix-free ones.
    Vectors are tuples of leaf-shaped arrays (``natgrad_jax._vectors``). With ``axis_name`` (inside
    ``shard_map``) ``inputs`` is this device's share of the batch: ``num_examples``,
    ``device_sum``, ``gather_rows`` and ``matvec`` then speak of the whole batch.
    ``forward``, when given (from ``ng.value_and_grad``), is the model's forward pass on
    this batch at ``params``: the statistics, the Fisher-vector products and the loss
    are taken from it instead of from new passes (the quadratic model's forward-mode
    products linearise the model themselves: ``linearised``). ``statistics_precision``
    is the matmul precision of the statistics a solver measures inside its solve
    (``"auto"``'s K-FAC): the transform's ``precision=``, else the one in effect where
    ``update`` was traced.
    ``mesh``: the devices a solver spreads its factorisations over (the transform's
    ``mesh=`` or the context's; ``natgrad_jax._linalg.spread_over``). ``measurable``: a
    flag, false on a step the transform will skip (its gradient is not finite), whose
    statistics must not be averaged in; ``None``: always measurable.
    """

    model: Model
    params: PyTree
    inputs: PyTree
    kind: FisherKind
    targets: PyTree | None = None
    key: jax.Array | None = None
    num_samples: int = 1
    axis_name: str | None = None
    forward: ForwardPass | None = None
    statistics_precision: str | None = None
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None
    measurable: jax.Array | None = None
    model_pass: Linearisation | None = None

    @property
    def num_examples(self) -> int:
        """N, the examples of the whole batch (over every device of ``axis_name``)."""
        return global_batch_size(self.inputs, self.axis_name)

    def device_sum(self, value):
        """Σ over the devices holding parts of the batch (identity on one device)."""
        return device_sum(value, self.axis_name)

    def gather_examples(self, value, axis: int = 0):
        """``value`` with its example axis gathered from every device (tiled)."""
        if self.axis_name is None:
            return value
        return jax.lax.all_gather(value, self.axis_name, axis=axis, tiled=True)

    @property
    def device_key(self):
        """The PRNG key for this device's Monte-Carlo labels."""
        return None if self.key is None else device_key(self.key, self.axis_name)

    def score_rows(self) -> jax.Array:
        """This device's rows of S (F = SᵀS / N, N the whole batch), shape (rows, P)."""
        return rows_of_leaves(self.score_rows_by_leaf())

    def score_rows_by_leaf(self) -> tuple:
        """``score_rows`` leaf by leaf: a (rows, *leaf shape) array per trainable leaf."""
        params = device_varying(self.params, self.axis_name)
        if self.kind == "exact":
            return exact_score_rows_by_leaf(self.model, params, self.inputs)
        if self.kind == "monte_carlo":
            num_samples = check_num_samples(self.num_samples)
            return monte_carlo_score_rows_by_leaf(
                self.model, params, self.inputs, self.device_key, num_samples
            )
        return scores_by_leaf(self.model, params, self.inputs, self.targets)

    def forward_pass(self) -> ForwardPass:
        """The model's forward pass on this batch: ``forward`` or a new one."""
        if self.forward is not None:
            return self.forward
        captured = capture(self.model.apply_fn, self.params, self.inputs)
        params = device_varying(self.params, self.axis_name)
        return probed_forward(self.model.apply_fn, captured, params, self.inputs)

    def cotangent_rows(self, outputs):
        """Output-space rows c_r whose pullbacks Jᵀc_r are the score rows of ``kind``
        (leading axis R; for the exact Fisher Σ_r c_r c_rᵀ is the output Fisher)."""
        likelihood = self.model.likelihood
        if self.kind == "exact":
            return likelihood.fisher_sqrt(outputs)

        def score(labels, log_prob):
            return jax.grad(lambda o: jnp.sum(log_prob(o, labels)))(outputs)

        if self.kind == "empirical":
            return jax.tree.map(lambda c: c[None], score(self.targets, likelihood.log_prob))
        num_samples = check_num_samples(self.num_samples)
        sampled = sample_labels(likelihood, outputs, self.device_key, num_samples)
        rows = jax.vmap(lambda labels: score(labels, likelihood.sampled_log_prob))(sampled)
        return jax.tree.map(lambda c: c / jnp.sqrt(jnp.asarray(num_samples, c.dtype)), rows)

    def linearised(self) -> Linearisation:
        """The model linearised at ``params`` on this batch: one forward pass, each
        product J v about one more.

        Forward mode directly, also where ``forward`` is given, not the transpose of
        its reverse-mode pullback (``ForwardPass.jvp``): on the transformer LM of
        ``benchmarks/transformer_lm.py`` a forward pass and two products took 20–24 ms
        this way against 41–46 ms through a ``ForwardPass`` (2-core CPU, jax 0.10.2;
        XLA's CPU dots over (batch, position, width) activations run slowly where the
        transpose contracts two axes), and the default step with ``forward`` 74
        against 109 ms; on the 2.8M-parameter autoencoder (2-D activations) the
        extra pass was within the machine's noise (102–111 against 101–107 ms).

        Traced at the statistics' precision wherever it is called from (the products'
        matmuls are fixed when the model is linearised): inside the transform's exact
        context, "highest" made the LM's forward pass and two products 10–13 ms slower
        on that CPU, and on a GPU float32 matmuls run several times slower than TF32."""
        params = device_varying(self.params, self.axis_name)
        with model_precision(self.statistics_precision):
            outputs, jvp = jax.linearize(lambda p: self.model.apply_fn(p, self.inputs), params)
        return Linearisation(outputs, jvp)

    def nll(self):
        """The batch's mean negative log-likelihood at ``params`` (over every device),
        from ``forward``, else ``model_pass`` (the quadratic model's linearisation, built
        once at the top of a step whose quadratic model runs; the statistics build their
        own pass inside the refresh's branch, so that the two passes' residuals are not
        alive at once), else a new forward pass."""
        shared = self.forward if self.forward is not None else self.model_pass
        if shared is None:
            return self.nll_at(self.params)
        local = self.model.nll_of_outputs(shared.outputs, self.targets)
        return device_mean(local, self.axis_name)

    def nll_at(self, params):
        """The batch's mean negative log-likelihood at ``params`` (over every device),
        from a new forward pass at the statistics' precision (see ``linearised``)."""
        with model_precision(self.statistics_precision):
            local = self.model.nll(params, self.inputs, self.targets)
        return device_mean(local, self.axis_name)

    @functools.cached_property
    def matvec(self):
        """v ↦ F v on vectors (tuples of leaves), linearised once (see
        ``ng._fisher.fisher_operator``), or from ``forward`` without a new pass.

        Products are taken in the parameters' dtype and returned in the vector's.
        """
        if self.forward is None:
            product = fisher_operator(
                self.model,
                self.params,
                self.inputs,
                kind=self.kind,
                targets=self.targets,
                key=self.key,
                num_samples=self.num_samples,
                axis_name=self.axis_name,
            )
        else:
            product = self._product_of_forward()

        def matvec(vector):
            result = vectors.leaves_of(product(self._as_parameters(vector)))
            return vectors.astype(result, vectors.dtype_of(vector))

        return matvec

    def _as_parameters(self, vector):
        """A vector (leaf by leaf) as a pytree like ``params``, each leaf in its dtype."""
        leaves = jax.tree.leaves(self.params)
        cast = [v.astype(jnp.result_type(leaf)) for v, leaf in zip(vector, leaves, strict=True)]
        return vectors.as_tree(self.params, cast)

    def _product_of_forward(self):
        """v ↦ F v = 1/N Jᵀ F_out J v through ``forward``'s linearisation, with F_out the
        likelihood's output Fisher (exact) or Σ_r c_r c_rᵀ of the sampled or the data's
        labels."""
        forward = self.forward
        outputs = forward.outputs
        local_examples = batch_size(self.inputs)
        if self.kind == "exact":
            output_product = functools.partial(self.model.likelihood.fisher_product, outputs)
        else:
            rows = jax.lax.stop_gradient(self.cotangent_rows(outputs))
            output_product = functools.partial(_product_of_rows, rows)

        def product(vector):
            vector = device_varying(vector, self.axis_name)
            result = forward.parameter_gradient(output_product(forward.jvp(vector)))
            result = jax.tree.map(lambda leaf: leaf / local_examples, result)
            return device_mean(result, self.axis_name)

        return product

    def fisher_gram(self, span):
        """VᵀFV, the (k, k) Fisher inner products of a sequence of k vectors, from k
        forward-mode products J v through one forward pass (no backward pass, unlike
        ``matvec``): what a step's quadratic model needs.

        uᵀFv = 1/N Σ_n ⟨J_n u, F_out J_n v⟩ (exact) or 1/N Σ_n Σ_r (c_rᵀJ_n u)(c_rᵀJ_n v)
        (sampled or the data's labels), in the vectors' dtype. One product per vector,
        not a ``vmap`` over them, which would stack the vectors and transpose their
        batched weight blocks: copies of P floats each.
        """
        forward = self.model_pass if self.model_pass is not None else self.linearised()
        outputs = forward.outputs

        def tangent(vector):
            return forward.jvp(device_varying(self._as_parameters(vector), self.axis_name))

        tangents = [tangent(vector) for vector in span]
        if self.kind == "exact":
            product = functools.partial(self.model.likelihood.fisher_product, outputs)
            weighted = [vectors.leaves_of(product(t)) for t in tangents]
            gram = vectors.inner_products([vectors.leaves_of(t) for t in tangents], weighted)
        else:
            rows = jax.lax.stop_gradient(self.cotangent_rows(outputs))
            projections = [_projections_on_rows(rows, t).ravel() for t in tangents]
            gram = vectors.inner_products(projections, projections)
        gram = device_mean(gram / batch_size(self.inputs), self.axis_name)
        return gram.astype(vectors.dtype_of(span[0]))

    @property
    def num_rows(self) -> int:
        """M, the number of score rows: N·R (exact), N·S (Monte-Carlo) or N (empirical)."""
        if self.kind == "empirical":
            return self.num_examples
        if self.kind == "monte_carlo":
            return self.num_examples * self.num_samples
        return self.num_examples * exact_rows_per_example(self.model, self.params, self.inputs)


def _projections_on_rows(rows, tangent):
    """c_rᵀ t per example, (R, N), for output rows c (leading axis R, then N)."""
    # An output that does not depend on the parameters (a mask) has t = 0 and may have
    # non-finite scores c (at masked positions); 0·c is 0 there, as in the Jacobian.
    per_leaf = jax.tree.map(
        lambda c, t: jnp.sum(
            jnp.where(t == 0, 0.0, c * t).reshape(c.shape[0], c.shape[1], -1), axis=-1
        ),
        rows,
        tangent,
    )
    return sum(jax.tree.leaves(per_leaf))


def _product_of_rows(rows, tangent):
    """Σ_r c_r (c_rᵀ t) per example, for output rows c (leading axis R, then N)."""
    weights = _projections_on_rows(rows, tangent)
    return jax.tree.map(lambda c: jnp.einsum("rn,rn...->n...", weights.astype(c.dtype), c), rows)
