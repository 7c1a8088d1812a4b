"""What a training loop can watch: λ and the steps the transform did not take."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from natgrad_jax._state import NaturalGradientState


class Diagnostics(NamedTuple):
    """``ng.diagnostics(state)``: scalars (arrays) of one natural-gradient transform.

    Attributes:
      steps: updates taken or passed on so far (a skipped non-finite step is not counted).
      damping: λ of the next update (adaptive damping) or of the last one.
      rejected_non_finite: updates whose gradient or step held a NaN or an infinity.
      rejected_no_decrease: Levenberg–Marquardt steps skipped because the batch loss
        would not have decreased.
    """

    steps: jax.Array
    damping: jax.Array
    rejected_non_finite: jax.Array
    rejected_no_decrease: jax.Array


def _is_state(node: Any) -> bool:
    return isinstance(node, NaturalGradientState)


def diagnostics(state: Any) -> Diagnostics:
    """The damping and rejected-step counters of the natural-gradient transform in
    ``state``: its own ``NaturalGradientState`` or any optax state holding one (a
    ``chain``, ``inject_hyperparams``, ``MultiSteps``, ...). Works under ``jit``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import natgrad_jax as ng
      >>> model = ng.Model(lambda w, x: x @ w, ng.Bernoulli())
      >>> x, y = jnp.eye(3), jnp.array([1.0, 0.0, 1.0])
      >>> optimizer = optax.chain(optax.clip(1.0), ng.natural_gradient(model, 1.0))
      >>> w = jnp.zeros(3)
      >>> state = optimizer.init(w)
      >>> bad_grads = jnp.array([jnp.nan, 0.0, 0.0])
      >>> updates, state = optimizer.update(bad_grads, state, w, inputs=x, targets=y)
      >>> bool(jnp.all(updates == 0))  # the step was skipped
      True
      >>> report = ng.diagnostics(state)
      >>> int(report.rejected_non_finite), int(report.rejected_no_decrease), int(report.steps)
      (1, 0, 0)
      >>> grads = jax.grad(model.nll)(w, x, y)
      >>> updates, state = optimizer.update(grads, state, w, inputs=x, targets=y)
      >>> int(ng.diagnostics(state).steps), bool(updates[0] > 0)  # w[0] moves towards y = 1
      (1, True)
    """
    found = [node for node in jax.tree.leaves(state, is_leaf=_is_state) if _is_state(node)]
    if len(found) != 1:
        raise ValueError(
            f"ng.diagnostics needs a state holding one natural-gradient transform's state; "
            f"this one holds {len(found)}. Pass that transform's NaturalGradientState "
            "(found with isinstance(node, ng.NaturalGradientState))."
        )
    (ours,) = found
    return Diagnostics(
        steps=ours.count,
        damping=ours.damping,
        rejected_non_finite=ours.rejected.non_finite,
        rejected_no_decrease=ours.rejected.no_decrease,
    )
