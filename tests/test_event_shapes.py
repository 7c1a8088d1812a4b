"""Every Fisher path on outputs with several events per example, against the definition.

Outputs (N, L) multi-label, (N, T, C) per-token, (N, T, D) Gaussians — with and without
a padding mask. The reference is the Hessian in θ' at θ' = θ of the cross-entropy
between p(·|x, θ) and p(·|x, θ'), each family's cross-entropy written out below from
its closed form (not from the library), mean over examples, sum over events.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng
from natgrad_jax._solvers.batch import CurvatureBatch
from tests.helpers import (
    as_leaves,
    assert_ekfac_is_exact_in_its_eigenbasis,
    first_step_key,
    init_mlp,
    leaf_blocks,
    leaf_slices,
    mlp,
)

N, T, K = 4, 3, 2


# --- closed-form per-event cross-entropies E_{y~p}[-log q(y)], up to constants in q ---


def _categorical_ce(p, q):
    return -jnp.sum(jax.nn.softmax(p) * jax.nn.log_softmax(q), axis=-1)


def _bernoulli_ce(p, q):
    prob = jax.nn.sigmoid(p)
    return prob * jax.nn.softplus(-q) + (1 - prob) * jax.nn.softplus(q)


def _poisson_ce(p, q):
    return jnp.exp(q) - jnp.exp(p) * q


def _gaussian_ce(scale):
    return lambda p, q: jnp.sum((p - q) ** 2, axis=-1) / (2 * scale**2)


def _heteroscedastic_ce(p, q):
    (mean_p, log_scale_p), (mean_q, log_scale_q) = p, q
    var_p, var_q = jnp.exp(2 * log_scale_p), jnp.exp(2 * log_scale_q)
    return jnp.sum(log_scale_q + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q), axis=-1)


def _categorical_log_prob(outputs, y):
    return jnp.take_along_axis(jax.nn.log_softmax(outputs), y[..., None], axis=-1)[..., 0]


def _bernoulli_log_prob(outputs, y):
    return y * outputs - jax.nn.softplus(outputs)


def _poisson_log_prob(outputs, y):
    return y * outputs - jnp.exp(outputs) - jax.scipy.special.gammaln(y + 1)


def _gaussian_log_prob(scale):
    return lambda mean, y: jnp.sum(
        -0.5 * ((y - mean) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi), axis=-1
    )


def _heteroscedastic_log_prob(outputs, y):
    mean, log_scale = outputs
    z = (y - mean) * jnp.exp(-log_scale)
    return jnp.sum(-0.5 * z**2 - log_scale - 0.5 * np.log(2 * np.pi), axis=-1)


# --- models: token-wise MLPs (weights shared across positions) and multi-label heads ---


def _tokenwise(params, x):  # x (N, T, K) -> (N, T, out)
    return mlp(params, x)


def _heteroscedastic_tokenwise(params, x):
    out = mlp(params, x)
    half = out.shape[-1] // 2
    return out[..., :half], 0.3 * out[..., half:]


CASES = {
    # name: (likelihood, apply_fn, input shape, output size, cross-entropy, log_prob)
    "bernoulli-NL": (ng.Bernoulli(), mlp, (N, K), 3, _bernoulli_ce, _bernoulli_log_prob),
    "poisson-NL": (ng.Poisson(), mlp, (N, K), 3, _poisson_ce, _poisson_log_prob),
    "bernoulli-NTL": (ng.Bernoulli(), _tokenwise, (N, T, K), 2, _bernoulli_ce, _bernoulli_log_prob),
    "categorical-NTC": (
        ng.Categorical(),
        _tokenwise,
        (N, T, K),
        3,
        _categorical_ce,
        _categorical_log_prob,
    ),
    "gaussian-NTD": (
        ng.Gaussian(scale=0.7),
        _tokenwise,
        (N, T, K),
        2,
        _gaussian_ce(0.7),
        _gaussian_log_prob(0.7),
    ),
    "heteroscedastic-NTD": (
        ng.Gaussian(),
        _heteroscedastic_tokenwise,
        (N, T, K),
        4,
        _heteroscedastic_ce,
        _heteroscedastic_log_prob,
    ),
    # Single-event outputs, as before: they must stay right.
    "categorical-NC": (ng.Categorical(), mlp, (N, K), 3, _categorical_ce, _categorical_log_prob),
    "bernoulli-N": (
        ng.Bernoulli(),
        lambda p, x: mlp(p, x)[:, 0],
        (N, K),
        1,
        _bernoulli_ce,
        _bernoulli_log_prob,
    ),
}
MASKED = ("categorical-NTC", "heteroscedastic-NTD", "bernoulli-NL")


def _problem(name, masked=False):
    likelihood, apply_fn, in_shape, out_size, ce, log_prob = CASES[name]
    k_params, k_inputs, k_targets, k_mask = jax.random.split(jax.random.PRNGKey(3), 4)
    params = init_mlp(k_params, [in_shape[-1], 3, out_size])
    x = jax.random.normal(k_inputs, in_shape)
    outputs = apply_fn(params, x)
    targets = likelihood.sample(k_targets, outputs)
    weights = None
    if masked:
        event_shape = likelihood.batch_shape(outputs)
        # 0/1 padding and one fractional weight: each must multiply its event's terms.
        weights = (jax.random.uniform(k_mask, event_shape) > 0.35).astype(jnp.float64)
        weights = weights.at[0, 0].set(0.5).at[1].set(1.0)
        model = ng.Model(
            lambda p, inputs: (apply_fn(p, inputs[0]), inputs[1]), ng.Masked(likelihood)
        )
        return model, params, (x, weights), targets, ce, log_prob, apply_fn, weights
    model = ng.Model(apply_fn, likelihood)
    return model, params, x, targets, ce, log_prob, apply_fn, weights


def _weighted_mean(values, weights):
    if weights is not None:
        values = values * weights
    return jnp.mean(jnp.sum(values.reshape(values.shape[0], -1), axis=1))


@functools.partial(jax.jit, static_argnums=(0, 1))  # one compilation beats eager dispatch
def _reference_fisher(apply_fn, ce, params, x, weights):
    """∇²_{θ'} of the mean (weighted) cross-entropy at θ' = θ, from the closed forms."""
    flat, unravel = ravel_pytree(params)
    fixed = jax.lax.stop_gradient(apply_fn(params, x))
    return jax.hessian(lambda f: _weighted_mean(ce(fixed, apply_fn(unravel(f), x)), weights))(flat)


def _inputs_only(x):
    return x[0] if isinstance(x, tuple) else x


ALL = [(name, False) for name in CASES] + [(name, True) for name in MASKED]
IDS = [f"{name}{'-masked' if masked else ''}" for name, masked in ALL]


@functools.cache
def _cached_problem(name, masked):  # built once per case (each test enables float64)
    model, params, x, y, ce, log_prob, apply_fn, weights = _problem(name, masked)
    reference = _reference_fisher(apply_fn, ce, params, _inputs_only(x), weights)
    return dict(
        model=model,
        params=params,
        x=x,
        y=y,
        ce=ce,
        log_prob=log_prob,
        apply_fn=apply_fn,
        weights=weights,
        reference=np.asarray(reference),
    )


@pytest.fixture(params=ALL, ids=IDS)
def problem(request):
    return _cached_problem(*request.param)


def test_dense_fishers_equal_the_hessian_of_the_cross_entropy(problem):
    model, params, x, reference = (
        problem["model"],
        problem["params"],
        problem["x"],
        problem["reference"],
    )
    assert np.linalg.norm(reference) > 1e-3
    for fisher in (ng.fisher, ng.fisher_hessian):
        np.testing.assert_allclose(fisher(model, params, x), reference, rtol=1e-10, atol=1e-12)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jt_fout_j(apply_fn, ce, params, x, weights):
    """Jᵀ F_out J of one example, F_out the output-space Hessian of its (weighted) CE."""
    flat, unravel = ravel_pytree(params)
    outputs = apply_fn(params, x)
    out_flat, out_unravel = ravel_pytree(outputs)
    f_out = jax.hessian(lambda o: _weighted_mean(ce(outputs, out_unravel(o)), weights))(out_flat)
    jac = jax.jacobian(lambda f: ravel_pytree(apply_fn(unravel(f), x))[0])(flat)
    return jac.T @ f_out @ jac


def test_fisher_equals_mean_jt_fout_j_from_dense_jacobians(problem):
    """1/N Σᵢ Jᵢᵀ F_out,i Jᵢ, each example's Jacobian built with ``jax.jacobian``."""
    weights = problem["weights"]
    x = _inputs_only(problem["x"])
    total = sum(
        _jt_fout_j(
            problem["apply_fn"],
            problem["ce"],
            problem["params"],
            x[i : i + 1],
            None if weights is None else weights[i : i + 1],
        )
        for i in range(N)
    )
    np.testing.assert_allclose(total / N, problem["reference"], rtol=1e-10, atol=1e-12)


def test_matrix_free_products_equal_the_reference(problem):
    model, params, x = problem["model"], problem["params"], problem["x"]
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.PRNGKey(7), flat.shape)
    expected = problem["reference"] @ v
    got = ravel_pytree(ng.fisher_vector_product(model, params, x, unravel(v)))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["exact", "monte_carlo", "empirical"])
