r"""Optax transforms that precondition gradients by the damped inverse Fisher."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from natgrad_jax import _vectors as vectors
from natgrad_jax._cadence import due_every, is_every_step, when_due
from natgrad_jax._damping import LevenbergMarquardt, reduction_ratio
from natgrad_jax._eager import compiled_when_eager
from natgrad_jax._fisher import (
    FISHER_KINDS,
    check_num_samples,
    check_same_batch,
    device_invariant,
)
from natgrad_jax._independence import check_independent_examples
from natgrad_jax._linalg import trust_region_scale
from natgrad_jax._memory import (
    DEFAULT_MAX_CURVATURE_BYTES,
    SOLVERS,
    exact_rows_refusal,
    problem_of,
    refusal,
)
from natgrad_jax._model import Model, check_model
from natgrad_jax._parameters import (
    merge_updates,
    trainable_and_frozen,
    trainable_part,
    with_frozen,
)
from natgrad_jax._precision import EXACT, exact_matmuls, matmul_precision, statistics_precision
from natgrad_jax._sharding_types import (
    as_written,
    explicit_mesh,
    on_automatic_axes,
    spread_columns,
)
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._solvers.solver import Solver, solve_on_leaves
from natgrad_jax._state import Adaptation, NaturalGradientState, RejectedSteps
from natgrad_jax._value_and_grad import check_forward_pass

PyTree = Any
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]

# natural_gradient's damping: adaptive, so that a learning rate of 1 is safe on networks.
DEFAULT_ADAPTIVE_DAMPING = LevenbergMarquardt()
KL_MEASURES = ("exact", "solver")  # the Fisher that max_kl's bound ½ dᵀ(F + λI)d uses

NO_PARAMS_MSG = (
    "scale_by_natural_gradient needs the current parameters to measure the Fisher: "
    "call update(updates, state, params, inputs=...)."
)
NO_INPUTS_MSG = (
    "scale_by_natural_gradient needs the batch the gradient was computed on: "
    "call update(updates, state, params, inputs=..., targets=...)."
)

MASKED_MSG = (
    "scale_by_natural_gradient received parameters with leaves masked out by optax.masked, "
    "but the Fisher needs the whole model. Keep natural_gradient outside optax.masked and "
    "mask the other transforms, or zero the frozen leaves' updates afterwards with "
    "optax.masked(optax.set_to_zero(), frozen_mask)."
)


def _has_masked_leaves(tree) -> bool:
    is_masked = lambda leaf: isinstance(leaf, optax.MaskedNode)
    return any(map(is_masked, jax.tree.leaves(tree, is_leaf=is_masked)))


def _is_python_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_nonnegative(name: str, value) -> None:
    if _is_python_number(value) and not value >= 0:
        raise ValueError(f"{name} must be ≥ 0, got {value}.")


def _check_positive(name: str, value) -> None:
    if _is_python_number(value) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}.")


def _check_kl_measure(kl_measure, max_kl) -> None:
    if kl_measure not in KL_MEASURES:
        raise ValueError(f"kl_measure must be one of {KL_MEASURES}, got {kl_measure!r}.")
    if kl_measure != "exact" and max_kl is None:
        raise ValueError(
            f"kl_measure={kl_measure!r} says how max_kl's bound is measured: pass max_kl=ε too."
        )


def _check_mesh(mesh, axis_name) -> None:
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(
            f"mesh must be a jax.sharding.Mesh (the devices to spread factorisations over), "
            f"got {type(mesh).__name__}."
        )
    if mesh is not None and axis_name is not None:
        raise ValueError(
            "mesh and axis_name do not go together: inside shard_map (axis_name) each "
            "program is one device's; pass mesh= to a transform used under jax.jit."
        )


def _check_decay(decay) -> None:
    if _is_python_number(decay) and not 0 <= decay < 1:
        raise ValueError(f"decay must be in [0, 1) (0: no averaging across steps), got {decay}.")


def _check_refresh_every(refresh_every) -> None:
    if isinstance(refresh_every, bool) or (
        _is_python_number(refresh_every)
        and (refresh_every != int(refresh_every) or refresh_every < 1)
    ):
        raise ValueError(f"refresh_every must be an integer ≥ 1, got {refresh_every!r}.")


def _check_statistics_every(statistics_every, refresh_every) -> None:
    if statistics_every is None:
        return
    if not isinstance(statistics_every, int) or isinstance(statistics_every, bool):
        raise ValueError(f"statistics_every must be a Python int ≥ 1, got {statistics_every!r}.")
    if statistics_every < 1:
        raise ValueError(f"statistics_every must be ≥ 1, got {statistics_every}.")
    if not _is_python_number(refresh_every):
        raise ValueError("statistics_every needs refresh_every as a Python int.")


def _checked_adapt_every(adapt_every) -> int:
    if adapt_every is None:
        return 1
    if isinstance(adapt_every, bool) or not (
        isinstance(adapt_every, numbers.Integral) and adapt_every >= 1
    ):
        raise ValueError(f"adapt_every must be a Python int ≥ 1, got {adapt_every!r}.")
    return int(adapt_every)


def _check_separate_cadences(curvature: Solver, params, statistics_every, refresh_every) -> None:
    separate = statistics_every is not None and statistics_every != refresh_every
    if separate and not curvature.averages_for(params):
        raise ValueError(
            f"solver {curvature.name!r} cannot measure and factorise on separate "
            "cadences; use solver='dense', 'kronecker', 'diagonal' or 'block_diagonal', "
            "or leave statistics_every=None."
        )


def _resolve_solver(solver) -> Solver:
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(f"Unknown solver {solver!r}; choose one of {tuple(SOLVERS)}.")
        return SOLVERS[solver]()
    if isinstance(solver, Solver):
        return solver
    raise TypeError(
        f"solver must be one of {tuple(SOLVERS)} or an ng.Solver (a subclass implementing "
        f"init, solve and memory), got {solver!r}."
    )


def _check_averaging(curvature: Solver, params, decay, refresh_every) -> None:
    """Refuses decay/refresh_every (as given: ``None`` is unset) for a solver that keeps
    no curvature across steps (``Solver.averaging_refusal`` says why). Values held as
    arrays (``optax.inject_hyperparams``) cannot be read here; such a solver ignores
    them."""
    uses_averaging = (_is_python_number(decay) and decay != 0) or (
        _is_python_number(refresh_every) and refresh_every != 1
    )
    refusal = curvature.averaging_refusal(params) if uses_averaging else None
    if refusal is not None:
        raise ValueError(refusal)


def _check_memory(curvature, params, dtype, max_bytes, batch=None) -> None:
    """Raises, naming the remedies that would fit, before anything is allocated if the
    solver would exceed the budget (at ``init``, without a batch: for its state alone),
    or if its exact-Fisher statistics would back-propagate more output rows per example
    than it allows (``Solver.exact_rows_limit``).

    Only a Python-number budget is checked (under ``optax.inject_hyperparams`` list
    ``max_curvature_bytes`` in ``static_args`` to keep the check).
    """
    budget = float(max_bytes) if _is_python_number(max_bytes) else None
    rows_checked = batch is not None and batch.kind == "exact" and curvature.exact_rows_limit()
    if budget is None and not rows_checked:
        return
    problem = problem_of(params, dtype, batch)
    message = exact_rows_refusal(curvature, problem, budget) if rows_checked else None
    if message is None and budget is not None:
        message = refusal(curvature, problem, budget)
    if message is not None:
        raise ValueError(message)


def _check_same_structure(updates, params) -> None:
    """Raises unless ``updates`` has the structure of ``params`` (``None`` allowed where
    ``params`` holds a non-array leaf, as ``equinox.filter_grad`` returns)."""
    try:
        jax.tree.structure(params).flatten_up_to(updates)
    except (ValueError, TypeError):
        raise ValueError(
            "updates and params must have the same pytree structure, got "
            f"{jax.tree.structure(updates)} and {jax.tree.structure(params)}."
        ) from None


def _value_at(hyperparameter: ScalarOrSchedule, count: jax.Array):
    """A hyper-parameter's value at step ``count``: schedules are called, numbers kept."""
    return hyperparameter(count) if callable(hyperparameter) else hyperparameter


