"""Capture of convolutions (KFC) and elementwise scales against vmap-ed per-example gradients
and dense score rows; flax and equinox CNNs and normalisation layers end to end."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import natgrad_jax as ng
from natgrad_jax import _vectors as vectors
from natgrad_jax._capture import capture
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._solvers.factored import factored_rows, leaf_to_matrix
from natgrad_jax._solvers.kronecker import (
    Kronecker,
    _numpy_view,
    _same_g,
    shared_output_factors,
)
from tests.helpers import assert_capture_rebuilds_vmap_gradients, optional_import

N, CLASSES = 5, 3


def _conv_model(layout, strides, padding, dilation):
    """conv → tanh → mean over sites → scale → matmul, with the kernel in ``layout``."""
    lhs, rhs, _ = layout

    def apply(p, x):
        y = jax.lax.conv_general_dilated(
            x, p["kernel"], strides, padding, rhs_dilation=dilation, dimension_numbers=layout
        )
        feature_axis = lhs.index("C")
        bias_shape = [1] * y.ndim
        bias_shape[feature_axis] = -1
        y = jnp.tanh(y + p["bias"].reshape(bias_shape))
        pooled = jnp.mean(y, axis=[d for d in range(y.ndim) if d not in (0, feature_axis)])
        return (pooled * p["scale"]) @ p["out"]

    window = dict(zip([c for c in rhs if c not in "OI"], (3, 2, 2), strict=False))
    kernel_shape = tuple({"O": 4, "I": 2, **window}[c] for c in rhs)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {
        "kernel": jax.random.normal(keys[0], kernel_shape) / 3,
        "bias": jnp.full((4,), 0.1),
        "scale": jnp.linspace(0.5, 1.5, 4),
        "out": jax.random.normal(keys[1], (4, CLASSES)),
    }
    sites = dict(zip([c for c in lhs if c not in "NC"], (7, 6, 5), strict=False))
    input_sizes = {"N": N, "C": 2, **sites}
    x = jax.random.normal(keys[2], tuple(input_sizes[c] for c in lhs))
    return apply, params, x


CONVS = {
    "1d_strided_dilated": (("NCW", "OIW", "NCW"), (2,), ((2, 1),), (2,)),
    "2d_strided_padded_dilated": (("NHWC", "HWIO", "NHWC"), (2, 1), ((1, 0), (2, 1)), (1, 2)),
    "2d_channels_first": (("NCHW", "OIHW", "NCHW"), (1, 2), ((1, 1), (0, 1)), (2, 1)),
    "3d_same": (("NDHWC", "DHWIO", "NDHWC"), (1, 2, 1), "SAME", (1, 1, 1)),
}


def _dense_rows_by_row(batch):
    """The vmap-ed score rows, reordered (row, example) like the factored ones."""
    dense = batch.score_rows()
    return dense.reshape(N, -1, dense.shape[1]).transpose(1, 0, 2).reshape(-1, dense.shape[1])


def _check_factored_products(model, params, x):
    """S v, Sᵀ u, SSᵀ and diag(SᵀS) from captured (a, g) equal those of the vmap-ed rows."""

    @jax.jit
    def products(params, x):
        batch = CurvatureBatch(model, params, x, "exact")
        rows, dense = factored_rows(batch), _dense_rows_by_row(batch)
        v = jax.random.normal(jax.random.PRNGKey(5), (dense.shape[1],))
        u = jax.random.normal(jax.random.PRNGKey(6), (dense.shape[0] // N, N))
        leaves = vectors.ravel(jax.tree.leaves(params))[1](v)
        factored = (
            rows.matvec(leaves).reshape(-1),
            vectors.ravel(rows.rmatvec(u))[0],
            rows.kernel(),
            vectors.ravel(rows.diagonal())[0],
        )
        reference = (dense @ v, dense.T @ u.reshape(-1), dense @ dense.T, jnp.sum(dense**2, 0))
        return factored, reference

    for got, expected in zip(*products(params, x), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", CONVS.values(), ids=CONVS.keys())
def test_captured_convolutions_rebuild_vmap_gradients_and_score_rows(config):
    apply, params, x = _conv_model(*config)
    captured = capture(apply, params, x)
    assert captured.fallback == ()
    kinds = {captured.leaf_names[layer.leaf]: layer.kind for layer in captured.layers}
    assert kinds == {"['bias']": "add", "['kernel']": "conv", "['out']": "dot", "['scale']": "mul"}
    cotangent = jax.random.normal(jax.random.PRNGKey(3), (N, CLASSES))
    assert_capture_rebuilds_vmap_gradients(
        apply, captured, params, x, cotangent, rtol=1e-10, atol=1e-12
    )
    _check_factored_products(ng.Model(apply, ng.Categorical()), params, x)


def test_convolution_patches_match_lax_patches_in_the_kernels_order():
    """Kronecker's input factor of an HWIO kernel is Σ_t pₜpₜᵀ / N over the patches
    lax.conv_general_dilated_patches extracts (its features ordered channel first)."""
    apply, params, x = _conv_model(*CONVS["2d_strided_padded_dilated"])
    model = ng.Model(apply, ng.Categorical())
    batch = CurvatureBatch(model, params, x, "exact")
    rows = factored_rows(batch)
    patches = jax.lax.conv_general_dilated_patches(
        x,
        (3, 2),
        (2, 1),
        ((1, 0), (2, 1)),
        rhs_dilation=(1, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # (N, H', W', C·kh·kw), features (c, i, j)
    patches = patches.reshape(*patches.shape[:3], 2, 3, 2).transpose(0, 1, 2, 4, 5, 3)
    patches = patches.reshape(N, -1, 3 * 2 * 2)  # features (i, j, c): the kernel's order
    kernel_layer = [layer.kind for layer in rows.capture.layers].index("conv")
    inputs_factor, _ = rows.kronecker_factors(kernel_layer)
    np.testing.assert_allclose(
        inputs_factor, jnp.einsum("ntk,ntl->kl", patches, patches) / N, rtol=1e-12, atol=1e-12
    )
    assert set(Kronecker().factored_leaves(batch)) == {0, 1, 2, 3}  # bias, kernel, out, scale


def _flax_cnn():
    nn = optional_import("flax.linen")

    class Cnn(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME")(x))
            x = nn.LayerNorm()(x)
            x = nn.tanh(nn.Conv(3, (2, 2), kernel_dilation=2, padding="VALID")(x))
            x = nn.BatchNorm(use_running_average=True)(x)
            x = nn.RMSNorm()(x.reshape(x.shape[0], -1))
            return nn.Dense(CLASSES)(x)

    module = Cnn()
    x = jax.random.normal(jax.random.PRNGKey(1), (N, 8, 8, 2))
    variables = module.init(jax.random.PRNGKey(0), x)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
    # Running statistics far from (0, 1), so a missing 1/σ would show.
    mean, var = variables["batch_stats"]["BatchNorm_0"].values()
    stats = {"BatchNorm_0": {"mean": mean + 0.4, "var": var * jnp.linspace(0.2, 3.0, 3)}}
    apply = lambda p, x: module.apply({"params": p, "batch_stats": stats}, x)
    return apply, variables["params"], x


def _equinox_cnn():
    eqx = optional_import("equinox")
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    net = [
        eqx.nn.Conv2d(2, 4, 3, stride=2, padding=1, key=keys[0]),
        eqx.nn.Conv1d(4, 3, 2, dilation=2, key=keys[1]),
        eqx.nn.LayerNorm((3, 2)),
        eqx.nn.Linear(6, CLASSES, key=keys[2]),
    ]
    net = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_array(a) else a, net)
    params, static = eqx.partition(net, eqx.is_array)

    def one(layers, x):  # x: (2, 8, 8) channels first
        conv2, conv1, norm, linear = layers
        h = jax.nn.relu(conv2(x))  # (4, 4, 4)
        h = jnp.tanh(conv1(h.mean(axis=1)))  # (3, 2)
        return linear(norm(h).reshape(-1))

    apply = lambda p, x: jax.vmap(lambda xi: one(eqx.combine(p, static), xi))(x)
    return apply, params, jax.random.normal(jax.random.PRNGKey(1), (N, 2, 8, 8))


def _check_updates(model, params, inputs, targets, solvers, fisher):
    """One update of each solver against (F + λI)⁻¹g (or its diagonal) with F dense."""
    g = jax.jit(jax.grad(model.nll))(params, inputs, targets)
    flat_g, damping = ravel_pytree(g)[0], 1e-2
    for solver in solvers:
        tx = ng.scale_by_natural_gradient(model, damping=damping, solver=solver)
        d, _ = jax.jit(tx.update)(g, tx.init(params), params, inputs=inputs, targets=targets)
        if solver == "diagonal":
            expected = flat_g / (jnp.diag(fisher) + damping)
        else:
            expected = np.linalg.solve(fisher + damping * np.eye(len(fisher)), flat_g)
        np.testing.assert_allclose(ravel_pytree(d)[0], expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("make", [_flax_cnn, _equinox_cnn], ids=["flax", "equinox"])
def test_library_cnns_are_captured_and_match_the_dense_fisher(make):
    """Every convolution, norm scale and bias is captured, BatchNorm's scale (which flax
    multiplies by the running 1/σ before it meets the examples) included."""
    apply, params, x = make()
    model = ng.Model(apply, ng.Categorical())
    captured = capture(apply, params, x)
    assert captured.fallback == ()
    cotangent = jax.random.normal(jax.random.PRNGKey(3), (N, CLASSES))
    assert_capture_rebuilds_vmap_gradients(
        apply, captured, params, x, cotangent, rtol=1e-10, atol=1e-12
    )
    text = ng.describe(model, params, x)
    assert "convolution" in text and "elementwise scale" in text
    fisher = ng.fisher(model, params, x)
    _check_updates(model, params, x, jnp.arange(N) % CLASSES, ["woodbury", "diagonal"], fisher)


def _constant_scaled(p, x):
    """Scales multiplied by values that are the same for every example before they meet
    the examples: an array, a scalar literal, and (outside or inside a scan) an array
    that the scan body uses."""
    c = jnp.linspace(0.5, 2.0, 3)
    h = x[:, 0] @ p["w"]
    h = h * (c * p["s"]) + (3.0 * p["b"])
    h = h * (2.0 * p["s2"])
    s3 = c * p["s3"]

    def step(h, x_t):
        h = jnp.tanh(x_t @ p["w"][:, ::-1] + h * s3)
        return h * (c[::-1] * p["s4"]), None

    h, _ = jax.lax.scan(step, h, jnp.swapaxes(x, 0, 1))
    return h @ p["out"]


def test_scales_times_constants_are_captured_and_rebuild_vmap_gradients():
    """The constant multiplies the layer input: a = x ⊙ c; a weight multiplied by a
    constant before a matmul is left to vmap with the reason."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    scales = {k: jnp.linspace(0.5, 1.5, 3) + i for i, k in enumerate(["s", "s2", "s3", "s4"])}
    params = {
        **scales,
        "w": jax.random.normal(keys[0], (2, 3)),
        "b": jnp.full((3,), 0.2),
        "out": jax.random.normal(keys[1], (3, CLASSES)),
    }
    x = jax.random.normal(jax.random.PRNGKey(1), (N, 4, 2))
    captured = capture(_constant_scaled, params, x)
    routes = {name: captured.route(k) for k, name in enumerate(captured.leaf_names)}
    for name in ("['s']", "['s2']", "['s3']", "['s4']"):
        assert routes[name].endswith("times a constant") or "times a constant," in routes[name]
    assert routes["['b']"] == "vmap: multiplied by a computed value before its add"
    assert routes["['w']"].startswith("vmap: used by 2 operations")
    cotangent = jax.random.normal(jax.random.PRNGKey(3), (N, CLASSES))
    assert_capture_rebuilds_vmap_gradients(
        _constant_scaled, captured, params, x, cotangent, rtol=1e-10, atol=1e-12
    )


