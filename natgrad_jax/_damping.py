r"""Damping rules: fixed or scheduled λ, and Levenberg–Marquardt adaptation.

* A number: the same λ at every step. Simple; the right choice when a good value is
  known (GLMs: 0; small networks: 1e-3–1e-1 relative to the Fisher's scale).
* An optax schedule: λ as a function of the step, e.g. large early (short, gradient-like
  steps while the model is poor) and small late.
* ``LevenbergMarquardt``: λ follows how well the quadratic model predicted the loss
  (Martens 2010). Use it when no good λ is known or the curvature's scale drifts.

The reduction ratio of a step δ = −d (the transform's output taken with learning
rate 1, the setting the rule is designed for) on the current batch is

    ρ = (L(θ + δ) − L(θ)) / (gᵀδ + ½ δᵀ F δ),

and λ ← λ·decrease if ρ > 3/4, λ ← λ·increase if ρ < 1/4, clipped to [min, max].
A step that would increase the loss (ρ < 0, or a non-finite loss) is rejected — the
update is zero — and λ grows by the larger factor ``rejection_increase``, as in the
classical Levenberg–Marquardt algorithm: a poor initial λ costs a few skipped steps
instead of the parameters.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LevenbergMarquardt:
    """Adaptive damping by the Levenberg–Marquardt rule; pass it as ``damping=``.

    Args:
      initial: λ at the first step.
      decrease: factor applied after a good step (ρ > ``high``), in (0, 1).
      increase: factor applied after a poor step (ρ < ``low``), > 1.
      min_damping: lower bound on λ (≥ 0).
      max_damping: upper bound on λ.
      low: ratio under which a step is poor.
      high: ratio over which a step is good.
      reject_increases: skip (zero) a step that would increase the batch loss.
      rejection_increase: factor applied to λ after a rejected step (ρ < 0), > 1.

    Example:
      >>> import natgrad_jax as ng
      >>> rule = ng.LevenbergMarquardt(initial=1.0)
      >>> float(rule.adapt(1.0, 0.9)), float(rule.adapt(1.0, 0.1)), float(rule.adapt(1.0, 0.5))
      (0.6666666..., 1.5, 1.0)

    References:
      Martens, 2010, Deep learning via Hessian-free optimization.
      Martens & Grosse, 2015, Optimizing neural networks with Kronecker-factored
      approximate curvature, section 6.5.
    """

    initial: float = 1.0
    decrease: float = 2.0 / 3.0
    increase: float = 1.5
    min_damping: float = 1e-8
    max_damping: float = 1e4
    low: float = 0.25
    high: float = 0.75
    reject_increases: bool = True
    rejection_increase: float = 10.0

    def __post_init__(self):
        checks = [
            (0 <= self.min_damping <= self.initial <= self.max_damping, "min ≤ initial ≤ max"),
            (0 < self.decrease < 1, "0 < decrease < 1"),
            (self.increase > 1, "increase > 1"),
            (self.rejection_increase > 1, "rejection_increase > 1"),
            (self.low < self.high, "low < high"),
            (math.isfinite(self.max_damping), "a finite max_damping"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"LevenbergMarquardt needs {what}, got {self}.")

    def accepts(self, ratio: jax.Array) -> jax.Array:
        """Whether a step with this reduction ratio is taken."""
        return jnp.asarray(ratio) >= 0 if self.reject_increases else jnp.asarray(True)

    def adapt(self, damping: jax.Array, ratio: jax.Array) -> jax.Array:
        """The next λ after a step with reduction ratio ``ratio`` (NaN counts as poor)."""
        damping = jnp.asarray(damping)
        ratio = jnp.asarray(ratio)
        poor = jnp.where(ratio >= 0, self.increase, self.rejection_increase)
        factor = jnp.where(
            ratio > self.high, self.decrease, jnp.where(ratio >= self.low, 1.0, poor)
        )
        return jnp.clip(damping * factor, self.min_damping, self.max_damping).astype(damping.dtype)


def reduction_ratio(actual_change: jax.Array, predicted_change: jax.Array) -> jax.Array:
    """ρ = actual / predicted change of the loss; −∞ when the step is not a predicted decrease."""
    valid = (predicted_change < 0) & jnp.isfinite(actual_change)
    return jnp.where(valid, actual_change / jnp.where(valid, predicted_change, -1.0), -jnp.inf)
