"""Matmul precision: the dense functions, factorisations and solves ignore a TF32 default.

On a CPU every precision computes in float32, so the numbers cannot show a TF32
rounding here; the traced programs can. Each test reads the precision of every
``dot_general`` JAX records while tracing under ``jax.default_matmul_precision
("tensorfloat32")`` (recorded as ``Precision.HIGH``), which is what a GPU executes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng
from natgrad_jax._linalg import batched_inverses, damped_inverse
from tests.helpers import equations, mlp_problem

HIGHEST = jax.lax.Precision.HIGHEST


def dot_precisions(jaxpr) -> list:
    """The precision of every dot_general in ``jaxpr`` and its sub-jaxprs (cond, scan, ...)."""
    found = []
    for eqn in equations(jaxpr, "dot_general"):
        precision = eqn.params["precision"]
        found.append(precision[0] if isinstance(precision, tuple) else precision)
    return found


def traced_under_tf32(fn, *args) -> list:
    with jax.default_matmul_precision("tensorfloat32"):
        return dot_precisions(jax.make_jaxpr(fn)(*args).jaxpr)


def _float32_problem(name="categorical"):
    model, params, inputs, targets = mlp_problem(name)
    params, inputs = jax.tree.map(lambda a: a.astype(jnp.float32), (params, inputs))
    if jnp.issubdtype(targets.dtype, jnp.floating):
        targets = targets.astype(jnp.float32)
    return model, params, inputs, targets


def test_the_setting_is_visible_in_a_traced_program():
    """The probe itself: a plain matmul traced under TF32 records HIGH, not HIGHEST."""
    precisions = traced_under_tf32(lambda a: a @ a, jnp.ones((2, 2), jnp.float32))
    assert precisions == [jax.lax.Precision.HIGH]


@pytest.mark.parametrize(
    "function",
    [
        lambda m, p, x, y: ng.fisher(m, p, x),
        lambda m, p, x, y: ng.fisher_hessian(m, p, x),
        lambda m, p, x, y: ng.monte_carlo_fisher(m, p, x, jax.random.key(0), 2),
        lambda m, p, x, y: ng.empirical_fisher(m, p, x, y),
        lambda m, p, x, y: ng.per_example_scores(m, p, x, y),
        lambda m, p, x, y: ng.fisher_vector_product(m, p, x, p),
        lambda m, p, x, y: ng.fisher_operator(m, p, x, kind="empirical", targets=y)(p),
        lambda m, p, x, y: ng.kl_divergence(m, p, jax.tree.map(jnp.zeros_like, p), x),
    ],
    ids=["fisher", "hessian", "monte_carlo", "empirical", "scores", "fvp", "operator", "kl"],
)
def test_dense_functions_compute_every_matmul_at_highest(function):
    model, params, inputs, targets = _float32_problem()
    precisions = traced_under_tf32(lambda p: function(model, p, inputs, targets), params)
    assert precisions and all(p == HIGHEST for p in precisions), precisions


def test_factorisations_run_at_highest():
    matrix = jnp.eye(3, dtype=jnp.float32) + 0.1
    precisions = traced_under_tf32(lambda a: damped_inverse(a, 1e-3), matrix)
    assert precisions and all(p == HIGHEST for p in precisions), precisions
    # K-FAC's and the block-diagonal's factorisations, wherever they are called from
    pair = [matrix, jnp.eye(2, dtype=jnp.float32)]
    precisions = traced_under_tf32(lambda fs: batched_inverses(fs, [1e-3, 1e-3]), pair)
    assert precisions and all(p == HIGHEST for p in precisions), precisions


def _update_precisions(solver, precision, fisher="exact"):
    model, params, inputs, targets = _float32_problem()
    tx = ng.scale_by_natural_gradient(model, solver=solver, fisher=fisher, precision=precision)
    state = tx.init(params)
    grads = jax.grad(model.nll)(params, inputs, targets)
    return traced_under_tf32(
        lambda g, s: tx.update(g, s, params, inputs=inputs, targets=targets), grads, state
    )


@pytest.mark.parametrize("solver", ["dense", "woodbury", "cg", "kronecker", "diagonal"])
def test_transform_statistics_follow_its_precision_option(solver):
    precisions = _update_precisions(solver, "highest", fisher="monte_carlo")
    assert precisions and all(p == HIGHEST for p in precisions), precisions
    default = _update_precisions(solver, None, fisher="monte_carlo")
    if solver in ("dense", "kronecker", "diagonal"):
        # statistics measured at the refresh follow the TF32 default ...
        assert jax.lax.Precision.HIGH in default
    if solver in ("dense", "woodbury", "cg"):
        # ... the solve does not (Woodbury and CG measure theirs inside the solve)
        assert HIGHEST in default


def test_autos_kfac_statistics_follow_the_precision_option_and_its_solve_does_not(monkeypatch):
    """``"auto"`` measures K-FAC's statistics inside its solve: those follow
    ``precision=`` (TF32 here by default), the factorisation, solve and rescaling not."""
    from natgrad_jax._solvers import auto

    monkeypatch.setattr(auto, "KRONECKER_MIN_PARAMS", 20)  # P = 31 here
    model, params, inputs, _ = _float32_problem()
    assert "picks kronecker" in ng.describe(model, params, inputs)
    default = _update_precisions("auto", None)
    assert jax.lax.Precision.HIGH in default and HIGHEST in default, default
    assert all(p == HIGHEST for p in _update_precisions("auto", "highest"))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"adapt_every": 3, "max_kl": 0.1},
        {"rescale": False, "momentum": False, "damping": 1e-2, "max_kl": 0.1},
        {"rescale": False, "momentum": False},
    ],
    ids=["defaults", "adapt_every", "kl_clipped", "damping_rule_alone"],
)
def test_the_steps_model_passes_follow_the_statistics_precision(options):
    """Besides the statistics, a step passes the model through its batch for the
    quadratic model's linearisation and forward-mode products, the damping rule's loss
    at θ − d and ``max_kl``'s exact Fisher (in the unmeasured steps of ``adapt_every``
    and without the quadratic model too), and without the quadratic model the damping
    rule's dᵀFd. Each runs at the statistics' precision
    (TF32 by default here), as the gradient does: at "highest" they cost the
    transformer LM's CPU step 10–13 ms, and a GPU's float32 matmuls several times their
    TF32 time. The algebra on their results stays at "highest". A per-example matmul
    is one with the batch's 7 examples in its output's shape."""
    model, params, inputs, targets = mlp_problem("categorical", num_examples=7)
    params, inputs = jax.tree.map(lambda a: a.astype(jnp.float32), (params, inputs))
    tx = ng.natural_gradient(model, 0.5, solver="kronecker", **options)
    grads = jax.grad(model.nll)(params, inputs, targets)
    update = lambda g, s: tx.update(g, s, params, inputs=inputs, targets=targets)
    with jax.default_matmul_precision("tensorfloat32"):
        jaxpr = jax.make_jaxpr(update)(grads, tx.init(params)).jaxpr
    per_example, others = [], []
    for eqn in equations(jaxpr, "dot_general"):
        is_per_example = 7 in eqn.outvars[0].aval.shape
        (per_example if is_per_example else others).append(eqn.params["precision"])
    high = (jax.lax.Precision.HIGH, jax.lax.Precision.HIGH)
    assert len(per_example) >= 6 and all(p == high for p in per_example), per_example
    assert (HIGHEST, HIGHEST) in others


def test_float32_update_under_tf32_matches_float64():
    """With precision="highest" a float32 update does not depend on the TF32 default."""
    model, params, inputs, targets = mlp_problem("categorical")
    f32 = _float32_problem()
    want_tx = ng.scale_by_natural_gradient(model, solver="dense", damping=1e-2)
    grads = jax.grad(model.nll)(params, inputs, targets)
    want, _ = want_tx.update(grads, want_tx.init(params), params, inputs=inputs)
    model32, params32, inputs32, targets32 = f32
    tx = ng.scale_by_natural_gradient(model32, solver="dense", damping=1e-2, precision="highest")
    grads32 = jax.grad(model32.nll)(params32, inputs32, targets32)
    with jax.default_matmul_precision("tensorfloat32"):
        got, _ = jax.jit(lambda g, s: tx.update(g, s, params32, inputs=inputs32))(
            grads32, tx.init(params32)
        )
    got, want = ravel_pytree(got)[0], ravel_pytree(want)[0]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("solver", ["kronecker", "diagonal"])
def test_bfloat16_parameters_train_with_float32_curvature(solver):
    """bfloat16 parameters, inputs and gradients: the curvature state and solve are
    float32, the updates bfloat16, and 15 steps bring the loss as far down as with
    float32 parameters (evaluated in float32)."""
    model, params, inputs, targets = _float32_problem()
    losses = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        p = jax.tree.map(lambda a, dtype=dtype: a.astype(dtype), params)
        x = inputs.astype(dtype)
        optimizer = ng.natural_gradient(model, 1.0, solver=solver)
        state = optimizer.init(p)
        for _ in range(15):
            g = jax.grad(model.nll)(p, x, targets)
            updates, state = optimizer.update(g, state, p, inputs=x, targets=targets)
            assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(dtype)}
            p = optax.apply_updates(p, updates)
        curvature = jax.tree.leaves(state[0].curvature)
        assert {a.dtype for a in curvature} == {jnp.dtype(jnp.float32)}
        as_float32 = jax.tree.map(lambda a: a.astype(jnp.float32), p)
        losses[dtype] = float(model.nll(as_float32, inputs, targets))
    start = float(model.nll(params, inputs, targets))
    assert losses[jnp.bfloat16] < 0.5 * start
    assert losses[jnp.bfloat16] < losses[jnp.float32] + 0.1 * (start - losses[jnp.float32])
