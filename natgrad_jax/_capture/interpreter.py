"""The probe interpreter: a jaxpr evaluated with a zero probe added to the output of
every captured layer, returning the layers' inputs."""

from __future__ import annotations

import collections
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from natgrad_jax._capture.convolution import CONVOLUTION, convolution
from natgrad_jax._capture.find import constant_factor
from natgrad_jax._capture.layer import Capture, Layer
from natgrad_jax._capture.uses import CALL_OPS, REMAT_OPS, is_literal
from natgrad_jax._capture.walk import count_equations, parameter_uses
from natgrad_jax._fisher import varying_axes
from natgrad_jax._jaxpr import inner_jaxpr, scan_counts
from natgrad_jax._sharding_types import explicit_mesh_of_type


def bind(eqn, args):
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    # jax ≤ 0.9 returns (subfuns, params); newer releases return the params alone.
    subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    with _mesh_of(eqn):
        out = eqn.primitive.bind(*subfuns, *args, **params)
    return out if eqn.primitive.multiple_results else [out]


def _mesh_of(eqn):
    """The mesh context the equation was traced under, where its results are typed on a
    mesh with explicit axes (a model run as written inside natgrad's automatic region,
    ``_sharding_types._as_written``); the current one otherwise."""
    for var in eqn.outvars:
        mesh = explicit_mesh_of_type(var.aval)
        if mesh is not None:
            return jax.sharding.use_abstract_mesh(mesh)
    return contextlib.nullcontext()


def _evaluate(closed_jaxpr, args, probes, activations, counter):
    """Runs a jaxpr with the probes of ``probes[k] = [(layer, probe), ...]`` added to the
    output of equation k (several where leaves were concatenated); ``activations``
    receives each probed equation's layer input (and, under ``("factor", k)``, the
    constant factors of BatchNorm-like scales)."""
    factors = {
        layer.constant_factor[0]: layer.constant_factor[1]
        for pairs in probes.values()
        for layer, _ in pairs
        if layer.constant_factor is not None
    }
    env = dict(zip(closed_jaxpr.jaxpr.constvars, closed_jaxpr.consts, strict=True))
    env.update(zip(closed_jaxpr.jaxpr.invars, args, strict=True))

    def read(var):
        return var.val if is_literal(var) else env[var]

    for eqn in closed_jaxpr.jaxpr.eqns:
        index = counter[0]
        counter[0] += 1
        values = [read(v) for v in eqn.invars]
        if eqn.primitive.name in CALL_OPS and inner_jaxpr(eqn) is not None:
            outs = _evaluate(inner_jaxpr(eqn), values, probes, activations, counter)
        elif eqn.primitive.name == "scan":
            outs = _evaluate_scan(eqn, values, probes, activations, counter)
        elif eqn.primitive.name in REMAT_OPS:
            outs = _evaluate_checkpoint(eqn, values, probes, activations, counter)
        else:
            outs = _bind(eqn, values)
            if index in factors:
                factor = values[factors[index]]
                activations["factor", index] = jnp.broadcast_to(factor, outs[0].shape)
            if index in probes:
                layer_input = _layer_input(probes[index][0][0], values, activations)
                activations[index] = _on_automatic_axes(layer_input)
                probe = _equation_probe(probes[index]).astype(outs[0].dtype)
                with _mesh_of(eqn):
                    outs = [outs[0] + _typed_as(probe, outs[0])]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in closed_jaxpr.jaxpr.outvars]


def _bind(eqn, values) -> list:
    """``bind``, but a convolution of floats through ``convolution`` (its backward pass
    keeps the kernel's layout)."""
    floats = all(jnp.issubdtype(jnp.result_type(v), jnp.floating) for v in values)
    if eqn.primitive is CONVOLUTION and floats:
        return [convolution(eqn.params, *values)]
    return bind(eqn, values)


def _typed_as(value, like):
    """``value`` typed as ``like`` is, where ``like`` is typed on a mesh with explicit
    axes (under that mesh's context, see ``_mesh_of``); ``value`` elsewhere."""
    if explicit_mesh_of_type(jax.typeof(like)) is None:
        return value
    return jax.sharding.reshard(value, jax.typeof(like).sharding.spec)


def _on_automatic_axes(value):
    """``value`` typed on the context's automatic axes, where it is typed on explicit ones
    (a layer input inside a model run as written): natgrad's algebra runs there."""
    if explicit_mesh_of_type(jax.typeof(value)) is None:
        return value
    return jax.sharding.reshard(value, PartitionSpec(*[None] * jnp.ndim(value)))


def _equation_probe(pairs):
    """The probe added to an equation's output: its layer's, or the probes of the parts
    of a concatenated operand, each padded with zeros to its place."""
    if pairs[0][0].part is None:
        return pairs[0][1]
    total = 0
    for layer, probe in pairs:
        axis, start, size = layer.part
        widths = [(0, 0)] * probe.ndim
        widths[axis] = (start, size - start - probe.shape[axis])
        total = total + jnp.pad(probe, widths)
    return total


def _layer_input(layer: Layer, values, activations):
    """The input a of a layer: its non-parameter operand (times the constant factor)."""
    value = values[1 - layer.param_operand]
    if layer.constant_factor is None:
        return value
    eqn, _, chain = layer.constant_factor
    factor = activations["factor", eqn]
    for primitive, params in chain:
        factor = primitive.bind(factor, **params)
    return value * factor.astype(value.dtype)


