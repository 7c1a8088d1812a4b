"""Natural policy gradient on CartPole-v1: REINFORCE with Adam, NPG and a TRPO-style step.

A policy is an ``ng.Model`` whose inputs are states and whose outputs are the logits of
a ``Categorical`` over actions. The gradient handed to the transform is the
policy-gradient estimate (advantage-weighted scores), not ``model.nll``'s, and the Fisher
is the policy's own, measured at the visited states:

* **REINFORCE + Adam**: the policy-gradient estimate through ``optax.adam`` (three
  learning rates);
* **natural policy gradient** (Kakade 2001): θ ← θ + η (F + λI)⁻¹ ĝ, η = 0.5;
* **TRPO-style** (Schulman et al. 2015): the natural direction scaled so the step's
  quadratic KL is δ (``max_kl=δ``), then a backtracking line search on the surrogate
  that also checks the measured KL (``ng.kl_divergence``) stays ≤ δ; δ = 0.01.

The CartPole-v1 dynamics (Barto, Sutton & Anderson 1983, as in Gymnasium: reward 1 per
step, episodes end when the pole leans past 12° or the cart leaves ±2.4, or after 500
steps) are written in JAX below, so a whole batch of episodes is one ``lax.scan``.
Prints mean ± std over seeds of the return against environment steps and saves a plot.

    python examples/policy_gradient.py            # about 2 minutes on 2 CPU cores
    python examples/policy_gradient.py --iterations 10 --seeds 2   # a quick look
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import natgrad_jax as ng

MAX_STEPS = 500
RESULTS = pathlib.Path(__file__).parent / "results"

# --- CartPole-v1 ---------------------------------------------------------------------------

GRAVITY, CART_MASS, POLE_MASS, HALF_LENGTH, FORCE, TAU = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
THETA_LIMIT, X_LIMIT = 12 * 2 * np.pi / 360, 2.4


def cartpole_step(state, action):
    """One Euler step of the cart-pole; returns (next state, whether it has failed)."""
    x, x_dot, theta, theta_dot = state
    force = jnp.where(action == 1, FORCE, -FORCE)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    total_mass = CART_MASS + POLE_MASS
    temp = (force + POLE_MASS * HALF_LENGTH * theta_dot**2 * sin) / total_mass
    theta_acc = (GRAVITY * sin - cos * temp) / (
        HALF_LENGTH * (4.0 / 3.0 - POLE_MASS * cos**2 / total_mass)
    )
    x_acc = temp - POLE_MASS * HALF_LENGTH * theta_acc * cos / total_mass
    state = jnp.stack(
        [x + TAU * x_dot, x_dot + TAU * x_acc, theta + TAU * theta_dot, theta_dot + TAU * theta_acc]
    )
    failed = (jnp.abs(state[0]) > X_LIMIT) | (jnp.abs(state[2]) > THETA_LIMIT)
    return state, failed


# --- the policy -----------------------------------------------------------------------------


def init_policy(key, hidden=32):
    k1, _ = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (4, hidden)) / 2.0,
        "b1": jnp.zeros(hidden),
        "w2": jnp.zeros((hidden, 2)),  # a uniform policy to start with
        "b2": jnp.zeros(2),
    }


def logits(params, states):
    return jnp.tanh(states @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def apply_policy(params, inputs):
    """inputs = (states (N, 4), weights (N,)): a weight per visited state, 0 after an
    episode's end, so the Fisher is the mean over the states actually visited."""
    states, weights = inputs
    return logits(params, states), weights


POLICY = ng.Model(apply_policy, ng.Masked(ng.Categorical()))


def rollout(params, key, num_episodes):
    """A batch of episodes: states (E, T, 4), actions (E, T), alive (E, T) in {0, 1}."""
    reset_key, action_key = jax.random.split(key)
    start = jax.random.uniform(reset_key, (num_episodes, 4), minval=-0.05, maxval=0.05)

    def step(carry, key):
        states, alive = carry
        actions = jax.random.categorical(key, logits(params, states))
        next_states, failed = jax.vmap(cartpole_step)(states, actions)
        return (next_states, alive & ~failed), (states, actions, alive)

    keys = jax.random.split(action_key, MAX_STEPS)
    carry = (start, jnp.ones(num_episodes, bool))
    _, (states, actions, alive) = jax.lax.scan(step, carry, keys)
    return states.swapaxes(0, 1), actions.swapaxes(0, 1), alive.swapaxes(0, 1).astype(jnp.float32)


