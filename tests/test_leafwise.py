"""Per-leaf representations keep vectors leaf by leaf: their update never concatenates
the parameters into one P-vector (which, on parameters sharded over devices, gathers
every leaf on every device). Dense and Woodbury do, by design: they are the check
that the test can see a concatenation."""

import jax
import jax.numpy as jnp
import pytest

import natgrad_jax as ng
from natgrad_jax._memory import SOLVERS
from tests.helpers import equations, init_mlp, mlp

PER_LEAF = ["kronecker", "ekfac", "eigenbasis_adam", "diagonal", "block_diagonal", "cg"]
FLAT = ["dense", "woodbury"]


def _update_jaxpr(solver, fisher="exact"):
    model = ng.Model(mlp, ng.Categorical())
    params = init_mlp(jax.random.PRNGKey(0), [3, 8, 4])
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
    y = jnp.arange(16) % 4
    g = jax.grad(model.nll)(params, x, y)
    # Adaptive damping, where the solver's λ is a curvature's damping.
    fixed = {"damping": 1e-8} if SOLVERS[solver].adaptive_damping_refusal else {}
    tx = ng.natural_gradient(model, 0.1, solver=solver, fisher=fisher, **fixed)
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, inputs=x, targets=y))(
        g, state, params
    )
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    return jaxpr.jaxpr, num_params


def _concatenations_of_every_leaf(jaxpr, num_params):
    """Concatenations whose result runs over all P parameters (a flat vector, or score
    rows (M, P)), in the update and every jaxpr inside it."""
    return [
        eqn
        for eqn in equations(jaxpr, "concatenate")
        if eqn.outvars[0].aval.shape[-1:] == (num_params,)
    ]


@pytest.mark.parametrize("fisher", ["exact", "monte_carlo", "empirical"])
@pytest.mark.parametrize("solver", PER_LEAF)
def test_per_leaf_representations_never_concatenate_the_leaves(solver, fisher):
    jaxpr, num_params = _update_jaxpr(solver, fisher)
    assert _concatenations_of_every_leaf(jaxpr, num_params) == []


@pytest.mark.parametrize("solver", FLAT)
def test_flat_representations_gather_the_leaves_into_one_vector(solver):
    jaxpr, num_params = _update_jaxpr(solver)
    assert _concatenations_of_every_leaf(jaxpr, num_params)


@pytest.mark.parametrize("solver", PER_LEAF + FLAT)
def test_each_solver_says_whether_it_works_leaf_by_leaf(solver):
    assert SOLVERS[solver].per_leaf == (solver in PER_LEAF)


def test_describe_says_where_the_chosen_solver_works():
    small = init_mlp(jax.random.PRNGKey(0), [3, 8, 4])  # auto: dense
    large = init_mlp(jax.random.PRNGKey(0), [64, 128, 10])  # auto: K-FAC
    model = ng.Model(mlp, ng.Categorical())
    lines = {
        name: ng.describe(model, params, jnp.zeros((32, params[0]["w"].shape[0]))).splitlines()
        for name, params in (("small", small), ("large", large))
    }
    placement = {
        name: next(line for line in text if line.startswith("  placement"))
        for name, text in lines.items()
    }
    assert 'auto" picks dense' in "\n".join(lines["small"])
    assert placement["small"] == (
        "  placement: dense gathers the P-vector; its P×P Fisher on every device"
    )
    assert 'auto" picks kronecker' in "\n".join(lines["large"])
    assert placement["large"] == (
        "  placement: kronecker works leaf by leaf, on each leaf's sharding; "
        "it factorises each Kronecker factor whole, on every device (on one with mesh=)"
    )


def _one_device_mesh():
    return jax.sharding.Mesh(jax.devices()[:1], ("devices",))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(mesh=("data", "model")), "mesh must be a jax.sharding.Mesh"),
        (dict(mesh=_one_device_mesh(), axis_name="data"), "do not go together"),
    ],
)
def test_mesh_is_checked(options, message):
    model = ng.Model(mlp, ng.Categorical())
    with pytest.raises(ValueError, match=message):
        ng.natural_gradient(model, 0.1, **options)


@pytest.mark.parametrize("solver", ["kronecker", "ekfac", "block_diagonal"])
def test_a_mesh_of_one_device_leaves_the_update_as_it_is(solver):
    """``mesh=`` only places the factorisations (8 devices: tests/_sharded_checks.py)."""
    model = ng.Model(mlp, ng.Categorical())
    params = init_mlp(jax.random.PRNGKey(0), [3, 8, 4])
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
    y = jnp.arange(16) % 4
    g = jax.grad(model.nll)(params, x, y)
    mesh = _one_device_mesh()
    updates = [
        tx.update(g, tx.init(params), params, inputs=x, targets=y)[0]
        for tx in (
            ng.natural_gradient(model, 0.1, solver=solver),
            ng.natural_gradient(model, 0.1, solver=solver, mesh=mesh),
        )
    ]
    assert jax.tree.all(jax.tree.map(jnp.array_equal, *updates))