def _rnn(p, x):
    """A tanh RNN run backwards over time, a scaled read-out of every step, two heads."""

    def step(h, x_t):
        h = jnp.tanh(x_t @ p["wx"] + h @ p["wh"] + p["b"])
        return h, h * p["s"]

    h0 = jnp.zeros((x.shape[0], 3), x.dtype)
    h, hs = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1), reverse=True)
    return h @ p["out"] + jnp.mean(hs, axis=0) @ p["out2"]


def _nested_scan(p, x):
    """Scans over chunks of time, then over the steps of each chunk."""

    def inner(h, x_t):
        return jnp.tanh(x_t @ p["wx"] + h @ p["wh"] + p["b"]), None

    def outer(h, chunk):
        h, _ = jax.lax.scan(inner, h, chunk)
        return h * p["s"], None

    chunks = jnp.swapaxes(x, 0, 1).reshape(3, 2, x.shape[0], x.shape[2])
    h, _ = jax.lax.scan(outer, jnp.zeros((x.shape[0], 3), x.dtype), chunks)
    return h @ p["out"] + h @ p["out2"]


def _recurrent_params():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    return {
        "wx": jax.random.normal(keys[0], (2, 3)),
        "wh": jax.random.normal(keys[1], (3, 3)) / 2,
        "b": jnp.full((3,), 0.3),
        "s": jnp.linspace(0.5, 1.0, 3),
        "out": jax.random.normal(keys[2], (3, CLASSES)),
        "out2": jax.random.normal(keys[3], (3, CLASSES)),
    }


