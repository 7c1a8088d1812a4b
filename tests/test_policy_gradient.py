"""Natural policy gradient: the transform with a policy-gradient estimate as its gradient.

The incoming gradient is an arbitrary vector (an advantage-weighted score estimate), not
the gradient of ``model.nll``; the transform must still return (F + λI)⁻¹g for the
policy's Fisher, and ``max_kl=δ`` must make the step's KL δ (TRPO's constraint).
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
N, STATE, ACTIONS = 12, 4, 3


def _states():
    return jax.random.normal(jax.random.PRNGKey(0), (N, STATE), jnp.float64)


def _categorical_policy():
    params = {
        "w": 0.5 * jax.random.normal(jax.random.PRNGKey(1), (STATE, ACTIONS), jnp.float64),
        "b": jnp.zeros(ACTIONS, jnp.float64),
    }
    model = ng.Model(lambda p, s: s @ p["w"] + p["b"], ng.Categorical())

    def kl(p, q, s):  # closed form, written here
        log_p = jax.nn.log_softmax(model.apply_fn(p, s))
        log_q = jax.nn.log_softmax(model.apply_fn(q, s))
        return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))

    return model, params, kl


def _gaussian_policy():
    """Continuous actions: mean s W, a learned state-independent log standard deviation."""
    params = {
        "w": 0.5 * jax.random.normal(jax.random.PRNGKey(2), (STATE, 2), jnp.float64),
        "log_std": jnp.array([-0.3, 0.2], jnp.float64),
    }

    def apply_fn(p, s):
        mean = s @ p["w"]
        return mean, jnp.broadcast_to(p["log_std"], mean.shape)

    model = ng.Model(apply_fn, ng.Gaussian())

    def kl(p, q, s):  # KL(N(m_p, σ_p²) ‖ N(m_q, σ_q²)), summed over the action dimensions
        (m_p, l_p), (m_q, l_q) = apply_fn(p, s), apply_fn(q, s)
        per_dim = l_q - l_p + (jnp.exp(2 * l_p) + (m_p - m_q) ** 2) / (2 * jnp.exp(2 * l_q)) - 0.5
        return jnp.mean(jnp.sum(per_dim, axis=-1))

    return model, params, kl


POLICIES = {"categorical": _categorical_policy, "gaussian": _gaussian_policy}


def _policy_gradient(model, params, states):
    """An advantage-weighted score estimate −(1/N) Σ A_i ∇ log π(a_i|s_i) (a descent direction
    for the surrogate), with actions drawn from the policy: not ∇ model.nll of any data."""
    actions = model.likelihood.sample(jax.random.PRNGKey(3), model.apply_fn(params, states))
    advantages = jax.random.normal(jax.random.PRNGKey(4), (N,), jnp.float64)
    return jax.grad(lambda p: -jnp.mean(advantages * model.log_likelihood(p, states, actions)))(
        params
    )


def _kl_hessian(kl, params, states):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: kl(params, unravel(f), states))(flat)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("solver", ["dense", "cg", "woodbury"])
def test_update_is_the_damped_natural_policy_gradient(policy, solver):
    model, params, kl = POLICIES[policy]()
    states = _states()
    grads = _policy_gradient(model, params, states)
    damping = 1e-3
    tx = ng.scale_by_natural_gradient(
        model,
        fisher="exact",
        damping=damping,
        solver=ng.ConjugateGradient(tol=1e-12) if solver == "cg" else solver,
    )
    updates, _ = tx.update(grads, tx.init(params), params, inputs=states)
    fisher = _kl_hessian(kl, params, states)
    g = ravel_pytree(grads)[0]
    want = np.linalg.solve(fisher + damping * np.eye(len(g)), g)
    np.testing.assert_allclose(ravel_pytree(updates)[0], want, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("max_kl", [1e-5, 1e-3])
def test_the_step_has_the_kl_of_the_trust_region(policy, max_kl):
    model, params, kl = POLICIES[policy]()
    states = _states()
    grads = _policy_gradient(model, params, states)
    optimizer = ng.natural_gradient(model, learning_rate=1.0, damping=1e-10, max_kl=max_kl)
    updates, _ = optimizer.update(grads, optimizer.init(params), params, inputs=states)
    moved = jax.tree.map(lambda p, u: p + u, params, updates)
    measured = float(ng.kl_divergence(model, params, moved, states))
    assert measured == pytest.approx(float(kl(params, moved, states)), rel=1e-10)
    # KL = δ + O(δ^{3/2}): the quadratic model is exact up to the cubic term
    assert measured == pytest.approx(max_kl, rel=20 * np.sqrt(max_kl))


@pytest.mark.parametrize(
    "method, fisher", [("natural policy gradient", "exact"), ("trpo-style", "monte_carlo")]
)
def test_policy_gradient_example_improves_its_returns(method, fisher, monkeypatch):
    """The example in a short configuration: 12 iterations of 8 CartPole episodes."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("policy_gradient", None)
    import policy_gradient

    returns = policy_gradient.train(method, seed=0, iterations=12, num_episodes=8, fisher=fisher)
    assert returns[0] < 30  # a uniform policy keeps the pole up for ~20 steps
    assert returns[-3:].mean() > 1.5 * returns[0]