def _solve_dtype(dtype) -> jnp.dtype:
    """The dtype the curvature is stored and solved in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def scale_by_natural_gradient(
    model: Model,
    *,
    fisher: str = "exact",
    damping: ScalarOrSchedule | LevenbergMarquardt = 1e-3,
    solver: str | Any = "auto",
    max_kl: ScalarOrSchedule | None = None,
    kl_measure: str = "exact",
    decay: float | jax.Array | None = None,
    refresh_every: int | jax.Array | None = None,
    statistics_every: int | None = None,
    adapt_every: int | None = None,
    num_samples: int | None = None,
    seed: int | jax.Array = 0,
    max_curvature_bytes: float | None = DEFAULT_MAX_CURVATURE_BYTES,
    axis_name: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    precision: str | None = None,
    rescale: bool | None = False,
    momentum: bool | None = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Preconditions updates by the damped inverse Fisher of ``model``: d = (F + λI)⁻¹ g.

    At every update the Fisher F of ``model`` at ``params`` is measured on the batch
    passed as ``inputs`` (and ``targets`` for the empirical Fisher), optionally averaged
    with the previous ones, and the incoming updates g (usually the gradient of
    ``model.nll``) are replaced by

    .. math::
      d = c\,(F + λI)^{-1} g, \qquad
      c = \min\Big(1, \sqrt{2ε / g^\top (F + λI)^{-1} g}\Big)\ \text{if max\_kl}=ε,

    so that the quadratic KL of a unit step, ½ dᵀ(F + λI)d, is at most ε (Amari 1998;
    Schulman et al. 2015). The output is a descent *direction*: follow it with
    ``optax.scale_by_learning_rate`` (as ``natural_gradient`` does).

    **Trust region and learning rate.** ``max_kl`` here bounds the output taken as a
    step with learning rate 1; a learning rate η then scales that KL by η². Use
    ``natural_gradient(..., max_kl=ε)`` to bound the final step's KL by ε whatever the
    learning rate: the effective step length becomes min(η, √(2ε / gᵀ(F+λI)⁻¹g)).
    The KL is always measured with the batch's *exact* Fisher, whatever ``fisher`` the
    solve uses: a Monte-Carlo or empirical Fisher sees one direction of each example's
    outputs per label, so a step solved with it is long where it is blind, and its own
    quadratic form would understate the KL, and so would an approximation's (K-FAC's
    gᵀd): one forward-mode product per step measures the exact one, which comes free
    from an exact solve with ``fisher="exact"`` or from the quadratic model.
    ``kl_measure="solver"`` measures it with the curvature the solve used instead,
    ½ dᵀ(F̂ + λI)d = ½ gᵀd for K-FAC: no product at all, the KL clipping of K-FAC
    implementations (Ba et al. 2017). It is what lets K-FAC run without the quadratic
    model on the transformer LM of ``benchmarks/transformer_lm.py``: steps as cheap as
    AdamW's, kept from diverging by the clip.

    **A building block.** Its defaults are plain natural gradient's: a fixed λ = 1e-3,
    no quadratic model, no momentum. A unit step with the exact Fisher is then a damped
    Gauss–Newton step, which fits the batch's linearised model and can overshoot on a
    nonlinear network at learning rates ``natural_gradient`` takes. In a chain of your
    own, keep a step-length control: ``damping=ng.LevenbergMarquardt()`` (with
    ``rescale=None, momentum=None``, as ``natural_gradient``: the same steps) or
    ``max_kl=ε``.

    The update is jit-compatible, has no Python control flow on traced values, keeps
    the dtype of each update leaf and solves in at least float32.

    **Non-finite values.** A numerically indefinite Fisher never yields NaN (the solve
    falls back to an eigendecomposition). When the gradient or the step holds a NaN or
    an infinity, ``ng.diagnostics(state).rejected_non_finite`` counts the update, and:

    * with Levenberg–Marquardt damping (``natural_gradient``'s default) the step is
      skipped: the update is zero and the state is left as it was (λ, curvature,
      cadence), so training resumes unchanged at the next finite batch;
    * with a fixed or scheduled damping the non-finite update is passed on, as optax's
      own transforms do; wrap the optimizer in ``optax.apply_if_finite`` to skip such
      steps (zero update, inner state untouched, skipped steps counted in its state).

    Either way a batch whose curvature statistics are not finite is not averaged in:
    the averaged statistics stay as they were, so one bad batch does not poison the
    later steps (EKFAC's scales, measured afresh at each refresh, are the refresh's).

    Steps the Levenberg–Marquardt rule rejects because the batch loss would not have
    decreased are counted apart (``rejected_no_decrease``).

    Args:
      model: the ``ng.Model`` whose Fisher preconditions the updates.
      fisher: ``"exact"`` (true Fisher, GGN form), ``"monte_carlo"`` (labels sampled
        from the model, keys held in the state) or ``"empirical"`` (the batch's own
        labels; needs ``targets``). See ``ng.fisher`` for the differences.
      damping: λ ≥ 0 added to the diagonal: a number, an optax schedule of the step,
        or ``ng.LevenbergMarquardt(...)`` to adapt it from the reduction ratio of each
        step (needs ``targets``; see ``natgrad_jax._damping`` for when to use which).
      solver: how F is represented and solved against (see ``ng.choose_solver``):
        ``"auto"`` (per batch, whichever of dense, Woodbury and CG has the least
        estimated cost, or K-FAC on a network of 5,000 parameters or more that capture
        explains, whose factors it keeps and refreshes every 5 steps), ``"dense"``
        (P×P, Cholesky with eigendecomposition fallback),
        ``"woodbury"`` (exact, through the M×M kernel of the M score rows),
        ``"cg"`` (matrix-free conjugate gradients, warm-started), ``"kronecker"``
        (K-FAC on the layers ``ng.describe`` lists, no tagging), ``"ekfac"``
        (K-FAC's eigenbasis with the Fisher's own second moments), ``"diagonal"`` (exact
        diagonal of F), ``"block_diagonal"`` (a dense block per pytree leaf), or a
        solver object such as ``ng.ConjugateGradient(tol=1e-6)``.
      max_kl: optional ε > 0 (number or schedule) bounding ½ dᵀ(F + λI)d, F the
        batch's exact Fisher (see above).
      kl_measure: the F of ``max_kl``'s bound: ``"exact"`` (the batch's exact Fisher)
        or ``"solver"`` (the curvature the solve used; free). Needs ``max_kl``.
      decay: in [0, 1): exponential moving average of the Fisher across refreshes,
        F ← decay·F + (1 − decay)·F_batch (the first refresh takes F_batch). ``None``:
        0, or with ``"auto"`` its K-FAC factors' 0.95.
      refresh_every: refactorise the curvature every this many updates; the updates in
        between reuse the last factorisation (chosen by ``lax.cond``). ``None``: 1, or
        with ``"auto"`` every 5 of the steps it gives K-FAC (``"auto"`` keeps no other
        curvature across steps: ``decay`` and ``refresh_every`` set its K-FAC cadence).
      statistics_every: measure the curvature statistics (Fisher, factors, diagonal)
        and average them into the state every this many updates (a Python int;
        ``None``: with every refactorisation). ``statistics_every=1,
        refresh_every=20`` is the usual K-FAC: cheap statistics at every step, the
        inverses every 20. Needs a solver with separate ``measure`` and
        ``factorise`` (dense, Kronecker, diagonal, block-diagonal).
      adapt_every: measure the quadratic model (``rescale``, ``momentum``) and adapt a
        Levenberg–Marquardt λ every this many updates (a Python int), and again at the
        update after a rejected step. The updates in between take their own direction
        d at the step length α last measured along d alone, no longer than that step in
        the solve's own norm (α² gᵀd for K-FAC: free), and keep λ: they spare the
        linearisation, its forward-mode products and the damping rule's forward pass,
        so such a step costs about what the solve costs. The momentum acts at the
        measured updates only (a momentum coefficient held fixed can make the steps
        grow without bound). ``None`` means 1. The updates it does not measure are not
        rejected; measured on ``benchmarks/``, ``adapt_every=5`` with K-FAC refreshed
        every 5 steps makes a step 1.3–1.4 AdamW steps amortised on the transformer LM
        instead of about 2 (and its loss at equal time ahead of AdamW's, where
        measuring every step is level or behind), but the deep autoencoder needs 120
        steps to Adam's loss instead of 50 and loses the time it saved.
      num_samples: labels sampled per example for the Monte-Carlo Fisher (a Python int;
        ``None`` means 1). It fixes array shapes, so with ``optax.inject_hyperparams``
        list it in ``static_args``.
      seed: seed of the PRNG key held in the state for Monte-Carlo labels.
      max_curvature_bytes: memory budget of the curvature solver (4 GiB); a
        solver that would need more raises a ValueError at trace time, before
        allocating, naming cheaper ones. ``None`` disables the check, and so does an
        array (``optax.inject_hyperparams`` makes it one unless it is in
        ``static_args``).
      axis_name: for use inside ``shard_map`` (or ``pmap``) with the batch split over
        this mapped axis: curvature statistics are all-reduced (Woodbury gathers the
        layers' inputs and output-gradients) so every device solves with the Fisher
        of the whole batch. The incoming updates must already be the whole batch's
        gradient (``jax.lax.pmean(grads, axis_name)``). ``None``: a single program,
        where sharded arrays under ``jax.jit`` need nothing more (GSPMD).
      mesh: a ``jax.sharding.Mesh`` (the one the parameters or the batch are sharded
        over) to spread the refreshes' factorisations over: K-FAC's and EKFAC's
        factors and the block-diagonal solver's blocks, each factorised on one device
        (same-size matrices split evenly over all of them; a size with fewer than a
        quarter as many matrices as devices stays on every device) instead of whole on
        every device; the results are the same. ``None``: the mesh set with
        ``jax.set_mesh`` where ``update`` is traced, if any; else each device
        factorises every matrix (GSPMD's default). Other solvers do not factorise per
        matrix and ignore it. Not with ``axis_name`` (inside ``shard_map`` the program
        is one device's). On a mesh whose axes are ``Explicit`` (sharding in types),
        ``init`` under ``jax.set_mesh`` also splits the curvature state's larger
        matrices by columns over its devices, and ``update`` returns every array with
        the type it was given (see
        "Beyond one device" in the docs).
      precision: matmul precision of the curvature statistics (the passes through the
        network, factor and kernel products): ``None`` follows
        ``jax.default_matmul_precision`` (TF32 for float32 on recent NVIDIA GPUs,
        relative error ~1e-3, a few times faster); ``"highest"`` gives full float32.
        The step's own passes (the quadratic model's linearisation and products, the
        damping rule's loss at θ − d, ``max_kl``'s exact Fisher) follow it too.
        Factorisations, solves and the trust region always run at ``"highest"``, and so
        do the products that Woodbury and CG measure inside their solves.
      rescale: scale the direction d to the minimiser of the batch's exact quadratic
        model along it, α d with α = gᵀd / dᵀ(F + λI)d (one Fisher-vector product; the
        adaptive damping reuses it). An approximate curvature (Kronecker, EKFAC,
        diagonal) gets the direction right more often than its length; an exact solve
        has α = 1. K-FAC's adaptive learning rate (Martens & Grosse 2015, §6.4).
        With adaptive damping and ``refresh_every > 1`` it also spares the
        refactorisations between refreshes: without ``rescale`` every move of λ is
        refactorised at once, with it the direction keeps λ of the last refresh and the
        step length follows the current λ. ``None``: where the solve is an
        approximation (``"kronecker"``, ``"ekfac"``, ``"diagonal"``,
        ``"block_diagonal"``, and ``"auto"`` when it picks K-FAC).
      momentum: take the minimiser of the batch's exact quadratic model over the plane
        of d and the previous update p, α d + μ p (K-FAC's momentum, Martens & Grosse
        2015, §7: α and μ from a 2×2 system, so no momentum constant to tune). Implies
        ``rescale``; costs one more forward-mode product per step and P floats of state.
        ``None``: where the solve is an approximation, as ``rescale=None``.

    Non-floating leaves of ``params`` (integers, booleans, an equinox module's
    functions) are constants: the Fisher is over the floating leaves, and the other
    leaves' updates are passed through (a ``float0`` becomes a zero of the leaf's dtype).
    An equinox module can be passed as it is, with ``equinox.filter_grad`` gradients.
    Called outside ``jax.jit``, ``update`` compiles itself (once per input shapes).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` is
      ``update(updates, state, params, *, inputs, targets=None, **extra_args)``;
      unknown extra arguments are ignored.

    Example:
      >>> import jax, jax.numpy as jnp, optax, natgrad_jax as ng
      >>> x = jnp.array([[1.0, 0.5], [1.0, -1.0], [1.0, 2.0], [1.0, 0.0]])
      >>> y = jnp.array([1.0, 0.0, 1.0, 0.0])
      >>> model = ng.Model(lambda w, x: x @ w, ng.Bernoulli())
      >>> tx = ng.scale_by_natural_gradient(model, damping=0.0)
      >>> w = jnp.zeros(2)
      >>> state = tx.init(w)
      >>> g = jax.grad(model.nll)(w, x, y)
      >>> d, state = tx.update(g, state, w, inputs=x, targets=y)
      >>> bool(jnp.allclose(ng.fisher(model, w, x) @ d, g, atol=1e-5))
      True

    References:
      Amari, 1998, Natural gradient works efficiently in learning.
      Martens, 2020, New insights and perspectives on the natural gradient method.
      Schulman et al., 2015, Trust region policy optimization.
    """
    options = _validated_options(**locals())  # every argument above, by name

    def init_fn(params):
        return _init(options, params)

    # Called outside any trace, the update runs compiled (one compilation per input
    # shapes, see natgrad_jax._eager). Hyper-parameters given as arrays come from
    # optax.inject_hyperparams, which builds a new transform at every step: its
    # compilation would never be reused, so that case runs op by op.
    # On a mesh with explicit axes the update's results keep its arguments' shardings.
    keep_shardings = on_automatic_axes(lambda updates, state, **_: (updates, state))
    precondition = keep_shardings(functools.partial(_precondition, options))
    run = precondition if options.has_array_hyperparameters else compiled_when_eager(precondition)

    def update_fn(
        updates, state, params=None, *, inputs=None, targets=None, forward_pass=None, **extra_args
    ):
        del extra_args
        trainable, frozen = _checked_parameters(options, updates, params, inputs, targets)
        if forward_pass is not None:
            check_forward_pass(forward_pass, options.model, trainable, frozen, inputs)
            # Its pullback takes cotangents typed for a mesh's explicit axes, which the
            # update's computations run without (see _sharding_types): run the model again.
            if explicit_mesh((params, inputs)) is not None:
                forward_pass = None
        directions, new_state = run(
            trainable_part(updates, params), state, trainable, frozen, inputs, targets, forward_pass
        )
        return merge_updates(directions, updates, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --- configuration, validated once ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
    """The transform's settings after validation: what every step of the pipeline reads."""

    model: Model
    fisher: str
    damping: ScalarOrSchedule | LevenbergMarquardt
    solver: Solver
    max_kl: ScalarOrSchedule | None
    kl_measure: str
    decay: float | jax.Array
    refresh_every: int | jax.Array
    statistics_every: int | None
    adapt_every: int
    num_samples: int
    seed: int | jax.Array
    max_curvature_bytes: float | None
    axis_name: str | None
    mesh: jax.sharding.Mesh | None
    precision: str | None
    rescale: bool | None
    momentum: bool | None
    requested_cadence: tuple  # (decay, refresh_every) as given, before a solver took them

    @property
    def adaptive(self) -> bool:
        return isinstance(self.damping, LevenbergMarquardt)

    @property
    def has_array_hyperparameters(self) -> bool:
        """Set by ``optax.inject_hyperparams``, which builds a new transform each step."""
        values = (self.damping, self.max_kl, self.decay, self.refresh_every, self.seed)
        return any(isinstance(value, jax.Array) for value in values)

    def damping_at(self, state: NaturalGradientState) -> jax.Array:
        """λ of this update: the adapted one, or the number or schedule's value."""
        return state.damping if self.adaptive else _value_at(self.damping, state.count)


def _validated_options(*, model, fisher, damping, solver, decay, refresh_every, **rest):
    """``_Options`` from the transform's arguments; raises on any invalid one."""
    model = as_written(check_model(model))  # itself, but on a mesh with explicit axes
    if fisher not in FISHER_KINDS:
        raise ValueError(f"Unknown fisher={fisher!r}; choose one of {FISHER_KINDS}.")
    num_samples = rest.pop("num_samples")
    num_samples = 1 if num_samples is None else check_num_samples(num_samples)
    if num_samples != 1 and fisher != "monte_carlo":
        raise ValueError(f'num_samples applies to fisher="monte_carlo" only, not {fisher!r}.')
    if not isinstance(damping, LevenbergMarquardt):
        _check_nonnegative("damping", damping)
    if rest["max_kl"] is not None:
        _check_positive("max_kl", rest["max_kl"])
    _check_kl_measure(rest["kl_measure"], rest["max_kl"])
    if decay is not None:
        _check_decay(decay)
    if refresh_every is not None:
        _check_refresh_every(refresh_every)
    axis_name = rest["axis_name"]
    if axis_name is not None and not isinstance(axis_name, str):
        raise ValueError(f"axis_name must be the name (a str) of a mapped axis, got {axis_name!r}.")
    _check_mesh(rest["mesh"], axis_name)
    requested_cadence = (decay, refresh_every)
    solver, decay, refresh_every = _resolve_solver(solver).with_cadence(decay, refresh_every)
    if isinstance(damping, LevenbergMarquardt) and solver.adaptive_damping_refusal:
        raise ValueError(
            f"solver {solver.name!r} cannot take ng.LevenbergMarquardt damping: "
            f"{solver.adaptive_damping_refusal}."
        )
    if _is_python_number(damping) and damping == 0:
        solver = solver.without_damping()
    refresh_every = 1 if refresh_every is None else refresh_every
    _check_statistics_every(rest["statistics_every"], refresh_every)
    rest["adapt_every"] = _checked_adapt_every(rest["adapt_every"])
    return _Options(
        model=model,
        fisher=fisher,
        damping=damping,
        solver=solver,
        decay=0.0 if decay is None else decay,
        refresh_every=refresh_every,
        num_samples=num_samples,
        requested_cadence=requested_cadence,
        **rest,
    )


def _checked_parameters(options: _Options, updates, params, inputs, targets):
    """``(trainable, frozen)`` parts of ``params``, after checking every argument of
    ``update``; raises, naming the fix, on what it cannot work with."""
    if params is None:
        raise ValueError(NO_PARAMS_MSG)
    if inputs is None:
        raise ValueError(NO_INPUTS_MSG)
    if _has_masked_leaves(params):
        raise ValueError(MASKED_MSG)
    if options.fisher == "empirical" and targets is None:
        raise ValueError(
            'fisher="empirical" uses the labels of the batch: pass targets=... to '
            'update (or choose fisher="exact" or "monte_carlo").'
        )
    _check_same_structure(updates, params)
    if targets is not None:
        check_same_batch(inputs, targets)
        options.model.check_targets(params, inputs, targets)
    trainable, frozen = trainable_and_frozen(params)  # refuses params without floating leaves
    check_independent_examples(options.model.apply_fn, params, inputs)
    if options.adaptive and targets is None:
        raise ValueError(
            "Levenberg–Marquardt damping (natural_gradient's default) compares the "
            "loss before and after the step: pass targets=... to update, or pass a "
            "fixed damping=... (a number or a schedule)."
        )
    return trainable, frozen


def _init(options: _Options, params) -> NaturalGradientState:
    params, _ = trainable_and_frozen(params)
    solver = options.solver
    dtype = _solve_dtype(jnp.result_type(*jax.tree.leaves(params)))
    _check_averaging(solver, params, *options.requested_cadence)
    _check_separate_cadences(solver, params, options.statistics_every, options.refresh_every)
    _check_memory(solver, params, dtype, options.max_curvature_bytes)
    damping = options.damping
    initial_damping = damping.initial if options.adaptive else _value_at(damping, jnp.int32(0))
    keeps_previous = options.momentum or (
        options.momentum is None and solver.may_approximate(params)
    )
    return NaturalGradientState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.PRNGKey(options.seed),
        damping=jnp.asarray(initial_damping, dtype),
        curvature=spread_columns(solver.init(params, dtype)),
        factorised_damping=jnp.asarray(initial_damping, dtype),
        previous_direction=(vectors.zeros_as(params, dtype) if keeps_previous else None),
        rejected=RejectedSteps.none(),
        adaptation=None if options.adapt_every == 1 else Adaptation.initial(dtype),
    )


