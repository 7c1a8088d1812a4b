"""Dense, Monte-Carlo, empirical and matrix-free Fishers vs closed forms and dense references."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng
from tests.helpers import MLP_NAMES, dense_output_fisher, init_mlp, mlp, mlp_problem

N = 5


def _constant_outputs(fn):
    """apply_fn that broadcasts per-parameter outputs over a batch of N dummy inputs."""
    return lambda params, x: jax.tree.map(
        lambda o: jnp.broadcast_to(o, (x.shape[0], *jnp.shape(o))), fn(params)
    )


# --- closed forms -------------------------------------------------------------------


@pytest.mark.parametrize(
    "to_log_scale, expected",
    [
        (
            lambda sigma: jnp.log(sigma),
            lambda sigma: np.diag([1 / sigma**2, 2 / sigma**2]),
        ),  # (μ, σ)
        (
            lambda log_sigma: log_sigma,
            lambda log_sigma: np.diag([np.exp(-2 * log_sigma), 2.0]),
        ),  # (μ, log σ)
        (
            lambda tau: -0.5 * jnp.log(tau),
            lambda tau: np.diag([tau, 1 / (2 * tau**2)]),
        ),  # (μ, τ = 1/σ²)
    ],
    ids=["mean-scale", "mean-log-scale", "mean-precision"],
)
def test_gaussian_fisher_in_three_parametrisations(to_log_scale, expected):
    model = ng.Model(_constant_outputs(lambda p: (p[:1], to_log_scale(p[1:]))), ng.Gaussian())
    for value in (0.4, 1.7):
        params = jnp.array([0.3, value])
        np.testing.assert_allclose(
            ng.fisher(model, params, jnp.zeros((N, 1))), expected(value), rtol=1e-12
        )


@pytest.mark.parametrize(
    "likelihood, to_output, expected",
    [
        (
            ng.Bernoulli(),
            lambda p: jnp.log(p) - jnp.log1p(-p),
            lambda p: 1 / (p * (1 - p)),
        ),  # mean p
        (ng.Bernoulli(), lambda z: z, lambda z: 1 / (2 + 2 * np.cosh(z))),  # logit: σ(1−σ)
        (ng.Poisson(), jnp.log, lambda rate: 1 / rate),  # rate λ
        (ng.Poisson(), lambda eta: eta, np.exp),  # log-rate η
    ],
    ids=["bernoulli-mean", "bernoulli-logit", "poisson-rate", "poisson-log-rate"],
)
def test_scalar_fisher_closed_forms(likelihood, to_output, expected):
    model = ng.Model(_constant_outputs(lambda p: to_output(p[0])), likelihood)
    for value in (0.2, 0.65):
        f = ng.fisher(model, jnp.array([value]), jnp.zeros((N, 1)))
        np.testing.assert_allclose(f, [[expected(value)]], rtol=1e-12)


def test_categorical_fisher_in_logits_is_diag_p_minus_ppt():
    logits = jnp.array([0.5, -1.0, 2.0, 0.0])
    model = ng.Model(_constant_outputs(lambda p: p), ng.Categorical())
    p = np.asarray(jax.nn.softmax(logits))
    np.testing.assert_allclose(
        ng.fisher(model, logits, jnp.zeros((N, 1))),
        np.diag(p) - np.outer(p, p),
        rtol=1e-12,
        atol=1e-15,
    )


def _regression_data(seed=0, n=20, d=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=d)


def test_linear_regression_fisher_is_xtx_over_n_sigma_squared():
    x, w = _regression_data()
    sigma = 0.3
    model = ng.Model(lambda w, x: (x @ w)[:, None], ng.Gaussian(scale=sigma))
    np.testing.assert_allclose(ng.fisher(model, w, x), x.T @ x / (len(x) * sigma**2), rtol=1e-12)


def test_logistic_regression_fisher_is_xtwx_over_n():
    x, w = _regression_data()
    p = 1 / (1 + np.exp(-x @ w))
    model = ng.Model(lambda w, x: x @ w, ng.Bernoulli())
    expected = x.T @ (x * (p * (1 - p))[:, None]) / len(x)
    np.testing.assert_allclose(ng.fisher(model, w, x), expected, rtol=1e-12)
    np.testing.assert_allclose(ng.fisher_hessian(model, w, x), expected, rtol=1e-10)


def test_poisson_regression_fisher_is_xt_diag_rate_x_over_n():
    x, w = _regression_data()
    rate = np.exp(x @ w)
    model = ng.Model(lambda w, x: x @ w, ng.Poisson())
    np.testing.assert_allclose(
        ng.fisher(model, w, x), x.T @ (x * rate[:, None]) / len(x), rtol=1e-12
    )


# --- the Fisher functions agree with each other on MLPs with several leaves ----------


@pytest.mark.parametrize("name", MLP_NAMES)
def test_fisher_equals_hessian_of_expected_nll(name):
    model, params, inputs, _ = mlp_problem(name)
    f = ng.fisher(model, params, inputs)
    p = ravel_pytree(params)[0].size
    assert f.shape == (p, p)
    np.testing.assert_allclose(f, f.T, atol=1e-14)
    assert np.linalg.eigvalsh(f).min() > -1e-12
    np.testing.assert_allclose(ng.fisher_hessian(model, params, inputs), f, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", MLP_NAMES)
def test_fisher_equals_mean_jt_fout_j_from_dense_jacobians(name):
    model, params, inputs, _ = mlp_problem(name)
    flat, unravel = ravel_pytree(params)

    def outputs_flat(f, x):
        return ravel_pytree(model.apply_fn(unravel(f), x[None]))[0]

    expected = 0.0
    for x in inputs:
        jac = jax.jit(jax.jacobian(outputs_flat))(flat, x)  # (K, P)
        f_out = dense_output_fisher(model.likelihood, model.apply_fn(params, x[None]))
        expected = expected + jac.T @ f_out @ jac
    np.testing.assert_allclose(
        ng.fisher(model, params, inputs), expected / len(inputs), rtol=1e-10, atol=1e-13
    )


@pytest.mark.parametrize("name", ["categorical", "heteroscedastic", "poisson"])
def test_monte_carlo_fisher_is_unbiased(name):
    model, params, inputs, _ = mlp_problem(name, num_examples=3)
    exact = ng.fisher(model, params, inputs)
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    draws = jax.jit(jax.vmap(lambda k: ng.monte_carlo_fisher(model, params, inputs, k)))(keys)
    mean, stderr = draws.mean(0), draws.std(0) / np.sqrt(len(keys))
    # Every entry within 5 standard errors of its estimate (plus float round-off).
    assert np.all(np.abs(mean - exact) <= 5 * stderr + 1e-10)
    # And the estimator is not trivially exact: single draws scatter around the mean.
    assert np.max(np.abs(draws[0] - exact)) > 10 * np.max(stderr)


def test_monte_carlo_num_samples_averages_single_sample_estimates():
    model, params, inputs, _ = mlp_problem("categorical")
    key = jax.random.PRNGKey(3)
    many = ng.monte_carlo_fisher(model, params, inputs, key, num_samples=4)
    outputs = model.apply_fn(params, inputs)
    targets = jax.vmap(lambda k: model.likelihood.sample(k, outputs))(jax.random.split(key, 4))
    by_hand = jnp.mean(
        jnp.stack([ng.empirical_fisher(model, params, inputs, y) for y in targets]), 0
    )
    np.testing.assert_allclose(many, by_hand, rtol=1e-12)
    np.testing.assert_array_equal(
        many, ng.monte_carlo_fisher(model, params, inputs, key, num_samples=4)
    )


@pytest.mark.parametrize("num_samples", [0, -2, 1.5, "3"])
def test_monte_carlo_rejects_bad_num_samples(num_samples):
    model, params, inputs, _ = mlp_problem("categorical")
    with pytest.raises(ValueError, match="num_samples"):
        ng.monte_carlo_fisher(model, params, inputs, jax.random.PRNGKey(0), num_samples)


@pytest.mark.parametrize("name", MLP_NAMES)
def test_per_example_scores_match_jacobian_of_log_likelihood(name):
    model, params, inputs, targets = mlp_problem(name)
    flat, unravel = ravel_pytree(params)
    jac = jax.jacobian(lambda f: model.log_likelihood(unravel(f), inputs, targets))(flat)
    np.testing.assert_allclose(
        ng.per_example_scores(model, params, inputs, targets), jac, rtol=1e-10, atol=1e-13
    )
    grad_nll = ravel_pytree(jax.grad(model.nll)(params, inputs, targets))[0]
    np.testing.assert_allclose(-jac.mean(0), grad_nll, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", MLP_NAMES)
def test_empirical_fisher_is_mean_score_outer_product_and_differs_from_exact(name):
    model, params, inputs, targets = mlp_problem(name)
    scores = ng.per_example_scores(model, params, inputs, targets)
    emp = ng.empirical_fisher(model, params, inputs, targets)
    np.testing.assert_allclose(
        emp, np.einsum("ni,nj->ij", scores, scores) / len(scores), rtol=1e-12, atol=1e-15
    )
    exact = ng.fisher(model, params, inputs)
    assert np.linalg.norm(emp - exact) > 0.05 * np.linalg.norm(exact)


# --- matrix-free --------------------------------------------------------------------


@pytest.mark.parametrize("name", MLP_NAMES)
def test_fisher_vector_product_equals_dense_fisher_times_vector(name):
    model, params, inputs, _ = mlp_problem(name)
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.PRNGKey(7), flat.shape)
    fv = ng.fisher_vector_product(model, params, inputs, unravel(v))
    assert jax.tree.structure(fv) == jax.tree.structure(params)
    np.testing.assert_allclose(
        ravel_pytree(fv)[0], ng.fisher(model, params, inputs) @ v, rtol=1e-10, atol=1e-13
    )


# --- the seed's central claim: F is the curvature of the KL divergence ---------------


@pytest.mark.parametrize("name", MLP_NAMES)
def test_hessian_of_kl_at_equal_parameters_is_fisher(name):
    model, params, inputs, _ = mlp_problem(name)
    flat, unravel = ravel_pytree(params)
    hess = jax.jit(jax.hessian(lambda f: ng.kl_divergence(model, params, unravel(f), inputs)))(flat)
    np.testing.assert_allclose(hess, ng.fisher(model, params, inputs), rtol=1e-9, atol=1e-12)
    assert abs(float(ng.kl_divergence(model, params, params, inputs))) < 1e-14


@pytest.mark.parametrize("name", MLP_NAMES)
def test_kl_is_half_quadratic_form_to_third_order(name):
    model, params, inputs, _ = mlp_problem(name)
    flat, unravel = ravel_pytree(params)
    f = ng.fisher(model, params, inputs)
    delta = jax.random.normal(jax.random.PRNGKey(11), flat.shape)
    errors = []
    for t in (1e-1, 1e-2, 1e-3):
        kl = ng.kl_divergence(model, params, unravel(flat + t * delta), inputs)
        quadratic = 0.5 * t**2 * delta @ f @ delta
        errors.append(abs(float(kl / quadratic) - 1.0))
    # The relative error is O(t): it shrinks about tenfold per decade of t.
    assert errors[-1] < 1e-2
    assert errors[1] < 0.3 * errors[0] and errors[2] < 0.3 * errors[1]


# --- float32 --------------------------------------------------------------------------


@pytest.mark.parametrize("name", MLP_NAMES)
def test_float32_paths_agree_with_float64(name):
    model, params, inputs, targets = mlp_problem(name)
    params32, inputs32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, inputs))
    targets32 = (
        targets.astype(jnp.float32) if jnp.issubdtype(targets.dtype, jnp.floating) else targets
    )
    flat32, unravel32 = ravel_pytree(params32)
    v32 = jnp.ones_like(flat32)
    # The float32 side under a TF32 default (what float32 means on recent NVIDIA GPUs):
    # the dense functions must not depend on it (see tests/test_precision.py).
    with jax.default_matmul_precision("tensorfloat32"):
        results = {
            "fisher": (ng.fisher(model, params32, inputs32), ng.fisher(model, params, inputs)),
            "empirical": (
                ng.empirical_fisher(model, params32, inputs32, targets32),
                ng.empirical_fisher(model, params, inputs, targets),
            ),
            "fvp": (
                ravel_pytree(ng.fisher_vector_product(model, params32, inputs32, unravel32(v32)))[
                    0
                ],
                ng.fisher(model, params, inputs) @ jnp.ones(flat32.shape),
            ),
        }
    for got, want in results.values():
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())


def test_bad_inputs_raise_clear_errors():
    model, params, inputs, _ = mlp_problem("categorical")
    with pytest.raises(TypeError, match=r"ng\.Model"):
        ng.fisher(lambda p, x: x, params, inputs)
    with pytest.raises(ValueError, match="leading"):
        ng.fisher(model, params, jnp.zeros(()))
    with pytest.raises(ValueError, match="one target per example"):
        ng.empirical_fisher(model, params, inputs, jnp.zeros(len(inputs) + 1, jnp.int32))
    with pytest.raises(ValueError, match="pass targets"):
        ng.fisher_operator(model, params, inputs, kind="empirical")
    with pytest.raises(ValueError, match="Unknown Fisher kind"):
        ng.fisher_operator(model, params, inputs, kind="true")
    with pytest.raises(TypeError, match="likelihood"):
        ng.Model(lambda p, x: x, "categorical")


# --- memory guards ----------------------------------------------------------------------


def _large_mlp_problem():
    """784-256-256-10 MLP (P = 269,322) on 64 examples: a 290 GB Fisher."""
    params = init_mlp(jax.random.PRNGKey(0), [784, 256, 256, 10], dtype=jnp.float32)
    x = jnp.zeros((64, 784), jnp.float32)
    y = jnp.zeros(64, jnp.int32)
    return ng.Model(mlp, ng.Categorical()), params, x, y


@pytest.mark.parametrize(
    "call",
    [
        lambda m, p, x, y: ng.fisher(m, p, x),
        lambda m, p, x, y: ng.fisher_hessian(m, p, x),
        lambda m, p, x, y: ng.monte_carlo_fisher(m, p, x, jax.random.PRNGKey(0)),
        lambda m, p, x, y: ng.empirical_fisher(m, p, x, y),
        # The (N, P) rows alone are 69 MB: refused under a 10 MB budget.
        lambda m, p, x, y: ng.per_example_scores(m, p, x, y, max_bytes=10**7),
    ],
    ids=["fisher", "fisher_hessian", "monte_carlo_fisher", "empirical_fisher", "scores"],
)
def test_dense_functions_refuse_a_large_model_before_allocating(call):
    model, params, x, y = _large_mlp_problem()
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"GiB.*fisher_vector_product.*max_bytes=None"):
        call(model, params, x, y)
    assert time.perf_counter() - start < 5.0  # refused, not attempted


def test_max_bytes_none_disables_the_guard_and_a_small_budget_enables_it():
    model, params, inputs, targets = mlp_problem("categorical")
    tiny = 100
    with pytest.raises(ValueError, match="over max_bytes"):
        ng.fisher(model, params, inputs, max_bytes=tiny)
    with pytest.raises(ValueError, match="over max_bytes"):
        ng.per_example_scores(model, params, inputs, targets, max_bytes=tiny)
    np.testing.assert_array_equal(
        ng.fisher(model, params, inputs, max_bytes=None), ng.fisher(model, params, inputs)
    )
