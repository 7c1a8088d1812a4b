"""The data a curvature is measured on at one step: model, parameters, batch, Fisher kind."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax.flatten_util import ravel_pytree

from natgrad_jax._fisher import (
    FisherKind,
    device_key,
    device_sum,
    device_varying,
    exact_rows_per_example,
    fisher_operator,
    global_batch_size,
    score_rows,
)
from natgrad_jax._model import Model

PyTree = Any


@dataclasses.dataclass(frozen=True)
class CurvatureBatch:
    """Everything a representation may need to measure the Fisher of one batch.

    Built inside ``update`` (at trace time); representations pick what they use:
    score rows for dense, diagonal and low-rank forms, products for matrix-free ones.
    Vectors are flat, in ``ravel_pytree(params)`` order. With ``axis_name`` (inside
    ``shard_map``) ``inputs`` is this device's share of the batch: ``num_examples``,
    ``device_sum``, ``gather_rows`` and ``matvec`` then speak of the whole batch.
    """

    model: Model
    params: PyTree
    inputs: PyTree
    kind: FisherKind
    targets: PyTree | None = None
    key: jax.Array | None = None
    num_samples: int = 1
    axis_name: str | None = None

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
    def leaf_sizes(self) -> tuple[int, ...]:
        """Sizes of the parameter leaves, in ``ravel_pytree`` order."""
        return tuple(leaf.size for leaf in jax.tree.leaves(self.params))

    @property
    def device_key(self):
        """The PRNG key for this device's Monte-Carlo labels."""
        return None if self.key is None else device_key(self.key, self.axis_name)

    def score_rows(self) -> jax.Array:
        """This device's rows of S (F = SᵀS / N, N the whole batch), shape (rows, P)."""
        return score_rows(
            self.model,
            device_varying(self.params, self.axis_name),
            self.inputs,
            kind=self.kind,
            targets=self.targets,
            key=self.device_key,
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
            axis_name=self.axis_name,
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
        return self.num_examples * exact_rows_per_example(self.model, self.params, self.inputs)
