"""Bad input fails early with an error naming the fix; numerical extremes stay finite."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng
from tests.helpers import assert_resumes_identically, init_mlp, mlp, optional_import


def _categorical():
    params = init_mlp(jax.random.PRNGKey(0), [3, 4, 3])
    return ng.Model(mlp, ng.Categorical()), params, jax.random.normal(jax.random.PRNGKey(1), (5, 3))


@pytest.mark.parametrize(
    "targets, error, match",
    [
        (np.array([0, 1, 2, 3, 0]), ValueError, r"\[0, 3\)"),
        (np.array([0, 1, -1, 0, 0]), ValueError, r"\[0, 3\)"),
        (np.array([0.0, 1.0, 2.0, 0.0, 1.0]), TypeError, "integer class labels"),
        (np.zeros((5, 3), np.int32), ValueError, "shape"),
    ],
)
def test_bad_categorical_targets(targets, error, match):
    model, params, x = _categorical()
    with pytest.raises(error, match=match):
        ng.empirical_fisher(model, params, x, targets)
    tx = ng.natural_gradient(model, 0.1)
    g = jax.tree.map(jnp.zeros_like, params)
    with pytest.raises(error, match=match):
        tx.update(g, tx.init(params), params, inputs=x, targets=targets)


@pytest.mark.parametrize(
    "likelihood, targets, match",
    [
        (ng.Bernoulli(), np.array([0.0, 1.0, 0.5]), "0 or 1"),
        (ng.Poisson(), np.array([0.0, -1.0, 2.0]), "non-negative integers"),
        (ng.Poisson(), np.array([0.0, 1.5, 2.0]), "non-negative integers"),
    ],
)
def test_bad_scalar_targets(likelihood, targets, match):
    model = ng.Model(lambda w, x: x @ w, likelihood)
    with pytest.raises(ValueError, match=match):
        ng.per_example_scores(model, jnp.zeros(2), jnp.ones((3, 2)), targets)


def test_gaussian_target_shape_must_match_the_mean():
    model = ng.Model(lambda w, x: x @ w, ng.Gaussian(scale=1.0))
    with pytest.raises(ValueError, match=r"shape \(3, 1\)"):
        ng.empirical_fisher(model, jnp.zeros((2, 1)), jnp.ones((3, 2)), jnp.ones(3))


def test_targets_under_jit_are_checked_for_shape_only():
    model, params, x = _categorical()
    tx = ng.natural_gradient(model, 0.1, fisher="empirical")
    g = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(tx.update)
    update(g, tx.init(params), params, inputs=x, targets=jnp.array([0, 1, 2, 0, 1]))  # fine
    with pytest.raises(ValueError, match="shape"):
        update(g, tx.init(params), params, inputs=x, targets=jnp.zeros(5, jnp.int32)[:, None])


def _nll_cases():
    """(model, params, inputs, bad targets, match, good targets) for each mistake."""
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 2))
    w = jnp.array([0.3, -0.2])
    logistic = ng.Model(lambda w, x: x @ w, ng.Bernoulli())
    column = ng.Model(lambda w, x: (x @ w)[:, None], ng.Bernoulli())
    softmax = ng.Model(lambda w, x: x @ w, ng.Categorical())
    w_cat = jnp.zeros((2, 4))
    return {
        "plus-minus-one": (
            logistic,
            w,
            x,
            jnp.array([1.0, -1.0, 1.0, -1.0]),
            r"\(y \+ 1\) / 2",
            jnp.array([1.0, 0.0, 1.0, 0.0]),
        ),
        "label-equal-to-C": (
            softmax,
            w_cat,
            x,
            jnp.array([0, 4, 1, 2]),
            r"\[0, 4\).*\[4\]",
            jnp.array([0, 3, 1, 2]),
        ),
        "one-hot": (
            softmax,
            w_cat,
            x,
            jax.nn.one_hot(jnp.array([0, 3, 1, 2]), 4, dtype=jnp.int32),
            "argmax",
            jnp.array([0, 3, 1, 2]),
        ),
        "column-outputs-flat-targets": (
            column,
            w,
            x,
            jnp.array([1.0, 0.0, 1.0, 0.0]),
            r"shape \(4, 1\)",
            jnp.array([[1.0], [0.0], [1.0], [0.0]]),
        ),
    }


@pytest.mark.parametrize("case", list(_nll_cases()))
def test_model_nll_refuses_bad_targets_with_the_fix(case):
    model, params, x, bad, match, good = _nll_cases()[case]
    assert np.isfinite(float(model.nll(params, x, good)))
    with pytest.raises(ValueError, match=match):
        model.nll(params, x, bad)


@pytest.mark.parametrize("case", ["plus-minus-one", "label-equal-to-C"])
def test_model_nll_under_jit_flags_out_of_support_targets_with_nan(case):
    """Inside jit values cannot raise: the loss and gradient become NaN, not a wrong number."""
    model, params, x, bad, _, good = _nll_cases()[case]
    nll = jax.jit(model.nll)
    assert np.isfinite(float(nll(params, x, good)))
    np.testing.assert_allclose(nll(params, x, good), model.nll(params, x, good), rtol=1e-12)
    assert np.isnan(float(nll(params, x, bad)))
    assert np.all(np.isnan(ravel_pytree(jax.jit(jax.grad(model.nll))(params, x, bad))[0]))


def test_model_nll_under_jit_still_refuses_bad_shapes():
    model, params, x, bad, _, _ = _nll_cases()["column-outputs-flat-targets"]
    with pytest.raises(ValueError, match=r"shape \(4, 1\)"):
        jax.jit(model.nll)(params, x, bad)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("solver", ["dense", "woodbury", "cg", "kronecker", "diagonal"])
def test_huge_logits_give_finite_fisher_and_updates(dtype, solver):
    model, params, x = _categorical()
    params = jax.tree.map(lambda p: (p * 1e4).astype(dtype), params)  # logits of order ±1e4
    x = x.astype(dtype)
    y = jnp.array([0, 1, 2, 0, 1])
    assert float(jnp.max(jnp.abs(mlp(params, x)))) > 1e3
    g = jax.grad(model.nll)(params, x, y)
    tx = ng.natural_gradient(model, 0.1, damping=1e-3, solver=solver)
    updates, _ = jax.jit(tx.update)(g, tx.init(params), params, inputs=x, targets=y)
    for leaf, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert leaf.dtype == p.dtype and bool(jnp.all(jnp.isfinite(leaf)))
    assert bool(jnp.all(jnp.isfinite(ng.fisher(model, params, x))))


def test_state_round_trips_through_pickle_and_resumes_identically():
    model, params, x = _categorical()
    y = jnp.array([0, 1, 2, 0, 1])
    assert_resumes_identically(
        model, params, x, y, lambda tree: pickle.loads(pickle.dumps(jax.device_get(tree))), steps=6
    )


def test_monte_carlo_fisher_is_deterministic_given_the_seed():
    model, params, x = _categorical()
    y = jnp.array([0, 1, 2, 0, 1])
    g = jax.grad(model.nll)(params, x, y)

    def update(seed):
        tx = ng.scale_by_natural_gradient(model, fisher="monte_carlo", seed=seed)
        return ravel_pytree(tx.update(g, tx.init(params), params, inputs=x)[0])[0]

    np.testing.assert_array_equal(update(3), update(3))
    assert not np.allclose(update(3), update(4))


hypothesis = optional_import("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
@hypothesis.given(
    hidden=st.integers(1, 6),
    num_examples=st.integers(1, 12),
    damping=st.floats(1e-6, 1e2),
    likelihood=st.sampled_from(["categorical", "gaussian", "poisson"]),
    seed=st.integers(0, 2**16),
)
def test_update_is_finite_and_solves_the_damped_system(
    hidden, num_examples, damping, likelihood, seed
):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    outputs = {"categorical": 3, "gaussian": 2, "poisson": 1}[likelihood]
    params = init_mlp(keys[0], [2, hidden, outputs])
    x = jax.random.normal(keys[1], (num_examples, 2))
    if likelihood == "categorical":
        model = ng.Model(mlp, ng.Categorical())
    elif likelihood == "gaussian":
        model = ng.Model(mlp, ng.Gaussian(scale=0.5))
    else:
        model = ng.Model(lambda p, x: mlp(p, x)[:, 0], ng.Poisson())
    y = model.likelihood.sample(keys[2], model.apply_fn(params, x))
    g = jax.grad(model.nll)(params, x, y)
    tx = ng.scale_by_natural_gradient(model, damping=damping)
    updates, _ = tx.update(g, tx.init(params), params, inputs=x, targets=y)
    d, flat_g = ravel_pytree(updates)[0], ravel_pytree(g)[0]
    assert bool(jnp.all(jnp.isfinite(d)))
    f = ng.fisher(model, params, x)
    residual = (f + damping * jnp.eye(len(f))) @ d - flat_g
    assert float(jnp.linalg.norm(residual)) <= 1e-8 * (1 + float(jnp.linalg.norm(flat_g)))


def _categorical_fisher_by_jacobian(apply_fn, params, inputs):
    """(Jᵀ F_out J / N, J) of a categorical model: J the whole batch's (N·C, P) Jacobian
    of its logits, F_out = diag(p) − ppᵀ for each example."""
    flat, unravel = ravel_pytree(params)
    jacobian = jax.jacobian(lambda v: apply_fn(unravel(v), inputs).ravel())(flat)
    probabilities = jax.nn.softmax(apply_fn(params, inputs))
    output_fisher = jax.scipy.linalg.block_diag(
        *[jnp.diag(p) - jnp.outer(p, p) for p in probabilities]
    )
    return jacobian.T @ output_fisher @ jacobian / len(probabilities), jacobian


def _fixed_batch_model(batch):
    """A model written for one batch size: it reshapes its hidden layer to (batch, ...)."""

    def apply(params, x):
        h = jnp.tanh(x @ params["w"]).reshape(batch, 2, 2)  # not x.shape[0]
        return h.reshape(batch, 4) @ params["out"]

    params = {
        "w": jax.random.normal(jax.random.PRNGKey(0), (3, 4)) / 2,
        "out": jax.random.normal(jax.random.PRNGKey(1), (4, 3)) / 2,
    }
    return ng.Model(apply, ng.Categorical()), params


def test_auto_takes_cg_for_a_model_of_one_batch_size():
    """A model that only runs at its batch size: the capture reads no layer (it cannot
    trace N + 1 examples) and per-example gradients fail, so "auto" (which would take
    Woodbury's kernel of per-example rows for these 24 parameters) solves by CG, to
    (F + λI) d = g of the whole batch."""
    model, params = _fixed_batch_model(6)
    x = jax.random.normal(jax.random.PRNGKey(2), (6, 3))
    y = jnp.array([0, 1, 2, 0, 1, 2])
    assert 'solver="auto" picks cg' in ng.describe(model, params, x)
    gradient = jax.grad(model.nll)(params, x, y)
    tx = ng.scale_by_natural_gradient(model, damping=0.1)
    step, _ = tx.update(gradient, tx.init(params), params, inputs=x, targets=y)
    flat = lambda tree: ravel_pytree(tree)[0]
    fisher = ng.fisher_hessian(model, params, x)
    np.testing.assert_allclose(
        (fisher + 0.1 * jnp.eye(fisher.shape[0])) @ flat(step), flat(gradient), rtol=1e-4, atol=1e-6
    )


def test_a_model_of_one_batch_size_is_told_why_and_cg_solves_it():
    """Per-example gradients evaluate the model on batches of one: a model that only runs
    at its batch size gets that said with its own error, ``describe`` gives the reason
    for each leaf, and the remedy the note names (CG's whole-batch products) solves
    (F + λI) d = g with F = Jᵀ F_out J / N of the whole batch's Jacobian."""
    model, params = _fixed_batch_model(6)
    x = jax.random.normal(jax.random.PRNGKey(2), (6, 3))
    y = jnp.array([0, 1, 2, 0, 1, 2])
    gradient = jax.grad(model.nll)(params, x, y)
    dense = ng.natural_gradient(model, 1.0, solver="dense", damping=0.1)
    with pytest.raises(TypeError, match="reshape") as raised:
        dense.update(gradient, dense.init(params), params, inputs=x, targets=y)
    if hasattr(raised.value, "add_note"):  # Python ≥ 3.11
        assert any("one example at a time" in note for note in raised.value.__notes__)
    reasons = ng.describe(model, params, x)
    assert reasons.count("apply_fn fails on N + 1 examples (TypeError)") == 2
    failing = "dense, woodbury, diagonal, block_diagonal, kronecker, ekfac"
    assert (
        f"fails on one example (TypeError), which their per-example gradients evaluate: {failing}"
        in reasons
    )

    cg = ng.scale_by_natural_gradient(model, damping=0.1, solver=ng.ConjugateGradient(tol=1e-12))
    step, _ = cg.update(gradient, cg.init(params), params, inputs=x, targets=y)
    fisher, _ = _categorical_fisher_by_jacobian(model.apply_fn, params, x)
    expected = jnp.linalg.solve(fisher + 0.1 * jnp.eye(len(fisher)), ravel_pytree(gradient)[0])
    np.testing.assert_allclose(ravel_pytree(step)[0], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("likelihood", [ng.Gaussian(scale=1.0), ng.Categorical()])
def test_one_number_per_example_is_told_to_take_an_event_axis(likelihood):
    """(N,) outputs are one event of a vector likelihood: the error says so and names the
    (N, 1) shape, with which the loss is the mean of the examples' own terms."""
    params = init_mlp(jax.random.PRNGKey(0), [3, 4, 1])
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    targets = {"Gaussian": jnp.linspace(-1.0, 1.0, 5), "Categorical": jnp.zeros(5, jnp.int32)}
    y = targets[type(likelihood).__name__]
    flat = ng.Model(lambda p, x: mlp(p, x)[:, 0], likelihood)
    with pytest.raises(ValueError, match=r"shape \(5,\) are one example: .* \(N, 1\)"):
        flat.nll(params, x, y)
    column = ng.Model(mlp, likelihood)
    y = y[:, None] if isinstance(likelihood, ng.Gaussian) else y
    outputs = mlp(params, x)[:, 0]
    expected = (
        jnp.mean(0.5 * (outputs - y[:, 0]) ** 2 + 0.5 * jnp.log(2 * jnp.pi))
        if isinstance(likelihood, ng.Gaussian)
        else 0.0  # one class: log-probability 0
    )
    np.testing.assert_allclose(column.nll(params, x, y), expected, atol=1e-12)


def _dropout_mlp(params, inputs):
    """A 3-4-3 tanh MLP with dropout (keep 0.75) on its hidden layer, each example's mask
    drawn from its own key."""
    x, keys = inputs
    hidden = jnp.tanh(x @ params[0]["w"] + params[0]["b"])
    keep = jax.vmap(lambda key: jax.random.bernoulli(key, 0.75, hidden.shape[1:]))(keys)
    return (hidden * keep / 0.75) @ params[1]["w"] + params[1]["b"]


def test_dropout_takes_one_key_per_example_and_keeps_its_masks():
    """One key for the batch is refused with the way out; with a key per example the
    Fisher is that of the masked network, Jᵀ F_out J / N of the whole batch's Jacobian
    (each example evaluated alone keeps its mask), which the dense and the Woodbury
    (captured layers) steps solve with."""
    model = ng.Model(_dropout_mlp, ng.Categorical())
    params = init_mlp(jax.random.PRNGKey(0), [3, 4, 3])
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 3))
    key = jax.random.PRNGKey(2)
    with pytest.raises(ValueError, match=r"jax.random.split\(key, N\)"):
        ng.fisher(model, params, (x, key))
    inputs = (x, jax.random.split(key, 6))
    expected, jacobian = _categorical_fisher_by_jacobian(_dropout_mlp, params, inputs)
    assert float(jnp.abs(jacobian).min(initial=1.0)) == 0.0  # some units are dropped
    np.testing.assert_allclose(ng.fisher(model, params, inputs), expected, atol=1e-12)
    gradient = jax.grad(model.nll)(params, inputs, jnp.array([0, 1, 2, 0, 1, 2]))
    solution = jnp.linalg.solve(expected + 0.1 * jnp.eye(len(expected)), ravel_pytree(gradient)[0])
    for solver in ("dense", "woodbury"):  # Woodbury's kernel from the captured layers
        tx = ng.scale_by_natural_gradient(model, damping=0.1, solver=solver)
        step, _ = tx.update(gradient, tx.init(params), params, inputs=inputs)
        np.testing.assert_allclose(ravel_pytree(step)[0], solution, rtol=1e-9, atol=1e-12)


def test_a_value_shared_by_the_batch_among_the_inputs_is_told_where_it_goes():
    """A scalar among the inputs has no example axis: refused with the two ways out, and
    the first (a closure) gives the Fisher of the same function of the examples."""
    params = init_mlp(jax.random.PRNGKey(0), [3, 4, 3])
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    tempered = ng.Model(lambda p, inputs: mlp(p, inputs[0]) / inputs[1], ng.Categorical())
    with pytest.raises(ValueError, match=r"close over it in apply_fn, or give it the example"):
        ng.fisher(tempered, params, (x, jnp.asarray(2.0)))
    closed = ng.Model(lambda p, x: mlp(p, x) / 2.0, ng.Categorical())
    broadcast = (x, jnp.full((5,), 2.0)[:, None])
    np.testing.assert_allclose(
        ng.fisher(closed, params, x), ng.fisher(tempered, params, broadcast), atol=1e-14
    )