# --- the update, as a pipeline of named steps ------------------------------------------


class _StepPlan(NamedTuple):
    """What this update does besides the solve (decided from the batch, at trace time)."""

    rescaled: bool  # the quadratic model sets the direction's length
    with_momentum: bool  # ... over the plane of the direction and the previous update

    @property
    def modelled(self) -> bool:
        return self.rescaled or self.with_momentum


def _precondition(options: _Options, updates, state, params, frozen, inputs, targets, forward):
    """The update on the trainable leaves, (F + λI)⁻¹ g shaped by the quadratic model, the
    trust region and the damping rule; and the next state."""
    key, step_key = jax.random.split(state.key)
    damping = options.damping_at(state)
    update_leaves, treedef = jax.tree.flatten(updates)  # the gradient, leaf by leaf
    gradient = tuple(vectors.astype(update_leaves, _solve_dtype(jnp.result_type(*update_leaves))))
    batch = CurvatureBatch(
        with_frozen(options.model, frozen),
        params,
        inputs,
        options.fisher,
        targets=targets,
        key=step_key,
        num_samples=options.num_samples,
        axis_name=options.axis_name,
        mesh=_factorisation_mesh(options),
        forward=forward,
        statistics_precision=statistics_precision(options.precision),
    )
    dtype = vectors.dtype_of(gradient)
    _check_memory(options.solver, params, dtype, options.max_curvature_bytes, batch)
    plan = _plan(options, state, batch)
    # A skipped step must leave the curvature as it found it: with the damping rule, a
    # batch whose gradient is not finite refreshes nothing (selecting the whole state
    # afterwards would read and write every factor at every step).
    if options.adaptive:
        batch = dataclasses.replace(batch, measurable=vectors.all_finite(gradient))
    factorised, factorised_damping = _advance_curvature(options, state, batch, damping, plan)
    with matmul_precision(EXACT):
        direction, curvature = solve_on_leaves(options.solver, factorised, batch, gradient, damping)
    step = _shaped_step(options, state, batch, curvature, gradient, direction, damping, plan)
    direction = step.direction
    next_state = NaturalGradientState(
        count=optax.safe_int32_increment(state.count),
        key=key,
        damping=step.next_damping.astype(state.damping.dtype),
        curvature=curvature,
        factorised_damping=factorised_damping,
        previous_direction=None if state.previous_direction is None else direction,
        rejected=_count_rejections(state.rejected, step.taken),
        adaptation=step.adaptation,
    )
    if options.adaptive:  # a skipped non-finite step leaves the state as it found it
        next_state = _unless_skipped(step.taken.finite, next_state, state, factorised)
    # Every device holds the same numbers; say so to shard_map.
    invariant = lambda tree: device_invariant(tree, options.axis_name)
    next_state = next_state._replace(
        damping=invariant(next_state.damping),
        curvature=invariant(next_state.curvature),
        factorised_damping=invariant(next_state.factorised_damping),
        previous_direction=invariant(next_state.previous_direction),
        adaptation=invariant(next_state.adaptation),
    )
    direction = invariant(direction)
    new_updates = [new.astype(old.dtype) for new, old in zip(direction, update_leaves, strict=True)]
    return jax.tree.unflatten(treedef, new_updates), next_state


