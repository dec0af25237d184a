"""Ordering XLA's schedule by data, where an optimisation barrier does not.

XLA's CPU pipeline removes optimisation barriers before it schedules, and its
memory-minimising scheduler may place an instruction anywhere its operands allow.
Measured on the CPU benchmark's 1-device step (benchmarks/RESULTS.md, issue 22's
fourth round), it placed the attention weights recomputed for the backward pass
right after the forward pass, beside the weights they were to replace, and every
encoder kernel's gradient at the end of the step, holding each layer's float32
operands until then. `after` adds the dependence that keeps each where it belongs.
"""

from __future__ import annotations

import jax

Array = jax.Array


def after(value: Array, dependency: Array) -> Array:
    """`value`, which XLA can use only once `dependency` is computed.

    It is `value + 0 * dependency` (broadcast; the zero cast to `value`'s dtype),
    which XLA does not fold for floats: exact while `dependency` is finite, NaN
    where it is not (a step whose gradients are then non-finite anyway, which the
    step's guard skips). Pass a dependency of `value`'s shape and sharding, or a
    scalar of it, so that the sum needs no communication.
    """
    return value + (dependency * 0).astype(value.dtype)