def advantages(alive, discount=0.99):
    """Normalised reward-to-go minus a per-time-step baseline (reward 1 while alive)."""

    def back(future, reward):
        value = reward + discount * future
        return value, value

    _, to_go = jax.lax.scan(back, jnp.zeros(alive.shape[0]), alive.T, reverse=True)
    to_go = to_go.T * alive
    baseline = jnp.sum(to_go, 0) / jnp.maximum(jnp.sum(alive, 0), 1.0)
    advantage = (to_go - baseline) * alive
    count = jnp.sum(alive)
    std = jnp.sqrt(jnp.sum(advantage**2) / count)
    return advantage / (std + 1e-8)


def batch_of(params, key, num_episodes):
    """Flattened visited states with their weights, actions, advantages, and the returns."""
    states, actions, alive = rollout(params, key, num_episodes)
    advantage = advantages(alive)
    weights = alive / jnp.mean(alive)  # mean over visited states, see apply_policy
    flat = lambda a: a.reshape(-1, *a.shape[2:])
    inputs = (flat(states), flat(weights))
    return inputs, flat(actions), flat(advantage), jnp.mean(jnp.sum(alive, 1))


def surrogate(params, old_log_probs, inputs, actions, advantage):
    """−(1/|visited|) Σ A · π_θ(a|s)/π_old(a|s): its gradient at θ_old is −ĝ."""
    states, weights = inputs
    log_probs = jnp.take_along_axis(
        jax.nn.log_softmax(logits(params, states)), actions[:, None], axis=1
    )[:, 0]
    return -jnp.mean(weights * advantage * jnp.exp(log_probs - old_log_probs))


def log_probs_of(params, states, actions):
    log_probs = jax.nn.log_softmax(logits(params, states))
    return jnp.take_along_axis(log_probs, actions[:, None], axis=1)[:, 0]


# --- the three methods ----------------------------------------------------------------------


def make_method(name, max_kl=0.01, fisher="exact"):
    """(optimizer, whether a line search follows): the optimizer maps −ĝ to an update.

    ``fisher``: the policy's exact Fisher, or ``"monte_carlo"`` (actions resampled from
    the policy at the visited states: what an implementation without closed forms uses).
    """
    if name.startswith("reinforce + adam"):
        return optax.adam(float(name.split("=")[1])), False
    if name == "natural policy gradient":
        return ng.natural_gradient(POLICY, 0.5, fisher=fisher, damping=1e-3), False
    if name == "trpo-style":
        return ng.natural_gradient(POLICY, 1.0, fisher=fisher, damping=1e-3, max_kl=max_kl), True
    raise ValueError(f"unknown method {name!r}")


def line_search(params, updates, inputs, actions, advantage, max_kl, fractions):
    """The first fraction of the step that lowers the surrogate with KL ≤ max_kl (else 0)."""
    old = log_probs_of(params, inputs[0], actions)
    before = surrogate(params, old, inputs, actions, advantage)

    def try_fraction(fraction):
        moved = optax.apply_updates(params, jax.tree.map(lambda u: fraction * u, updates))
        improved = surrogate(moved, old, inputs, actions, advantage) < before
        kl = ng.kl_divergence(POLICY, params, moved, inputs)
        return improved & (kl <= max_kl)

    accepted = jax.vmap(try_fraction)(fractions)
    first = jnp.argmax(accepted)
    return jnp.where(jnp.any(accepted), fractions[first], 0.0)


