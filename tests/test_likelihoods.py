"""Likelihoods against scipy.stats and against Fisher matrices built by enumeration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy import integrate, special, stats

import natgrad_jax as ng
from tests.helpers import dense_output_fisher

KEY = jax.random.PRNGKey(0)


def _probs(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_categorical_log_prob_and_kl_match_numpy():
    logits_p = np.array([[0.3, -1.0, 2.0], [1.0, 1.0, 1.0]])
    logits_q = np.array([[1.0, 0.5, -0.2], [0.0, 2.0, -3.0]])
    labels = np.array([2, 0])
    lik = ng.Categorical()
    p, q = _probs(logits_p), _probs(logits_q)
    np.testing.assert_allclose(
        lik.log_prob(logits_p, labels), np.log(p[[0, 1], labels]), rtol=1e-12
    )
    np.testing.assert_allclose(lik.kl(logits_p, logits_q), (p * np.log(p / q)).sum(-1), rtol=1e-12)


def test_categorical_log_prob_with_masked_classes_and_labels_out_of_range():
    """A class masked with a logit of -inf (an action a policy may not take) leaves the
    other labels' log-probability and its gradient finite, the softmax's over the
    unmasked classes; a label outside [0, C) reads NaN, -1 included (not the last class)."""
    logits = np.array([[0.3, -np.inf, 2.0], [0.3, -np.inf, 2.0], [1.0, 0.0, 0.5], [1.0, 0.0, 0.5]])
    labels = np.array([2, 0, -1, 3])
    lik = ng.Categorical()
    got = np.asarray(lik.log_prob(logits, labels))
    p = _probs(logits[:1, [0, 2]])[0]
    np.testing.assert_allclose(got[:2], np.log([p[1], p[0]]), rtol=1e-12)
    assert np.all(np.isnan(got[2:]))
    gradient = jax.grad(lambda z: lik.log_prob(z, labels[:1]).sum())(logits[:1])
    np.testing.assert_allclose(gradient, [[-p[0], 0.0, 1.0 - p[1]]], rtol=1e-12)


def test_bernoulli_log_prob_and_kl_match_scipy():
    logits_p, logits_q = np.array([-2.0, 0.0, 3.0]), np.array([1.0, -0.5, 3.5])
    p, q = special.expit(logits_p), special.expit(logits_q)
    y = np.array([1.0, 0.0, 1.0])
    lik = ng.Bernoulli()
    np.testing.assert_allclose(lik.log_prob(logits_p, y), stats.bernoulli.logpmf(y, p), rtol=1e-12)
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    np.testing.assert_allclose(lik.kl(logits_p, logits_q), kl, rtol=1e-10)


def test_poisson_log_prob_and_kl_match_scipy():
    eta_p, eta_q = np.array([-1.0, 0.5, 2.0]), np.array([0.0, 0.7, 1.0])
    y = np.array([0.0, 3.0, 7.0])
    lik = ng.Poisson()
    np.testing.assert_allclose(
        lik.log_prob(eta_p, y), stats.poisson.logpmf(y, np.exp(eta_p)), rtol=1e-12
    )
    k = np.arange(200)[:, None]
    log_p, log_q = stats.poisson.logpmf(k, np.exp(eta_p)), stats.poisson.logpmf(k, np.exp(eta_q))
    kl_by_sum = np.sum(np.exp(log_p) * (log_p - log_q), axis=0)
    np.testing.assert_allclose(lik.kl(eta_p, eta_q), kl_by_sum, rtol=1e-9)


def test_gaussian_fixed_scale_log_prob_and_kl():
    mean_p, mean_q = np.array([[0.0, 1.0]]), np.array([[0.5, -1.0]])
    y = np.array([[0.3, 0.2]])
    lik = ng.Gaussian(scale=0.5)
    np.testing.assert_allclose(
        lik.log_prob(mean_p, y), stats.norm.logpdf(y, mean_p, 0.5).sum(-1), rtol=1e-12
    )
    np.testing.assert_allclose(
        lik.kl(mean_p, mean_q), ((mean_p - mean_q) ** 2).sum(-1) / (2 * 0.25), rtol=1e-12
    )


def test_gaussian_heteroscedastic_log_prob_and_kl_by_quadrature():
    mean_p, log_scale_p = np.array([[0.2]]), np.array([[-0.3]])
    mean_q, log_scale_q = np.array([[-0.4]]), np.array([[0.4]])
    lik = ng.Gaussian()
    y = np.array([[1.1]])
    np.testing.assert_allclose(
        lik.log_prob((mean_p, log_scale_p), y),
        stats.norm.logpdf(1.1, 0.2, np.exp(-0.3)).reshape(1),
        rtol=1e-12,
    )
    p = stats.norm(0.2, np.exp(-0.3))
    q = stats.norm(-0.4, np.exp(0.4))
    kl, _ = integrate.quad(lambda t: p.pdf(t) * (p.logpdf(t) - q.logpdf(t)), -20, 20)
    np.testing.assert_allclose(
        lik.kl((mean_p, log_scale_p), (mean_q, log_scale_q)), [kl], rtol=1e-9
    )


def _output_fisher_by_enumeration(lik, outputs, support):
    """E_y[∇ log p ∇ log pᵀ] w.r.t. the outputs, summing over an explicit support."""
    flat, unravel = ravel_pytree(outputs)

    def score(y):
        return jax.grad(lambda f: jnp.sum(lik.log_prob(unravel(f), y)))(flat)

    scores = jax.vmap(score)(support)
    weights = jnp.exp(jax.vmap(lambda y: jnp.sum(lik.log_prob(outputs, y)))(support))
    return jnp.einsum("k,ki,kj->ij", weights, scores, scores)


def _output_fisher_by_hessian(lik, outputs):
    """−E[∇² log p] as the Hessian of KL(p ‖ q) in q's outputs at q = p."""
    flat, unravel = ravel_pytree(outputs)
    return jax.hessian(lambda f: jnp.sum(lik.kl(outputs, unravel(f))))(flat)


