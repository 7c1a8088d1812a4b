"""The memory guard's estimates against what XLA allocates for the compiled update.

For each representation, ``memory(...)`` (floats, from the shapes and the captured
layers) must be within a factor of 2 of the temporaries and outputs of the compiled
``update`` reported by ``jit(...).lower(...).compile().memory_analysis()``, on three
model sizes. Nothing is run: the update is only compiled.
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import natgrad_jax as ng
from natgrad_jax._capture import capture
from natgrad_jax._memory import (
    DEFAULT_MAX_CURVATURE_BYTES,
    SOLVERS,
    exact_rows_refusal,
    problem_of,
)
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._solvers.factored import captured_row_sizes
from tests.helpers import benchmark_module, init_mlp, mlp

SIZES = {  # (layer sizes, batch): P = 1,160, 2,762 and 85,002
    "small": ([16, 64, 8], 64),
    "medium": ([32, 64, 10], 512),
    "large": ([64, 256, 256, 10], 256),
}


def _unlimited(solver):
    """The solver named ``solver`` without a limit on the exact rows it back-propagates
    (``exact_rows_refusal``: these tests measure memory, not that guard)."""
    solver = SOLVERS[solver]() if isinstance(solver, str) else solver
    if solver.exact_rows_limit() is None:
        return solver
    return dataclasses.replace(solver, max_exact_rows=None)


def _update_memory(model, params, inputs, targets, solver, fisher):
    """XLA's memory analysis of the compiled ``update`` (λ = 1e-2, no memory guard nor
    limit on the exact rows); skips the test where the backend gives none. Nothing is
    run."""
    tx = ng.scale_by_natural_gradient(
        model, solver=_unlimited(solver), fisher=fisher, damping=1e-2, max_curvature_bytes=None
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
    "solver, likelihood",
    [
        ("kronecker", ng.Categorical()),
        ("ekfac", ng.Categorical()),
        ("diagonal", ng.Gaussian(scale=1.0)),
    ],
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


# --- sequence and image models ---------------------------------------------------------


def _language_model():
    """A transformer LM of benchmarks/transformer_lm.py: 32 tokens of a 40-character
    vocabulary, D = 32, one block; per-token Categorical (1,280 exact rows an example)."""
    lm = benchmark_module("transformer_lm")
    params = lm.init_transformer(jax.random.PRNGKey(0), 40, 32, 1, 32)
    tokens = jax.ShapeDtypeStruct((8, 32), jnp.int32)
    return ng.Model(lm.transformer, ng.Categorical()), params, tokens, tokens


def _cnn():
    """The CNN of benchmarks/cnn.py with 8 and 16 channels (a 1,024 × 10 head), batch 32."""
    cnn = benchmark_module("cnn")
    params = cnn.init_cnn(jax.random.PRNGKey(0), (8, 16))
    images = jax.ShapeDtypeStruct((32, 8, 8, 1), jnp.float32)
    labels = jax.ShapeDtypeStruct((32,), jnp.int32)
    return ng.Model(cnn.cnn, ng.Categorical()), params, images, labels


def _autoencoder():
    """The 2.8M-parameter deep autoencoder of benchmarks/autoencoder.py, batch 8
    (784 exact rows an example)."""
    autoencoder = benchmark_module("autoencoder")
    params = init_mlp(jax.random.PRNGKey(0), autoencoder.SIZES, jnp.float32)
    x = jax.ShapeDtypeStruct((8, 784), jnp.float32)
    return ng.Model(autoencoder.autoencoder, ng.Gaussian(scale=1.0)), params, x, x


def _estimated_bytes(model, params, x, y, solver, fisher):
    """The guard's estimate, from the batch an update would see."""
    dtype = jnp.float32
    batch = CurvatureBatch(model, params, x, fisher, y)
    return problem_of(params, dtype, batch).bytes_for(SOLVERS[solver]())