@pytest.mark.parametrize("apply", [_rnn, _nested_scan], ids=["scan", "nested_scan"])
def test_weights_inside_scan_are_captured_and_rebuild_vmap_gradients(apply):
    params = _recurrent_params()
    x = jax.random.normal(jax.random.PRNGKey(1), (N, 6, 2))
    captured = capture(apply, params, x)
    assert captured.fallback == ()
    steps = {captured.leaf_names[layer.leaf]: layer.scan_lengths for layer in captured.layers}
    inner = (6,) if apply is _rnn else (3, 2)
    assert steps["['wx']"] == steps["['wh']"] == steps["['b']"] == inner
    cotangent = jax.random.normal(jax.random.PRNGKey(3), (N, CLASSES))
    assert_capture_rebuilds_vmap_gradients(
        apply, captured, params, x, cotangent, rtol=1e-10, atol=1e-12
    )
    _check_factored_products(ng.Model(apply, ng.Categorical()), params, x)


def _flax_recurrent(cell_name):
    nn = optional_import("flax.linen")
    cell = getattr(nn, cell_name)

    class Recurrent(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.RNN(cell(4, param_dtype=jnp.float64, dtype=jnp.float64))(x)
            return nn.Dense(CLASSES, param_dtype=jnp.float64)(h[:, -1])

    module = Recurrent()
    x = jax.random.normal(jax.random.PRNGKey(1), (N, 5, 2))
    return module.apply, module.init(jax.random.PRNGKey(0), x), x


@pytest.mark.parametrize("cell", ["GRUCell", "LSTMCell", "OptimizedLSTMCell"])
def test_flax_recurrent_cells_are_captured_and_match_the_dense_fisher(cell):
    """OptimizedLSTMCell concatenates its gates' kernels (and biases) before one matmul,
    and nn.RNN traces the cell once more outside the scan, as dead code."""
    apply, params, x = _flax_recurrent(cell)
    model = ng.Model(apply, ng.Categorical())
    assert "vmap" not in ng.describe(model, params, x)
    if cell == "OptimizedLSTMCell":  # its update: the next test, against LSTMCell's
        cotangent = jax.random.normal(jax.random.PRNGKey(3), (N, CLASSES))
        assert_capture_rebuilds_vmap_gradients(
            apply, capture(apply, params, x), params, x, cotangent, rtol=1e-10, atol=1e-12
        )
        return
    fisher = ng.fisher(model, params, x)
    _check_updates(model, params, x, jnp.arange(N) % CLASSES, ["woodbury"], fisher)


def test_optimized_lstm_gets_the_kronecker_factors_of_the_plain_lstm():
    """The two cells compute the same function of the same parameter tree: one matmul
    on concatenated kernels or one per gate. K-FAC's factors and update are the same."""
    lstm, params, x = _flax_recurrent("LSTMCell")
    optimized, optimized_params, _ = _flax_recurrent("OptimizedLSTMCell")
    cell = optimized_params["params"].pop("OptimizedLSTMCell_0")
    optimized_params["params"]["LSTMCell_0"] = cell
    assert jax.tree.structure(params) == jax.tree.structure(optimized_params)
    rename = {"LSTMCell_0": "OptimizedLSTMCell_0", "Dense_0": "Dense_0"}

    def optimized_with_lstm_names(p, x):
        return optimized({"params": {rename[k]: v for k, v in p["params"].items()}}, x)

    targets = jnp.arange(N) % CLASSES
    results = []
    for apply in (lstm, optimized_with_lstm_names):
        model = ng.Model(apply, ng.Categorical())
        tx = ng.scale_by_natural_gradient(model, damping=1e-2, solver="kronecker")
        g = jax.grad(model.nll)(params, x, targets)
        results.append(jax.jit(tx.update)(g, tx.init(params), params, inputs=x, targets=targets))
    for got, expected in zip(*map(jax.tree.leaves, results), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13)


def _concatenated(p, x):
    """Kernels joined along their output axis, in (in, out) and in equinox's (out, in)
    layout (transposed after the join), biases joined, reshaped and broadcast."""
    kernel = jnp.concatenate([p["w1"], p["w2"]], axis=1)
    bias = jnp.broadcast_to(jnp.concatenate([p["b1"], p["b2"]]).reshape(1, -1), (x.shape[0], 5))
    h = jnp.tanh(x @ kernel.astype(x.dtype) + bias)
    out = jnp.concatenate([p["v1"], p["v2"]], axis=0).T
    return jnp.tanh(h) @ out


def _concatenated_params():
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    shapes = {"w1": (4, 2), "w2": (4, 3), "b1": (2,), "b2": (3,), "v1": (1, 5), "v2": (2, 5)}
    return {
        name: jax.random.normal(key, shape)
        for key, (name, shape) in zip(keys, shapes.items(), strict=True)
    }


def test_concatenated_leaves_are_captured_and_rebuild_vmap_gradients():
    params = _concatenated_params()
    x = jax.random.normal(jax.random.PRNGKey(1), (N, 4))
    captured = capture(_concatenated, params, x)
    assert captured.fallback == ()
    parts = {captured.leaf_names[layer.leaf]: layer.part for layer in captured.layers}
    assert parts == {
        "['b1']": (1, 0, 5),
        "['b2']": (1, 2, 5),
        "['v1']": (1, 0, CLASSES),
        "['v2']": (1, 1, CLASSES),
        "['w1']": (1, 0, 5),
        "['w2']": (1, 2, 5),
    }
    cotangent = jax.random.normal(jax.random.PRNGKey(3), (N, CLASSES))
    assert_capture_rebuilds_vmap_gradients(
        _concatenated, captured, params, x, cotangent, rtol=1e-10, atol=1e-12
    )
    model = ng.Model(_concatenated, ng.Categorical())
    _check_factored_products(model, params, x)
    fisher = ng.fisher(model, params, x)
    _check_updates(model, params, x, jnp.arange(N) % CLASSES, ["woodbury", "diagonal"], fisher)


def test_leaves_joined_along_a_contracted_axis_fall_back_to_vmap():
    """x @ concat([W1; W2]) sums two matmuls on slices of x: not one layer per leaf."""
    params = {"w1": jnp.ones((2, 3)), "w2": jnp.ones((1, 3)), "w3": jnp.ones((3, 3))}
    x = jnp.ones((N, 3))

    def apply(p, x):
        return x @ jnp.concatenate([p["w1"], p["w2"]], axis=0) + x * p["w3"].sum()

    captured = capture(apply, params, x)
    assert captured.fallback == (0, 1, 2)
    assert captured.reasons[0].startswith("used by dot_general of a concatenation")


def test_kfac_expand_and_reduce_factors_have_their_closed_forms():
    """y = mean_t(x_t) W with a unit Gaussian: per position g = e_r / T, so
    expand gives (Σ x xᵀ/N, I/T²) and reduce gives (Σ x̄ x̄ᵀ/N, I), whose product is the
    exact Fisher (the inputs enter only through their mean)."""
    t, k, d = 4, 3, 2
    x = jax.random.normal(jax.random.PRNGKey(0), (N, t, k))
    params = {"w": jax.random.normal(jax.random.PRNGKey(1), (k, d))}
    model = ng.Model(lambda p, x: jnp.mean(x @ p["w"], axis=1), ng.Gaussian(scale=1.0))
    rows = factored_rows(CurvatureBatch(model, params, x, "exact"))
    mean = jnp.mean(x, axis=1)
    expand = rows.kronecker_factors(0, "expand")
    np.testing.assert_allclose(expand[0], jnp.einsum("ntk,ntl->kl", x, x) / N, rtol=1e-12)
    np.testing.assert_allclose(expand[1], jnp.eye(d) / t**2, rtol=1e-12, atol=1e-15)
    reduce = rows.kronecker_factors(0, "reduce")
    np.testing.assert_allclose(reduce[0], mean.T @ mean / N, rtol=1e-12)
    np.testing.assert_allclose(reduce[1], jnp.eye(d), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(
        jnp.kron(*reduce), ng.fisher(model, params, x), rtol=1e-10, atol=1e-12
    )
    with pytest.raises(ValueError, match="approximation must be one of"):
        ng.Kronecker("mean")


def test_kfac_expand_and_reduce_are_ordinary_kfac_with_one_position():
    """A dense layer over T = 1 positions, (N, 1, K) @ W: expand and reduce give the
    factors of the same layer on (N, K) inputs, A = Σ x xᵀ/N and G of its rows."""
    k, d = 3, 2
    x = jax.random.normal(jax.random.PRNGKey(0), (N, k))
    params = {"w": jax.random.normal(jax.random.PRNGKey(1), (k, d))}
    flat = ng.Model(lambda p, x: x @ p["w"], ng.Categorical())
    sequence = ng.Model(lambda p, x: (x @ p["w"])[:, 0], ng.Categorical())
    ordinary = factored_rows(CurvatureBatch(flat, params, x, "exact")).kronecker_factors(0)
    rows = factored_rows(CurvatureBatch(sequence, params, x[:, None], "exact"))
    np.testing.assert_allclose(ordinary[0], x.T @ x / N, rtol=1e-12)
    for approximation in ("expand", "reduce"):
        for got, want in zip(rows.kronecker_factors(0, approximation), ordinary, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


def _flax_language_model():
    """Token embedding, positional table, causal attention, MLP, LayerNorms; per-token
    logits with a padding mask."""
    nn = optional_import("flax.linen")
    t, vocab, width = 5, 7, 8
    f64 = {"param_dtype": jnp.float64, "dtype": jnp.float64}

    class LanguageModel(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            tokens, mask = inputs
            h = nn.Embed(vocab, width, **f64)(tokens)
            h = h + self.param("positions", nn.initializers.normal(0.1), (t, width), jnp.float64)
            attention = nn.MultiHeadDotProductAttention(num_heads=2, **f64)
            h = h + attention(nn.LayerNorm(**f64)(h), mask=nn.make_causal_mask(tokens))
            h = h + nn.Dense(width, **f64)(nn.gelu(nn.Dense(16, **f64)(nn.LayerNorm(**f64)(h))))
            return nn.Dense(vocab, **f64)(nn.LayerNorm(**f64)(h)), mask

    lengths = jnp.array([5, 3, 4, 2, 5])
    mask = (jnp.arange(t)[None] < lengths[:, None]).astype(jnp.float64)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (N, t), 1, vocab) * (mask > 0)
    module = LanguageModel()
    params = module.init(jax.random.PRNGKey(1), (tokens, mask))["params"]
    model = ng.Model(lambda p, x: module.apply({"params": p}, x), ng.Masked(ng.Categorical()))
    return model, params, (tokens, mask)


def test_language_model_is_captured_and_matches_the_dense_fisher():
    model, params, (tokens, mask) = _flax_language_model()
    text = ng.describe(model, params, (tokens, mask))
    assert "vmap" not in text and "embedding lookup" in text
    for name in ("query", "key", "value", "out"):  # multi-axis kernels get factors
        line = next(row for row in text.splitlines() if f"['{name}']['kernel'] " in row[:60])
        assert "A ⊗ G: 8×8 ⊗ 8×8" in line
    fisher = jax.jit(lambda p, x: ng.fisher(model, p, x))
    reference = fisher(params, (tokens, mask))
    padded_differently = jnp.where(mask > 0, tokens, 3)  # causal: later tokens unseen
    np.testing.assert_allclose(
        fisher(params, (padded_differently, mask)), reference, rtol=1e-12, atol=1e-14
    )
    solvers = ["woodbury", "diagonal"]  # CG: Fisher-vector products, shape-agnostic
    next_tokens = jnp.roll(tokens, -1, axis=1)
    _check_updates(model, params, (tokens, mask), next_tokens, solvers, reference)


def test_haiku_biases_added_through_broadcast_to_are_captured():
    hk = optional_import("haiku")
    net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([5, CLASSES])(x)))
    x = jax.random.normal(jax.random.PRNGKey(1), (N, 4))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), net.init(jax.random.PRNGKey(0), x))
    captured = capture(net.apply, params, x)
    assert captured.fallback == () and {layer.kind for layer in captured.layers} == {"add", "dot"}
    cotangent = jax.random.normal(jax.random.PRNGKey(3), (N, CLASSES))
    assert_capture_rebuilds_vmap_gradients(
        net.apply, captured, params, x, cotangent, rtol=1e-10, atol=1e-12
    )
    _check_factored_products(ng.Model(net.apply, ng.Categorical()), params, x)