@pytest.mark.parametrize(
    "lik, outputs, support",
    [
        (ng.Categorical(), np.array([[0.3, -1.0, 2.0]]), np.arange(3)[:, None]),
        (ng.Bernoulli(), np.array([0.7]), np.array([[0.0], [1.0]])),
        (ng.Poisson(), np.array([1.2]), np.arange(80.0)[:, None]),
    ],
)
def test_discrete_output_fisher_matches_enumerated_score_covariance(lik, outputs, support):
    expected = _output_fisher_by_enumeration(lik, outputs, support)
    np.testing.assert_allclose(dense_output_fisher(lik, outputs), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "lik, outputs",
    [
        (ng.Categorical(), np.array([[0.3, -1.0, 2.0, 0.1]])),
        (ng.Bernoulli(), np.array([-1.3])),
        (ng.Poisson(), np.array([0.4])),
        (ng.Gaussian(scale=0.3), np.array([[0.5, -1.0]])),
        (ng.Gaussian(), (np.array([[0.5, -1.0]]), np.array([[0.2, -0.7]]))),
    ],
)
def test_output_fisher_is_kl_hessian_and_square_root_squares_to_it(lik, outputs):
    """One distribution each: its square-root rows must square to its output Fisher."""
    dense = dense_output_fisher(lik, outputs)
    np.testing.assert_allclose(
        dense, _output_fisher_by_hessian(lik, outputs), rtol=1e-10, atol=1e-12
    )
    rows = lik.fisher_sqrt(outputs)
    flat_rows = jax.vmap(lambda row: ravel_pytree(row)[0])(rows)
    np.testing.assert_allclose(flat_rows.T @ flat_rows, dense, rtol=1e-10, atol=1e-12)