def _factorisation_mesh(options: _Options):
    """The mesh the refreshes' factorisations are spread over: ``mesh=``, else the one
    set with ``jax.set_mesh`` (or ``jax.sharding.use_mesh``) where ``update`` is traced,
    except inside ``shard_map`` (``axis_name``, or a mesh whose axes are manual there);
    None for a mesh of one device, which has nothing to spread. A ``mesh=`` of the
    context's devices is taken with the context's axis types (on a mesh with explicit
    axes the update runs with them automatic, see ``_sharding_types``)."""
    mesh, context = options.mesh, jax.sharding.get_abstract_mesh()
    if mesh is None and options.axis_name is None:
        mesh = context
        if any(kind == jax.sharding.AxisType.Manual for kind in mesh.axis_types):
            return None
    elif mesh is not None and mesh.shape_tuple == context.shape_tuple:
        mesh = context
    return mesh if mesh is not None and mesh.size > 1 else None


def _plan(options: _Options, state: NaturalGradientState, batch: CurvatureBatch) -> _StepPlan:
    rescaled = options.solver.approximate_for(batch) if options.rescale is None else options.rescale
    with_momentum = state.previous_direction is not None and bool(options.momentum or rescaled)
    return _StepPlan(rescaled=bool(rescaled), with_momentum=with_momentum)


