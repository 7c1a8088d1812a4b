"""The probed forward pass's convolution: lax's own numbers in both modes of
differentiation, with a backward pass whose kernel keeps the forward's layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natgrad_jax as ng
from natgrad_jax._capture import capture, probed_forward
from natgrad_jax._capture.convolution import convolution
from natgrad_jax._solvers.batch import CurvatureBatch
from natgrad_jax._solvers.factored import _conv_patches, leaf_to_matrix
from tests.helpers import equations

# (input shape, kernel shape, keyword arguments of lax.conv_general_dilated)
CASES = {
    "2-D NHWC/HWIO, SAME (the benchmark's CNN)": (
        (3, 6, 6, 2),
        (3, 3, 2, 4),
        dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
    ),
    "2-D NCHW/OIHW, stride 2, VALID (equinox's layout)": (
        (3, 2, 7, 7),
        (4, 2, 3, 3),
        dict(window_strides=(2, 2), padding="VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")),
    ),
    "1-D, kernel dilation 2, uneven padding": (
        (2, 9, 3),
        (3, 3, 5),
        dict(
            window_strides=(1,),
            padding=((2, 1),),
            rhs_dilation=(2,),
            dimension_numbers=("NWC", "WIO", "NWC"),
        ),
    ),
    "2-D input dilation (a transposed convolution)": (
        (2, 4, 4, 3),
        (3, 3, 3, 2),
        dict(
            window_strides=(1, 1),
            padding=((1, 2), (1, 2)),
            lhs_dilation=(2, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ),
    ),
    "depthwise (feature groups)": (
        (2, 5, 5, 3),
        (3, 3, 1, 6),
        dict(
            window_strides=(1, 1),
            padding="SAME",
            feature_group_count=3,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ),
    ),
    "batch groups": (
        (4, 5, 5, 3),
        (3, 3, 3, 4),
        dict(
            window_strides=(1, 1),
            padding="SAME",
            batch_group_count=2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ),
    ),
    "3-D NDHWC/DHWIO, stride (1, 2, 1)": (
        (2, 4, 5, 4, 2),
        (2, 3, 2, 2, 3),
        dict(
            window_strides=(1, 2, 1),
            padding="SAME",
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        ),
    ),
}


def _case(name):
    x_shape, k_shape, options = CASES[name]
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], x_shape)
    kernel = jax.random.normal(keys[1], k_shape)
    lax_conv = lambda x, k: jax.lax.conv_general_dilated(x, k, **options)
    params = jax.make_jaxpr(lax_conv)(x, kernel).eqns[0].params
    ours = lambda x, k: convolution(params, x, k)
    return lax_conv, ours, x, kernel, keys[2:]


@pytest.mark.parametrize("name", CASES)
def test_values_and_both_modes_of_differentiation_are_lax_own(name):
    """Outputs, both cotangents, the forward-mode tangent and a Hessian-vector product
    (forward over reverse) equal those of lax.conv_general_dilated to 1e-12 (float64)."""
    lax_conv, ours, x, kernel, (key_t, key_c) = _case(name)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    close(ours(x, kernel), lax_conv(x, kernel))
    out, pullback = jax.vjp(lax_conv, x, kernel)
    cotangent = jax.random.normal(key_c, out.shape)
    jax.tree.map(close, jax.vjp(ours, x, kernel)[1](cotangent), pullback(cotangent))
    tangents = (jax.random.normal(key_t, x.shape), jnp.cos(kernel))
    close(jax.jvp(ours, (x, kernel), tangents)[1], jax.jvp(lax_conv, (x, kernel), tangents)[1])

    def hvp(conv):
        loss = lambda x, k: jnp.sum(jnp.tanh(conv(x, k)) * cotangent)
        return jax.jvp(jax.grad(loss, argnums=(0, 1)), (x, kernel), tangents)[1]

    jax.tree.map(close, hvp(ours), hvp(lax_conv))


def _specs(jaxpr):
    """(lhs_spec, rhs_spec, out_spec) of each convolution in ``jaxpr``."""
    return [tuple(e.params["dimension_numbers"]) for e in equations(jaxpr, "conv_general_dilated")]


def _canonical(ndim):
    """XLA CPU's fast layout: (N, spatial…, C) input and output, (spatial…, I, O) kernel."""
    feature_last = (0, ndim - 1, *range(1, ndim - 1))
    return (feature_last, (ndim - 1, ndim - 2, *range(ndim - 2)), feature_last)


@pytest.mark.parametrize("name", CASES)
def test_the_forward_pass_and_the_input_cotangent_convolve_in_the_canonical_layout(name):
    """The reason for the module: inside lax.cond XLA's CPU backend runs a convolution in
    any other layout as a generic loop. The forward pass and the input's cotangent are
    canonical convolutions; lax's own input cotangent is not (it labels the kernel's
    feature axes swapped)."""
    lax_conv, ours, x, kernel, _ = _case(name)
    canonical = _canonical(x.ndim)
    out, pull = jax.vjp(lambda x: ours(x, kernel), x)
    assert _specs(jax.make_jaxpr(ours)(x, kernel).jaxpr) == [canonical]
    assert _specs(jax.make_jaxpr(pull)(out).jaxpr) == [canonical]
    _, lax_pull = jax.vjp(lambda x: lax_conv(x, kernel), x)
    assert _specs(jax.make_jaxpr(lax_pull)(out).jaxpr) != [canonical]