def test_gaussian_output_fisher_closed_forms():
    sigma = np.array([[0.5, 2.0]])
    mean = jnp.zeros((1, 2))
    np.testing.assert_allclose(
        dense_output_fisher(ng.Gaussian(), (mean, jnp.log(sigma))),
        np.diag([4.0, 0.25, 2.0, 2.0]),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        dense_output_fisher(ng.Gaussian(scale=0.5), mean), 4.0 * np.eye(2), rtol=1e-12
    )


@pytest.mark.parametrize(
    "lik, outputs, mean_fn",
    [
        (
            ng.Categorical(),
            np.array([0.3, -1.0, 2.0]),
            lambda o: jax.nn.softmax(o) @ np.arange(3.0),
        ),
        (ng.Bernoulli(), np.array(0.4), jax.nn.sigmoid),
        (ng.Poisson(), np.array(1.1), jnp.exp),
        (ng.Gaussian(scale=2.0), np.array([0.5]), lambda o: o[0]),
        (ng.Gaussian(), (np.array([0.5]), np.array([0.3])), lambda o: o[0][0]),
    ],
)
def test_sample_mean_matches_distribution_mean(lik, outputs, mean_fn):
    num = 20_000
    batched = jax.tree.map(lambda a: jnp.broadcast_to(a, (num, *a.shape)), outputs)
    draws = lik.sample(KEY, batched).reshape(num, -1)[:, 0].astype(jnp.float64)
    # Five standard errors: a wrong mean or scale fails, sampling noise does not.
    assert abs(draws.mean() - mean_fn(outputs)) < 5 * draws.std() / np.sqrt(num)
    assert lik.log_prob(batched, lik.sample(KEY, batched)).shape == (num,)


@pytest.mark.parametrize(
    "lik, outputs, targets",
    [
        (ng.Categorical(), np.array([[1e4, -1e4, 0.0]]), np.array([1])),
        (ng.Bernoulli(), np.array([1e4, -1e4]), np.array([0.0, 1.0])),
        (ng.Gaussian(), (np.zeros((1, 1)), np.array([[40.0]])), np.ones((1, 1))),
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_extreme_outputs_stay_finite(lik, outputs, targets, dtype):
    cast = jax.tree.map(lambda a: jnp.asarray(a, dtype), outputs)
    assert jnp.all(jnp.isfinite(lik.log_prob(cast, targets)))
    assert jnp.all(jnp.isfinite(lik.kl(cast, jax.tree.map(jnp.zeros_like, cast))))
    for leaf in jax.tree.leaves(lik.fisher_sqrt(cast)):
        assert jnp.all(jnp.isfinite(leaf)) and leaf.dtype == dtype


def test_bernoulli_log_prob_at_huge_logits_is_exact():
    lik = ng.Bernoulli()
    np.testing.assert_allclose(
        lik.log_prob(jnp.array([1e4, -1e4]), jnp.array([0.0, 1.0])), [-1e4, -1e4]
    )


def test_likelihoods_are_hashable_values():
    assert ng.Gaussian(scale=1.0) == ng.Gaussian(scale=1.0)
    assert hash(ng.Gaussian(scale=1.0)) == hash(ng.Gaussian(scale=1.0))
    assert ng.Gaussian() != ng.Gaussian(scale=1.0)
    assert len({ng.Categorical(), ng.Categorical(), ng.Bernoulli()}) == 2


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), "1.0"])
def test_gaussian_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match="positive finite"):
        ng.Gaussian(scale=scale)


def test_gaussian_rejects_outputs_of_the_other_form():
    with pytest.raises(ValueError, match="mean, log_scale"):
        ng.Gaussian().log_prob(jnp.zeros((2, 1)), jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match="Gaussian\\(\\)"):
        ng.Gaussian(scale=1.0).log_prob((jnp.zeros((2, 1)), jnp.zeros((2, 1))), jnp.zeros((2, 1)))
