"""The data a curvature is measured on at one step: model, parameters, batch, Fisher kind."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from natgrad_jax._fisher import FisherKind, batch_size, score_rows
from natgrad_jax._model import Model

PyTree = Any


@dataclasses.dataclass(frozen=True)
class CurvatureBatch:
    """Everything a representation may need to measure the Fisher of one batch.

    Built inside ``update`` (at trace time); representations pick what they use:
    score rows for dense and low-rank forms, products for matrix-free ones.
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