def test_the_statistics_pass_of_a_cnn_backpropagates_in_the_forward_layout():
    """The probed forward pass binds a model's convolutions through ``convolution``: the
    rows' backward pass through the second convolution reads its kernel labelled as in
    the forward pass, never swapped, and the first convolution's output-gradients g equal
    those of the model's own vjp."""
    numbers = ("NHWC", "HWIO", "NHWC")
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=numbers
    )

    def after_first(p, h):
        return jnp.tanh(conv(jnp.tanh(h), p["w2"])).reshape(h.shape[0], -1) @ p["head"]

    cnn = lambda p, x: after_first(p, conv(x, p["w1"]))
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    params = {
        "w1": jax.random.normal(keys[0], (3, 3, 2, 3)),
        "w2": jax.random.normal(keys[1], (3, 3, 3, 3)),
        "head": jax.random.normal(keys[2], (48, 4)),
    }
    x = jax.random.normal(keys[3], (5, 4, 4, 2))
    captured = capture(cnn, params, x)
    rows = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 4))

    def gradients(rows):
        return probed_forward(cnn, captured, params, x).layer_gradients(rows)

    jaxpr = jax.make_jaxpr(gradients)(rows).jaxpr
    convolutions = equations(jaxpr, "conv_general_dilated")
    specs = {e.params["dimension_numbers"].rhs_spec for e in convolutions}
    # HWIO: O is axis 3, I axis 2 (the kernels' cotangents are convolutions too).
    assert (3, 2, 0, 1) in specs and (2, 3, 0, 1) not in specs, specs
    first = next(
        k
        for k, layer in enumerate(captured.layers)
        if layer.kind == "conv" and captured.leaf_names[layer.leaf].endswith("w1']")
    )
    h = conv(x, params["w1"])
    expected = jax.vmap(jax.vjp(lambda h: after_first(params, h), h)[1])(rows)[0]
    np.testing.assert_allclose(gradients(rows)[first], expected, rtol=1e-12, atol=1e-12)


def test_kfac_statistics_of_an_nchw_cnn_convolve_in_the_canonical_layout():
    """Equinox's layout (NCHW input, OIHW kernel): the K-FAC statistics' forward pass,
    the patches of A and the backward pass through the second convolution run no
    convolution on an NCHW input, and every leaf's factors equal those of the same
    network in NHWC/HWIO (A up to the order of its patch axis)."""
    layouts = {"nchw": ("NCHW", "OIHW", "NCHW"), "nhwc": ("NHWC", "HWIO", "NHWC")}

    def network(numbers):
        channel_axis = numbers[0].index("C")

        def apply(p, x):
            for w in (p["w1"], p["w2"]):
                x = jnp.tanh(
                    jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=numbers)
                )
            x = jnp.moveaxis(x, channel_axis, -1)  # one head for both layouts
            return x.reshape(x.shape[0], -1) @ p["head"]

        return apply

    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    hwio = [jax.random.normal(keys[0], (3, 3, 2, 4)), jax.random.normal(keys[1], (3, 3, 4, 4))]
    head = jax.random.normal(keys[2], (64, 4))
    x = jax.random.normal(keys[3], (5, 4, 4, 2))
    cases = {
        "nhwc": ({"w1": hwio[0], "w2": hwio[1], "head": head}, x),
        "nchw": (
            {
                "w1": hwio[0].transpose(3, 2, 0, 1),
                "w2": hwio[1].transpose(3, 2, 0, 1),
                "head": head,
            },
            x.transpose(0, 3, 1, 2),
        ),
    }
    factors = {}
    for name, (params, inputs) in cases.items():
        model = ng.Model(network(layouts[name]), ng.Categorical())

        def measured(params, model=model, inputs=inputs):
            batch = CurvatureBatch(model, params, inputs, "exact")
            return ng.Kronecker().measured(batch, jnp.float64).factors

        if name == "nchw":
            lhs_specs = {spec[0] for spec in _specs(jax.make_jaxpr(measured)(params).jaxpr)}
            assert (0, 1, 2, 3) not in lhs_specs, lhs_specs
        factors[name] = measured(params)
    # The kernels' views differ by layout (HWIO: A over 3·3·I patches, then G; OIHW: G,
    # then A over I·3·3), so A are equal up to a permutation: compare spectra.
    spectra = lambda pair: sorted((np.linalg.eigvalsh(f) for f in pair), key=len)
    assert factors["nhwc"].keys() == factors["nchw"].keys()
    for k, pair in factors["nhwc"].items():
        for ours, theirs in zip(spectra(pair), spectra(factors["nchw"][k]), strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", [name for name in CASES if "groups" not in name])
def test_patches_times_the_kernel_as_a_matrix_are_the_convolution(name):
    """K-FAC's input rows of a convolution (``_conv_patches``): row (n, t) times the
    kernel viewed as K×D (``leaf_to_matrix``) is the output at site t, for every layout,
    stride, padding and dilation; sliced out of the input (no convolution) unless the
    convolution dilates its input. (Grouped convolutions are not captured: their
    kernels take the exact diagonal.)"""
    lax_conv, _, x, kernel, _ = _case(name)
    (layer,) = capture(lambda k, x: lax_conv(x, k), kernel, x).layers
    assert layer.kind == "conv"
    patches = _conv_patches(layer, x)
    numbers = layer.primitive_params["dimension_numbers"]
    out = jnp.transpose(
        lax_conv(x, kernel), (numbers.out_spec[0], *numbers.out_spec[2:], numbers.out_spec[1])
    )
    want = out.reshape(out.shape[0], -1, out.shape[-1])
    np.testing.assert_allclose(
        patches @ leaf_to_matrix(layer, kernel), want, rtol=1e-12, atol=1e-12
    )
    sliced = set(layer.primitive_params["lhs_dilation"]) == {1}
    convolutions = equations(
        jax.make_jaxpr(lambda x: _conv_patches(layer, x))(x).jaxpr, "conv_general_dilated"
    )
    assert (len(convolutions) == 0) == sliced
