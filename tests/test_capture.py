"""Layer capture on hand-written, flax (linen, nnx) and equinox models vs vmap-ed gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng
from natgrad_jax import _vectors as vectors
from natgrad_jax._capture import capture
from natgrad_jax._capture.interpreter import probed_apply
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._solvers.factored import factored_rows
from tests.helpers import assert_capture_rebuilds_vmap_gradients, init_mlp, mlp


def flat(vector):
    return ravel_pytree(vector)[0]


N, IN, OUT = 6, 3, 4


def _inputs():
    return jax.random.normal(jax.random.PRNGKey(1), (N, IN))


def hand_written():
    return mlp, init_mlp(jax.random.PRNGKey(0), [IN, 5, OUT])


def hand_written_with_casts_and_reshapes():
    """Weights stored flat and in float32, cast and reshaped before the matmul."""
    params = {"w1": jnp.ones(IN * 5, jnp.float32) * 0.3, "w2": jnp.linspace(-1, 1, 5 * OUT)}

    def apply(p, x):
        h = jnp.tanh(x @ p["w1"].astype(x.dtype).reshape(IN, 5))
        return h @ p["w2"].reshape(OUT, 5).T

    return apply, params


def flax_linen():
    nn = pytest.importorskip("flax.linen")

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Dense(5)(x))
            return nn.Dense(OUT)(x)

    module = Mlp()
    return module.apply, module.init(jax.random.PRNGKey(0), _inputs())


def _nnx_mlp(nnx, hidden):
    """An NNX IN-5-OUT MLP whose hidden layer runs as ``hidden(layer, x)``, split."""

    class Mlp(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(IN, 5, rngs=rngs)
            self.out = nnx.Linear(5, OUT, rngs=rngs)

        def __call__(self, x):
            return self.out(hidden(self.hidden, x))

    graphdef, state = nnx.split(Mlp(nnx.Rngs(0)))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


def flax_nnx():
    nnx = pytest.importorskip("flax.nnx")
    return _nnx_mlp(nnx, lambda layer, x: jnp.tanh(layer(x)))


def equinox_mlp():
    eqx = pytest.importorskip("equinox")
    net = eqx.nn.MLP(IN, OUT, 5, 2, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(net, eqx.is_array)

    def apply(p, x):  # equinox computes W @ x per example, under vmap, in float32
        return jax.vmap(eqx.combine(p, static))(x.astype(jnp.float32)).astype(x.dtype)

    return apply, params


def hand_written_with_checkpoints():
    """Each layer in its own ``jax.checkpoint`` (the first saving its matmul's output),
    as models too large to keep their activations are written."""
    policy = jax.checkpoint_policies.checkpoint_dots

    def apply(params, x):
        hidden, out = params
        layer = lambda h, p: jnp.tanh(h @ p["w"] + p["b"])
        x = jax.checkpoint(layer, policy=policy)(x, hidden)
        return jax.checkpoint(lambda h, p: h @ p["w"] + p["b"])(x, out)

    return apply, init_mlp(jax.random.PRNGKey(0), [IN, 5, OUT])


def flax_linen_remat():
    nn = pytest.importorskip("flax.linen")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.tanh(nn.Dense(5)(x))

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(OUT)(nn.remat(Block)()(x))

    module = Mlp()
    return module.apply, module.init(jax.random.PRNGKey(0), _inputs())


def flax_nnx_remat():
    """``nnx.remat`` returns the module's parameters from its checkpoint, unused after."""
    nnx = pytest.importorskip("flax.nnx")
    return _nnx_mlp(nnx, nnx.remat(lambda layer, x: jnp.tanh(layer(x))))


def hand_written_with_weights_from_a_jit():
    """A nested ``jit`` returns the weights, cast and reshaped, for matmuls after it."""
    params = {"w1": jnp.ones(IN * 5, jnp.float32) * 0.3, "w2": jnp.linspace(-1, 1, 5 * OUT)}

    @jax.jit
    def prepared(p):
        return p["w1"].astype(jnp.float64).reshape(IN, 5), p["w2"].reshape(OUT, 5).T

    def apply(p, x):
        w1, w2 = prepared(p)
        return jnp.tanh(x @ w1) @ w2

    return apply, params


MODELS = [
    hand_written,
    hand_written_with_casts_and_reshapes,
    flax_linen,
    flax_nnx,
    equinox_mlp,
    hand_written_with_checkpoints,
    flax_linen_remat,
    flax_nnx_remat,
    hand_written_with_weights_from_a_jit,
]


@pytest.mark.parametrize("make", MODELS, ids=lambda f: f.__name__)
def test_every_dense_layer_is_captured_and_rebuilds_vmap_gradients(make):
    apply, params = make()
    x = _inputs()
    captured = capture(apply, params, x)
    num_leaves = len(jax.tree.leaves(params))
    assert len(captured.layers) == num_leaves and captured.fallback == ()
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (N, OUT))
    assert_capture_rebuilds_vmap_gradients(
        apply, captured, params, x, cotangent, rtol=1e-5, atol=1e-6
    )


