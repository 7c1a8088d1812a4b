"""Reading nested jaxprs the same way on every supported jax (0.9.1 to 0.12).

Two things moved between releases: a call's body is a ``ClosedJaxpr`` on some primitives
and an open ``Jaxpr`` on others, and ``scan`` gave up its ``num_consts``/``num_carry``
parameters (jax 0.12) for ``ft_in``, a flat tree of its (consts, carry, xs) inputs.
"""

from __future__ import annotations

import jax.extend.core as jex_core


def inner_jaxpr(eqn) -> jex_core.ClosedJaxpr | None:
    """The body of a call-like equation (jit, custom derivatives, scan) as a closed jaxpr,
    or None when the equation has none."""
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if inner is None or isinstance(inner, jex_core.ClosedJaxpr):
        return inner
    return jex_core.ClosedJaxpr(inner, ())


def scan_counts(eqn) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a scan equation: its inputs are that many constants,
    then that many carried values, then the scanned inputs.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> scan = lambda w, c, xs: jax.lax.scan(lambda c, x: (c + w * x, c), c, xs)
        >>> jaxpr = jax.make_jaxpr(scan)(2.0, 0.0, jnp.ones(3))
        >>> scan_counts(jaxpr.eqns[0])
        (1, 1)
    """
    params = eqn.params
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].unpack()
    return len(consts), len(carry)
