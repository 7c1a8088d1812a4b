"""Curvature work on a cadence: run where it is due and the batch can be measured.

The transform's statistics and refactorisations and ``"auto"``'s own K-FAC refreshes
share these two rules: a step is due every ``period`` steps (at every step without any
condition for a period of 1), and a due refresh runs as one ``lax.cond`` that also skips
a batch the transform will not take (``CurvatureBatch.measurable``).
"""

from __future__ import annotations

import numbers

import jax

from natgrad_jax._fisher import device_invariant


def is_every_step(period) -> bool:
    """Whether ``period`` is a Python 1: due at every step, without a condition."""
    return isinstance(period, numbers.Real) and not isinstance(period, bool) and period == 1


def due_every(period, count):
    """Whether step ``count`` is due every ``period`` steps: ``True`` for every step, or
    a traced flag."""
    return True if is_every_step(period) else count % period == 0


def when_due(due, measurable, refresh, state, axis_name=None):
    """``refresh(state)`` where ``due`` (``True``, or a flag) and ``measurable`` (a
    flag, or ``None``: every batch) hold, else ``state``: one ``lax.cond``, whose
    refreshed branch is typed device-invariant over ``axis_name`` like the stored state
    (inside ``shard_map`` both branches must be typed alike)."""
    if measurable is not None:
        due = measurable if due is True else due & measurable
    if due is True:
        return refresh(state)
    refreshed = lambda stored: device_invariant(refresh(stored), axis_name)
    return jax.lax.cond(due, refreshed, lambda stored: stored, state)
