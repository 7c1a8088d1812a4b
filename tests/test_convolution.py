"""The probed forward pass's convolution: lax's own numbers in both modes of
differentiation, with a backward pass whose kernel keeps the forward's layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from natgrad_jax._capture import capture, probed_forward
from natgrad_jax._capture.convolution import convolution
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


def _input_cotangent_kernels(conv, x, kernel):
    """The kernels' rhs_spec of the convolutions that pull a cotangent back to ``x``."""
    out, pull = jax.vjp(lambda x: conv(x, kernel), x)
    jaxpr = jax.make_jaxpr(pull)(jnp.zeros(out.shape, out.dtype)).jaxpr
    return [
        e.params["dimension_numbers"].rhs_spec for e in equations(jaxpr, "conv_general_dilated")
    ]


@pytest.mark.parametrize("name", CASES)
def test_the_input_cotangent_reads_the_kernel_in_the_forward_layout(name):
    """The reason for the module: lax's transpose labels the kernel's feature axes
    swapped (a layout XLA's CPU backend runs slowly inside lax.cond); ours convolves with
    the forward's labels."""
    lax_conv, ours, x, kernel, _ = _case(name)
    forward = jax.make_jaxpr(lax_conv)(x, kernel).eqns[0].params["dimension_numbers"].rhs_spec
    out_axis, in_axis, *spatial = forward
    assert _input_cotangent_kernels(ours, x, kernel) == [forward]
    assert _input_cotangent_kernels(lax_conv, x, kernel) == [(in_axis, out_axis, *spatial)]


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
