"""The data a curvature is measured on at one step: model, parameters, batch, Fisher kind."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax.flatten_util import ravel_pytree

from natgrad_jax._fisher import FisherKind, batch_size, fisher_operator, score_rows
from natgrad_jax._model import Model

PyTree = Any


def parameter_count(params: PyTree) -> int:
    """P, the number of scalars in a parameter pytree."""
    return sum(jax.numpy.size(leaf) for leaf in jax.tree.leaves(params))


@dataclasses.dataclass(frozen=True)
class CurvatureBatch:
    """Everything a representation may need to measure the Fisher of one batch.

    Built inside ``update`` (at trace time); representations pick what they use:
    score rows for dense, diagonal and low-rank forms, products for matrix-free ones.
    Vectors are flat, in ``ravel_pytree(params)`` order.
    """

    model: Model
    params: PyTree
    inputs: PyTree
    kind: FisherKind
    targets: PyTree | None = None
    key: jax.Array | None = None
    num_samples: int = 1

    @property
    def num_examples(self) -> int:
        return batch_size(self.inputs)

    @property
    def leaf_sizes(self) -> tuple[int, ...]:
        """Sizes of the parameter leaves, in ``ravel_pytree`` order."""
        return tuple(leaf.size for leaf in jax.tree.leaves(self.params))

    def score_rows(self) -> jax.Array:
        """S with F = SᵀS / N for this batch and Fisher kind, shape (rows, P)."""
        return score_rows(
            self.model,
            self.params,
            self.inputs,
            kind=self.kind,
            targets=self.targets,
            key=self.key,
            num_samples=self.num_samples,
        )

    @functools.cached_property
    def matvec(self):
        """v ↦ F v on flat vectors, linearised once (see ``ng._fisher.fisher_operator``).

        Products are taken in the parameters' dtype and returned in the vector's.
        """
        flat, unravel = ravel_pytree(self.params)
        product = fisher_operator(
            self.model,
            self.params,
            self.inputs,
            kind=self.kind,
            targets=self.targets,
            key=self.key,
            num_samples=self.num_samples,
        )

        def matvec(vector):
            result = ravel_pytree(product(unravel(vector.astype(flat.dtype))))[0]
            return result.astype(vector.dtype)

        return matvec

    @property
    def num_rows(self) -> int:
        """M, the number of score rows: N·R (exact), N·S (Monte-Carlo) or N (empirical)."""
        if self.kind == "empirical":
            return self.num_examples
        if self.kind == "monte_carlo":
            return self.num_examples * self.num_samples
        outputs = jax.eval_shape(self.model.apply_fn, self.params, self.inputs)
        sqrt = jax.eval_shape(self.model.likelihood.fisher_sqrt, outputs)
        return self.num_examples * jax.tree.leaves(sqrt)[0].shape[0]
