r"""The implicit solver: conjugate gradients on Fisher-vector products.

Never forms F: each CG iteration costs one forward and one backward pass through the
linearised network (``fisher_operator``). Solves (F + λI) x = g to a relative residual
``tol`` or ``max_iters`` iterations, warm-started from the previous step's solution
(Martens 2010), as truncated-Newton and TRPO do (Schulman et al. 2015).

An inexact solve is not A⁻¹g, so nothing that assumes it may be trusted: on a
rank-deficient Monte-Carlo Fisher with little damping a warm start from another
step's (another matrix's) solution can lie far uphill on this step's quadratic model
m(x) = ½ xᵀAx − gᵀx, and a truncated CG from there returns a step of unbounded KL. So:

* the warm start is used only where m(x₀) < 0 (else CG starts from 0), and from there
  CG decreases m monotonically;
* the returned step's quadratic form xᵀAx = xᵀ(g − r) is measured (r, the residual, is
  tracked by CG, so this is free) and reported for the trust region, instead of the
  gᵀx that equals it only for an exact solve;
* a step with m(x) ≥ 0 or non-finite entries is replaced by the Cauchy point
  (gᵀg / gᵀAg)·g, the minimiser of m along the gradient (one more product), and the
  state says so.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from natgrad_jax import _vectors as vectors
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._solvers.solver import Solver


class ConjugateGradientState(NamedTuple):
    """Arrays of the CG solver."""

    solution: tuple  # per leaf, in its shape: the last solution, the next warm start
    iterations: jax.Array  # int32 []: CG iterations used at the last step
    residual: jax.Array  # float []: ‖(F + λI)x − g‖ / ‖g‖ of the last CG solution
    quadratic: jax.Array  # float []: xᵀ(F + λI)x of the returned step (½ of it: its KL)
    fell_back: jax.Array  # bool []: the last step is the Cauchy point, CG's was unsafe


def conjugate_gradient(matvec, rhs, initial, *, tol, max_iters, progress_tol=None):
    """Solves A x = rhs for a symmetric PSD A; returns (x, residual rhs − Ax, iterations).

    Starts from ``initial`` only if the quadratic model ½ xᵀAx − rhsᵀx is negative
    there (downhill of 0), otherwise from 0. With ``progress_tol=ε`` it also stops when
    the model's value m_i has fallen by less than a fraction k·ε over the last
    k = max(10, i/10) iterations (Martens 2010, §4.4).
    """
    threshold = (tol * vectors.norm(rhs)) ** 2

    def model_value(x, residual):  # m(x) = ½ xᵀAx − rhsᵀx = −½ xᵀ(rhs + r)
        return -0.5 * vectors.vdot(x, vectors.add(rhs, residual))

    def stalled(values, it):
        window = jnp.maximum(10, it // 10)
        now, before = values[it], values[jnp.maximum(it - window, 0)]
        relative_progress = (now - before) / jnp.where(now < 0, now, -1.0)
        return (it > window) & (now < 0) & (relative_progress < window * progress_tol)

    def cond(carry):
        _, _, _, residual_norm, it, values = carry
        running = (residual_norm > threshold) & (it < max_iters)
        return running if progress_tol is None else running & ~stalled(values, it)

    def body(carry):
        x, residual, direction, residual_norm, it, values = carry
        product = matvec(direction)
        curvature = vectors.vdot(direction, product)
        step = residual_norm / jnp.where(curvature > 0, curvature, 1.0)
        step = jnp.where(curvature > 0, step, 0.0)  # a null direction: stop moving along it
        x = vectors.add_scaled(x, step, direction)
        residual = vectors.add_scaled(residual, -step, product)
        new_norm = vectors.vdot(residual, residual)
        beta = new_norm / jnp.where(residual_norm > 0, residual_norm, 1.0)
        direction = vectors.add_scaled(residual, beta, direction)
        it = jnp.where(curvature > 0, it + 1, max_iters)
        values = values.at[it].set(model_value(x, residual))
        return x, residual, direction, new_norm, it, values

    residual = vectors.subtract(rhs, matvec(initial))
    downhill = model_value(initial, residual) < 0
    initial = vectors.where(downhill, initial, 0.0)
    residual = vectors.where(downhill, residual, rhs)
    norm = vectors.vdot(residual, residual)
    values = jnp.zeros((max_iters + 1,), vectors.dtype_of(rhs))
    values = values.at[0].set(model_value(initial, residual))
    carry = (initial, residual, residual, norm, jnp.zeros([], jnp.int32), values)
    x, residual, _, _, iterations, _ = jax.lax.while_loop(cond, body, carry)
    return x, residual, iterations


def cauchy_point(matvec, gradient):
    """The minimiser of ½ xᵀAx − gᵀx along g: (α g, its xᵀAx), α = gᵀg / gᵀAg."""
    curvature = vectors.vdot(gradient, matvec(gradient))
    alpha = jnp.where(curvature > 0, vectors.vdot(gradient, gradient) / curvature, 0.0)
    return vectors.scale(alpha, gradient), alpha**2 * curvature


@dataclasses.dataclass(frozen=True)
class ConjugateGradient(Solver):
    """CG on (F + λI) x = g with matrix-free Fisher products.

    Args:
      tol: stop when ‖(F + λI)x − g‖ ≤ tol·‖g‖.
      max_iters: iteration cap (at most P are needed in exact arithmetic).
      progress_tol: also stop when the quadratic model ½ xᵀ(F + λI)x − gᵀx has fallen
        by less than a fraction k·progress_tol over the last k = max(10, i/10)
        iterations (Martens 2010's truncation for Hessian-free optimisation, with
        5e-4 there): an optimiser needs the step's decrease of the model, not the
        residual, and late iterations add little of it. ``None``: residual only.
      warm_start: start from the previous step's solution, kept in the state.

    Example:
      >>> import jax, jax.numpy as jnp, natgrad_jax as ng
      >>> model = ng.Model(lambda w, x: x @ w, ng.Gaussian(scale=1.0))
      >>> x = jnp.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
      >>> cg = ng.ConjugateGradient(tol=1e-6)
      >>> tx = ng.scale_by_natural_gradient(model, damping=0.0, solver=cg)
      >>> w, g = jnp.zeros((2, 1)), jnp.array([[1.0], [0.0]])
      >>> d, state = tx.update(g, tx.init(w), w, inputs=x)
      >>> bool(jnp.allclose((x.T @ x / 3) @ d, g, atol=1e-5)), int(state.curvature.iterations) <= 2
      (True, True)
    """

    tol: float = 1e-5
    max_iters: int = 100
    warm_start: bool = True
    progress_tol: float | None = None
    name = "cg"
    averages = False  # nothing is stored to average or reuse
    per_leaf = True

    def __post_init__(self):
        if not self.tol > 0:
            raise ValueError(f"ConjugateGradient tol must be > 0, got {self.tol}.")
        if self.progress_tol is not None and not self.progress_tol > 0:
            raise ValueError(
                f"ConjugateGradient progress_tol must be > 0 or None, got {self.progress_tol}."
            )
        if not (isinstance(self.max_iters, int) and self.max_iters >= 1):
            raise ValueError(
                f"ConjugateGradient max_iters must be an int ≥ 1, got {self.max_iters!r}."
            )

    def memory(self, num_params: int, num_rows: int, leaf_shapes=(), rows=None) -> int:
        """Floats held at once, for the memory guard: six vectors of P, and with a
        batch (``rows``) the linearised forward pass of the Fisher-vector products (the
        captured layers' inputs and outputs)."""
        del num_rows, leaf_shapes
        return 6 * num_params + (0 if rows is None else rows.activations)

    def init(self, params, dtype) -> ConjugateGradientState:
        return ConjugateGradientState(
            solution=vectors.zeros_as(params, dtype),
            iterations=jnp.zeros([], jnp.int32),
            residual=jnp.zeros([], dtype),
            quadratic=jnp.zeros([], dtype),
            fell_back=jnp.zeros([], bool),
        )

    def step_quadratic(self, state, gradient, direction):
        """dᵀ(F + λI)d as measured by the solve (not gᵀd: CG stops short of the solution)."""
        del gradient, direction
        return state.quadratic

    def solve(self, state, batch: CurvatureBatch, vector, damping):
        dtype = vectors.dtype_of(vector)
        damping = jnp.asarray(damping, dtype)
        matvec = batch.matvec

        def damped(v):
            return vectors.add_scaled(matvec(v), damping, v)

        initial = state.solution if self.warm_start else vectors.zeros_like(vector)
        solution, residual, iterations = conjugate_gradient(
            damped,
            vector,
            vectors.astype(initial, dtype),
            tol=self.tol,
            max_iters=self.max_iters,
            progress_tol=self.progress_tol,
        )
        quadratic = vectors.vdot(solution, vectors.subtract(vector, residual))  # xᵀAx: Ax = g − r
        model_value = 0.5 * quadratic - vectors.vdot(vector, solution)
        unsafe = ~(jnp.isfinite(model_value) & (model_value < 0) & vectors.all_finite(solution))
        step, quadratic = jax.lax.cond(
            unsafe, lambda: cauchy_point(damped, vector), lambda: (solution, quadratic)
        )
        gradient_norm = vectors.norm(vector)
        new_state = ConjugateGradientState(
            solution=vectors.astype(
                vectors.where(~unsafe, solution, 0.0), vectors.dtype_of(state.solution)
            ),
            iterations=iterations,
            residual=(
                vectors.norm(residual) / jnp.where(gradient_norm > 0, gradient_norm, 1.0)
            ).astype(state.residual.dtype),
            quadratic=quadratic.astype(state.quadratic.dtype),
            fell_back=unsafe,
        )
        return step, new_state