def _advance_curvature(options: _Options, state, batch, damping, plan: _StepPlan):
    """The cadence: ``(curvature state, λ of its factorisation)`` for this step.

    Statistics are measured every ``statistics_every`` steps and factorised every
    ``refresh_every`` (one refresh when they coincide), but not where
    ``batch.measurable`` is false (a solver with ``gates_refresh`` reads it itself).
    With adaptive damping and no quadratic model, a factorisation whose λ has moved since
    is redone, so that the step uses the current λ."""
    solver, decay, first = options.solver, options.decay, state.count == 0
    usable = None if solver.gates_refresh else batch.measurable

    def refresh(curvature):
        with matmul_precision(options.precision):
            return solver.refresh(curvature, batch, damping, decay, is_first=first)

    def measure(curvature):
        with matmul_precision(options.precision):
            return solver.measure(curvature, batch, decay, is_first=first)

    def factorise(curvature):
        with matmul_precision(EXACT):
            return solver.factorise(curvature, batch, damping)

    def when(due, fn, curvature):
        return when_due(due, usable, fn, curvature, options.axis_name)

    def every(period, fn, curvature):
        return when(due_every(period, state.count), fn, curvature)

    refresh_every, statistics_every = options.refresh_every, options.statistics_every
    if statistics_every is None or statistics_every == refresh_every:
        curvature = every(refresh_every, refresh, state.curvature)
    else:
        curvature = every(
            refresh_every, factorise, every(statistics_every, measure, state.curvature)
        )
    factorised_damping = jnp.asarray(damping, state.damping.dtype)
    if options.adaptive and solver.averages_for(batch.params) and not is_every_step(refresh_every):
        refactorised = state.count % refresh_every == 0
        if not plan.modelled:
            # The step's length comes from the factorisation alone: once λ has moved,
            # the next step must use it. With the quadratic model the length comes with
            # the current λ, and the factorisation keeps λ of its last refresh (as
            # K-FAC does), so λ can move at no cost.
            moved = (state.damping != state.factorised_damping) & ~refactorised
            curvature = when(moved, factorise, curvature)
            refactorised = refactorised | moved
        if batch.measurable is not None:
            refactorised = refactorised & batch.measurable
        factorised_damping = jnp.where(refactorised, damping, state.factorised_damping)
    return curvature, factorised_damping