def _checkpointed_recurrence(params, x):
    """h_t = tanh(x_t W + h_{t−1} U) over T steps, each step a ``jax.checkpoint`` inside
    the scan; the last state through a dense head. x: (N, T, IN)."""

    @jax.checkpoint
    def step(h, x_t):
        return jnp.tanh(x_t @ params["w"] + h @ params["u"]), None

    h0 = jnp.zeros((x.shape[0], 5), x.dtype)
    h, _ = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    return h @ params["head"]


def test_checkpointed_layers_are_captured_and_keep_their_checkpoint():
    """Layers under ``jax.checkpoint`` (alone, with a policy, and inside a scan's body)
    are captured as those without it: the same per-example gradients as ``vmap``, and
    the probed forward pass keeps each checkpoint, policy and all, so the statistics'
    backward pass recomputes what the model's own recomputes."""
    apply, params = hand_written_with_checkpoints()
    x = _inputs()
    captured = capture(apply, params, x)
    probes = [jnp.zeros(layer.probe_shape, layer.output_dtype) for layer in captured.layers]
    jaxpr = jax.make_jaxpr(lambda p: probed_apply(apply, captured, params, x, p))(probes)
    remat = ("remat2", "checkpoint")
    policies = [e.params["policy"] for e in jaxpr.eqns if e.primitive.name in remat]
    assert policies == [jax.checkpoint_policies.checkpoint_dots, None]

    recurrence_params = {
        "w": jax.random.normal(jax.random.PRNGKey(3), (IN, 5)) / 2,
        "u": jax.random.normal(jax.random.PRNGKey(4), (5, 5)) / 3,
        "head": jax.random.normal(jax.random.PRNGKey(5), (5, OUT)),
    }
    sequences = jax.random.normal(jax.random.PRNGKey(6), (N, 7, IN))
    captured = capture(_checkpointed_recurrence, recurrence_params, sequences)
    names = sorted(captured.leaf_names[layer.leaf] for layer in captured.layers)
    assert names == ["['head']", "['u']", "['w']"] and captured.fallback == ()
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (N, OUT))
    assert_capture_rebuilds_vmap_gradients(
        _checkpointed_recurrence, captured, recurrence_params, sequences, cotangent, rtol=1e-10
    )


def test_a_checkpointed_model_takes_the_same_kronecker_step_as_without():
    apply, params = hand_written_with_checkpoints()
    model, plain = ng.Model(apply, ng.Categorical()), ng.Model(mlp, ng.Categorical())
    x = _inputs()
    y = jnp.arange(N) % OUT
    steps = []
    for each in (model, plain):
        tx = ng.natural_gradient(each, 0.5, solver="kronecker", refresh_every=1)
        gradient = jax.grad(each.nll)(params, x, y)
        step, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, inputs=x, targets=y))(  # noqa: B023
            gradient, tx.init(params), params
        )
        steps.append(flat(step))
    np.testing.assert_allclose(steps[0], steps[1], rtol=1e-12, atol=1e-14)


def test_a_checkpointed_model_trains_as_without_from_one_forward_pass():
    """The defaults (quadratic model, damping rule, momentum) fed by ``ng.value_and_grad``,
    whose forward pass runs the probed checkpoints: three steps, the same parameters."""
    apply, params = hand_written_with_checkpoints()
    x, y = _inputs(), jnp.arange(N) % OUT
    trained = []
    for each in (apply, mlp):
        model = ng.Model(each, ng.Categorical())
        tx = ng.natural_gradient(model, 0.5)

        @jax.jit
        def step(p, s, model=model, tx=tx):
            (_, forward_pass), g = ng.value_and_grad(model)(p, x, y)
            u, s = tx.update(g, s, p, inputs=x, targets=y, forward_pass=forward_pass)
            return optax.apply_updates(p, u), s

        p, s = params, tx.init(params)
        for _ in range(3):
            p, s = step(p, s)
        trained.append(flat(p))
    assert float(jnp.max(jnp.abs(trained[1] - flat(params)))) > 1e-2  # they moved
    np.testing.assert_allclose(trained[0], trained[1], rtol=1e-12, atol=1e-14)


