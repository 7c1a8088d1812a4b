"""A factor side kept as its diagonal blocks: which sides, where the blocks lie, and the
products with them.

A side s over twice ``block_size`` is split into B = ⌈s / block_size⌉ consecutive ranges
as equal as integers allow (``block_ranges``: sides ⌊s/B⌋ or ⌈s/B⌉), kept as one
(B, b, b) stack, b = ⌈s/B⌉, each smaller block padded to b (``stacked``). The stack
stands for the s×s block-diagonal matrix of its blocks: K-FAC keeps a blocked factor and
its inverse so (s·b floats against s²), eigenbasis Adam its eigenbases.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp


def is_blocked(size: int, block_size: int | None) -> bool:
    """Whether a side of this size is kept as diagonal blocks: over twice ``block_size``
    (``None``: never)."""
    return block_size is not None and size > 2 * block_size


def block_layout(size: int, block_size: int) -> tuple[int, int]:
    """(B, b): B = ⌈size / block_size⌉ diagonal blocks of sides at most b = ⌈size / B⌉."""
    count = -(-size // block_size)
    return count, -(-size // count)


def blocked_shape(size: int, block_size: int | None) -> tuple[int, ...]:
    """The shape a side's matrix is kept in: (s, s), or (B, b, b) where ``is_blocked``."""
    if not is_blocked(size, block_size):
        return (size, size)
    count, side = block_layout(size, block_size)
    return (count, side, side)


def block_ranges(size: int, count: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of ``count`` consecutive parts of ``range(size)``, of sides
    ⌊size/count⌋ or ⌈size/count⌉ (the first ones the smaller)."""
    edges = [size * b // count for b in range(count + 1)]
    return list(itertools.pairwise(edges))


def stacked(blocks, padding: float = 0.0) -> jax.Array:
    """Square blocks of sides b or b − 1 as one (B, b, b) stack, each smaller one padded
    with zeros and ``padding`` on its last diagonal entry (1 for an eigenbasis: an
    identity on the padding, no mixing with the block)."""
    side = max(block.shape[0] for block in blocks)
    padded = jnp.stack([jnp.pad(block, (0, side - block.shape[0])) for block in blocks])
    if padding == 0.0:
        return padded
    short = jnp.array([float(block.shape[0] < side) for block in blocks], padded.dtype)
    return padded.at[:, side - 1, side - 1].add(padding * short)


def blocks_of(stack: jax.Array, size: int) -> list[jax.Array]:
    """The diagonal blocks a (B, b, b) stack of a side of ``size`` stands for, each
    without its padding (the inverse of ``stacked``)."""
    sides = [stop - start for start, stop in block_ranges(size, stack.shape[0])]
    return [block[:side, :side] for block, side in zip(stack, sides, strict=True)]


def block_matmul(factor: jax.Array, matrix: jax.Array, transpose: bool = False) -> jax.Array:
    """F M (Fᵀ M with ``transpose``) for an (s, s) matrix F or a (B, b, b) stack standing
    for its block-diagonal matrix, M of s rows."""
    if factor.ndim == 2:
        return (factor.T if transpose else factor) @ matrix
    count, side, _ = factor.shape
    size = matrix.shape[0]
    ranges = block_ranges(size, count)
    equal = size == count * side  # then a reshape, no copies
    padded = (
        matrix.reshape(count, side, -1)
        if equal
        else jnp.stack([jnp.pad(matrix[a:b], ((0, side - (b - a)), (0, 0))) for a, b in ranges])
    )
    product = jnp.einsum("kij,kin->kjn" if transpose else "kji,kin->kjn", factor, padded)
    if equal:
        return product.reshape(matrix.shape)
    return jnp.concatenate([product[k, : b - a] for k, (a, b) in enumerate(ranges)])
