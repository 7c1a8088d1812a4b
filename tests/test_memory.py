"""The memory guard's estimates against what XLA allocates for the compiled update.

For each representation, ``memory(...)`` (floats, from the shapes and the captured
layers) must be within a factor of 2 of the temporaries and outputs of the compiled
``update`` reported by ``jit(...).lower(...).compile().memory_analysis()``, on three
model sizes. Nothing is run: the update is only compiled.
"""

import math

import jax
import jax.numpy as jnp
import optax
import pytest

import natgrad_jax as ng
from natgrad_jax._capture import capture
from natgrad_jax._solvers.factored import captured_row_sizes
from natgrad_jax._transform import SOLVERS
from tests.helpers import init_mlp, mlp

SIZES = {  # (layer sizes, batch): P = 1,160, 2,762 and 85,002
    "small": ([16, 64, 8], 64),
    "medium": ([32, 64, 10], 512),
    "large": ([64, 256, 256, 10], 256),
}


def _update_memory(model, params, inputs, targets, solver, fisher):
    """XLA's memory analysis of the compiled ``update`` (λ = 1e-2, no memory guard);
    skips the test where the backend gives none. Nothing is run."""
    tx = ng.scale_by_natural_gradient(
        model, solver=solver, fisher=fisher, damping=1e-2, max_curvature_bytes=None
    )
    state = jax.eval_shape(tx.init, params)
    update = jax.jit(lambda g, s, p, x, y: tx.update(g, s, p, inputs=x, targets=y))
    analysis = update.lower(params, state, params, inputs, targets).compile().memory_analysis()
    if analysis is None:
        pytest.skip("this backend gives no memory analysis")
    return analysis


def _allocated_and_estimated(
    solver, sizes, batch, apply_fn=mlp, extra_params=None, fisher="monte_carlo"
):
    model = ng.Model(apply_fn, ng.Categorical())
    params = init_mlp(jax.random.PRNGKey(0), sizes, jnp.float32)
    if extra_params is not None:
        params = {"mlp": params, **extra_params}
    inputs = jax.ShapeDtypeStruct((batch, sizes[0]), jnp.float32)
    targets = jax.ShapeDtypeStruct((batch,), jnp.int32)
    analysis = _update_memory(model, params, inputs, targets, solver, fisher)
    allocated = analysis.temp_size_in_bytes + analysis.output_size_in_bytes

    shapes = tuple(leaf.shape for leaf in jax.tree.leaves(params))
    num_rows = batch * (sizes[-1] if fisher == "exact" else 1)  # exact: a row per class
    rows = captured_row_sizes(capture(apply_fn, params, inputs), shapes, num_rows, batch)
    floats = SOLVERS[solver]().memory(sum(map(math.prod, shapes)), num_rows, shapes, rows)
    return allocated, 4 * floats


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("solver", ["dense", "woodbury", "kronecker", "diagonal", "cg", "auto"])
def test_memory_estimates_are_within_two_of_what_xla_allocates(solver, size):
    sizes, batch = SIZES[size]
    if solver == "dense" and size == "large":
        sizes, batch = [32, 96, 10], 128  # P = 4,138: seven 85,002² matrices would not fit
    allocated, estimated = _allocated_and_estimated(solver, sizes, batch)
    assert allocated / 2 <= estimated <= 2 * allocated, (allocated, estimated)


def test_woodbury_on_captured_layers_is_not_refused_for_rows_it_never_forms():
    """M·P would be 85,002 × 4,096 floats (1.4 GB); capture holds a, g and the M×M
    kernel (~0.3 GB), under a 1 GB budget."""
    model = ng.Model(mlp, ng.Categorical())
    params = init_mlp(jax.random.PRNGKey(0), [64, 256, 256, 10], jnp.float32)
    x = jax.ShapeDtypeStruct((4096, 64), jnp.float32)
    y = jax.ShapeDtypeStruct((4096,), jnp.int32)
    for capture_layers, fits in ((True, True), (False, False)):
        solver = ng.Woodbury(capture=capture_layers)
        tx = ng.scale_by_natural_gradient(
            model, solver=solver, fisher="empirical", max_curvature_bytes=2**30
        )
        state = jax.eval_shape(tx.init, params)
        update = lambda g, s, p, x, y, tx=tx: tx.update(g, s, p, inputs=x, targets=y)
        if fits:
            jax.eval_shape(update, params, state, params, x, y)
        else:
            with pytest.raises(ValueError, match="over max_curvature_bytes"):
                jax.eval_shape(update, params, state, params, x, y)