@pytest.mark.parametrize("make", [_language_model, _cnn, _autoencoder], ids=lambda f: f.__name__)
def test_estimates_on_sequence_and_image_models_are_within_two_of_xla(make):
    """Every representation, exact and Monte-Carlo Fisher: where the guard admits the
    update at the default budget its estimate is within 2× of XLA's temporaries and
    outputs of the compiled update; the defaults are always admitted."""
    model, params, x, y = make()
    admitted, wrong = [], []
    for fisher in ("exact", "monte_carlo"):
        for solver in SOLVERS:
            estimated = _estimated_bytes(model, params, x, y, solver, fisher)
            if estimated > DEFAULT_MAX_CURVATURE_BYTES:
                continue
            analysis = _update_memory(model, params, x, y, solver, fisher)
            allocated = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
            admitted.append((solver, fisher))
            if not allocated / 2 <= estimated <= 2 * allocated:
                wrong.append((solver, fisher, allocated / 2**20, estimated / 2**20))
    assert ("auto", "exact") in admitted and ("kronecker", "monte_carlo") in admitted
    assert not wrong, f"(solver, fisher, XLA MiB, estimated MiB): {wrong}"


def _update_shapes(tx, params, x, y):
    update = lambda p, x, y: tx.update(p, tx.init(p), p, inputs=x, targets=y)
    return jax.eval_shape(update, params, x, y)


def _guard_passes(model, params, x, y, budget, **options) -> bool:
    tx = ng.scale_by_natural_gradient(model, max_curvature_bytes=budget, **options)
    try:
        _update_shapes(tx, params, x, y)
    except ValueError as error:
        assert "over max_curvature_bytes" in str(error) or "over its max_exact_rows" in str(error)
        return False
    return True


def test_a_refusal_names_every_remedy_that_passes_the_guard_and_no_other():
    """K-FAC with the exact Fisher of a transformer LM under half its estimate: each
    solver the message offers passes at that budget and each it leaves out is refused;
    the Monte-Carlo Fisher and the smaller batch it offers pass."""
    model, params, x, y = _language_model()
    kfac = _unlimited("kronecker")  # its 1,280 exact rows an example taken, as asked
    budget = _estimated_bytes(model, params, x, y, "kronecker", "exact") / 2
    assert not _guard_passes(model, params, x, y, budget, solver=kfac)
    tx = ng.scale_by_natural_gradient(model, solver=kfac, max_curvature_bytes=budget)
    with pytest.raises(ValueError) as refused:
        _update_shapes(tx, params, x, y)
    message = str(refused.value)
    offered = re.search(r"solver=([^;]*);", message).group(1)
    for name in ("auto", "cg", "diagonal"):  # the diagonal: refused for its exact rows
        passes = _guard_passes(model, params, x, y, budget, solver=name)
        assert (repr(name) in offered) == passes, (name, passes, message)
    assert "fisher='monte_carlo'" in message
    assert _guard_passes(model, params, x, y, budget, solver=kfac, fisher="monte_carlo")
    examples = int(re.search(r"a batch of at most (\d+) examples", message).group(1))
    smaller = jax.ShapeDtypeStruct((examples, *x.shape[1:]), x.dtype)
    assert _guard_passes(model, params, smaller, smaller, budget, solver=kfac)
    assert message.endswith("or raise max_curvature_bytes.")


def test_describe_says_whether_the_defaults_would_be_refused():
    model, params, x, _ = _language_model()
    assert "within max_curvature_bytes = 4.00 GiB" in ng.describe(model, params, x)
    needed = _estimated_bytes(model, params, x, x, "auto", "exact")
    text = ng.describe(model, params, x, max_curvature_bytes=needed / 2)
    assert "an update would be refused: solver 'auto' would allocate" in text
    assert "fisher='monte_carlo'" not in text.split("refused:")[0]


# --- exact-Fisher rows back-propagated one by one ---------------------------------------


