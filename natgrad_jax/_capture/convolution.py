"""Convolutions whose backward pass keeps the kernel in the forward pass's layout.

JAX transposes a convolution with respect to its input as a convolution of the output
cotangent with the spatially reversed kernel, its two feature axes swapped by relabelling
them (``rhs_spec`` (I, O, …) for the forward's (O, I, …)) rather than by moving data.
At the top level of a program XLA's CPU backend moves the data itself and runs its fast
convolution; inside a ``lax.cond`` branch it does not, and falls back to a generic loop:
for the 3×3, 16 → 32 channel convolution of ``benchmarks/cnn.py`` at batch 128 the input
cotangent took 11.3 ms in a branch against 0.40 ms at the top level (2-core CPU, jax
0.10.2). A refresh's statistics pass runs in such a branch (the cadence's), so the probed
forward pass binds its convolutions through ``convolution``: the input's tangent is
written with the kernel's feature axes swapped in memory and relabelled, the same
convolution, whose transpose then has the forward's labels and runs in the branch as
fast as at the top level.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

CONVOLUTION = jax.lax.conv_general_dilated_p


def convolution(params: dict, lhs, rhs):
    """``conv_general_dilated`` of ``lhs`` and ``rhs`` with an equation's ``params``,
    differentiable in both modes, whose input cotangent convolves with the kernel laid
    out as in the forward pass (module docstring)."""

    @jax.custom_jvp
    def convolve(x, kernel):
        return CONVOLUTION.bind(x, kernel, **params)

    def tangent(primals, tangents):
        (x, kernel), (x_dot, kernel_dot) = primals, tangents
        terms = []
        if not isinstance(x_dot, SymbolicZero):
            swapped, relabelled = kernel_in_place(kernel, params)
            terms.append(CONVOLUTION.bind(x_dot, swapped, **relabelled))
        if not isinstance(kernel_dot, SymbolicZero):
            terms.append(CONVOLUTION.bind(x, kernel_dot, **params))
        out = convolve(x, kernel)
        return out, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)

    convolve.defjvp(tangent, symbolic_zeros=True)
    return convolve(lhs, rhs)


def kernel_in_place(kernel, params: dict):
    """The kernel with its out- and in-feature axes swapped in memory, and ``params``
    with its labels swapped to match: the same convolution. JAX's transpose of it swaps
    the labels back, so its kernel is in the forward's layout."""
    numbers = params["dimension_numbers"]
    out_axis, in_axis, *spatial = numbers.rhs_spec
    relabelled = numbers._replace(rhs_spec=(in_axis, out_axis, *spatial))
    return jnp.swapaxes(kernel, out_axis, in_axis), dict(params, dimension_numbers=relabelled)