@pytest.mark.parametrize(
    "apply_params_inputs",
    [
        lambda: _conv_model(*CONVS["2d_strided_padded_dilated"]),
        lambda: (_rnn, _recurrent_params(), jax.random.normal(jax.random.PRNGKey(1), (N, 6, 2))),
        lambda: (
            _concatenated,
            _concatenated_params(),
            jax.random.normal(jax.random.PRNGKey(1), (N, 4)),
        ),
    ],
    ids=["conv", "scan", "concatenated"],
)
def test_captured_layers_in_float32(apply_params_inputs):
    """Patches (HIGHEST precision), scan probes and the parts of concatenated kernels keep
    float32 per-example gradients."""
    apply, params, x = apply_params_inputs()
    params, x = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x))
    captured = capture(apply, params, x)
    assert captured.fallback == ()
    cotangent = jax.random.normal(jax.random.PRNGKey(3), (N, CLASSES), jnp.float32)
    assert_capture_rebuilds_vmap_gradients(
        apply, captured, params, x, cotangent, rtol=2e-4, atol=2e-5
    )


def _captured_models():
    """(name, apply_fn, params, inputs): every kind of captured layer, multi-axis
    kernels, (out, in) kernels of several layouts, leaves joined before their matmul."""
    model, params, inputs = _flax_language_model()
    yield "language model", model.apply_fn, params, inputs
    for name, config in CONVS.items():
        yield name, *_conv_model(*config)
    yield "concatenated", _concatenated, _concatenated_params(), jnp.ones((N, 4))


