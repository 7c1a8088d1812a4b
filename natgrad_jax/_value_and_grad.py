r"""One forward pass for the loss, its gradient and the curvature statistics.

A natural-gradient step needs, on one batch, the loss gradient Jᵀ∇ₒL and curvature
statistics: the inputs a and output-gradients g = Jᵀc of every captured layer for the
Fisher's output rows c (K-FAC factors, diagonals, Woodbury kernels), or products Jᵀ F_out
J v (conjugate gradients, adaptive damping). All of them are pullbacks through the same
linearisation of the network at the same parameters. ``value_and_grad`` runs the forward
pass once, keeps its linearisation (a ``ForwardPass``), and returns it next to the loss
and gradient; ``update(..., forward_pass=...)`` then measures the curvature from it
instead of running the model again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from natgrad_jax._capture import ForwardPass, capture, probed_forward
from natgrad_jax._fisher import check_same_batch, device_mean, device_varying
from natgrad_jax._model import Model, check_model
from natgrad_jax._parameters import trainable_and_frozen, with_frozen

PyTree = Any


def value_and_grad(
    model: Model, *, axis_name: str | None = None
) -> Callable[[PyTree, PyTree, PyTree], tuple[tuple[jax.Array, ForwardPass], PyTree]]:
    r"""``jax.value_and_grad(model.nll, has_aux=True)`` whose auxiliary output is the
    forward pass, for ``update(..., forward_pass=...)``.

    ``value_and_grad(model)(params, inputs, targets)`` returns ``((loss, forward_pass),
    grads)``: the mean negative log-likelihood of the batch, the ``ForwardPass`` (the
    outputs, the input of every captured layer and the linearisation at ``params``), and
    the gradient of the loss. Passing ``forward_pass`` to the natural-gradient update
    of the same ``params`` and batch,

    .. code-block:: python

        (loss, forward), grads = ng.value_and_grad(model)(params, x, y)
        updates, state = optimizer.update(
            grads, state, params, inputs=x, targets=y, forward_pass=forward
        )

    gives the same update as ``update(jax.grad(model.nll)(params, x, y), ...)``, with one
    forward pass of the model where that runs two or more: the curvature statistics
    (captured layers' a and g, Monte-Carlo labels sampled from the outputs), the
    Fisher-vector products of conjugate gradients, and the loss the damping compares
    against all come from it. What still runs the model: the quadratic model's
    forward-mode products (``rescale``, ``momentum``: one linearisation of their own; on
    a transformer's (batch, position, width) activations it costs half what the
    transpose of this pass's pullback does, on 2-D ones about as much), the adaptive
    damping's loss at the moved parameters (a different point), and the per-example
    ``jax.vmap`` rows of leaves capture does not cover and of the dense and
    block-diagonal solvers (``ng.describe`` lists them).

    On a mesh whose axes are ``Explicit`` the update does not reuse the forward pass: its
    pullback takes cotangents typed for those axes, and the update's computations run
    with them automatic (see "Beyond one device" in the docs), so it runs the model
    again; the loss and gradient are as here.

    The forward pass runs at the caller's matmul precision (``precision=`` of the
    transform sets the precision of the statistics computed from it, not of the forward
    pass itself).

    Args:
      model: the ``ng.Model`` trained.
      axis_name: inside ``shard_map`` with the batch split over this axis: the loss and
        gradient are averaged over the devices (pass the same ``axis_name`` to the
        transform).

    Returns:
      A function ``(params, inputs, targets) -> ((loss, forward_pass), grads)``. ``grads``
      has the structure of ``params``, with ``None`` at the leaves that are not floating
      arrays (as ``equinox.filter_grad`` returns).

    Example:
      >>> import jax, jax.numpy as jnp, natgrad_jax as ng
      >>> model = ng.Model(lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"], ng.Categorical())
      >>> params = {"w": jnp.full((3, 4), 0.1), "v": jnp.full((4, 2), 0.1)}
      >>> x, y = jnp.ones((5, 3)), jnp.array([0, 1, 0, 1, 1])
      >>> (loss, forward), grads = ng.value_and_grad(model)(params, x, y)
      >>> bool(jnp.allclose(loss, model.nll(params, x, y)))
      True
      >>> tx = ng.natural_gradient(model, 1.0, solver="kronecker", damping=1e-3)
      >>> updates, state = tx.update(
      ...     grads, tx.init(params), params, inputs=x, targets=y, forward_pass=forward
      ... )
    """
    model = check_model(model)

    def loss_and_gradient(params, inputs, targets):
        check_same_batch(inputs, targets)
        model.check_targets(params, inputs, targets)
        trainable, frozen = trainable_and_frozen(params)
        apply_fn = with_frozen(model, frozen).apply_fn
        captured = capture(apply_fn, trainable, inputs)
        forward = probed_forward(apply_fn, captured, device_varying(trainable, axis_name), inputs)

        loss, output_cotangent = jax.value_and_grad(model.nll_of_outputs)(forward.outputs, targets)
        gradient = device_mean(forward.parameter_gradient(output_cotangent), axis_name)
        return (device_mean(loss, axis_name), forward), gradient

    return loss_and_gradient


def check_forward_pass(forward: Any, model: Model, trainable: PyTree, frozen: PyTree, inputs):
    """Raises unless ``forward`` is a ``ForwardPass`` of ``model`` on a batch shaped like
    ``inputs`` and parameters shaped like ``trainable`` (the values cannot be checked:
    they must be the update's)."""
    if not isinstance(forward, ForwardPass):
        raise TypeError(
            "forward_pass must be the ForwardPass returned by ng.value_and_grad(model)("
            f"params, inputs, targets), got {type(forward).__name__}."
        )
    apply_fn = with_frozen(model, frozen).apply_fn
    expected = jax.eval_shape(apply_fn, trainable, inputs)
    gradient = jax.eval_shape(forward.parameter_gradient, forward.outputs)
    layers = capture(apply_fn, trainable, inputs).layers
    if (
        _shapes(forward.outputs) != _shapes(expected)
        or _shapes(gradient) != _shapes(trainable)
        or len(forward.layer_inputs) != len(layers)
    ):
        raise ValueError(
            "forward_pass does not belong to this model, parameters and batch: compute it "
            "with ng.value_and_grad(model)(params, inputs, targets) from the params and "
            "inputs passed to update."
        )


def _shapes(tree):
    return jax.tree.structure(tree), [
        (jnp.shape(leaf), jnp.result_type(leaf)) for leaf in jax.tree.leaves(tree)
    ]