def test_fisher_gram_equals_the_reference_quadratic_forms(problem, kind):
    """VᵀFV from forward-mode products alone (what a step's quadratic model uses), with
    and without the forward pass of ``ng.value_and_grad`` and through the linearisation
    a plain step builds once (``model_pass``, which gives the loss too), against the
    dense Fishers."""
    model, params, x, y = (problem[k] for k in ("model", "params", "x", "y"))
    key = jax.random.PRNGKey(4)
    reference = {
        "exact": problem["reference"],
        "monte_carlo": ng.monte_carlo_fisher(model, params, x, key, 2),
        "empirical": ng.empirical_fisher(model, params, x, y),
    }[kind]
    flat, _ = ravel_pytree(params)
    vectors = jax.random.normal(jax.random.PRNGKey(8), (3, flat.size))
    (_, forward), _ = ng.value_and_grad(model)(params, x, y)
    plain = CurvatureBatch(model, params, x, kind, targets=y, key=key, num_samples=2)
    linearised = dataclasses.replace(plain, model_pass=plain.linearised())
    np.testing.assert_allclose(linearised.nll(), model.nll(params, x, y), rtol=1e-13)
    for batch in (plain, dataclasses.replace(plain, forward=forward), linearised):
        span = [as_leaves(params, v) for v in vectors]
        np.testing.assert_allclose(
            batch.fisher_gram(span), vectors @ reference @ vectors.T, rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize(
    "solver", ["dense", "woodbury", "cg", "diagonal", "diagonal in chunks", "block_diagonal"]
)
def test_every_exact_solver_solves_against_the_reference(problem, solver):
    """``"diagonal in chunks"`` takes the exact rows (up to 12 per example here) two at
    a time, each chunk's cotangent rows formed in the loop."""
    model, params, x, y, reference = (
        problem[k] for k in ("model", "params", "x", "y", "reference")
    )
    damping = 1e-2
    if solver == "cg":
        solver = ng.ConjugateGradient(tol=1e-13, max_iters=500)
    if solver == "diagonal in chunks":
        solver = ng.Diagonal(chunk_rows=2)
    tx = ng.scale_by_natural_gradient(model, fisher="exact", damping=damping, solver=solver)
    g = jax.grad(model.nll)(params, x, y)
    updates, _ = tx.update(g, tx.init(params), params, inputs=x)
    g, d = ravel_pytree(g)[0], ravel_pytree(updates)[0]
    if isinstance(solver, ng.Diagonal) or solver == "diagonal":
        matrix = np.diag(np.diag(reference))
    elif solver == "block_diagonal":
        matrix = leaf_blocks(reference, params)
    else:
        matrix = reference
    expected = np.linalg.solve(matrix + damping * np.eye(len(matrix)), g)
    np.testing.assert_allclose(d, expected, rtol=1e-7, atol=1e-10)


def test_ekfac_is_the_reference_blocks_diagonal_in_its_eigenbasis(problem):
    """EKFAC's second moments are exact whatever its eigenbasis: s = diag(Uᵀ F_ℓ U) for
    each leaf's block F_ℓ of the reference Fisher (U = U_left ⊗ U_right of the state),
    and the update solves (U diag(s) Uᵀ + λI) d = g leaf by leaf."""
    model, params, x, y, reference = (
        problem[k] for k in ("model", "params", "x", "y", "reference")
    )
    damping = 1e-2
    tx = ng.scale_by_natural_gradient(model, fisher="exact", damping=damping, solver="ekfac")
    g = jax.grad(model.nll)(params, x, y)
    updates, state = tx.update(g, tx.init(params), params, inputs=x)
    g, d = ravel_pytree(g)[0], ravel_pytree(updates)[0]
    assert_ekfac_is_exact_in_its_eigenbasis(
        state.curvature.leaves, reference, params, g, d, damping
    )


def test_scores_empirical_fisher_and_nll_follow_the_closed_form_log_likelihood(problem):
    model, params, x, y, weights = (problem[k] for k in ("model", "params", "x", "y", "weights"))
    apply_fn, log_prob = problem["apply_fn"], problem["log_prob"]
    flat, unravel = ravel_pytree(params)

    def log_likelihoods(f):  # (N,): the sum over each example's (weighted) events
        values = log_prob(apply_fn(unravel(f), _inputs_only(x)), y)
        if weights is not None:
            values = values * weights
        return jnp.sum(values.reshape(N, -1), axis=1)

    np.testing.assert_allclose(
        model.nll(params, x, y), -jnp.mean(log_likelihoods(flat)), rtol=1e-12
    )
    scores = jax.jit(jax.jacobian(log_likelihoods))(flat)
    np.testing.assert_allclose(
        ng.per_example_scores(model, params, x, y), scores, rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(
        ng.empirical_fisher(model, params, x, y), scores.T @ scores / N, rtol=1e-10, atol=1e-12
    )


def test_kl_divergence_is_the_cross_entropy_difference(problem):
    model, params, x, ce, apply_fn, weights = (
        problem[k] for k in ("model", "params", "x", "ce", "apply_fn", "weights")
    )
    moved = jax.tree.map(lambda a: a + 0.1, params)
    p = apply_fn(params, _inputs_only(x))
    q = apply_fn(moved, _inputs_only(x))
    expected = _weighted_mean(ce(p, q) - ce(p, p), weights)
    np.testing.assert_allclose(ng.kl_divergence(model, params, moved, x), expected, rtol=1e-10)


def test_monte_carlo_fisher_converges_to_the_reference(problem):
    model, params, x, reference = (problem[k] for k in ("model", "params", "x", "reference"))
    keys = jax.random.split(jax.random.PRNGKey(1), 2000)
    draws = jax.jit(jax.vmap(lambda k: ng.monte_carlo_fisher(model, params, x, k)))(keys)
    mean, stderr = draws.mean(0), draws.std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(mean - reference) <= 5 * stderr + 1e-10)


@pytest.mark.parametrize("name", MASKED)
def test_a_padded_position_changes_nothing(name):
    """Whatever the inputs and targets at a position with mask 0, every result is the same."""
    model, params, (x, weights), y, *_ = _problem(name, masked=True)
    index = tuple(np.argwhere(np.asarray(weights) == 0)[0])  # (example, position)
    # A per-token input at the padded position may change too; a multi-label example
    # has one input for all its labels, so only the padded label changes there.
    other_x = x.at[index].add(3.0) if x.ndim == 3 else x
    if name.startswith("categorical"):
        other_y = y.at[index].set((y[index] + 1) % 3)
    elif name.startswith("bernoulli"):
        other_y = y.at[index].set(1 - y[index])
    else:
        other_y = y.at[index].add(1.0)
    results = []
    for inputs, targets in (((x, weights), y), ((other_x, weights), other_y)):
        results.append(
            [
                ng.fisher(model, params, inputs),
                ng.empirical_fisher(model, params, inputs, targets),
                model.nll(params, inputs, targets),
            ]
        )
    for before, after in zip(*results, strict=True):
        np.testing.assert_allclose(after, before, rtol=1e-12, atol=1e-14)
    # And the position does count once unmasked.
    unmasked = (x, weights.at[index].set(1.0))
    assert not np.allclose(model.nll(params, unmasked, y), model.nll(params, unmasked, other_y))


def test_log_prob_and_kl_return_one_number_per_example():
    logits = jnp.zeros((N, T, 5))
    labels = jnp.zeros((N, T), jnp.int32)
    lik = ng.Categorical()
    assert lik.log_prob(logits, labels).shape == (N,)
    np.testing.assert_allclose(lik.log_prob(logits, labels), -T * np.log(5.0) * np.ones(N))
    assert ng.Bernoulli().kl(jnp.zeros((N, T)), jnp.ones((N, T))).shape == (N,)


def test_masked_rejects_a_mask_of_the_wrong_shape_or_dtype():
    lik = ng.Masked(ng.Categorical())
    logits, labels = jnp.zeros((N, T, 5)), jnp.zeros((N, T), jnp.int32)
    with pytest.raises(ValueError, match="batch shape"):
        lik.log_prob((logits, jnp.ones((N, T, 5))), labels)
    with pytest.raises(TypeError, match="astype"):
        lik.log_prob((logits, jnp.ones((N, T), bool)), labels)
    with pytest.raises(ValueError, match=r"\(outputs, mask\)"):
        lik.log_prob(logits, labels)
    with pytest.raises(ValueError, match="non-negative"):
        lik.check_targets((logits, -jnp.ones((N, T))), labels)
    with pytest.raises(TypeError, match="wraps one"):
        ng.Masked(lik)


@pytest.mark.parametrize(
    "case",
    [("poisson-NL", False), ("heteroscedastic-NTD", False), ("categorical-NTC", True)],
    ids=lambda case: f"{case[0]}{'-masked' * case[1]}",
)
def test_exact_kfac_factors_from_rows_in_chunks_equal_those_from_all_rows(case):
    """K-FAC's exact-Fisher factors and update with the rows taken two at a time (the
    last chunk overlapping the one before) equal those from all rows at once; on three
    shapes (the chunks themselves are those of the exact diagonal, checked on all)."""
    problem = _cached_problem(*case)
    model, params, x, y = (problem[k] for k in ("model", "params", "x", "y"))
    g = jax.grad(model.nll)(params, x, y)
    results = []
    for chunk_rows in (None, 2):
        tx = ng.scale_by_natural_gradient(
            model, fisher="exact", damping=1e-2, solver=ng.Kronecker(chunk_rows=chunk_rows)
        )
        results.append(tx.update(g, tx.init(params), params, inputs=x))
    for got, want in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[0]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "case",
    [("bernoulli-NL", False), ("poisson-NL", False), ("bernoulli-NL", True)],
    ids=lambda case: f"{case[0]}{'-masked' * case[1]}",
)
def test_exact_kfac_blocks_of_one_example_are_the_reference_blocks(case):
    """With one example and no weight shared over positions, a dense layer's Fisher
    block is (a aᵀ) ⊗ Σ_r g_r g_rᵀ over its output-Fisher rows r, one per label (and
    masked label): K-FAC's left ⊗ right is then each leaf's block of the reference."""
    model, params, x, _, ce, _, apply_fn, weights = _problem(*case)
    x = jax.tree.map(lambda a: a[:1], x)
    weights = None if weights is None else weights[:1]
    reference = np.asarray(_reference_fisher(apply_fn, ce, params, _inputs_only(x), weights))
    tx = ng.scale_by_natural_gradient(model, fisher="exact", damping=1e-2, solver="kronecker")
    g = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(g, tx.init(params), params, inputs=x)
    for leaf, where in zip(state.curvature.leaves, leaf_slices(params), strict=True):
        np.testing.assert_allclose(
            np.kron(leaf.left, leaf.right), reference[where, where], atol=1e-12
        )