def _per_token_model(positions=40, classes=30, width=8, examples=4):
    """Per-token Categorical logits (N, T, C): T·C = 1,200 exact rows an example."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {
        "embed": 0.3 * jax.random.normal(keys[0], (classes, width)),
        "out": 0.3 * jax.random.normal(keys[1], (width, classes)),
    }
    model = ng.Model(lambda p, t: jnp.tanh(p["embed"][t]) @ p["out"], ng.Categorical())
    tokens = jax.random.randint(keys[2], (examples, positions), 0, classes)
    return model, params, tokens, jnp.roll(tokens, -1, axis=1)


@pytest.mark.parametrize("name", ["kronecker", "ekfac", "diagonal"])
def test_exact_statistics_over_the_row_limit_are_refused_for_remedies_that_run(name):
    """K-FAC, EKFAC and the diagonal back-propagate every output-Fisher row of an
    example at a refresh, one backward pass each: with the exact Fisher of a per-token
    model (1,200 rows an example here; 6,080 on the LM benchmark: minutes
    a refresh) the update is refused, and each remedy the message names runs."""
    model, params, x, y = _per_token_model()
    grads = jax.grad(model.nll)(params, x, y)

    def update(**options):
        tx = ng.natural_gradient(model, 0.5, **options)
        updates, _ = tx.update(grads, tx.init(params), params, inputs=x, targets=y)
        return updates

    with pytest.raises(ValueError, match="1,200 output-Fisher rows") as refused:
        update(solver=name)
    message = str(refused.value)
    solver_class = type(SOLVERS[name]())
    remedies = {
        "fisher='monte_carlo'": {"solver": name, "fisher": "monte_carlo"},
        "solver='cg'": {"solver": "cg"},
        f"solver=ng.{solver_class.__name__}(max_exact_rows=None)": {
            "solver": solver_class(max_exact_rows=None)
        },
    }
    for offered, options in remedies.items():
        assert offered in message, (offered, message)
        updates = update(**options)
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(updates))
    update(solver=solver_class(max_exact_rows=1200))  # the limit is inclusive
    with pytest.raises(ValueError, match="max_exact_rows = 1,199"):
        update(solver=solver_class(max_exact_rows=1199))
    for bad in (0, -2, 1.5, True, "1024"):
        with pytest.raises(ValueError, match="max_exact_rows must be an int"):
            solver_class(max_exact_rows=bad)


def test_eigenbasis_adam_refuses_exact_statistics_over_the_row_limit_with_its_own_remedies():
    """``ng.eigenbasis_adam(fisher="exact")`` measures K-FAC's statistics from every
    output-Fisher row: refused over the limit, as K-FAC is, offering the Monte-Carlo
    Fisher and its own unlimited form; not CG, which would not be Adam in an
    eigenbasis. Each remedy runs."""
    model, params, x, y = _per_token_model()
    grads = jax.grad(model.nll)(params, x, y)

    def update(**options):
        tx = ng.eigenbasis_adam(model, 1e-3, **options)
        updates, _ = tx.update(grads, tx.init(params), params, inputs=x, targets=y)
        return updates

    with pytest.raises(ValueError, match="1,200 output-Fisher rows") as refused:
        update(fisher="exact")
    message = str(refused.value)
    assert "fisher='monte_carlo'" in message and "solver='cg'" not in message
    assert "ng.eigenbasis_adam's max_exact_rows=None" in message
    for options in ({}, {"fisher": "exact", "max_exact_rows": None}):
        updates = update(**options)
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(updates))
    with pytest.raises(ValueError, match="max_exact_rows must be an int"):
        ng.eigenbasis_adam(model, 1e-3, max_exact_rows=0)


def _transforms_verdict(model, params, x, y, solver, budget) -> str:
    """What ``ng.natural_gradient(model, lr, solver=solver)`` does with an update at
    ``budget``: "runs", or the guard that refuses it ("rows" or "memory"). Traced only
    (``jax.eval_shape``): the guards raise at trace time."""
    tx = ng.natural_gradient(model, 0.5, solver=solver, max_curvature_bytes=budget)
    grads = jax.eval_shape(jax.grad(model.nll), params, x, y)
    try:
        state = jax.eval_shape(tx.init, params)
        jax.eval_shape(lambda g, s: tx.update(g, s, params, inputs=x, targets=y), grads, state)
    except ValueError as refused:
        if "output-Fisher rows" in str(refused):
            return "rows"
        assert "over max_curvature_bytes" in str(refused), refused
        return "memory"
    return "runs"


@pytest.mark.parametrize("budget", ["default", "dense's estimate", "one byte less", None])
def test_describe_gives_each_named_solvers_verdict_as_an_update_would(budget):
    """For every solver a user may name, ``describe`` says what an update with it does
    at this budget: runs, or is refused for its memory or its exact rows (the per-token
    model: 1,200 rows an example); each verdict is the transform's own, at the edge of
    dense's estimate too."""
    model, params, x, y = _per_token_model()
    batch = CurvatureBatch(model, params, x, "exact", y)
    dtype = jax.tree.leaves(params)[0].dtype  # float64 under the tests' x64
    dense_bytes = problem_of(params, dtype, batch).bytes_for(ng.Dense())
    budget = {
        "default": DEFAULT_MAX_CURVATURE_BYTES,
        "dense's estimate": dense_bytes,
        "one byte less": dense_bytes - 1,
    }.get(budget, budget)
    text = ng.describe(model, params, x, max_curvature_bytes=budget)
    said = {}
    for line in text.split('solver="..." by name, fisher="exact":\n')[1].splitlines():
        head, _, names = line.strip().partition(": ")
        verdict = {"runs": "runs", "refused, over max_curvature_bytes": "memory"}.get(head, "rows")
        if verdict == "rows":
            assert head.startswith("refused, 1,200 output-Fisher rows an example over "), head
            assert "max_exact_rows = 1,024" in head
        for name in names.split(", "):
            said[name.partition(" (about ")[0]] = verdict
    named = set(SOLVERS) - {"auto", "eigenbasis_adam"}
    assert set(said) == named, text
    for name in named:
        assert said[name] == _transforms_verdict(model, params, x, y, name, budget), name
    assert said["kronecker"] == said["ekfac"] == said["diagonal"] == "rows"
    assert said["cg"] == "runs"
    assert (said["dense"] == "memory") == (budget == dense_bytes - 1)