def test_numpy_layout_views_are_leaf_to_matrix():
    """K-FAC reads a leaf's orientation from the K×D view of its entry indices, computed
    with NumPy when ``leaf_to_matrix`` is layout operations only; that view must be the
    one jax computes, on every captured layer it is computed for."""
    computed_with_numpy = 0
    for name, apply_fn, params, inputs in _captured_models():
        shapes = [leaf.shape for leaf in jax.tree.leaves(params)]
        for layer in capture(apply_fn, params, inputs).layers:
            index = np.arange(math.prod(shapes[layer.leaf]), dtype=np.float32)
            index = index.reshape(shapes[layer.leaf])
            view = _numpy_view(layer, index)
            if view is not None:
                computed_with_numpy += 1
                want = np.asarray(leaf_to_matrix(layer, jnp.asarray(index)))
                np.testing.assert_array_equal(view, want, err_msg=f"{name}: {layer}")
    assert computed_with_numpy == 22 + 4 * len(CONVS) + 6  # every layer of the models


def _residual(p, x):
    """The matmul's output is read twice (the bias's add and a skip connection): its g
    is the sum of both paths', not the bias's."""
    h = x @ p["w"]
    return jnp.tanh(h + p["b"]) @ p["v"] + h[:, :CLASSES]


def _transposed_square(p, x):
    """A per-token matmul (N, T, D) with T = D, transposed to (N, D, T) before a bias
    of T entries is added: same shape, but the bias's features are the tokens."""
    h = jnp.swapaxes(x @ p["w"], 1, 2) + p["b"]
    return jnp.mean(jnp.tanh(h), axis=1) @ p["v"]