MULTI_EVENT = [case for case in ALL if case[0] not in ("categorical-NC", "bernoulli-N")]


@pytest.mark.parametrize("kind", ["monte_carlo", "empirical"])
@pytest.mark.parametrize("solver", ["woodbury", "diagonal"])
@pytest.mark.parametrize("case", MULTI_EVENT, ids=lambda case: f"{case[0]}{'-masked' * case[1]}")
def test_factored_solvers_use_the_same_sampled_and_empirical_fishers(case, kind, solver):
    """The factored rows (capture) give the matrices of the dense Fisher functions
    (single-event outputs: tests/test_curvature.py)."""
    problem = _cached_problem(*case)
    model, params, x, y = (problem[k] for k in ("model", "params", "x", "y"))
    seed, damping = 5, 1e-2
    tx = ng.scale_by_natural_gradient(model, fisher=kind, damping=damping, solver=solver, seed=seed)
    g = jax.grad(model.nll)(params, x, y)
    updates, _ = tx.update(g, tx.init(params), params, inputs=x, targets=y)
    if kind == "empirical":
        matrix = ng.empirical_fisher(model, params, x, y)
    else:  # the transform's first step uses the second half of its seed's split
        matrix = ng.monte_carlo_fisher(model, params, x, first_step_key(seed))
    if solver == "diagonal":
        matrix = jnp.diag(jnp.diag(matrix))
    g = ravel_pytree(g)[0]
    expected = np.linalg.solve(matrix + damping * np.eye(len(matrix)), g)
    np.testing.assert_allclose(ravel_pytree(updates)[0], expected, rtol=1e-7, atol=1e-10)
