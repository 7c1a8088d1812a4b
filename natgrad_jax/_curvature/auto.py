r"""``solver="auto"``: pick a representation from the problem's sizes.

The rule, with P parameters and M score rows per batch (N·R exact, N·S Monte-Carlo,
N empirical):

1. P ≤ 4096: **dense**. A P×P Cholesky is cheap and exact, and supports ``decay`` and
   ``refresh_every``.
2. otherwise M ≤ P/2 and M ≤ 4096: **woodbury** (exact, through the M×M kernel).
3. otherwise: **cg** (exact to its tolerance, matrix-free).

``choose_solver`` states the choice and the reason; the transform follows it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from natgrad_jax._curvature.batch import CurvatureBatch
from natgrad_jax._curvature.dense import Dense
from natgrad_jax._curvature.implicit import ConjugateGradient
from natgrad_jax._curvature.low_rank import Woodbury, WoodburyState
from natgrad_jax._fisher import parameter_count

DENSE_MAX_PARAMS = 4096
WOODBURY_MAX_ROWS = 4096
_BY_NAME = {"dense": Dense, "woodbury": Woodbury, "cg": ConjugateGradient}


def choose_solver(num_params: int, num_rows: int | None = None) -> tuple[str, str]:
    """The solver ``"auto"`` picks for P parameters and M score rows, with the reason.

    Args:
      num_params: P.
      num_rows: M, the rows of the score matrix per batch (``None``: not known yet).

    Returns:
      ``(name, reason)``, the name being one of ``"dense"``, ``"woodbury"``, ``"cg"``.

    Example:
      >>> import natgrad_jax as ng
      >>> ng.choose_solver(1_000)[0], ng.choose_solver(100_000, 512)[0]
      ('dense', 'woodbury')
    """
    if num_params <= DENSE_MAX_PARAMS:
        return (
            "dense",
            f"P = {num_params} ≤ {DENSE_MAX_PARAMS}: a dense Cholesky is cheap and exact",
        )
    if num_rows is None:
        return (
            "woodbury or cg",
            f"P = {num_params} > {DENSE_MAX_PARAMS}: depends on the rows per batch",
        )
    if num_rows <= min(num_params // 2, WOODBURY_MAX_ROWS):
        return "woodbury", (
            f"M = {num_rows} score rows ≤ min(P/2, {WOODBURY_MAX_ROWS}) with P = {num_params}: "
            "an M×M kernel solve is exact and cheaper than P×P"
        )
    return "cg", (
        f"P = {num_params} and M = {num_rows} rows are both large: matrix-free conjugate gradients"
    )


@dataclasses.dataclass(frozen=True)
class Auto:
    """Dense for small P; otherwise Woodbury or CG per batch (CG's state is kept for both)."""

    name = "auto"

    def averages_for(self, params) -> bool:
        """Whether ``decay`` and ``refresh_every`` apply: only on the dense branch."""
        return self._dense(parameter_count(params))

    @staticmethod
    def _dense(num_params: int) -> bool:
        return num_params <= DENSE_MAX_PARAMS

    def memory(self, num_params: int, num_rows: int, leaf_shapes=()) -> int:
        """Floats held at once by the representation this problem gets."""
        name, _ = choose_solver(num_params, num_rows)
        return _BY_NAME[name]().memory(num_params, num_rows, leaf_shapes)

    def init(self, params, dtype):
        if self._dense(parameter_count(params)):
            return Dense().init(params, dtype)
        return ConjugateGradient().init(params, dtype)

    def refresh(self, state, batch: CurvatureBatch, damping, decay, is_first):
        if self._dense(parameter_count(batch.params)):
            return Dense().refresh(state, batch, damping, decay, is_first)
        return state

    def solve(self, state, batch: CurvatureBatch, vector, damping):
        name, _ = choose_solver(parameter_count(batch.params), batch.num_rows)
        if name != "woodbury":
            return _BY_NAME[name]().solve(state, batch, vector, damping)
        # The state is CG's (kept for either branch): record the exact solve in it, so
        # that the trust region reads this step's dᵀ(F + λI)d = gᵀd, not a stale one.
        direction, _ = Woodbury().solve(WoodburyState(), batch, vector, damping)
        return direction, state._replace(
            solution=direction.astype(state.solution.dtype),
            iterations=jnp.zeros_like(state.iterations),
            residual=jnp.zeros_like(state.residual),
            quadratic=jnp.vdot(vector, direction).real.astype(state.quadratic.dtype),
            fell_back=jnp.zeros_like(state.fell_back),
        )