def _bias_models():
    """(name, model, params, inputs, the biases expected to share their weight's G)."""
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    square = {
        "b": jnp.linspace(-0.5, 0.5, 3),
        "v": jax.random.normal(keys[0], (3, CLASSES)),
        "w": jax.random.normal(keys[1], (4, 3)),
    }
    residual = {**square, "w": jax.random.normal(keys[2], (4, 3 + CLASSES))}
    residual["v"] = jax.random.normal(keys[0], (3 + CLASSES, CLASSES))
    residual["b"] = jnp.linspace(-0.5, 0.5, 3 + CLASSES)
    x = jax.random.normal(jax.random.PRNGKey(1), (N, 4))
    yield "residual", ng.Model(_residual, ng.Categorical()), residual, x, set()
    tokens = jnp.stack([x[:, :3]] * 4, -1)
    yield "transposed", ng.Model(_transposed_square, ng.Categorical()), square, tokens, set()
    apply, params, images = _flax_cnn()
    yield (
        "flax cnn",
        ng.Model(apply, ng.Categorical()),
        params,
        images,
        {"['Conv_0']['bias']", "['Conv_1']['bias']", "['Dense_0']['bias']"},
    )
    model, params, inputs = _flax_language_model()
    dense = {f"['Dense_{k}']['bias']" for k in range(3)}
    out = "['MultiHeadDotProductAttention_0']['out']['bias']"
    yield "language model", model, params, inputs, dense | {out}
    apply, params, sequences = _flax_recurrent("OptimizedLSTMCell")  # gates' kernels joined
    gates = {f"['params']['OptimizedLSTMCell_0']['h{gate}']['bias']" for gate in "fgio"}
    lstm = ng.Model(apply, ng.Categorical())
    yield "optimized lstm", lstm, params, sequences, gates | {"['params']['Dense_0']['bias']"}
    eqx = optional_import("equinox")
    net = eqx.nn.MLP(4, CLASSES, 5, 1, key=jax.random.PRNGKey(0))
    net = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_array(a) else a, net)
    params, static = eqx.partition(net, eqx.is_array)
    apply = lambda p, x: jax.vmap(eqx.combine(p, static))(x)  # W @ x, then a transpose
    yield (
        "equinox mlp",
        ng.Model(apply, ng.Categorical()),
        params,
        x,
        {".layers[0].bias", ".layers[1].bias"},
    )


