"""A probabilistic model: a network's ``apply_fn`` followed by a likelihood."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from natgrad_jax._eager import eval_shape
from natgrad_jax._likelihoods import Likelihood, concrete_values

PyTree = Any


def per_example(values: jax.Array) -> jax.Array:
    """``values`` (one number per example from a likelihood), after checking it has the
    leading example axis that ``apply_fn``'s outputs must have."""
    if jnp.ndim(values) != 1:
        raise ValueError(
            "The likelihood returned a scalar: outputs need a leading batch axis "
            "(apply_fn maps a batch of inputs to a batch of outputs)."
        )
    return values


def check_example_axis(likelihood: Likelihood, outputs: PyTree) -> None:
    """Raises if ``outputs`` leave the likelihood no example axis: its last
    ``event_ndim`` axes are one example's event (a vector of D numbers for ``Gaussian``
    and ``Categorical``), so (N,) outputs of one number per example are one event."""
    if likelihood.batch_shape(outputs):
        return
    shape = tuple(np.shape(jax.tree.leaves(outputs)[0]))
    hint = ""
    if likelihood.event_ndim == 1:
        hint = (
            f" {type(likelihood).__name__} reads the last axis of the outputs as one "
            f"example's event, so outputs of shape {shape} are one example: for one number "
            "per example, return outputs of shape (N, 1) (``[:, None]``) and pass targets "
            "of that shape."
        )
    raise ValueError(
        f"The outputs of shape {shape} have no example axis (apply_fn maps a batch of "
        f"inputs to a batch of outputs).{hint}"
    )


def _poison_invalid_examples(outputs: PyTree, likelihood: Likelihood, targets) -> PyTree:
    """``outputs`` with NaN in every example whose targets lie outside the support.

    The NaN enters the outputs (not the log-likelihood), so that it reaches the loss
    *and* the gradient: a gather at an out-of-range label would drop a NaN cotangent.
    """
    valid = likelihood.valid_targets(outputs, targets)
    valid_example = jnp.all(jnp.reshape(valid, (valid.shape[0], -1)), axis=1)
    factor = jnp.where(valid_example, 1.0, jnp.nan)

    def poison(leaf):
        return leaf * factor.reshape((-1,) + (1,) * (jnp.ndim(leaf) - 1)).astype(leaf.dtype)

    return jax.tree.map(poison, outputs)


@dataclasses.dataclass(frozen=True)
class Model:
    """p(y | x, θ): ``apply_fn(params, inputs)`` gives the outputs of ``likelihood``.

    ``apply_fn`` maps a batch of inputs (leading axis N, any pytree) to a batch of
    outputs: axis 0 of every output leaf indexes the examples; the other axes are the
    likelihood's events (positions such as tokens, then the event axes; see
    ``Likelihood``). An example's log-likelihood is the sum over its events, and
    ``nll`` — like every Fisher of the library — is the **mean over examples of that
    sum**; wrap the likelihood in ``ng.Masked`` to weight or drop positions.

    Models are immutable and hashable, so they can be static arguments of ``jax.jit``
    and ``optax.inject_hyperparams`` (``static_args=("model",)``).

    Example:
        >>> import jax.numpy as jnp, natgrad_jax as ng
        >>> model = ng.Model(lambda w, x: x @ w, ng.Bernoulli())   # logistic regression
        >>> x, y = jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([1.0, 0.0])
        >>> float(model.nll(jnp.zeros(2), x, y))                    # log 2
        0.6931471...
    """

    apply_fn: Callable[[PyTree, PyTree], PyTree]
    likelihood: Likelihood

    def __post_init__(self):
        if not callable(self.apply_fn):
            raise TypeError(
                f"Model's apply_fn must be callable as apply_fn(params, inputs), got "
                f"{type(self.apply_fn).__name__}."
            )
        if not isinstance(self.likelihood, Likelihood):
            raise TypeError(
                "Model's likelihood must be a natgrad_jax likelihood such as "
                f"ng.Categorical() or ng.Gaussian(scale=1.0), got {self.likelihood!r}."
            )

    def apply(self, params: PyTree, inputs: PyTree) -> PyTree:
        """The likelihood's outputs for a batch of inputs."""
        return self.apply_fn(params, inputs)

    def log_likelihood(self, params: PyTree, inputs: PyTree, targets: PyTree) -> jax.Array:
        """Per-example log p(targets_i | inputs_i, params), shape (N,).

        Checks the targets' shape against the outputs (also under ``jit``). Their values
        are checked too: concrete targets raise a ValueError naming the fix; traced ones
        (inside ``jit``) cannot raise, so an example with a target outside the support
        (a Bernoulli −1, a label ≥ C) gets log-likelihood NaN, which makes the loss
        and its gradient NaN instead of silently wrong (``optax.apply_if_finite`` skips
        such a step). See ``Likelihood.valid_targets``.
        """
        return self.log_likelihood_of_outputs(self.apply_fn(params, inputs), targets)

    def log_likelihood_of_outputs(self, outputs: PyTree, targets: PyTree) -> jax.Array:
        """``log_likelihood`` from the outputs of ``apply_fn`` (already computed)."""
        check_example_axis(self.likelihood, outputs)
        self.likelihood.check_targets(outputs, targets)
        if concrete_values(targets) is None:
            outputs = _poison_invalid_examples(outputs, self.likelihood, targets)
        return per_example(self.likelihood.log_prob(outputs, targets))

    def sampled_log_likelihood(self, params: PyTree, inputs: PyTree, targets: PyTree) -> jax.Array:
        """Per-example log-likelihood whose scores at labels sampled from the model average
        to the exact Fisher (``Likelihood.sampled_log_prob``); shape (N,)."""
        outputs = self.apply_fn(params, inputs)
        check_example_axis(self.likelihood, outputs)
        return per_example(self.likelihood.sampled_log_prob(outputs, targets))

    def check_targets(self, params: PyTree, inputs: PyTree, targets: PyTree) -> None:
        """Raises a clear error if ``targets`` do not fit the model's outputs (see
        ``Likelihood.check_targets``); costs one abstract evaluation, no computation."""
        self.likelihood.check_targets(eval_shape(self.apply_fn, params, inputs), targets)

    def nll(self, params: PyTree, inputs: PyTree, targets: PyTree) -> jax.Array:
        """The mean negative log-likelihood over the batch: the usual training loss."""
        return self.nll_of_outputs(self.apply_fn(params, inputs), targets)

    def nll_of_outputs(self, outputs: PyTree, targets: PyTree) -> jax.Array:
        """``nll`` from the outputs of ``apply_fn`` (already computed)."""
        return -jnp.mean(self.log_likelihood_of_outputs(outputs, targets))


def check_model(model: Any) -> Model:
    """Returns ``model`` if it is a ``Model``; raises a TypeError naming the fix otherwise."""
    if not isinstance(model, Model):
        raise TypeError(
            f"Expected a natgrad_jax Model, got {type(model).__name__}; wrap your network "
            "as ng.Model(apply_fn, likelihood)."
        )
    return model