def train(name, seed, iterations, num_episodes, max_kl=0.01, fisher="exact"):
    """Returns the batch's mean return at every iteration."""
    optimizer, searches = make_method(name, max_kl, fisher)
    params = init_policy(jax.random.PRNGKey(seed))
    state = optimizer.init(params)
    fractions = 0.5 ** jnp.arange(10.0)

    @jax.jit
    def iteration(params, state, key):
        inputs, actions, advantage, mean_return = batch_of(params, key, num_episodes)
        old = jax.lax.stop_gradient(log_probs_of(params, inputs[0], actions))
        grads = jax.grad(surrogate)(params, old, inputs, actions, advantage)  # −ĝ
        updates, state = optimizer.update(grads, state, params, inputs=inputs)
        if searches:
            fraction = line_search(params, updates, inputs, actions, advantage, max_kl, fractions)
            updates = jax.tree.map(lambda u: fraction * u, updates)
        return optax.apply_updates(params, updates), state, mean_return

    returns = []
    key = jax.random.PRNGKey(1000 + seed)
    for _ in range(iterations):
        key, step_key = jax.random.split(key)
        params, state, mean_return = iteration(params, state, step_key)
        returns.append(float(mean_return))
    return np.array(returns)


METHODS = (
    "reinforce + adam lr=0.01",
    "reinforce + adam lr=0.03",
    "reinforce + adam lr=0.1",
    "natural policy gradient",
    "trpo-style",
)


def run(iterations, seeds, num_episodes, fisher="exact"):
    """{method: (seeds, iterations) returns}."""
    return {
        name: np.stack(
            [train(name, seed, iterations, num_episodes, fisher=fisher) for seed in range(seeds)]
        )
        for name in METHODS
    }


def environment_steps(returns, num_episodes):
    """Cumulative environment steps simulated by the end of each iteration (per seed):
    an episode of return R took R steps."""
    return np.cumsum(returns * num_episodes, axis=-1)


def at_budgets(returns, num_episodes, budgets):
    """(seeds, budgets): the return of the last iteration that ended within each budget
    of environment steps (NaN if none did)."""
    steps = environment_steps(returns, num_episodes)
    values = np.full((returns.shape[0], len(budgets)), np.nan)
    for seed in range(returns.shape[0]):
        for j, budget in enumerate(budgets):
            done = np.nonzero(steps[seed] <= budget)[0]
            if done.size:
                values[seed, j] = returns[seed, done[-1]]
    return values


def report(results, num_episodes, budgets):
    print("  ".join(f"{h:>24}" for h in ["environment steps", *results]))
    table = {name: at_budgets(r, num_episodes, budgets) for name, r in results.items()}
    for j, budget in enumerate(budgets):
        cells = [f"{budget:>24,}"]
        for values in table.values():
            column = values[:, j]
            cells.append(
                f"{np.nanmean(column):>15.1f} ± {np.nanstd(column):<6.1f}"
                if np.any(np.isfinite(column))
                else f"{'-':>24}"
            )
        print("  ".join(cells))


def plot(results, num_episodes, path):
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, axis = plt.subplots(figsize=(6, 3.8))
    steps = [environment_steps(r, num_episodes) for r in results.values()]
    grid = np.linspace(max(s[:, 0].max() for s in steps), max(s.max() for s in steps), 200)
    for name, returns in results.items():
        curves = at_budgets(returns, num_episodes, grid)
        mean, std = np.nanmean(curves, 0), np.nanstd(curves, 0)
        axis.plot(grid, mean, label=name)
        axis.fill_between(grid, mean - std, mean + std, alpha=0.2)
    axis.set_xlabel("environment steps")
    axis.set_ylabel("mean return of the batch (max 500)")
    axis.set_title("CartPole-v1, mean ± std over seeds", fontsize=9)
    axis.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=16, help="episodes per iteration")
    parser.add_argument("--fisher", choices=["exact", "monte_carlo"], default="exact")
    parser.add_argument("--plot", type=pathlib.Path, default=RESULTS / "policy_gradient.png")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = jax.devices()[0]
    print(
        f"CartPole-v1, policy MLP 4-32-2, {args.episodes} episodes per iteration, "
        f"{args.fisher} Fisher, {args.seeds} seeds; {device.platform} "
        f"({device.device_kind}), jax {jax.__version__}\n"
    )
    results = run(args.iterations, args.seeds, args.episodes, args.fisher)
    report(results, args.episodes, [25_000, 50_000, 100_000, 200_000, 400_000])
    plot(results, args.episodes, args.plot)
    print(f"\n(ran in {(time.perf_counter() - start) / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