def _evaluate_scan(eqn, values, probes, activations, counter):
    """A scan whose body holds probed layers: rerun as ``lax.scan`` with the probes as
    extra scanned inputs and the layers' inputs as extra stacked outputs."""
    body = inner_jaxpr(eqn)
    start, inside = _probes_inside(body, probes, counter)
    if not inside:
        return bind(eqn, values)
    num_consts, num_carry = scan_counts(eqn)
    consts, carry = values[:num_consts], values[num_consts : num_consts + num_carry]
    xs = values[num_consts + num_carry :]

    def step(carry, scanned):
        xs_t, probes_t = scanned
        step_probes = {
            k: [(layer, p) for (layer, _), p in zip(probes[k], ps, strict=True)]
            for k, ps in zip(inside, probes_t, strict=True)
        }
        # Reads fall back to the values stashed before the scan (constant factors).
        step_inputs = collections.ChainMap({}, activations)
        outs = _evaluate(body, [*consts, *carry, *xs_t], step_probes, step_inputs, [start])
        return outs[:num_carry], (outs[num_carry:], [step_inputs[k] for k in inside])

    carry, (ys, stacked_inputs) = jax.lax.scan(
        step,
        carry,
        (xs, [[p for _, p in probes[k]] for k in inside]),
        length=eqn.params["length"],
        reverse=eqn.params["reverse"],
        unroll=eqn.params["unroll"],
    )
    activations.update(zip(inside, stacked_inputs, strict=True))
    return [*carry, *ys]


def _probes_inside(body, probes, counter) -> tuple[int, list]:
    """``(start, the probed equations of a nested body)``, the counter moved past it."""
    start = counter[0]
    counter[0] += count_equations(body)
    return start, sorted(k for k in probes if start <= k < counter[0])


def _evaluate_checkpoint(eqn, values, probes, activations, counter):
    """A ``jax.checkpoint`` whose body holds probed layers: rerun as a checkpoint with the
    probes as extra inputs and the layers' inputs as extra outputs, so that the backward
    pass recomputes the body as the model's own does (its policy kept), and saves only
    what the statistics read."""
    body = inner_jaxpr(eqn)
    start, inside = _probes_inside(body, probes, counter)
    if not inside:
        return bind(eqn, values)

    def run(values, inside_probes):
        body_probes = {
            k: [(layer, p) for (layer, _), p in zip(probes[k], ps, strict=True)]
            for k, ps in zip(inside, inside_probes, strict=True)
        }
        body_inputs = collections.ChainMap({}, activations)
        outs = _evaluate(body, values, body_probes, body_inputs, [start])
        return outs, [body_inputs[k] for k in inside]

    rerun = jax.checkpoint(run, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
    outs, layer_inputs = rerun(values, [[p for _, p in probes[k]] for k in inside])
    activations.update(zip(inside, layer_inputs, strict=True))
    return outs


def probed_apply(apply_fn, captured: Capture, params, inputs, probes):
    """``apply_fn`` with ``probes[k]`` added to the output of captured layer k.

    Returns ``(outputs, inputs_of_layers)``: the gradient of a function of the outputs
    w.r.t. ``probes[k]`` is the output-gradient g of layer k, and ``inputs_of_layers[k]``
    its input a.
    """
    closed, layers = _traced_here(apply_fn, captured, params, inputs)
    args = [*jax.tree.leaves(params), *jax.tree.leaves(inputs)]
    by_eqn = collections.defaultdict(list)
    for layer, probe in zip(layers, probes, strict=True):
        by_eqn[layer.eqn].append((layer, probe))
    activations: dict[int, jax.Array] = {}
    flat_outputs = _evaluate(closed, args, by_eqn, activations, [0])
    outputs = jax.tree.unflatten(
        jax.tree.structure(jax.eval_shape(apply_fn, params, inputs)), flat_outputs
    )
    return outputs, [activations[layer.eqn] for layer in layers]


def _traced_here(apply_fn, captured: Capture, params, inputs):
    """The jaxpr to evaluate and the captured layers at its equations.

    Inside ``shard_map`` (values varying over mapped axes) ``apply_fn`` is traced again
    on the values themselves: a primitive there needs its operands to vary alike (a
    literal 0 and the examples in a ReLU, a replicated kernel and a sharded batch), and
    tracing inserts the casts (``pvary``) that the analysis's jaxpr, traced on shapes
    alone, lacks. Its layers are found again, leaf by leaf.
    """
    if not any(varying_axes(value) for value in jax.tree.leaves((params, inputs))):
        return captured.jaxpr, captured.layers
    closed = jax.make_jaxpr(apply_fn)(params, inputs)
    uses = parameter_uses(closed, len(jax.tree.leaves(params)))
    found = {(use.leaf, use.part): use for use in uses if use.eqn is not None}
    layers = []
    for layer in captured.layers:
        use = found.get((layer.leaf, layer.part))
        if use is None:
            name = captured.leaf_names[layer.leaf]
            raise ValueError(
                f"apply_fn traced on device-varying values (inside shard_map) does not use "
                f"{name} as the layer it is traced on shapes alone: {layer.summary}."
            )
        layers.append(dataclasses.replace(layer, eqn=use.eqn, constant_factor=constant_factor(use)))
    return closed, tuple(layers)