class _ShapedStep(NamedTuple):
    """The step after the quadratic model, the trust region and the damping rule."""

    direction: tuple  # leaf by leaf
    next_damping: jax.Array
    taken: _Taken
    adaptation: Adaptation | None


def _shaped_step(options: _Options, state, batch, curvature, gradient, direction, damping, plan):
    """The solve's direction d shaped into the step: with the quadratic model, the
    minimiser of the batch's exact model over d (and the previous update), then the trust
    region and the damping rule.

    With ``adapt_every`` > 1 the model and λ are measured every that many updates, and
    again after a rejected step; the updates in between take their own d at the step
    length α last measured along d alone and keep λ, sparing the linearisation, its
    products and the damping rule's forward pass. (Not the momentum's coefficient too:
    the recurrence p ← α d + μ p with a μ held fixed grows without bound for |μ| ≥ 1,
    which the plane's minimiser often has.)"""
    span = [direction] + ([state.previous_direction] if plan.with_momentum else [])

    def trust_region(on_batch, step, fisher_quadratic):
        return _trust_region(
            options, state.count, on_batch, curvature, gradient, step, damping, fisher_quadratic
        )

    def measured():
        model, fisher_quadratic, step, measuring = None, None, direction, batch
        if plan.modelled:
            # The linearisation runs at the statistics' precision wherever it is traced
            # (``CurvatureBatch.linearised``), the algebra on it at full precision.
            measuring = dataclasses.replace(batch, model_pass=batch.linearised())
        with matmul_precision(EXACT):
            if plan.modelled:
                model = _quadratic_model(measuring, gradient, span, damping)
                step = vectors.combination(model.coefficients, span)
                fisher_quadratic = model.fisher_quadratic
            step, fisher_quadratic = trust_region(measuring, step, fisher_quadratic)
            step, next_damping, taken = _adapt_damping(
                options, measuring, gradient, step, damping, fisher_quadratic
            )
            return _ShapedStep(step, next_damping, taken, adaptation(model, taken))

    def solver_quadratic(step_length):
        return step_length**2 * options.solver.step_quadratic(curvature, gradient, direction)

    def adaptation(model: _QuadraticModel | None, taken: _Taken) -> Adaptation | None:
        if state.adaptation is None:
            return None
        last = state.adaptation
        if model is not None:
            step_length = model.step_length.astype(last.step_length.dtype)
            last = Adaptation(step_length, solver_quadratic(step_length), last.retry)
        return last._replace(retry=taken.finite & ~taken.accepted)

    @exact_matmuls
    def reused():
        step = direction
        if plan.modelled:
            last = state.adaptation
            longest = trust_region_scale(
                solver_quadratic(last.step_length), 0.5 * last.solver_quadratic
            )
            step = vectors.scale(last.step_length * longest, direction)
        step, _ = trust_region(batch, step, None)
        finite = vectors.all_finite(gradient, step)
        if options.adaptive:
            step = vectors.where(finite, step, 0.0)
        taken = _Taken(finite, accepted=jnp.ones([], bool))
        adaptation = state.adaptation._replace(retry=jnp.zeros([], bool))
        return _ShapedStep(step, jnp.asarray(damping, state.damping.dtype), taken, adaptation)

    if state.adaptation is None or not (plan.modelled or options.adaptive):
        return measured()._replace(adaptation=state.adaptation)
    due = due_every(options.adapt_every, state.count) | state.adaptation.retry
    invariant = lambda step: device_invariant(step, options.axis_name)
    return jax.lax.cond(due, lambda: invariant(measured()), lambda: invariant(reused()))


def _trust_region(
    options: _Options, count, batch, curvature, gradient, direction, damping, fisher_quadratic
):
    """``(d, dᵀFd)`` scaled so that ½ dᵀ(F + λI)d ≤ ``max_kl`` (F the batch's exact
    Fisher); unchanged without ``max_kl``."""
    if options.max_kl is None:
        return direction, fisher_quadratic
    step_quadratic = options.solver.step_quadratic(curvature, gradient, direction)
    quadratic = _kl_quadratic(
        batch,
        step_quadratic,
        direction,
        damping,
        fisher_quadratic,
        options.kl_measure,
        approximate=options.solver.approximate_for(batch),
    )
    scale = trust_region_scale(quadratic, _value_at(options.max_kl, count))
    if fisher_quadratic is not None:
        fisher_quadratic = fisher_quadratic * scale**2
    return vectors.scale(scale, direction), fisher_quadratic


class _Taken(NamedTuple):
    """Whether the step was taken: ``finite`` (no NaN or infinity in the gradient or the
    step) and ``accepted`` (Levenberg–Marquardt: the batch loss would decrease)."""

    finite: jax.Array
    accepted: jax.Array


def _adapt_damping(options: _Options, batch, gradient, direction, damping, fisher_quadratic):
    """``(d, next λ, _Taken)``: with Levenberg–Marquardt damping, λ follows the reduction
    ratio and a step that is not finite or would raise the loss becomes zero; otherwise
    λ and d pass through."""
    finite = vectors.all_finite(gradient, direction)
    if not options.adaptive:
        return direction, jnp.asarray(damping), _Taken(finite, jnp.asarray(True))
    next_damping, accepted = _levenberg_marquardt(
        options.damping, batch, gradient, direction, damping, fisher_quadratic
    )
    direction = vectors.where(accepted & finite, direction, 0.0)
    return direction, next_damping, _Taken(finite, accepted)


