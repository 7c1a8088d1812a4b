r"""The contract between the natural-gradient transform and a curvature solver.

A solver represents the Fisher F of a batch (densely, by factors, or matrix-free) and
solves (F + λI) d = g against it. The transform owns the cadence (when to measure, when
to factorise), the step's length, the trust region and the damping; a solver owns its
arrays (a ``NamedTuple`` state: jit, shard, checkpoint) and the linear algebra.

Every solver states these facts as class attributes, which the transform reads instead
of inspecting the object:

* ``name``: the ``solver=`` string, used in messages and by ``ng.describe``;
* ``approximate``: whether ``solve`` returns an approximation of (F + λI)⁻¹g (K-FAC,
  diagonal) rather than the solution to a tolerance; ``natural_gradient`` then sets the
  step's length from the batch's exact quadratic model (``rescale``);
* ``averages``: whether the state keeps a curvature across steps, which ``decay`` and
  ``refresh_every`` act on; such a solver implements ``measure`` and ``factorise``;
* ``adaptive_damping_refusal``: why λ cannot follow ``ng.LevenbergMarquardt`` (where
  λ is not a curvature's damping, as eigenbasis Adam's ε), or None (the default);
* ``gates_refresh``: whether ``refresh`` keeps its own cadence and reads
  ``batch.measurable`` itself (``"auto"``'s K-FAC factors), so that the transform need
  not wrap it in a ``lax.cond`` of its own (default False);
* ``per_leaf``: whether ``solve`` takes and returns vectors leaf by leaf (a tuple of
  leaf-shaped arrays, ``natgrad_jax._vectors``), so that leaves sharded over devices
  stay sharded, or one flat (P,) array in ``ravel_pytree`` order (the default: simplest
  to write, and what a dense or Woodbury solve needs; the transform gathers it).

A solver whose answer depends on the parameters or the batch (``"auto"``) refines them
with ``averages_for``, ``may_approximate`` and ``approximate_for``.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import chex
import jax

from natgrad_jax import _vectors as vectors

PyTree = Any


class Solver(abc.ABC):
    """Base class of every ``solver=`` of the natural-gradient transform.

    Subclasses implement ``init``, ``solve`` and ``memory``; those that keep curvature
    across steps (``averages = True``) implement ``measure`` and ``factorise`` too, and
    ``refresh`` is their composition. Write one as a frozen dataclass whose fields are its
    options, as the solvers of natgrad_jax are.

    Example:
      A scaled identity, F ≈ c·I with c the mean of the diagonal of the batch's Fisher
      (a solver in ten lines; ``tests/test_transform.py`` checks it against its
      definition through the transform):

      >>> import dataclasses, jax.numpy as jnp, natgrad_jax as ng
      >>> @dataclasses.dataclass(frozen=True)
      ... class ScaledIdentity(ng.Solver):
      ...     name = "scaled_identity"
      ...     approximate = True
      ...     def init(self, params, dtype):
      ...         return ()
      ...     def memory(self, num_params, num_rows, leaf_shapes=(), rows=None):
      ...         return num_rows * num_params
      ...     def solve(self, state, batch, vector, damping):
      ...         scale = jnp.mean(jnp.sum(batch.score_rows() ** 2, axis=0)) / batch.num_examples
      ...         return vector / (scale + damping), state
      >>> model = ng.Model(lambda w, x: x @ w, ng.Bernoulli())
      >>> tx = ng.scale_by_natural_gradient(model, solver=ScaledIdentity(), damping=0.1)
      >>> w, x = jnp.zeros(2), jnp.eye(2)
      >>> updates, _ = tx.update(jnp.ones(2), tx.init(w), w, inputs=x)
      >>> updates  # F = diag(1/8, 1/8) at w = 0, so c = 1/8 and d = g / (1/8 + 0.1)
      Array([4.44444..., 4.44444...], dtype=float32)
    """

    name: ClassVar[str]
    approximate: ClassVar[bool] = False
    averages: ClassVar[bool] = False
    per_leaf: ClassVar[bool] = False
    adaptive_damping_refusal: ClassVar[str | None] = None
    gates_refresh: ClassVar[bool] = False
    # The update is (F + λI)⁻¹ g for some curvature F, so another solver (CG) can stand
    # in for it in a refusal's remedies; not eigenbasis Adam's moments.
    applies_curvature_inverse: ClassVar[bool] = True

    @abc.abstractmethod
    def init(self, params: PyTree, dtype) -> NamedTuple | tuple:
        """The state before the first update (arrays of ``dtype``, the solve's dtype)."""

    @abc.abstractmethod
    def solve(self, state, batch, vector: jax.Array, damping) -> tuple[jax.Array, Any]:
        """``(direction, state)``: (F + λI)⁻¹ ``vector``, with the state of the last
        refresh or of this batch. ``vector`` is flat (``ravel_pytree`` order of the
        trainable leaves) or, with ``per_leaf``, a tuple of the leaves' entries. The
        transform calls it once a step, with the gradient, so a state may move with it
        (``ng.EigenbasisAdam``'s moments); return the arrays it does not move as they
        came (the same objects), so that a step the damping rule skips selects only
        the moved ones back."""

    @abc.abstractmethod
    def memory(self, num_params: int, num_rows: int, leaf_shapes=(), rows=None) -> int:
        """Floats an update allocates, for the memory guard (``max_curvature_bytes``);
        ``rows`` (``RowSizes``, from the batch's capture) is None at ``init``."""

    def exact_rows_limit(self) -> int | None:
        """The most output-Fisher rows per example an exact-Fisher refresh may
        back-propagate one by one (``None``: no limit; the transform refuses more): the
        solver's ``max_exact_rows`` field where it has one (K-FAC, EKFAC, the diagonal,
        eigenbasis Adam). Solvers that take products (CG) or store the rows (dense,
        Woodbury: the memory guard bounds them) have none."""
        return getattr(self, "max_exact_rows", None)

    def measure(self, state, batch, decay, is_first):
        """Measures the curvature statistics on ``batch`` and averages them into the
        state with ``decay`` (``is_first``: replace instead). Keeps nothing by default."""
        del batch, decay, is_first
        return state

    def factorise(self, state, batch, damping):
        """Prepares ``solve`` from the stored statistics (inverses, eigenbases) at λ =
        ``damping``. Nothing to prepare by default."""
        del batch, damping
        return state

    def refresh(self, state, batch, damping, decay, is_first):
        """``measure`` then ``factorise``: what the transform runs every ``refresh_every``
        steps when statistics and factorisation share one cadence."""
        return self.factorise(self.measure(state, batch, decay, is_first), batch, damping)

    def step_quadratic(self, state, gradient: jax.Array, direction: jax.Array) -> jax.Array:
        """dᵀ(F + λI)d of the last solve (½ of it is the step's quadratic KL). A solver that
        solves exactly with its own matrix has d = A⁻¹g, so this is gᵀd; an inexact one
        (CG) measures it during the solve and overrides this."""
        del state
        return vectors.vdot(gradient, direction).real

    def with_cadence(self, decay, refresh_every) -> tuple[Solver, Any, Any]:
        """``(solver, decay, refresh_every)`` for the transform: a solver that keeps its
        own cadence (``"auto"``'s K-FAC factors) takes the transform's over and returns
        ``None`` for both; by default the transform keeps them."""
        return self, decay, refresh_every

    def without_damping(self) -> Solver:
        """This solver for λ = 0 (a fixed damping of zero): one that would divide by λ
        in some of its choices (``"auto"``'s Woodbury) turns them off."""
        return self

    def averaging_refusal(self, params: PyTree) -> str | None:
        """Why ``decay``/``refresh_every`` cannot apply to this solver on ``params``, or
        None when they can."""
        if self.averages_for(params):
            return None
        return (
            f"solver {self.name!r} keeps no curvature across steps, so decay and "
            "refresh_every do not apply to it; use solver='dense', 'kronecker', "
            "'diagonal' or 'block_diagonal' (or leave decay=0, refresh_every=1)."
        )

    def averages_for(self, params: PyTree) -> bool:
        """Whether, for these parameters, the state keeps curvature that ``decay`` and
        ``refresh_every`` act on."""
        del params
        return self.averages

    def may_approximate(self, params: PyTree) -> bool:
        """Whether some batch's solve may be an approximation (the transform then keeps
        the previous update in its state for ``momentum=None``)."""
        del params
        return self.approximate

    def approximate_for(self, batch) -> bool:
        """Whether this batch's solve is an approximation (what ``rescale=None`` rescales)."""
        del batch
        return self.approximate


def solve_on_leaves(solver: Solver, state, batch, gradient: tuple, damping):
    """``solver.solve`` on a gradient held leaf by leaf: ``(direction, state)``, the
    direction leaf by leaf too. A flat solver (``per_leaf = False``) gets the raveled
    gradient and its answer is split back; its answer is checked to be shaped like what
    it was given."""
    if solver.per_leaf:
        direction, state = solver.solve(state, batch, gradient, damping)
        given, shape = gradient, "the gradient's leaves it was given"
    else:
        given, unravel = vectors.ravel(gradient)
        direction, state = solver.solve(state, batch, given, damping)
        shape = "the flat gradient (P,) it was given"
    chex.assert_type(jax.tree.leaves(direction), float)
    chex.assert_trees_all_equal_shapes(
        given,
        direction,
        custom_message=f"{solver!r}.solve must return a direction shaped like {shape}",
    )
    return (direction if solver.per_leaf else unravel(direction)), state