def _output_factors(model, params, inputs, layer_indices):
    """{(layer index, approximation): G from the layer's own g}, exact Fisher, jitted."""

    @jax.jit
    def factors(params, inputs):
        rows = factored_rows(CurvatureBatch(model, params, inputs, "exact"))
        return {
            (k, how): rows.output_factor(k, how)
            for k in layer_indices
            for how in ("expand", "reduce")
        }

    return factors(params, inputs)


def test_biases_share_their_weights_output_factor_exactly_where_their_g_is_the_weights():
    """K-FAC keeps one G for a bias added straight to its weight's output (directly,
    through a transpose: equinox's W @ x under vmap, or as slices of a matmul on joined
    kernels and an add of joined biases: flax's OptimizedLSTMCell). Every bias captured
    as following a matmul or convolution has its own output factor computed from its own
    g here: equal to the weight's G where it is shared, different where the output is read
    again (a skip connection: not following) or the bias runs along another axis of it
    (the layouts disagree); for K-FAC's "expand" and "reduce" alike."""
    for case in _bias_models():
        _check_shared_biases(*case)


def test_haiku_biases_share_their_weights_output_factor():
    """haiku adds its biases through ``broadcast_to`` (Linear and Conv2D)."""
    hk = optional_import("haiku")
    to_f64 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)
    mlp = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([5, CLASSES])(x)))
    x = jax.random.normal(jax.random.PRNGKey(1), (N, 4))
    mlp_params = to_f64(mlp.init(jax.random.PRNGKey(0), x))
    expected = {f"['mlp/~/linear_{k}']['b']" for k in range(2)}
    _check_shared_biases(
        "haiku mlp", ng.Model(mlp.apply, ng.Categorical()), mlp_params, x, expected
    )

    def cnn(images):
        h = jnp.tanh(hk.Conv2D(3, 3)(images))
        return hk.Linear(CLASSES)(h.reshape(images.shape[0], -1))

    cnn = hk.without_apply_rng(hk.transform(cnn))
    images = jax.random.normal(jax.random.PRNGKey(1), (N, 5, 5, 2))
    cnn_params = to_f64(cnn.init(jax.random.PRNGKey(0), images))
    expected = {"['conv2_d']['b']", "['linear']['b']"}
    _check_shared_biases(
        "haiku cnn", ng.Model(cnn.apply, ng.Categorical()), cnn_params, images, expected
    )