def _count_rejections(rejected: RejectedSteps, taken: _Taken) -> RejectedSteps:
    return RejectedSteps(
        non_finite=rejected.non_finite + ~taken.finite,
        no_decrease=rejected.no_decrease + (taken.finite & ~taken.accepted),
    )


def _unless_skipped(finite, next_state: NaturalGradientState, state, factorised):
    """``next_state``, or where the step is skipped (``finite`` false) ``state`` but for
    the rejection counts and the curvature's factorisation.

    The factorisation ``factorised`` is already ``state``'s own unless the gradient was
    finite (``_advance_curvature`` refreshes nothing otherwise), and a refresh keeps the
    statistics it had where a batch's are not finite (``moving_average``); so only what
    the solve itself changed (CG's warm start, eigenbasis Adam's moments) is selected,
    never a factor the solve passed through."""
    keep = lambda new, old: jnp.where(finite, new, old)
    curvature = jax.tree.map(
        lambda new, old: new if new is old else keep(new, old), next_state.curvature, factorised
    )
    return next_state._replace(
        count=keep(next_state.count, state.count),
        key=keep(next_state.key, state.key),
        damping=keep(next_state.damping, state.damping),
        curvature=curvature,
        previous_direction=jax.tree.map(
            keep, next_state.previous_direction, state.previous_direction
        ),
        adaptation=jax.tree.map(keep, next_state.adaptation, state.adaptation),
    )


class _QuadraticModel(NamedTuple):
    coefficients: jax.Array  # (k,): c of the minimiser over the span
    fisher_quadratic: jax.Array  # δᵀFδ of that minimiser
    step_length: jax.Array  # α of the minimiser along d alone


def _quadratic_model(batch: CurvatureBatch, gradient, span, damping) -> _QuadraticModel:
    """The coefficients c of the minimiser δ = Σ_i c_i v_i of the batch's exact quadratic
    model m(−δ) = −gᵀδ + ½ δᵀ(F + λI)δ over the span of the k ≤ 2 vectors v_i of
    ``span`` (each held leaf by leaf), δᵀFδ, and the minimiser's α along d = v_1 alone.

    With v = d alone, δ = α d, α = gᵀd / dᵀ(F + λI)d (0 if d is not a descent direction
    of the model): α = 1 for d = (F + λI)⁻¹g, and for an approximate curvature (K-FAC) α
    corrects its scale (Martens & Grosse 2015, §6.4). With the previous update p as a
    second row, c solves the 2×2 system Vᵀ(F + λI)V c = Vᵀg (§7), or falls back to d
    alone where that system is singular (p = 0 after a rejected step, or p ∥ d). The
    Fisher's inner products come from forward-mode products alone (``fisher_gram``).
    """
    dtype = vectors.dtype_of(span[0])
    fisher = batch.fisher_gram(span)
    damped = fisher + jnp.asarray(damping, dtype) * vectors.gram(span)
    slopes = vectors.inner_products(span, [gradient])[:, 0]
    curvature, slope = damped[0, 0], slopes[0]
    descent = (curvature > 0) & (slope > 0)
    alpha = jnp.where(descent, slope / jnp.where(descent, curvature, 1.0), 0.0)
    coefficients = jnp.zeros_like(slopes).at[0].set(alpha)
    if len(span) == 2:
        determinant = damped[0, 0] * damped[1, 1] - damped[0, 1] * damped[1, 0]
        tolerance = 100 * jnp.finfo(dtype).eps * damped[0, 0] * damped[1, 1]
        regular = determinant > tolerance
        safe = jnp.where(regular, determinant, 1.0)
        plane = jnp.stack(
            [
                damped[1, 1] * slopes[0] - damped[0, 1] * slopes[1],
                damped[0, 0] * slopes[1] - damped[1, 0] * slopes[0],
            ]
        )
        coefficients = jnp.where(regular, plane / safe, coefficients)
    return _QuadraticModel(coefficients, coefficients @ fisher @ coefficients, alpha)


def _kl_quadratic(
    batch: CurvatureBatch,
    step_quadratic,
    direction,
    damping,
    fisher_quadratic,
    measure: str,
    approximate: bool,
):
    """dᵀ(F + λI)d with F the batch's *exact* Fisher (``measure="exact"``): twice the
    step's KL to second order, which ``max_kl`` bounds whatever Fisher estimate the
    solve used; with ``measure="solver"``, F is that estimate.

    A sampled or empirical Fisher sees one direction of each example's outputs per label;
    a step solved with it lies where it is small, so its own quadratic form misses the
    KL elsewhere (a 64-output Gaussian autoencoder's CG step with one Monte-Carlo label
    per example: 0.01 by the sampled Fisher, 804 by the exact one); an ``approximate``
    solve's own quadratic (K-FAC's gᵀd) is its approximation's. One forward-mode product
    measures the exact one. Where the solve's measure is the exact Fisher's, it is used:
    ``fisher_quadratic`` (dᵀFd, from the quadratic model on the exact Fisher) or
    ``step_quadratic`` (``Solver.step_quadratic`` of a solve with the exact Fisher).
    """
    own_is_exact = batch.kind == "exact" and (fisher_quadratic is not None or not approximate)
    if measure == "exact" and not own_is_exact:
        exact = dataclasses.replace(batch, kind="exact")
        fisher_quadratic = exact.fisher_gram([direction])[0, 0]
    if fisher_quadratic is None:
        return step_quadratic
    damping = jnp.asarray(damping, vectors.dtype_of(direction))
    return fisher_quadratic + damping * vectors.vdot(direction, direction)


def _levenberg_marquardt(
    rule, batch: CurvatureBatch, gradient, direction, damping, fisher_quadratic=None
):
    """(next λ, whether to take the step), from the reduction ratio of the unit step −d.

    ``fisher_quadratic``: dᵀFd where already measured, else from one forward-mode
    product J d (``CurvatureBatch.fisher_gram``, at the statistics' precision like the
    loss at θ − d; a Fisher-vector product F d would add a backward pass)."""
    step = vectors.scale(-1, direction)
    actual = batch.nll_at(vectors.moved(batch.params, step)) - batch.nll()
    if fisher_quadratic is None:
        fisher_quadratic = batch.fisher_gram([step])[0, 0]
    predicted = vectors.vdot(gradient, step) + 0.5 * fisher_quadratic
    dtype = vectors.dtype_of(step)
    ratio = reduction_ratio(actual.astype(dtype), predicted)
    return rule.adapt(jnp.asarray(damping, dtype), ratio), rule.accepts(ratio)