def test_a_deep_autoencoder_of_2_8m_parameters_takes_a_default_step_on_the_cpu():
    """The classic K-FAC benchmark network, 784-1000-500-250-30-250-500-1000-784
    (P = 2,837,314), one jitted step of ``ng.natural_gradient(model, 1.0)`` (``"auto"``
    picks K-FAC here): no memory-guard refusal, and the loss does not go up (adaptive
    damping)."""
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    params = init_mlp(jax.random.PRNGKey(0), sizes, jnp.float32)
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == 2_837_314
    model = ng.Model(mlp, ng.Gaussian(scale=1.0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, 784))
    optimizer = ng.natural_gradient(model, 1.0)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(model.nll)(params, x, x)
        updates, state = optimizer.update(grads, state, params, inputs=x, targets=x)
        return optax.apply_updates(params, updates), state, loss

    new_params, _, loss = step(params, optimizer.init(params))
    new_loss = model.nll(new_params, x, x)
    assert jnp.isfinite(new_loss) and new_loss <= loss
    assert 'auto" picks kronecker' in ng.describe(model, params, x)


def _gated_mlp(params, x):
    """An MLP behind a learned input mixing tanh(W) that capture cannot explain."""
    return mlp(params["mlp"], x @ jnp.tanh(params["gate"]))


def test_auto_counts_the_kfac_state_it_keeps_while_it_picks_cg():
    """P ≥ 5,000, so the state keeps K-FAC's factors; the gate (4,096 of 89,098
    parameters) is not factored, so the exact Fisher's 2,560 rows get CG. The estimate
    (CG's memory plus that state) is within 2× of XLA's, and the state's part is within
    2× of what XLA allocates beyond an explicit ``solver="cg"``."""
    gate = {"gate": jnp.eye(64, dtype=jnp.float32)}
    sizes, batch = [64, 256, 256, 10], 256
    params = {"mlp": init_mlp(jax.random.PRNGKey(0), sizes, jnp.float32), **gate}
    assert 'auto" picks cg' in ng.describe(
        ng.Model(_gated_mlp, ng.Categorical()), params, jnp.zeros((batch, 64))
    )
    auto, cg = (
        _allocated_and_estimated(solver, sizes, batch, _gated_mlp, gate, fisher="exact")
        for solver in ("auto", "cg")
    )
    assert auto[0] / 2 <= auto[1] <= 2 * auto[0], auto
    state = 4 * ng.Kronecker().state_floats([leaf.shape for leaf in jax.tree.leaves(params)])
    assert auto[1] - cg[1] == state
    beyond_cg = auto[0] - cg[0]
    assert beyond_cg / 2 <= state <= 2 * beyond_cg, (beyond_cg, state)


@pytest.mark.parametrize(
    "solver, likelihood", [("kronecker", ng.Categorical()), ("diagonal", ng.Gaussian(scale=1.0))]
)
def test_exact_fisher_statistics_never_form_all_output_rows(solver, likelihood):
    """With 256 outputs the exact Fisher has 256 cotangent rows per example: 16 MiB of
    (R, N, outputs) rows at N = 64. Taken 32 rows at a time (the default chunk), the
    compiled update's temporaries stay under a third of that."""
    outputs, batch = 256, 64
    params = init_mlp(jax.random.PRNGKey(0), [outputs, 32, outputs], jnp.float32)
    model = ng.Model(mlp, likelihood)
    x = jax.ShapeDtypeStruct((batch, outputs), jnp.float32)
    y = jax.eval_shape(
        lambda: likelihood.sample(jax.random.PRNGKey(0), jnp.zeros((batch, outputs)))
    )
    analysis = _update_memory(model, params, x, y, solver, "exact")
    all_rows = outputs * batch * outputs * 4
    assert analysis.temp_size_in_bytes < all_rows / 3, (analysis.temp_size_in_bytes, all_rows)
