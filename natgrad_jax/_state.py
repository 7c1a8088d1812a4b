"""The state of the natural-gradient transform: arrays only (jit, shard, checkpoint)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RejectedSteps(NamedTuple):
    """How many updates the transform did not take, by reason (int32 counters)."""

    # The gradient or the step held a NaN or an infinity. With Levenberg–Marquardt damping
    # the step was skipped (zero update, the rest of the state kept); with a fixed or
    # scheduled damping the non-finite update was passed on, as optax transforms do.
    non_finite: jax.Array
    # Levenberg–Marquardt: the step would not have lowered the batch loss (ρ < 0), so it
    # was skipped and λ grew by ``rejection_increase``.
    no_decrease: jax.Array

    @classmethod
    def none(cls) -> RejectedSteps:
        return cls(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))


class Adaptation(NamedTuple):
    """What the last measured step found, reused until the next is due (``adapt_every``)."""

    # α: the quadratic model's minimiser along the direction alone (float []).
    step_length: jax.Array
    # (α d)ᵀ(F̂ + λI)(α d) by the solve's own curvature F̂ (K-FAC: α² gᵀd): the steps that
    # reuse α are no longer than this in that norm.
    solver_quadratic: jax.Array
    # Levenberg–Marquardt rejected the last measured step: measure again at the next one.
    retry: jax.Array

    @classmethod
    def initial(cls, dtype) -> Adaptation:
        return cls(jnp.zeros([], dtype), jnp.zeros([], dtype), jnp.zeros([], bool))


class NaturalGradientState(NamedTuple):
    """State of ``scale_by_natural_gradient``: arrays only (jit, shard, checkpoint).

    ``ng.diagnostics(state)`` reads the parts a user watches (λ, rejected steps)."""

    count: jax.Array  # int32 []: number of updates taken or passed on so far
    key: jax.Array  # uint32 [2]: PRNG key for Monte-Carlo labels, split at every update
    damping: jax.Array  # float []: λ of the next update (adaptive) or of the last one
    curvature: NamedTuple  # the solver's arrays, e.g. DenseState (P, P) matrices
    # λ of the stored factorisation: without rescale, adaptive damping refactorises
    # between refreshes when λ has moved, so that the next solve uses it.
    factorised_damping: jax.Array | None = None
    # With momentum: the last update's direction (flat, zeros after a rejected step).
    previous_direction: jax.Array | None = None
    rejected: RejectedSteps | None = None
    # With ``adapt_every`` > 1: the step length and its bound measured last.
    adaptation: Adaptation | None = None
