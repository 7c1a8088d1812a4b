r"""``solver="auto"``: the exact solver with the least estimated cost for this batch.

With P parameters, M score rows per batch (N·R exact, N·S Monte-Carlo, N empirical) and
N examples, one update costs about (in multiply-adds)

* **dense**: M·P² to form SᵀS and P³/3 to factorise F + λI; memory P² + M·P;
* **woodbury**: the kernel SSᵀ (M²·P from dense rows, far less for captured layers:
  ``kernel_work``), M³/3 to factorise it, 4·M·P for the products with S; memory
  M² + M·P; needs λ > 0;
* **cg**: an estimated ``CG_ITERATIONS`` Fisher-vector products of about 6·N·P each (a
  forward-mode and a reverse-mode pass), plus a fixed ``CG_ITERATION_OVERHEAD`` per
  iteration for the latency of one loop step; memory O(P).

``"auto"`` picks the cheapest whose memory fits the budget. All three are exact (CG to
its tolerance). One approximation is chosen for you: on a network of at least
``KRONECKER_MIN_PARAMS`` parameters whose layers capture explains (at least
``KRONECKER_MIN_FACTORED_SHARE`` of the parameters in leaves K-FAC factors), an exact
solve costs tens of Fisher-vector products per step, and K-FAC from this batch's
statistics, its step set by the exact quadratic model (``rescale`` and, in
``natural_gradient``, ``momentum``), reaches a given loss as soon for less: on the
digits MLP (P = 9,610) 25–30 steps at 1.9 Adam steps each against CG's 20–25 at 6.4;
on the autoencoder (P = 2.8M, CPU) 40 steps at 0.23 s a step against CG's 30 at 4.4 s.
Its factors come from one Monte-Carlo label per example, as kfac-jax estimates them (the
exact Fisher's statistics cost a backward pass per output row: 10 for ten classes, 784
for a Gaussian image model), while the quadratic model that sets the step stays on the
batch's Fisher.
On such a network ``"auto"`` keeps K-FAC's factors in its state and refreshes them every
``KRONECKER_REFRESH_EVERY`` K-FAC steps, averaged with ``KRONECKER_DECAY`` (K-FAC's usual
cadence; the steps in between cost a preconditioned matmul, and the quadratic model sets
each step's length with the current λ). The transform's ``refresh_every`` and ``decay``
set this cadence (``Auto.kronecker_refresh_every`` and ``kronecker_decay``).
``choose_solver`` returns the choice with the estimates; ``ng.describe`` prints it.
``"auto"`` keeps no other curvature across steps (each batch may get another solver).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from natgrad_jax import _vectors as vectors
from natgrad_jax._cadence import due_every, when_due
from natgrad_jax._capture import capture
from natgrad_jax._fisher import parameter_count
from natgrad_jax._independence import one_example_failure
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._solvers.conjugate_gradient import ConjugateGradient, ConjugateGradientState
from natgrad_jax._solvers.dense import Dense
from natgrad_jax._solvers.kronecker import (
    Kronecker,
    KroneckerState,
    factored_share,
    split_shape,
)
from natgrad_jax._solvers.solver import Solver, solve_on_leaves
from natgrad_jax._solvers.woodbury import Woodbury, WoodburyState

CG_ITERATIONS = 30  # warm-started CG to tol 1e-5 on the benchmarks: 10–60 iterations
# Martens 2010's truncation of CG by the model's relative progress: on the digits
# benchmark the defaults' step costs 20% less and takes as many steps.
AUTO_CG_PROGRESS_TOL = 5e-4
CG_ITERATION_OVERHEAD = 1e6  # one loop iteration's latency, in multiply-adds (≈ 20–50 µs)
KRONECKER_MIN_PARAMS = 5_000
KRONECKER_MIN_FACTORED_SHARE = 0.99
KRONECKER_REFRESH_EVERY = 5  # K-FAC's statistics and inverses, every this many K-FAC steps
KRONECKER_DECAY = 0.95  # moving average of the factors across refreshes
_SOLVERS = {
    "dense": Dense,
    "woodbury": Woodbury,
    "cg": ConjugateGradient,
    "kronecker": Kronecker,
}


def estimated_costs(
    num_params: int,
    num_rows: int,
    num_examples: int | None = None,
    woodbury_kernel: float | None = None,
) -> dict[str, tuple[float, float]]:
    """``{solver: (multiply-adds per update, floats held)}`` for dense, Woodbury and CG.

    ``woodbury_kernel`` is the work of forming SSᵀ (default M²·P, from dense rows).
    """
    p, m = float(num_params), float(num_rows)
    n = float(num_examples if num_examples is not None else num_rows)
    kernel = m * m * p if woodbury_kernel is None else float(woodbury_kernel)
    return {
        "dense": (m * p * p + p**3 / 3, p * p + m * p),
        "woodbury": (kernel + m**3 / 3 + 4 * m * p, m * m + m * p),
        "cg": (CG_ITERATIONS * (6 * n * p + CG_ITERATION_OVERHEAD), 4 * p),
    }


def kernel_work(captured, leaf_shapes, num_rows: int, num_examples: int) -> float:
    """Multiply-adds of Woodbury's kernel SSᵀ with layer capture: for a captured K×D
    layer shared by T positions, M²·T²·(K + D) through the position Gram matrices or
    M·T·K·D + M²·K·D through per-example gradients, whichever is less; M²·P_leaf for a
    leaf left to vmap."""
    m = float(num_rows)
    work = sum(m * m * math.prod(leaf_shapes[k]) for k in captured.fallback)
    for layer in captured.layers:
        k, d = split_shape(leaf_shapes[layer.leaf])
        t = max(math.prod(layer.probe_shape) / max(num_examples * d, 1), 1.0)
        work += min(m * m * t * t * (k + d), m * t * k * d + m * m * k * d)
    return float(work)


def choose_solver(
    num_params: int,
    num_rows: int | None = None,
    num_examples: int | None = None,
    *,
    allow_woodbury: bool = True,
    max_floats: float | None = None,
    woodbury_kernel: float | None = None,
    factored_share: float | None = None,
    per_example: bool = True,
) -> tuple[str, str]:
    """The solver ``"auto"`` picks for P parameters and M score rows, with the estimates.

    Args:
      num_params: P.
      num_rows: M, the rows of the score matrix per batch (``None``: not known yet).
      num_examples: N, the examples per batch (default M).
      allow_woodbury: False when the damping is 0 (Woodbury divides by λ, and K-FAC's
        factors need it too).
      max_floats: the memory budget in floats (``None``: no limit).
      woodbury_kernel: the work of Woodbury's kernel (see ``kernel_work``; default M²·P).
      factored_share: the share of P in leaves K-FAC factors (``None``: not known; see
        the module's docstring for when K-FAC is chosen).
      per_example: False where the model cannot run on one example (a fixed batch size,
        or placements that split the examples over a mesh): dense, whose rows are
        per-example gradients, is out.

    Returns:
      ``(name, reason)``, the name being one of ``"dense"``, ``"woodbury"``, ``"cg"``,
      ``"kronecker"``.

    Example:
      >>> import natgrad_jax as ng
      >>> ng.choose_solver(50, 200)[0]
      'dense'
      >>> ng.choose_solver(2_000, 2_560, 256)[0]   # 256 examples × 10 classes
      'cg'
      >>> ng.choose_solver(100_000, 512, woodbury_kernel=512**2 * 2_000)[0]  # captured
      'woodbury'
      >>> ng.choose_solver(2_837_314, 256 * 784, 256, factored_share=1.0)[0]  # autoencoder
      'kronecker'
    """
    large = num_params >= KRONECKER_MIN_PARAMS
    if allow_woodbury and large and (factored_share or 0.0) >= KRONECKER_MIN_FACTORED_SHARE:
        return "kronecker", (
            f"P = {num_params} ≥ {KRONECKER_MIN_PARAMS:,} with {factored_share:.0%} in "
            "layers K-FAC factors: Kronecker from this batch, rescaled by the exact "
            "quadratic model"
        )
    if num_rows is None:
        return "dense, woodbury or cg", f"P = {num_params}: depends on the rows per batch"
    costs = estimated_costs(num_params, num_rows, num_examples, woodbury_kernel)
    if not allow_woodbury:
        del costs["woodbury"]
    if not per_example:
        del costs["dense"]
    fitting = {k: v for k, v in costs.items() if max_floats is None or v[1] <= max_floats}
    name = min(fitting or costs, key=lambda k: (fitting or costs)[k][0])
    estimates = ", ".join(f"{k} {cost:.1e}" for k, (cost, _) in costs.items())
    return name, f"least estimated cost, P = {num_params}, M = {num_rows}: {estimates}"


def auto_choice(
    captured,
    leaf_shapes,
    num_rows: int,
    num_examples: int,
    allow_woodbury: bool = True,
    per_example: bool = True,
) -> tuple[str, str]:
    """``choose_solver`` for a batch whose layers ``captured`` describes: Woodbury's
    kernel work and K-FAC's factored share from the capture. ``per_example`` False: the
    model cannot run on one example (``one_example_failure``), so no dense solve, and
    CG alone where some leaf is left to the fallback's per-example gradients."""
    if not per_example and captured.fallback:
        return "cg", (
            "apply_fn cannot run on one example, which the per-example gradients of the "
            "leaves the capture cannot read evaluate: CG, whose products take the batch"
        )
    return choose_solver(
        sum(math.prod(shape) for shape in leaf_shapes),
        num_rows,
        num_examples,
        allow_woodbury=allow_woodbury,
        woodbury_kernel=kernel_work(captured, leaf_shapes, num_rows, num_examples)
        if allow_woodbury
        else None,
        factored_share=factored_share(captured, leaf_shapes),
        per_example=per_example,
    )


class AutoState(NamedTuple):
    """Auto's state: CG's (its warm start, and the record of every solve), and K-FAC's
    factors on a network where some batch may get K-FAC (else ``None``)."""

    cg: ConjugateGradientState
    # The averaged factors and the inverses of the last refresh.
    kronecker: KroneckerState | None = None
    kronecker_steps: jax.Array | None = None  # int32 []: K-FAC steps taken (refresh when ≡ 0)


@dataclasses.dataclass(frozen=True)
class Auto(Solver):
    """Per batch, the exact solver (dense, Woodbury, CG) of least estimated cost, or
    K-FAC from this batch's statistics on a large captured network (module docstring).

    ``cg`` is the ``ConjugateGradient`` used when CG is chosen: by default to a residual
    of 1e-5 or until the quadratic model stops improving (``progress_tol=5e-4``).

    The state is an ``AutoState``. Its ``cg`` part is CG's (its warm start); a dense,
    Woodbury or K-FAC solve records its direction and gᵀd there, so the trust region and
    the next warm start read this step (with K-FAC the transform rescales the step and
    measures dᵀ(F + λI)d itself). Where some batch may get K-FAC (``may_approximate``)
    it also holds K-FAC's factors between refreshes: measured and factorised every
    ``kronecker_refresh_every`` K-FAC steps and averaged with ``kronecker_decay`` (the
    transform's ``refresh_every`` and ``decay`` when given).
    """

    allow_woodbury: bool = True
    cg: ConjugateGradient = dataclasses.field(
        default_factory=lambda: ConjugateGradient(progress_tol=AUTO_CG_PROGRESS_TOL)
    )
    kronecker_refresh_every: int | jax.Array = KRONECKER_REFRESH_EVERY
    kronecker_decay: float | jax.Array = KRONECKER_DECAY

    name = "auto"
    averages = False
    per_leaf = True
    gates_refresh = True

    def _choice(self, batch: CurvatureBatch) -> str:
        captured = capture(batch.model.apply_fn, batch.params, batch.inputs)
        shapes = [np.shape(leaf) for leaf in jax.tree.leaves(batch.params)]
        per_example = one_example_failure(batch.model.apply_fn, batch.params, batch.inputs)
        return auto_choice(
            captured,
            shapes,
            batch.num_rows,
            batch.num_examples,
            self.allow_woodbury,
            per_example=per_example is None,
        )[0]

    def with_cadence(self, decay, refresh_every):
        """The transform's ``decay`` and ``refresh_every``, when given, become the cadence
        of K-FAC's factors (the only curvature "auto" keeps); the transform's own are off."""
        if decay is not None:
            self = dataclasses.replace(self, kronecker_decay=decay)
        if refresh_every is not None:
            self = dataclasses.replace(self, kronecker_refresh_every=refresh_every)
        return self, None, None

    def without_damping(self) -> Auto:
        """Woodbury and K-FAC divide by λ: with λ = 0 neither is picked."""
        return dataclasses.replace(self, allow_woodbury=False)

    def averaging_refusal(self, params) -> str | None:
        if self.may_approximate(params):
            return None
        return (
            "solver 'auto' keeps curvature across steps only as K-FAC's factors, on "
            f"networks of {KRONECKER_MIN_PARAMS:,} parameters or more with damping > 0 "
            f"(this one has {parameter_count(params):,}), so decay and refresh_every do "
            "not apply to it; use solver='dense', 'kronecker', 'diagonal' or "
            "'block_diagonal' (or leave them unset)."
        )

    def may_approximate(self, params) -> bool:
        """Whether some batch may get K-FAC: a network of ``KRONECKER_MIN_PARAMS`` or more."""
        return self._keeps_kronecker_state(parameter_count(params))

    def _keeps_kronecker_state(self, num_params: int) -> bool:
        return self.allow_woodbury and num_params >= KRONECKER_MIN_PARAMS

    def approximate_for(self, batch: CurvatureBatch) -> bool:
        """Whether this batch gets K-FAC (which the transform then rescales)."""
        return self._choice(batch) == "kronecker"

    def memory(self, num_params: int, num_rows: int, leaf_shapes=(), rows=None) -> int:
        """Floats allocated by the solver this problem gets, plus K-FAC's factors and
        inverses that the state keeps where some batch may get K-FAC. With ``rows``
        computed from a batch's capture this is the choice ``solve`` makes; without (at
        ``init``) the choice from the sizes alone."""
        if rows is not None and rows.captured is not None:
            name, _ = auto_choice(
                rows.captured, leaf_shapes, num_rows, rows.num_examples, self.allow_woodbury
            )
        else:
            name, _ = choose_solver(num_params, num_rows, allow_woodbury=self.allow_woodbury)
        if name == "kronecker":
            if rows is not None and rows.rows_per_example > 1:
                rows = rows.in_chunks_of(1)  # one Monte-Carlo label per example
            return Kronecker().memory(num_params, num_rows, leaf_shapes, rows)
        floats = _SOLVERS[name]().memory(num_params, num_rows, leaf_shapes, rows)
        if self._keeps_kronecker_state(num_params):
            floats += Kronecker().state_floats(leaf_shapes)
        return floats

    def init(self, params, dtype):
        cg = self.cg.init(params, dtype)
        if not self.may_approximate(params):
            return AutoState(cg)
        return AutoState(cg, Kronecker().init(params, dtype), jnp.zeros([], jnp.int32))

    def step_quadratic(self, state, gradient, direction):
        """dᵀ(F + λI)d of the step: recorded in CG's state whichever solver ran."""
        return self.cg.step_quadratic(state.cg, gradient, direction)

    def refresh(self, state, batch: CurvatureBatch, damping, decay, is_first):
        """Where this batch gets K-FAC, its factors on their own cadence
        (``kronecker_refresh_every``, ``kronecker_decay``; the transform's ``decay`` and
        ``is_first`` are not those); nothing otherwise, nor where ``batch.measurable`` is
        false (a step the transform will skip). The transform calls it every step before
        ``solve``."""
        del decay, is_first
        if self._choice(batch) != "kronecker":
            return state
        kronecker = _kronecker_refreshed(
            state, batch, damping, self.kronecker_refresh_every, self.kronecker_decay
        )
        counted = 1 if batch.measurable is None else batch.measurable.astype(jnp.int32)
        return state._replace(kronecker=kronecker, kronecker_steps=state.kronecker_steps + counted)

    def solve(self, state, batch: CurvatureBatch, vector, damping):
        name = self._choice(batch)
        cg_state = state.cg
        if name == "cg":
            direction, cg_state = self.cg.solve(cg_state, batch, vector, damping)
            return direction, state._replace(cg=cg_state)
        if name == "kronecker":  # factors as ``refresh`` left them
            direction, _ = Kronecker().solve(state.kronecker, batch, vector, damping)
        elif name == "woodbury":
            direction, _ = solve_on_leaves(Woodbury(), WoodburyState(), batch, vector, damping)
        else:
            dense = Dense()
            dtype = vectors.dtype_of(vector)
            fresh = dense.refresh(dense.init(batch.params, dtype), batch, damping, 0.0, True)
            direction, _ = solve_on_leaves(dense, fresh, batch, vector, damping)
        # Record the solve in CG's state, so that the trust region and the next warm
        # start read this step's direction and gᵀd, not stale ones.
        cg_state = cg_state._replace(
            solution=vectors.astype(direction, vectors.dtype_of(cg_state.solution)),
            iterations=jnp.zeros_like(cg_state.iterations),
            residual=jnp.zeros_like(cg_state.residual),
            quadratic=vectors.vdot(vector, direction).real.astype(cg_state.quadratic.dtype),
            fell_back=jnp.zeros_like(cg_state.fell_back),
        )
        return direction, state._replace(cg=cg_state)


def _kronecker_refreshed(
    state: AutoState, batch: CurvatureBatch, damping, refresh_every, decay
) -> KroneckerState:
    """K-FAC's state for this step: every ``refresh_every`` K-FAC steps the factors of
    this batch (the exact Fisher's output factors from one Monte-Carlo label
    per example) averaged in and factorised with this λ, else the stored ones. The
    refresh runs at the transform's statistics precision (``batch.statistics_precision``;
    the factorisation is full float32 whatever it is), as an explicit
    ``solver="kronecker"``'s refresh does."""
    if batch.kind == "exact":
        batch = dataclasses.replace(batch, kind="monte_carlo", num_samples=1)
    kronecker = Kronecker()
    steps = state.kronecker_steps

    def refreshed(stored):
        with jax.default_matmul_precision(batch.statistics_precision):
            return kronecker.refresh(stored, batch, damping, decay, steps == 0)

    due = due_every(refresh_every, steps)
    return when_due(due, batch.measurable, refreshed, state.kronecker, batch.axis_name)