def _unit_step_max_kl(max_kl: ScalarOrSchedule, learning_rate: ScalarOrSchedule):
    """ε/η²: the bound on a unit step that makes the step scaled by η satisfy KL ≤ ε."""

    def ratio(max_kl, learning_rate):
        # In the widest float dtype: η² rounded to float32 would bias the bound by ~1e-7.
        dtype = jnp.result_type(float)
        return jnp.asarray(max_kl, dtype) / jnp.square(jnp.asarray(learning_rate, dtype))

    if _is_python_number(max_kl) and _is_python_number(learning_rate):
        return float(max_kl) / float(learning_rate) ** 2  # a Python float is a double
    if not (callable(max_kl) or callable(learning_rate)):
        return ratio(max_kl, learning_rate)
    return lambda count: ratio(_value_at(max_kl, count), _value_at(learning_rate, count))


def natural_gradient(
    model: Model,
    learning_rate: ScalarOrSchedule,
    *,
    damping: ScalarOrSchedule | LevenbergMarquardt = DEFAULT_ADAPTIVE_DAMPING,
    max_kl: ScalarOrSchedule | None = None,
    rescale: bool | None = None,
    momentum: bool | None = None,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""Natural gradient descent: θ ← θ − η (F + λI)⁻¹ ∇L, as an optax optimizer.

    ``chain(scale_by_natural_gradient(...), scale_by_learning_rate(learning_rate))``.
    With ``max_kl=ε`` the *final* step δ satisfies ½ δᵀ(F + λI)δ ≤ ε, with equality when
    the step at learning rate η would exceed it: the effective step length is
    min(η, √(2ε / gᵀ(F + λI)⁻¹g)). With exact Fisher, ``damping=0`` and η = 1 this is
    Fisher scoring, i.e. IRLS/Newton for canonical-link GLMs.

    Takes every keyword of ``scale_by_natural_gradient``; only ``damping``,
    ``rescale`` and ``momentum`` have other defaults here.

    Args:
      model: the ``ng.Model`` being trained (its ``nll`` is the loss).
      learning_rate: η, a number or an optax schedule.
      damping: λ ≥ 0: a number, a schedule or ``ng.LevenbergMarquardt(...)``. The
        default adapts λ (from 1.0) to how well the quadratic model predicted the batch
        loss, and skips a step that would increase it, at every step (or every
        ``adapt_every`` steps), so a learning rate of 1 is safe on a network; it needs
        ``targets`` and costs one more forward pass and Fisher-vector product at each
        step it measures. Pass a number for a fixed λ (Fisher scoring: 0;
        ``scale_by_natural_gradient``'s default is 1e-3).
      max_kl: optional ε > 0 bounding the KL of each step (measured with the batch's
        exact Fisher whatever ``fisher`` is).
      rescale: scale each direction to the minimiser of the exact quadratic model along
        it (see ``scale_by_natural_gradient``); ``None``: where the solve is an
        approximation (``"kronecker"``, ``"ekfac"``, ``"diagonal"``,
        ``"block_diagonal"``, and ``"auto"`` when it picks K-FAC).
      momentum: the minimiser of the exact quadratic model over the plane of the
        direction and the previous update (see ``scale_by_natural_gradient``);
        ``None``: where the solve is an approximation, as ``rescale``.
      **options: the other keywords of ``scale_by_natural_gradient``, below.

    Keyword Args:
      fisher (str): ``"exact"``, ``"monte_carlo"`` or ``"empirical"``.
      kl_measure (str): ``max_kl``'s Fisher: ``"exact"`` (the batch's) or ``"solver"``
        (the solve's own estimate: no extra product; see ``scale_by_natural_gradient``).
      solver (str | Solver): ``"auto"``, ``"dense"``, ``"woodbury"``, ``"cg"``, ``"kronecker"``,
        ``"diagonal"``, ``"block_diagonal"`` or an ``ng.Solver`` object.
      decay (float | None): EMA factor of the Fisher across refreshes, in [0, 1) (``None``: see
        ``scale_by_natural_gradient``; with ``"auto"`` that of its K-FAC factors).
      refresh_every (int | None): refactorise the curvature every this many steps (``None``: see
        ``scale_by_natural_gradient``; with ``"auto"`` its K-FAC factors' cadence).
      statistics_every (int | None): measure the curvature statistics every this many steps
        (``None``: with every refactorisation).
      adapt_every (int | None): measure the quadratic model and adapt λ every this many
        steps (``None`` means 1; see ``scale_by_natural_gradient``).
      num_samples (int | None): Monte-Carlo labels per example (``None`` means 1).
      seed (int): seed of the Monte-Carlo PRNG key held in the state.
      max_curvature_bytes (float | None): memory budget of the curvature (``None``: unchecked).
      axis_name (str | None): the mapped axis the batch is split over inside ``shard_map``.
      mesh (jax.sharding.Mesh | None): the devices to spread the refreshes'
        factorisations over (K-FAC, EKFAC, block-diagonal) under ``jax.jit``
        (``None``: the mesh of ``jax.set_mesh``, if any).
      precision (str | None): matmul precision of the curvature statistics (``None``: JAX's default,
        TF32 on recent GPUs; ``"highest"``: full float32); solves are always exact.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; pass ``inputs=`` (and ``targets=``)
      to ``update``, the same batch as the gradient's.

    Example:
      >>> import jax, jax.numpy as jnp, optax, natgrad_jax as ng
      >>> x = jnp.array([[1.0, 0.5], [1.0, -1.0], [1.0, 2.0], [1.0, 0.0]])
      >>> y = jnp.array([1.0, 0.0, 1.0, 0.0])
      >>> model = ng.Model(lambda w, x: x @ w, ng.Bernoulli())
      >>> optimizer = ng.natural_gradient(model, learning_rate=1.0, damping=1e-4)
      >>> w = jnp.zeros(2)
      >>> state = optimizer.init(w)
      >>> for _ in range(5):
      ...     g = jax.grad(model.nll)(w, x, y)
      ...     updates, state = optimizer.update(g, state, w, inputs=x, targets=y)
      ...     w = optax.apply_updates(w, updates)
      >>> float(model.nll(w, x, y)) < 0.55
      True
    """
    if max_kl is not None:
        _check_positive("max_kl", max_kl)
        max_kl = _unit_step_max_kl(max_kl, learning_rate)
    return optax.chain(
        scale_by_natural_gradient(
            model, damping=damping, max_kl=max_kl, rescale=rescale, momentum=momentum, **options
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def _optimizer_signature() -> inspect.Signature:
    """``natural_gradient``'s full signature, for ``help`` and editors: the transform's
    keywords (with the optimizer's defaults) after ``model, learning_rate``."""
    transform = inspect.signature(scale_by_natural_gradient)
    optimizer = inspect.signature(natural_gradient).parameters
    keywords = [optimizer.get(name, parameter) for name, parameter in transform.parameters.items()]
    head = [optimizer["model"], optimizer["learning_rate"]]
    return transform.replace(parameters=head + keywords[1:])


natural_gradient.__signature__ = _optimizer_signature()