def _tricky_model():
    """A tied weight (used twice) and a leaf inside custom_jvp, next to an elementwise
    scale (captured)."""

    @jax.custom_jvp
    def custom_matmul(x, w):
        return x @ w

    custom_matmul.defjvp(
        lambda primals, tangents: (
            custom_matmul(*primals),
            custom_matmul(tangents[0], primals[1]) + custom_matmul(primals[0], tangents[1]),
        )
    )

    def apply(p, x):
        h = jnp.tanh(x @ p["tied"])  # (N, 3) @ (3, 3)
        h = jnp.tanh(h @ p["tied"]) * p["scale"]
        h = custom_matmul(h, p["custom"])
        return h @ p["out"]

    params = {
        "tied": 0.5 * jnp.eye(3) + 0.1,
        "scale": jnp.array([1.0, 2.0, 0.5]),
        "custom": jnp.ones((3, 3)) * 0.2,
        "out": jnp.linspace(-1.0, 1.0, 3 * OUT).reshape(3, OUT),
    }
    return apply, params


def test_leaves_capture_cannot_explain_use_the_fallback_and_stay_exact():
    apply, params = _tricky_model()
    model = ng.Model(apply, ng.Categorical())
    x = _inputs()
    captured = capture(apply, params, x)
    names = [captured.leaf_names[k] for k in captured.fallback]
    assert names == ["['custom']", "['tied']"]
    captured_names = [captured.leaf_names[layer.leaf] for layer in captured.layers]
    assert captured_names == ["['out']", "['scale']"]
    text = ng.describe(model, params, x)
    rows = {line.split()[0]: line for line in text.splitlines()[1:-1]}
    assert "vmap: used by 2 operations (tied or reused)" in rows["['tied']"]
    assert "vmap: used by custom_jvp_call" in rows["['custom']"]
    assert "captured: matmul" in rows["['out']"] and "A ⊗ G: 3×3 ⊗ 4×4" in rows["['out']"]
    # The factored rows (captured + fallback) reproduce the vmap-ed score rows exactly.
    batch = CurvatureBatch(model, params, x, "exact")
    rows = factored_rows(batch)
    dense = batch.score_rows()
    num_rows = dense.shape[0] // N
    dense = dense.reshape(N, num_rows, -1).transpose(1, 0, 2).reshape(num_rows * N, -1)
    np.testing.assert_allclose(rows.kernel(), dense @ dense.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(flat(rows.diagonal()), jnp.sum(dense**2, 0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["exact", "empirical", "monte_carlo"])
def test_factored_rows_products_match_dense_rows(kind):
    model = ng.Model(mlp, ng.Gaussian())
    params = init_mlp(jax.random.PRNGKey(0), [IN, 5, 4])

    def apply(p, x):
        out = mlp(p, x)
        return out[:, :2], 0.3 * out[:, 2:]

    model = ng.Model(apply, ng.Gaussian())
    x = _inputs()
    y = model.likelihood.sample(jax.random.PRNGKey(3), apply(params, x))
    batch = CurvatureBatch(
        model, params, x, kind, targets=y, key=jax.random.PRNGKey(4), num_samples=2
    )
    rows = factored_rows(batch)
    dense = batch.score_rows()
    if kind == "exact":  # score_rows orders exact rows (example, row); factored: (row, example)
        dense = dense.reshape(N, -1, dense.shape[1]).transpose(1, 0, 2).reshape(-1, dense.shape[1])
    num_rows = dense.shape[0] // N
    v = jax.random.normal(jax.random.PRNGKey(5), (dense.shape[1],))
    u = jax.random.normal(jax.random.PRNGKey(6), (num_rows, N))
    leaves = vectors.ravel(jax.tree.leaves(params))[1](v)
    np.testing.assert_allclose(rows.matvec(leaves).reshape(-1), dense @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        flat(rows.rmatvec(u)), dense.T @ u.reshape(-1), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(rows.kernel(), dense @ dense.T, rtol=1e-10, atol=1e-12)


def test_shared_weight_over_positions_sums_over_tokens():
    """A weight applied at every position of a sequence: gradient Σ_t a_t g_tᵀ."""

    def apply(p, x):  # x: (N, T=4, IN) → logits (N, T, OUT)
        return jnp.tanh(x @ p["w"] + p["b"]) @ p["v"]

    params = {
        "w": jax.random.normal(jax.random.PRNGKey(0), (IN, 5)),
        "b": jnp.full((5,), 0.1),
        "v": jax.random.normal(jax.random.PRNGKey(1), (5, OUT)),
    }
    x = jax.random.normal(jax.random.PRNGKey(2), (N, 4, IN))
    model = ng.Model(apply, ng.Categorical())
    captured = capture(apply, params, x)
    assert captured.fallback == ()
    batch = CurvatureBatch(model, params, x, "exact")
    rows = factored_rows(batch)
    dense = batch.score_rows()
    dense = dense.reshape(N, -1, dense.shape[1]).transpose(1, 0, 2).reshape(-1, dense.shape[1])
    np.testing.assert_allclose(rows.kernel(), dense @ dense.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(flat(rows.diagonal()), jnp.sum(dense**2, 0), rtol=1e-10, atol=1e-12)


def test_woodbury_with_capture_on_flax_matches_dense():
    apply, params = flax_linen()
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)  # flax creates float32
    model = ng.Model(apply, ng.Categorical())
    x = _inputs()
    y = jnp.array([0, 1, 2, 3, 0, 1])
    g = jax.grad(model.nll)(params, x, y)
    tx = ng.scale_by_natural_gradient(model, damping=1e-2, solver="woodbury")
    d, _ = jax.jit(tx.update)(g, tx.init(params), params, inputs=x, targets=y)
    f = ng.fisher(model, params, x)
    expected = np.linalg.solve(f + 1e-2 * np.eye(len(f)), ravel_pytree(g)[0])
    np.testing.assert_allclose(ravel_pytree(d)[0], expected, rtol=1e-6, atol=1e-10)


def test_a_python_float_leaf_that_scales_the_output_falls_back_to_vmap():
    """x @ w · s with s a Python float: capture leaves s to vmap (it used to fail with an
    IndexError on the scalar's missing example axis), ``describe`` says why, and the
    exact solvers give (F + λI)⁻¹ g with F from ``ng.fisher``."""
    model = ng.Model(lambda p, x: x @ p["w"] * p["s"], ng.Bernoulli())
    params = {"w": jnp.array([0.1, -0.2]), "s": 1.5}
    x = jnp.array([[1.0, 0.5], [1.0, -1.0], [0.5, 2.0]])
    y = jnp.array([1.0, 0.0, 1.0])
    assert "has fewer axes than its output" in ng.describe(model, params, x)
    g = jax.grad(model.nll)(params, x, y)
    f = ng.fisher(model, params, x)
    want = jnp.linalg.solve(f + 0.1 * jnp.eye(3), ravel_pytree(g)[0])
    for solver in ("dense", "woodbury", ng.ConjugateGradient(tol=1e-12)):
        tx = ng.scale_by_natural_gradient(model, solver=solver, damping=0.1)
        update, _ = tx.update(g, tx.init(params), params, inputs=x, targets=y)
        np.testing.assert_allclose(ravel_pytree(update)[0], want, rtol=1e-9)


def test_layers_stacked_over_a_scan_are_told_to_unroll_and_unrolled_are_captured():
    """A weight sliced per step of a scan (layers stacked over it, as flax's nn.scan
    does) is not read: ``describe`` says so and how to get each layer captured, which
    the same layers as a Python loop are."""
    stacked = {"w": jax.random.normal(jax.random.PRNGKey(0), (3, IN, IN)) / 2}
    x = _inputs()

    def scanned(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

    def unrolled(p, x):
        for w in p["w"]:
            x = jnp.tanh(x @ w)
        return x

    text = ng.describe(ng.Model(scanned, ng.Gaussian(scale=1.0)), stacked, x)
    assert "scan, a slice each step (stacked layers: unroll them to capture each)" in text
    layers = {"w": list(stacked["w"])}
    captured = capture(lambda p, x: unrolled({"w": p["w"]}, x), layers, x)
    assert len(captured.layers) == 3 and captured.fallback == ()