def test_the_row_limits_remedies_are_the_ones_the_memory_guard_admits():
    """Under a budget that admits K-FAC with the Monte-Carlo Fisher exactly, the row
    refusal offers CG and the unlimited K-FAC only where their estimates fit; the
    Monte-Carlo Fisher and the model's own fisher='monte_carlo' rows pass it."""
    model, params, x, y = _language_model()
    batch = CurvatureBatch(model, params, x, "exact", y)
    problem = problem_of(params, jnp.float32, batch)
    kfac = ng.Kronecker()
    sampled = dataclasses.replace(problem, num_rows=problem.num_examples, kind="monte_carlo")
    budget = sampled.bytes_for(kfac)
    message = exact_rows_refusal(kfac, problem, budget)
    assert "1,280 output-Fisher rows" in message and "fisher='monte_carlo'" in message
    cg_fits = problem.bytes_for(ng.ConjugateGradient()) <= budget
    assert ("solver='cg'" in message) == cg_fits
    unlimited_fits = problem.bytes_for(kfac) <= budget
    assert ("max_exact_rows=None" in message) == unlimited_fits
    assert exact_rows_refusal(kfac, sampled, budget) is None
    assert exact_rows_refusal(ng.ConjugateGradient(), problem, budget) is None


def test_a_solver_of_its_own_with_a_row_limit_gets_the_remedies_it_has():
    """A user's solver may set a limit without a ``max_exact_rows`` field: the refusal
    then offers the Monte-Carlo Fisher and CG only."""

    class FewRows(ng.Solver):  # not a dataclass
        name = "few_rows"

        def init(self, params, dtype):
            return ()

        def memory(self, num_params, num_rows, leaf_shapes=(), rows=None):
            return num_params

        def solve(self, state, batch, vector, damping):
            return vector, state

        def exact_rows_limit(self):
            return 10

    model, params, x, y = _per_token_model()
    problem = problem_of(params, jnp.float32, CurvatureBatch(model, params, x, "exact", y))
    message = exact_rows_refusal(FewRows(), problem)
    assert "max_exact_rows = 10." in message and "fisher='monte_carlo'" in message
    assert "solver='cg'" in message and "max_exact_rows=None" not in message
