"""The walk over a jaxpr that finds every use of the parameter leaves."""

from __future__ import annotations

import dataclasses

import jax

from natgrad_jax._capture.rules import RULES, Read, follow_concatenation, use_as_other
from natgrad_jax._capture.uses import (
    CALL_OPS,
    REMAT_OPS,
    Concatenation,
    LayerOutputs,
    Origin,
    Use,
    is_literal,
    output_uses,
)
from natgrad_jax._jaxpr import inner_jaxpr


def live_equations(jaxpr) -> list[bool]:
    """Whether each equation feeds the jaxpr's outputs or has effects. A use by dead code
    is no use: flax's ``nn.RNN`` traces its cell once outside the scan, for shapes."""
    needed = {v for v in jaxpr.outvars if not is_literal(v)}
    live = [False] * len(jaxpr.eqns)
    for k in reversed(range(len(jaxpr.eqns))):
        eqn = jaxpr.eqns[k]
        if eqn.effects or any(v in needed for v in eqn.outvars):
            live[k] = True
            needed.update(v for v in eqn.invars if not is_literal(v))
    return live


@dataclasses.dataclass
class Walk:
    """The state of one walk over a jaxpr, which the rules read and extend.

    ``env`` maps a variable to how it derives from a parameter leaf (``Origin`` or
    ``Concatenation``); ``uses`` collects every use of a leaf; ``tainted`` holds the
    variables computed from the inputs. Every equation gets the next index of
    ``counter`` (the interpreter numbers them the same way). ``scan_lengths`` are the
    lengths of the ``scan`` bodies we are inside: a layer there is applied once per
    step, with the weight entering the scan as a constant.
    """

    env: dict
    uses: list
    counter: list
    tainted: set
    scan_lengths: tuple
    layer_outputs: LayerOutputs

    def enter(self, inner, derived, tainted, scan_lengths) -> list:
        """Walks a nested jaxpr (a call's or a scan's body) whose leading inputs are
        ``derived``; its uses join this walk's. Returns how each of its outputs derives
        from a leaf (None where it does not)."""
        origins = inner_origins(inner, derived)
        return analyse(inner, origins, self.uses, self.counter, tainted, scan_lengths)


def analyse(closed_jaxpr, origins, uses, counter, tainted, scan_lengths=()) -> list:
    """Walks a jaxpr, following parameter-derived variables: each live equation goes to
    the rule of its primitive (``RULES``; ``use_as_other`` for the primitives capture
    does not read), or, where it reads concatenated leaves, to
    ``follow_concatenation``. Returns how each output derives from a leaf, if it does:
    the caller decides whether that is a use (the model's outputs, a scan's) or a value
    its own walk follows (a call's)."""
    live = live_equations(closed_jaxpr.jaxpr)
    layer_outputs = LayerOutputs(closed_jaxpr.jaxpr, live)
    walk = Walk(dict(origins), uses, counter, tainted, scan_lengths, layer_outputs)
    for eqn, is_live in zip(closed_jaxpr.jaxpr.eqns, live, strict=True):
        index = counter[0]
        counter[0] += 1 + (0 if is_live else nested_equations(eqn))
        if not is_live:
            continue
        derived = [None if is_literal(v) else walk.env.get(v) for v in eqn.invars]
        from_inputs = any(v in tainted for v in eqn.invars if not is_literal(v))
        read = Read(eqn, index, derived, from_inputs)
        if from_inputs:
            tainted.update(eqn.outvars)
        if any(isinstance(derived[k], Concatenation) for k in read.sides):
            follow_concatenation(walk, read)
        else:
            RULES.get(eqn.primitive.name, use_as_other)(walk, read)
    return [None if is_literal(v) else walk.env.get(v) for v in closed_jaxpr.jaxpr.outvars]


def inner_origins(inner, derived) -> dict:
    """The origins of a nested jaxpr's leading inputs (those ``derived`` describes)."""
    return {v: d for v, d in zip(inner.jaxpr.invars, derived, strict=False) if d is not None}


def count_equations(closed_jaxpr) -> int:
    """How many indices ``analyse`` gives a jaxpr's equations, nested ones included."""
    return sum(1 + nested_equations(eqn) for eqn in closed_jaxpr.jaxpr.eqns)


def nested_equations(eqn) -> int:
    """How many indices the equations nested in ``eqn`` (a call or a scan) take."""
    nested = eqn.primitive.name in CALL_OPS | REMAT_OPS or eqn.primitive.name == "scan"
    inner = inner_jaxpr(eqn) if nested else None
    return 0 if inner is None else count_equations(inner)


def trace_uses(apply_fn, params, inputs):
    """``(jaxpr of apply_fn, every use of its parameter leaves)`` for these shapes."""
    closed = jax.make_jaxpr(apply_fn)(params, inputs)
    return closed, parameter_uses(closed, len(jax.tree.leaves(params)))


def parameter_uses(closed, num_leaves) -> list[Use]:
    """Every use of the first ``num_leaves`` inputs (the parameter leaves) of a jaxpr."""
    origins = {v: Origin(k, (), False) for k, v in enumerate(closed.jaxpr.invars[:num_leaves])}
    uses: list[Use] = []
    outputs = analyse(closed, origins, uses, [0], set(closed.jaxpr.invars[num_leaves:]))
    return uses + output_uses(outputs)
