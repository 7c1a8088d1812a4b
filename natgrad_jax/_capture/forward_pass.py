"""``ForwardPass``: one forward pass through the captured layers, and its linearisation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from natgrad_jax._capture.interpreter import probed_apply
from natgrad_jax._capture.layer import Capture
from natgrad_jax._fisher import varying_axes

PyTree = Any


class ForwardPass(NamedTuple):
    """One forward pass of a model through its captured layers, and its linearisation.

    Everything the loss gradient and the curvature statistics of one batch need,
    computed once (see ``ng.value_and_grad``): the outputs, the input a of every
    captured layer, and the pullback of ``(params, probes) ↦ (outputs, a)``. A pytree of
    arrays (the pullback holds the forward's residuals), so it can be passed through
    ``jax.jit`` like any other argument.
    """

    outputs: PyTree
    layer_inputs: list  # a of captured layer k, as the model computed it
    pullback: Callable  # (output cotangent, a cotangents) -> (params cotangent, g per layer)

    def _pull(self, output_cotangent):
        zero_inputs = [jnp.zeros_like(a) for a in self.layer_inputs]
        return self.pullback((output_cotangent, zero_inputs))

    def parameter_gradient(self, output_cotangent):
        """Jᵀc: the gradient w.r.t. the parameters of ⟨c, outputs⟩."""
        return self._pull(output_cotangent)[0]

    def layer_gradients(self, cotangent_rows):
        """g per captured layer for each of the R cotangent rows (leading axis R)."""
        return jax.vmap(lambda row: self._pull(row)[1])(cotangent_rows)

    def jvp(self, tangent):
        """J v: the outputs' tangent along a parameter tangent v, without a new forward
        pass (the transpose of the linear pullback)."""
        _, probes = jax.eval_shape(self._pull, self.outputs)
        zeros = _zero_probes(probes, jax.tree.leaves(self.outputs)[0])
        return jax.linear_transpose(self._pull, self.outputs)((tangent, zeros))[0]


def _zero_probes(shapes, batch_like) -> list:
    """Zeros of the probes' ``shapes``; inside shard_map varying like ``batch_like`` (a
    batch array), or their cotangents (the g) would be summed over the devices."""
    zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    for axis in sorted(varying_axes(batch_like)):
        zeros = [jax.lax.pcast(z, axis, to="varying") for z in zeros]
    return zeros


def probed_forward(apply_fn, captured: Capture, params, inputs) -> ForwardPass:
    """One forward pass of ``apply_fn`` with a zero probe on every captured layer."""
    shapes = [
        jax.ShapeDtypeStruct(layer.probe_shape, layer.output_dtype) for layer in captured.layers
    ]
    zeros = _zero_probes(shapes, jax.tree.leaves(inputs)[0])

    def forward(params, probes):
        return probed_apply(apply_fn, captured, params, inputs, probes)

    (outputs, layer_inputs), pullback = jax.vjp(forward, params, zeros)
    return ForwardPass(outputs, layer_inputs, pullback)
