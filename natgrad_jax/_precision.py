"""Matmul precision: where float32 may use TensorFloat-32 and where it must not.

On recent NVIDIA GPUs a float32 matmul at JAX's default precision rounds its inputs to
TF32 (10-bit mantissa, relative error ~1e-3). That is harmless for curvature
*statistics* — score rows, Kronecker factors, kernels: averages that are noisy anyway —
but not for what the library promises to the last digit:

* the dense reference functions (``ng.fisher``, ``ng.fisher_hessian``, ...): always at
  ``"highest"`` (true float32), whatever ``jax.default_matmul_precision`` says;
* factorisations and solves (Cholesky/eigendecomposition inverses, the Woodbury kernel's
  eigenbasis, conjugate gradients, the step's trust region): always at ``"highest"``;
* the transform's statistics: at its ``precision=`` (default ``None``: JAX's default,
  TF32 on such GPUs; ``"highest"`` for full float32 statistics), and so the step's
  other passes through the model (the quadratic model's linearisation, the damping
  rule's loss at θ − d): like the gradient, estimates the algebra after them takes
  exactly.

The precision is fixed while a function is traced, so this holds under ``jax.jit`` too.
On CPUs every setting computes in full precision.
"""

from __future__ import annotations

import contextlib
import functools

import jax

#: The precision of factorisations, solves and the dense reference functions.
EXACT = "highest"


def matmul_precision(precision: str | None):
    """A context setting ``jax.default_matmul_precision`` (``None``: leave it as it is)."""
    if precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)


def model_precision(precision: str | None):
    """A context setting ``jax.default_matmul_precision`` to ``precision``, ``None`` (JAX's
    default) included: a pass of the model traced inside an ``EXACT`` context runs at
    the statistics' precision (``statistics_precision``), not at full precision."""
    return jax.default_matmul_precision(precision)


def statistics_precision(precision: str | None) -> str | None:
    """The precision statistics take: ``precision``, else the one in effect now (read at
    trace time, for statistics measured later inside an ``EXACT`` context)."""
    return precision if precision is not None else jax.config.jax_default_matmul_precision


def exact_matmuls(fn):
    """``fn`` with every matmul it traces at full precision (see the module docstring)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with matmul_precision(EXACT):
            return fn(*args, **kwargs)

    return wrapped
