"""Output distributions p(y | outputs): log-likelihood, sampling, KL and output Fisher.

A likelihood turns the raw outputs of a network (logits, a mean, a log-rate, ...) into
a distribution over targets.

**Examples and events.** Axis 0 of every output leaf indexes the examples. The trailing
``event_ndim`` axes of an output describe one distribution of the family (an *event*:
the C logits of a categorical, the D coordinates of a diagonal Gaussian, one scalar for
Bernoulli and Poisson); every axis in between is a *position* (tokens of a sequence,
labels of a multi-label target, pixels), each position an independent event. So

* Categorical outputs (N, C), (N, T, C), ... with integer targets (N,), (N, T), ...;
* Bernoulli / Poisson outputs (N,), (N, L), (N, H, W), ... with targets of that shape;
* Gaussian outputs (N, D), (N, T, D), ... with targets of that shape.

``log_prob`` and ``kl`` return **one number per example: the sum over its events**
(shape (N,)). ``Masked`` weights the events (padding).

Besides ``log_prob``, ``sample`` and ``kl`` each family knows its Fisher information in
its own output space, F_out(outputs) = E_{y~p}[∇ log p ∇ log pᵀ] (the derivatives being
taken w.r.t. ``outputs``). The Fisher of a model is then Jᵀ F_out J with J the Jacobian
of the outputs w.r.t. the parameters (Martens 2020, section 9). Two forms are provided:

* ``fisher_product(outputs, tangents)``: F_out · tangents, for matrix-free products;
* ``fisher_sqrt(outputs)``: R cotangents c_1..c_R with F_out(example i) = Σ_r c_r[i] c_r[i]ᵀ,
  stacked on a new leading axis of every leaf. F_out of an example is block-diagonal
  over its events, so R = (rows of one event) × (positions per example): each row lives
  on one position. They turn the exact Fisher into a sum of outer products, which is
  what the dense, low-rank and factorised representations need.

A new family subclasses ``Likelihood`` and implements the per-event methods
``_event_log_prob``, ``_event_kl`` and ``_event_fisher_sqrt`` (plus ``sample`` and
``fisher_product``); the base class sums over positions and spreads the square root
over them.
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

    #: Number of trailing axes of an output leaf that belong to one event (distribution).
    event_ndim: int = 0

    def log_prob(self, outputs: PyTree, targets: jax.Array) -> jax.Array:
        """log p(targets | outputs) of each example: the sum over its events, shape (N,)."""
        return sum_over_positions(self._event_log_prob(outputs, targets))

    def sampled_log_prob(self, outputs: PyTree, targets: jax.Array) -> jax.Array:
        """The log-likelihood whose scores at labels sampled from the model estimate the
        Fisher without bias (E[s sᵀ] = F): ``log_prob`` itself, but for ``Masked``."""
        return self.log_prob(outputs, targets)

    def kl(self, outputs_p: PyTree, outputs_q: PyTree) -> jax.Array:
        """KL(p ‖ q) of each example (the sum over its events), shape (N,)."""
        return sum_over_positions(self._event_kl(outputs_p, outputs_q))

    def fisher_sqrt(self, outputs: PyTree) -> PyTree:
        """Cotangents c_r with F_out(example i) = Σ_r c_r[i] c_r[i]ᵀ, on a new leading axis.

        Each example's output Fisher is block-diagonal over its events; the rows of one
        event's square root are spread over the positions (R = rows per event × positions).
        """
        positions = self.batch_shape(outputs)[1:]
        return spread_over_positions(self._event_fisher_sqrt(outputs), positions)

    @abc.abstractmethod
    def sample(self, key: jax.Array, outputs: PyTree) -> jax.Array:
        """Draws targets from p(· | outputs), shaped like the targets of ``log_prob``."""

    @abc.abstractmethod
    def fisher_product(self, outputs: PyTree, tangents: PyTree) -> PyTree:
        """F_out(outputs) · tangents, with tangents shaped like ``outputs``."""

    @abc.abstractmethod
    def _event_log_prob(self, outputs: PyTree, targets: jax.Array) -> jax.Array:
        """log p of every event, shape ``batch_shape(outputs)``."""

    @abc.abstractmethod
    def _event_kl(self, outputs_p: PyTree, outputs_q: PyTree) -> jax.Array:
        """KL(p ‖ q) of every event, shape ``batch_shape(outputs_p)``."""

    @abc.abstractmethod
    def _event_fisher_sqrt(self, outputs: PyTree) -> PyTree:
        """Rows c_r with F_out(event) = Σ_r c_r c_rᵀ for every event at once, stacked on
        a new leading axis (each row covers every event of the batch)."""

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
                + self._check_target_shape(outputs, targets)
            )
        values = concrete_values(targets)
        if values is None:
            return
        with jax.ensure_compile_time_eval():  # concrete values, even inside a trace
            valid = np.asarray(self.valid_targets(outputs, values))
        if not np.all(valid):
            offending = np.unique(values[~valid])
            raise ValueError(
                f"{self._invalid_targets_message(outputs)}; got {offending[:8].tolist()}"
                f"{' …' if offending.size > 8 else ''}."
            )

    def _check_target_shape(self, outputs, targets) -> str:
        """A hint for a common shape mistake ("" if none applies)."""
        del outputs, targets
        return ""

    def valid_targets(self, outputs: PyTree, targets) -> jax.Array:
        """Whether each target entry lies in the support (a boolean array; traceable).

        Under ``jit`` the targets' values cannot be checked when the loss is traced, so
        ``Model.log_likelihood`` returns NaN for an example whose targets are invalid
        (see ``Model``); outside ``jit`` ``check_targets`` raises.
        """
        del outputs
        return jnp.ones(jnp.shape(targets), bool)

    def _invalid_targets_message(self, outputs) -> str:
        del outputs
        return "invalid targets"

    def _target_event_shape(self, outputs) -> tuple[int, ...]:
        return ()

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


def concrete_values(array) -> np.ndarray | None:
    """``array`` as NumPy values, or None while it is abstract (traced or a shape)."""
    if isinstance(array, jax.ShapeDtypeStruct):
        return None
    try:
        return np.asarray(array)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def sum_over_positions(values: jax.Array) -> jax.Array:
    """Sums every axis after the first: one number per example (a scalar stays one)."""
    if jnp.ndim(values) <= 1:
        return values
    return jnp.sum(jnp.reshape(values, (values.shape[0], -1)), axis=1)


def spread_over_positions(rows: PyTree, positions: tuple[int, ...]) -> PyTree:
    """Event rows (R, N, *positions, *event) → (Q·R, N, *positions, *event), Q = ∏ positions.

    Row (q, r) is row r restricted to position q (zero elsewhere), so that the rows of
    each example square to its block-diagonal output Fisher, not to a sum over positions
    of the event Fishers folded into one rank-R block.
    """
    count = math.prod(positions)
    if count == 1:
        return rows

    def spread(leaf):
        num_rows, num_examples = leaf.shape[:2]
        event = leaf.shape[2 + len(positions) :]
        one_hot = jnp.eye(count, dtype=leaf.dtype).reshape(
            (count, 1, 1, *positions) + (1,) * len(event)
        )
        spread_rows = one_hot * leaf[None]
        return spread_rows.reshape((count * num_rows, num_examples, *positions, *event))

    return jax.tree.map(spread, rows)


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

    def _event_log_prob(self, outputs, targets):
        log_probs = jax.nn.log_softmax(outputs, axis=-1)
        targets = jnp.asarray(targets)
        # The target's entry selected, not gathered: a class axis split over devices
        # (vocabulary-parallel logits on a mesh with explicit axes) has no gather, and a
        # logit of -inf elsewhere stays out of the sum. A label outside [0, C) reads NaN.
        chosen = jnp.arange(log_probs.shape[-1]) == targets[..., None]
        picked = jnp.sum(jnp.where(chosen, log_probs, 0.0), axis=-1)
        return jnp.where(self.valid_targets(outputs, targets), picked, jnp.nan)

    def sample(self, key, outputs):
        return jax.random.categorical(key, outputs, axis=-1)

    def check_targets(self, outputs, targets):
        if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
            raise TypeError(
                "Categorical targets are integer class labels, got dtype "
                f"{jnp.result_type(targets)}; pass labels.astype(int) (argmax of one-hot rows)."
            )
        super().check_targets(outputs, targets)

    def valid_targets(self, outputs, targets):
        return (targets >= 0) & (targets < np.shape(outputs)[-1])

    def _invalid_targets_message(self, outputs):
        num_classes = np.shape(outputs)[-1]
        return (
            f"Categorical labels are class indices in [0, {num_classes}) for {num_classes} "
            "logits (the last axis of the outputs); labels outside that range"
        )

    def _check_target_shape(self, outputs, targets) -> str:
        if tuple(jnp.shape(targets)) == tuple(np.shape(outputs)):
            return " These look like one-hot rows: pass labels = targets.argmax(-1)."
        return ""

    def _event_kl(self, outputs_p, outputs_q):
        log_p = jax.nn.log_softmax(outputs_p, axis=-1)
        log_q = jax.nn.log_softmax(outputs_q, axis=-1)
        return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)

    def fisher_product(self, outputs, tangents):
        p = jax.nn.softmax(outputs, axis=-1)
        return p * tangents - p * jnp.sum(p * tangents, axis=-1, keepdims=True)

    def _event_fisher_sqrt(self, outputs):
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

    def _event_log_prob(self, outputs, targets):
        targets = jnp.asarray(targets, outputs.dtype)
        return targets * outputs - jax.nn.softplus(outputs)

    def sample(self, key, outputs):
        return jax.random.bernoulli(key, jax.nn.sigmoid(outputs)).astype(outputs.dtype)

    def valid_targets(self, outputs, targets):
        return (targets == 0) | (targets == 1)

    def _invalid_targets_message(self, outputs):
        return "Bernoulli targets must be 0 or 1 (for labels in {-1, +1} pass (y + 1) / 2)"

    def _event_kl(self, outputs_p, outputs_q):
        p = jax.nn.sigmoid(outputs_p)
        log_ratio_one = jax.nn.softplus(-outputs_q) - jax.nn.softplus(-outputs_p)
        log_ratio_zero = jax.nn.softplus(outputs_q) - jax.nn.softplus(outputs_p)
        return p * log_ratio_one + (1.0 - p) * log_ratio_zero

    def fisher_product(self, outputs, tangents):
        return self._variance(outputs) * tangents

    def _event_fisher_sqrt(self, outputs):
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

    def _event_log_prob(self, outputs, targets):
        mean, log_scale = self._mean_and_log_scale(outputs)
        z = (targets - mean) * jnp.exp(-log_scale)
        return jnp.sum(-0.5 * z**2 - log_scale - _HALF_LOG_TWO_PI, axis=-1)

    def sample(self, key, outputs):
        mean, log_scale = self._mean_and_log_scale(outputs)
        return mean + jnp.exp(log_scale) * jax.random.normal(key, mean.shape, mean.dtype)

    def _target_event_shape(self, outputs):
        return tuple(np.shape(self._mean(outputs))[-1:])

    def valid_targets(self, outputs, targets):
        return jnp.isfinite(targets)

    def _invalid_targets_message(self, outputs):
        return "Gaussian targets must be finite"

    def _event_kl(self, outputs_p, outputs_q):
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

    def _event_fisher_sqrt(self, outputs):
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

    def _event_log_prob(self, outputs, targets):
        targets = jnp.asarray(targets, outputs.dtype)
        return targets * outputs - jnp.exp(outputs) - jax.lax.lgamma(targets + 1.0)

    def sample(self, key, outputs):
        return jax.random.poisson(key, jnp.exp(outputs)).astype(outputs.dtype)

    def valid_targets(self, outputs, targets):
        return (targets >= 0) & (targets == jnp.round(targets))

    def _invalid_targets_message(self, outputs):
        return "Poisson targets are counts: non-negative integers"

    def _event_kl(self, outputs_p, outputs_q):
        rate_p = jnp.exp(outputs_p)
        return rate_p * (outputs_p - outputs_q) - rate_p + jnp.exp(outputs_q)

    def fisher_product(self, outputs, tangents):
        return jnp.exp(outputs) * tangents

    def _event_fisher_sqrt(self, outputs):
        return jnp.exp(0.5 * outputs)[None]


@dataclasses.dataclass(frozen=True)
class Masked(Likelihood):
    """A likelihood whose events are weighted by a mask: padding, missing labels, weights.

    The network returns ``(outputs, mask)``: the outputs of ``base`` and a floating mask
    of shape ``base.batch_shape(outputs)`` — (N, T) for per-token logits (N, T, C), (N, L)
    for multi-label logits (N, L). Every event's term is multiplied by its mask entry,
    in the log-likelihood and in every Fisher alike:

    .. math::
      \\log p(y_i | x_i) = \\sum_t m_{it} \\log p(y_{it} | x_{it}),\\qquad
      F = \\frac1N \\sum_i \\sum_t m_{it} J_{it}^\\top F_{\\text{out}} J_{it},

    so a position with mask 0 (padding) changes nothing and ``model.nll`` is the mean over
    examples of the masked sum over positions. The exact and Monte-Carlo Fishers are
    linear in the weights (the Hessian of the expected weighted NLL); the empirical
    Fisher, the mean outer product of the weighted loss's per-example gradients, carries
    the weights squared — the same matrix for a 0/1 mask. For the mean over real tokens instead,
    scale the mask: ``mask * N / mask.sum()``. Entries must be non-negative; they need
    not be 0/1. The mask usually comes with the inputs, since attention needs it too.

    Example:
        >>> import jax.numpy as jnp, natgrad_jax as ng
        >>> def apply_fn(w, inputs):                      # a bigram language model
        ...     tokens, mask = inputs
        ...     return w[tokens], mask                      # logits (N, T, C), mask (N, T)
        >>> model = ng.Model(apply_fn, ng.Masked(ng.Categorical()))
        >>> tokens = jnp.array([[1, 2, 0], [2, 0, 0]])     # 0 is padding
        >>> mask = (tokens != 0).astype(jnp.float32)
        >>> float(model.nll(jnp.zeros((3, 3)), (tokens, mask), tokens))   # (2 + 1)/2 · log 3
        1.6479184...
    """

    base: Likelihood

    def __post_init__(self):
        if not isinstance(self.base, Likelihood) or isinstance(self.base, Masked):
            raise TypeError(
                f"Masked wraps one natgrad_jax likelihood such as ng.Categorical(), got "
                f"{self.base!r}."
            )

    @property
    def event_ndim(self) -> int:  # type: ignore[override]
        return self.base.event_ndim

    def _split(self, outputs):
        if not (isinstance(outputs, (tuple, list)) and len(outputs) == 2):
            raise ValueError(
                "Masked(...) expects the network to return (outputs, mask), with mask of the "
                "outputs' batch shape (N, positions...)."
            )
        base_outputs, mask = outputs
        shape = self.base.batch_shape(base_outputs)
        if tuple(np.shape(mask)) != shape:
            raise ValueError(
                f"The mask must have the batch shape {shape} of the outputs (one entry per "
                f"event), got {tuple(np.shape(mask))}."
            )
        if not jnp.issubdtype(jnp.result_type(mask), jnp.floating):
            raise TypeError(
                f"The mask must be floating point (it multiplies log-likelihoods), got "
                f"{jnp.result_type(mask)}; return mask.astype(logits.dtype)."
            )
        return base_outputs, mask

    def _on_events(self, mask, leaf):
        """``mask`` broadcast against a leaf with the event axes of ``base`` at the end."""
        return jnp.reshape(mask, mask.shape + (1,) * (jnp.ndim(leaf) - mask.ndim))

    def batch_shape(self, outputs):
        return self.base.batch_shape(self._split(outputs)[0])

    def _event_log_prob(self, outputs, targets):
        base_outputs, mask = self._split(outputs)
        return mask * self.base._event_log_prob(base_outputs, targets)

    def sampled_log_prob(self, outputs, targets):
        # Scores of independent events at sampled labels have zero mean, so weighting
        # event t by √m_t gives E[s sᵀ] = Σ_t m_t J_tᵀ F_out J_t: linear in the weights,
        # like the exact Fisher. (Weighting by m_t would give m_t², a different matrix
        # unless the mask is 0/1.)
        base_outputs, mask = self._split(outputs)
        root = jnp.sqrt(jnp.maximum(mask, 0.0))
        return sum_over_positions(root * self.base._event_log_prob(base_outputs, targets))

    def _event_kl(self, outputs_p, outputs_q):
        base_p, mask = self._split(outputs_p)
        return mask * self.base._event_kl(base_p, self._split(outputs_q)[0])

    def sample(self, key, outputs):
        return self.base.sample(key, self._split(outputs)[0])

    def fisher_product(self, outputs, tangents):
        base_outputs, mask = self._split(outputs)
        product = self.base.fisher_product(base_outputs, tangents[0])
        weighted = jax.tree.map(lambda leaf: self._on_events(mask, leaf) * leaf, product)
        return weighted, jnp.zeros_like(tangents[1])

    def _event_fisher_sqrt(self, outputs):
        base_outputs, mask = self._split(outputs)
        rows = self.base._event_fisher_sqrt(base_outputs)
        root = jnp.sqrt(jnp.maximum(mask, 0.0))[None]
        weighted = jax.tree.map(lambda leaf: self._on_events(root, leaf) * leaf, rows)
        num_rows = jax.tree.leaves(rows)[0].shape[0]
        return weighted, jnp.zeros((num_rows, *mask.shape), mask.dtype)

    def valid_targets(self, outputs, targets):
        return self.base.valid_targets(self._split(outputs)[0], targets)

    def check_targets(self, outputs, targets):
        base_outputs, mask = self._split(outputs)
        self.base.check_targets(base_outputs, targets)
        values = concrete_values(mask)
        if values is not None and values.size and values.min() < 0:
            raise ValueError(f"Mask entries must be non-negative, got {values.min()}.")
