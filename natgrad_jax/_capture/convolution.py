"""Convolutions in XLA CPU's canonical layout, with an input cotangent that keeps it.

XLA's CPU backend runs a convolution with its fast kernels when its input and output
are laid out (N, spatial…, C) and its kernel (spatial…, I, O). At the top level of a
program it transposes other layouts into that one itself; in the body of a ``lax.cond``
or a loop it does not (jax 0.10.2, 2-core CPU), and the convolution runs a generic loop:
an NCHW input 7.6 ms against 0.41 at the top level, for the 3×3, 16 → 32 channel
convolution of ``benchmarks/cnn.py`` at batch 128. JAX transposes a convolution with
respect to its input as a convolution with the reversed kernel whose two feature axes
are *relabelled* (``rhs_spec`` (I, O, …) for (O, I, …)), not moved: 11.3 ms in a branch
against 0.40. A refresh's statistics pass runs in the cadence's branch, so the probed
forward pass binds its convolutions through ``convolution``: computed in the canonical
layout, its input's tangent written with the kernel's feature axes swapped in memory and
relabelled to match (the same convolution), whose transpose then has the canonical
labels: 0.42 ms in the branch. JAX's transpose for the kernel's cotangent relabels the
input's and the output's axes instead; that one, and the input's forward-mode tangent
written here, stay slow in a branch or loop (no K-FAC refresh computes them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

CONVOLUTION = jax.lax.conv_general_dilated_p


def convolution(params: dict, lhs, rhs):
    """``conv_general_dilated`` of ``lhs`` and ``rhs`` with an equation's ``params``,
    differentiable in both modes, computed in XLA's canonical layout (input and output
    (N, spatial…, C), kernel (spatial…, I, O); operands of another layout, equinox's
    NCHW/OIHW for one, are transposed to it and the output back), and whose input
    cotangent convolves with the kernel in that layout too (module docstring)."""
    numbers = params["dimension_numbers"]
    ndim = len(numbers.lhs_spec)
    lhs_order, rhs_order, out_order = (
        (numbers.lhs_spec[0], *numbers.lhs_spec[2:], numbers.lhs_spec[1]),
        (*numbers.rhs_spec[2:], numbers.rhs_spec[1], numbers.rhs_spec[0]),
        (numbers.out_spec[0], *numbers.out_spec[2:], numbers.out_spec[1]),
    )
    canonical = numbers._replace(
        lhs_spec=(0, ndim - 1, *range(1, ndim - 1)),
        rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
        out_spec=(0, ndim - 1, *range(1, ndim - 1)),
    )
    identity = tuple(range(ndim))
    if (lhs_order, rhs_order, out_order) == (identity,) * 3:
        return _convolution(params, lhs, rhs)
    out = _convolution(
        dict(params, dimension_numbers=canonical),
        jnp.transpose(lhs, lhs_order),
        jnp.transpose(rhs, rhs_order),
    )
    return jnp.transpose(out, np.argsort(out_order))


def _convolution(params: dict, lhs, rhs):
    """The convolution, its input tangent written with ``kernel_in_place``."""

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
