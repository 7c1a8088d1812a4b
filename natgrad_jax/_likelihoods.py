"""Output distributions p(y | outputs): log-likelihood, sampling, KL and output Fisher.

A likelihood turns the raw outputs of a network (logits, a mean, a log-rate, ...) into
a distribution over targets. Every method is batch-polymorphic: the trailing
``event_ndim`` axes of ``outputs`` describe one distribution, any leading axes are a
batch, and per-example results have the batch shape.

Besides ``log_prob``, ``sample`` and ``kl`` each family knows its Fisher information in
its own output space, F_out(outputs) = E_{y~p}[∇ log p ∇ log pᵀ] (the derivatives being
taken w.r.t. ``outputs``). The Fisher of a model is then Jᵀ F_out J with J the Jacobian
of the outputs w.r.t. the parameters (Martens 2020, section 9). Two forms are provided:

* ``fisher_product(outputs, tangents)``: F_out · tangents, for matrix-free products;
* ``fisher_sqrt(outputs)``: R cotangents c_1..c_R with F_out = Σ_r c_r c_rᵀ, stacked on
  a new leading axis of every leaf; they turn the exact Fisher into a sum of outer
  products, which is what the dense, low-rank and factorised representations need.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


class Likelihood(abc.ABC):
    """Base class of the output distributions; subclasses are frozen dataclasses.

    Being frozen dataclasses, likelihoods are immutable, compare by value and are
    hashable, so they (and the ``Model`` holding them) can be static arguments.
    """

    #: Number of trailing axes of an output leaf that belong to one distribution.
    event_ndim: int = 0

    @abc.abstractmethod
    def log_prob(self, outputs: PyTree, targets: jax.Array) -> jax.Array:
        """Log-likelihood log p(targets | outputs), one value per distribution."""

    @abc.abstractmethod
    def sample(self, key: jax.Array, outputs: PyTree) -> jax.Array:
        """Draws targets from p(· | outputs), shaped like the targets of ``log_prob``."""

    @abc.abstractmethod
    def kl(self, outputs_p: PyTree, outputs_q: PyTree) -> jax.Array:
        """KL(p ‖ q) between the distributions with outputs ``outputs_p`` and ``outputs_q``."""

    @abc.abstractmethod
    def fisher_product(self, outputs: PyTree, tangents: PyTree) -> PyTree:
        """F_out(outputs) · tangents, with tangents shaped like ``outputs``."""

    @abc.abstractmethod
    def fisher_sqrt(self, outputs: PyTree) -> PyTree:
        """Cotangents c_r with F_out = Σ_r c_r c_rᵀ, stacked on a new leading axis."""

    #: Trailing axes of a target that belong to one distribution.
    target_event_ndim: int = 0

    def check_targets(self, outputs: PyTree, targets) -> None:
        """Raises a ValueError/TypeError naming the fix if ``targets`` cannot be scored.

        Shapes and dtypes are checked always (at trace time); values only when the
        targets are concrete (outside ``jit``).
        """
        shape = self.batch_shape(outputs)
        expected = shape + self._target_event_shape(outputs)
        if tuple(jnp.shape(targets)) != expected:
            raise ValueError(
                f"{type(self).__name__} targets must have shape {expected} for outputs of "
                f"batch shape {shape}, got {tuple(jnp.shape(targets))}."
            )
        try:
            values = np.asarray(targets)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            return
        self._check_target_values(outputs, values)

    def _target_event_shape(self, outputs) -> tuple[int, ...]:
        return ()

    def _check_target_values(self, outputs, values) -> None:
        del outputs, values

    def batch_shape(self, outputs: PyTree) -> tuple[int, ...]:
        """The shape of the batch of distributions described by ``outputs``."""
        shape = tuple(np.shape(jax.tree_util.tree_leaves(outputs)[0]))
        ndim = len(shape) - self.event_ndim
        if ndim < 0:
            raise ValueError(
                f"{type(self).__name__} needs outputs with at least {self.event_ndim} "
                f"axes, got shape {shape}."
            )
        return shape[:ndim]


def _one_hot_rows(size: int, dtype: jnp.dtype, batch_shape: tuple[int, ...]) -> jax.Array:
    """Identity rows e_r broadcast over a batch: shape (size, *batch_shape, size)."""
    eye = jnp.eye(size, dtype=dtype)
    return jnp.broadcast_to(
        eye.reshape((size,) + (1,) * len(batch_shape) + (size,)),
        (size, *batch_shape, size),
    )


@dataclasses.dataclass(frozen=True)
class Categorical(Likelihood):
    """Categorical distribution over C classes, parametrised by logits.

    outputs: logits of shape (..., C); targets: integer labels of shape (...).
    In logit space the output Fisher is F_out = diag(p) − ppᵀ with p = softmax(logits);
    its square root has rows c_r = √p_r (e_r − p).

    Example:
        >>> import jax.numpy as jnp, natgrad_jax as ng
        >>> lik = ng.Categorical()
        >>> float(lik.log_prob(jnp.zeros(4), jnp.array(2)))  # log(1/4)
        -1.3862943...
    """

    event_ndim = 1

    def log_prob(self, outputs, targets):
        log_probs = jax.nn.log_softmax(outputs, axis=-1)
        targets = jnp.asarray(targets)
        return jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]

    def sample(self, key, outputs):
        return jax.random.categorical(key, outputs, axis=-1)

    def check_targets(self, outputs, targets):
        if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
            raise TypeError(
                "Categorical targets are integer class labels, got dtype "
                f"{jnp.result_type(targets)}; pass labels.astype(int) (argmax of one-hot rows)."
            )
        super().check_targets(outputs, targets)

    def _check_target_values(self, outputs, values):
        num_classes = np.shape(outputs)[-1]
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"Categorical labels must lie in [0, {num_classes}) for {num_classes} logits, "
                f"got values from {values.min()} to {values.max()}."
            )

    def kl(self, outputs_p, outputs_q):
        log_p = jax.nn.log_softmax(outputs_p, axis=-1)
        log_q = jax.nn.log_softmax(outputs_q, axis=-1)
        return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)

    def fisher_product(self, outputs, tangents):
        p = jax.nn.softmax(outputs, axis=-1)
        return p * tangents - p * jnp.sum(p * tangents, axis=-1, keepdims=True)

    def fisher_sqrt(self, outputs):
        p = jax.nn.softmax(outputs, axis=-1)
        num_classes = outputs.shape[-1]
        eye = _one_hot_rows(num_classes, outputs.dtype, outputs.shape[:-1])
        sqrt_p = jnp.sqrt(jnp.moveaxis(p, -1, 0))[..., None]  # (C, ..., 1)
        return sqrt_p * (eye - p)


@dataclasses.dataclass(frozen=True)
class Bernoulli(Likelihood):
    """Bernoulli distribution parametrised by logits.

    outputs: logits of shape (...); targets: 0/1 values of shape (...).
    In logit space F_out = σ(x)(1 − σ(x)), computed as exp(−softplus(x) − softplus(−x))
    so that it stays finite (and correctly tiny) for logits of any size.

    Example:
        >>> import jax.numpy as jnp, natgrad_jax as ng
        >>> float(ng.Bernoulli().fisher_product(jnp.array(0.0), jnp.array(1.0)))
        0.25
    """

    def log_prob(self, outputs, targets):
        targets = jnp.asarray(targets, outputs.dtype)
        return targets * outputs - jax.nn.softplus(outputs)

    def sample(self, key, outputs):
        return jax.random.bernoulli(key, jax.nn.sigmoid(outputs)).astype(outputs.dtype)

    def _check_target_values(self, outputs, values):
        if not np.all((values == 0) | (values == 1)):
            raise ValueError("Bernoulli targets must be 0 or 1; got other values.")

    def kl(self, outputs_p, outputs_q):
        p = jax.nn.sigmoid(outputs_p)
        log_ratio_one = jax.nn.softplus(-outputs_q) - jax.nn.softplus(-outputs_p)
        log_ratio_zero = jax.nn.softplus(outputs_q) - jax.nn.softplus(outputs_p)
        return p * log_ratio_one + (1.0 - p) * log_ratio_zero

    def fisher_product(self, outputs, tangents):
        return self._variance(outputs) * tangents

    def fisher_sqrt(self, outputs):
        return jnp.exp(-0.5 * (jax.nn.softplus(outputs) + jax.nn.softplus(-outputs)))[None]

    @staticmethod
    def _variance(logits):
        return jnp.exp(-jax.nn.softplus(logits) - jax.nn.softplus(-logits))


@dataclasses.dataclass(frozen=True)
class Gaussian(Likelihood):
    """Diagonal Gaussian over vectors of size D.

    * ``Gaussian(scale=σ)``: fixed standard deviation σ; outputs are the mean (..., D)
      and F_out = I/σ².
    * ``Gaussian()``: heteroscedastic; outputs are a tuple ``(mean, log_scale)``, each
      (..., D), and F_out = diag(1/σ², 2) per dimension with σ = exp(log_scale).

    targets: reals of shape (..., D). ``log_prob`` and ``kl`` sum over the D axis.

    Example:
        >>> import jax.numpy as jnp, natgrad_jax as ng
        >>> outputs = (jnp.zeros(1), jnp.log(jnp.full(1, 2.0)))   # N(0, 2²)
        >>> ng.Gaussian().fisher_product(outputs, (jnp.ones(1), jnp.ones(1)))
        (Array([0.25], dtype=float32), Array([2.], dtype=float32))
    """

    scale: float | None = None
    event_ndim = 1

    def __post_init__(self):
        if self.scale is not None and not (
            isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0
        ):
            raise ValueError(
                f"Gaussian scale must be a positive finite Python number, got {self.scale!r}; "
                "use Gaussian() with (mean, log_scale) outputs for a learned scale."
            )

    @property
    def heteroscedastic(self) -> bool:
        return self.scale is None

    def _mean_and_log_scale(self, outputs):
        if self.heteroscedastic:
            if not (isinstance(outputs, (tuple, list)) and len(outputs) == 2):
                raise ValueError(
                    "Gaussian() expects outputs (mean, log_scale); for a fixed scale use "
                    "Gaussian(scale=...) with the mean as outputs."
                )
            return outputs[0], outputs[1]
        if isinstance(outputs, (tuple, list)):
            raise ValueError(
                f"Gaussian(scale={self.scale}) expects the mean array as outputs, got a "
                f"{type(outputs).__name__}; use Gaussian() for (mean, log_scale) outputs."
            )
        return outputs, jnp.full_like(outputs, math.log(self.scale))

    def _mean(self, outputs):
        """The mean, after checking the form of ``outputs`` (works on shapes too)."""
        if self.heteroscedastic:
            self._mean_and_log_scale(outputs)  # validates the (mean, log_scale) form
            return outputs[0]
        if isinstance(outputs, (tuple, list)):
            self._mean_and_log_scale(outputs)  # raises the explanatory error
        return outputs

    def batch_shape(self, outputs):
        return super().batch_shape(self._mean(outputs))

    def log_prob(self, outputs, targets):
        mean, log_scale = self._mean_and_log_scale(outputs)
        z = (targets - mean) * jnp.exp(-log_scale)
        return jnp.sum(-0.5 * z**2 - log_scale - _HALF_LOG_TWO_PI, axis=-1)

    def sample(self, key, outputs):
        mean, log_scale = self._mean_and_log_scale(outputs)
        return mean + jnp.exp(log_scale) * jax.random.normal(key, mean.shape, mean.dtype)

    def _target_event_shape(self, outputs):
        return tuple(np.shape(self._mean(outputs))[-1:])

    def _check_target_values(self, outputs, values):
        if not np.all(np.isfinite(values)):
            raise ValueError("Gaussian targets must be finite.")

    def kl(self, outputs_p, outputs_q):
        mean_p, log_scale_p = self._mean_and_log_scale(outputs_p)
        mean_q, log_scale_q = self._mean_and_log_scale(outputs_q)
        z = (mean_p - mean_q) * jnp.exp(-log_scale_q)
        per_dim = (
            log_scale_q
            - log_scale_p
            + 0.5 * jnp.exp(2.0 * (log_scale_p - log_scale_q))
            + 0.5 * z**2
            - 0.5
        )
        return jnp.sum(per_dim, axis=-1)

    def fisher_product(self, outputs, tangents):
        _, log_scale = self._mean_and_log_scale(outputs)
        precision = jnp.exp(-2.0 * log_scale)
        if self.heteroscedastic:
            return (precision * tangents[0], 2.0 * tangents[1])
        return precision * tangents

    def fisher_sqrt(self, outputs):
        mean, log_scale = self._mean_and_log_scale(outputs)
        size = mean.shape[-1]
        eye = _one_hot_rows(size, mean.dtype, mean.shape[:-1])
        mean_rows = eye * jnp.exp(-log_scale)  # (D, ..., D): e_r / σ_r
        if not self.heteroscedastic:
            return mean_rows
        zeros = jnp.zeros_like(mean_rows)
        scale_rows = math.sqrt(2.0) * eye
        return (
            jnp.concatenate([mean_rows, zeros], axis=0),
            jnp.concatenate([zeros, scale_rows], axis=0),
        )


@dataclasses.dataclass(frozen=True)
class Poisson(Likelihood):
    """Poisson distribution parametrised by its log-rate η (the canonical link).

    outputs: log-rates of shape (...); targets: non-negative counts of shape (...).
    In log-rate space F_out = exp(η), the rate.

    Example:
        >>> import jax.numpy as jnp, natgrad_jax as ng
        >>> round(float(ng.Poisson().log_prob(jnp.array(0.0), jnp.array(0.0))), 5)  # P(0)=e⁻¹
        -1.0
    """

    def log_prob(self, outputs, targets):
        targets = jnp.asarray(targets, outputs.dtype)
        return targets * outputs - jnp.exp(outputs) - jax.lax.lgamma(targets + 1.0)

    def sample(self, key, outputs):
        return jax.random.poisson(key, jnp.exp(outputs)).astype(outputs.dtype)

    def _check_target_values(self, outputs, values):
        if not np.all((values >= 0) & (values == np.round(values))):
            raise ValueError("Poisson targets are counts: non-negative integers.")

    def kl(self, outputs_p, outputs_q):
        rate_p = jnp.exp(outputs_p)
        return rate_p * (outputs_p - outputs_q) - rate_p + jnp.exp(outputs_q)

    def fisher_product(self, outputs, tangents):
        return jnp.exp(outputs) * tangents

    def fisher_sqrt(self, outputs):
        return jnp.exp(0.5 * outputs)[None]