def _check_shared_biases(name, model, params, inputs, expected):
    """The biases sharing their weight's G are ``expected`` (names), and every bias that
    follows a layer has its own G equal to the weight's exactly where the layouts agree."""
    captured = capture(model.apply_fn, params, inputs)
    shapes = [np.shape(leaf) for leaf in jax.tree.leaves(params)]
    shared = shared_output_factors(captured, shapes)
    assert {captured.leaf_names[k] for k in shared} == expected, name
    index = {layer.leaf: k for k, layer in enumerate(captured.layers)}
    pairs = [(layer.leaf, layer.follows[0]) for layer in captured.layers if layer.follows]
    assert set(shared.items()) <= set(pairs) and (pairs or not expected), name
    used = sorted({index[k] for pair in pairs for k in pair})
    factors = _output_factors(model, params, inputs, used)
    for bias, weight in pairs:
        layouts_agree = _same_g(captured.layer_of(bias), captured.layer_of(weight))
        for how in ("expand", "reduce"):
            own, weights = factors[index[bias], how], factors[index[weight], how]
            same = own.shape == weights.shape and np.allclose(own, weights, rtol=1e-12, atol=0)
            # The layout check agrees with the numbers (multi-axis attention biases
            # have their weight's g too, but keep tensor-normal factors: not shared).
            assert same == layouts_agree, (name, captured.leaf_names[bias], how)
            assert same or bias not in shared, (name, captured.leaf_names[bias], how)


def _token_model():
    """A tanh layer and a readout shared over T = 6 tokens of 5 sequences, per-token
    Categorical: two K-FAC layers with N·T = 30 positions each."""
    t, k, width, classes = 6, 4, 5, 3
    x = jax.random.normal(jax.random.PRNGKey(0), (5, t, k))
    params = {
        "w": jax.random.normal(jax.random.PRNGKey(1), (k, width)),
        "v": jax.random.normal(jax.random.PRNGKey(2), (width, classes)),
    }
    model = ng.Model(lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"], ng.Categorical())
    return model, params, x


def _factors(model, params, x, solver, key):
    batch = CurvatureBatch(model, params, x, "exact", key=key)
    factors = solver.measured(batch, jnp.float64).factors
    return [f for pair in factors.values() for f in pair]


def test_subsampled_factor_statistics_are_unbiased_and_converge_to_the_full_ones():
    """K-FAC's A and G from S of the N·T = 30 positions of each layer: with S ≥ N·T the
    full factors; each subsample symmetric PSD; their mean over draws converges to the
    full factors as 1/√draws (Monte-Carlo error), so it is unbiased; and the error of
    one draw falls as S grows."""
    model, params, x = _token_model()
    full = _factors(model, params, x, ng.Kronecker(), None)
    for got, want in zip(
        _factors(model, params, x, ng.Kronecker(statistics_positions=30), None), full, strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12)

    def draws(count, positions):
        solver = ng.Kronecker(statistics_positions=positions)
        keys = jax.random.split(jax.random.PRNGKey(7), count)
        return jax.vmap(lambda key: _factors(model, params, x, solver, key))(keys)

    def error(estimate, want):
        return float(jnp.linalg.norm(estimate - want) / jnp.linalg.norm(want))

    sampled = draws(1600, 8)
    for draw, want in zip(sampled, full, strict=True):
        np.testing.assert_allclose(draw, jnp.swapaxes(draw, 1, 2), rtol=1e-12, atol=1e-14)
        assert float(jnp.min(jnp.linalg.eigvalsh(draw))) > -1e-12
        few, many = error(jnp.mean(draw[:25], 0), want), error(jnp.mean(draw, 0), want)
        assert many < 0.05 and many < 0.5 * few, (few, many)  # 1/√64 = 0.125 expected
    for k, want in enumerate(full):
        single = [np.mean([error(d, want) for d in draws(200, s)[k]]) for s in (4, 8, 16, 24)]
        assert single == sorted(single, reverse=True), single


def test_subsampled_statistics_are_refused_where_they_do_not_apply():
    with pytest.raises(ValueError, match="statistics_positions must be an int"):
        ng.Kronecker(statistics_positions=0)
    with pytest.raises(ValueError, match='approximation="reduce"'):
        ng.Kronecker("reduce", statistics_positions=8)


def test_kfac_with_subsampled_statistics_trains_a_token_model():
    model, params, x = _token_model()
    y = jnp.arange(30).reshape(5, 6) % 3
    tx = ng.natural_gradient(model, 1.0, solver=ng.Kronecker(statistics_positions=8))
    state = tx.init(params)
    start = float(model.nll(params, x, y))
    for _ in range(5):
        updates, state = tx.update(
            jax.grad(model.nll)(params, x, y), state, params, inputs=x, targets=y
        )
        params = jax.tree.map(jnp.add, params, updates)
    assert float(model.nll(params, x, y)) < 0.7 * start
