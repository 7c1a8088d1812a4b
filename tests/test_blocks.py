"""A factor side kept as diagonal blocks (``_blocks``): the blocks are the matrix's own,
and products with a stack are products with the block-diagonal matrix it stands for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from natgrad_jax._blocks import (
    block_matmul,
    block_ranges,
    blocked_shape,
    blocks_of,
    is_blocked,
    stacked,
)


def test_a_side_is_blocked_over_twice_the_block_size_in_near_equal_ranges():
    assert not is_blocked(8, 4) and is_blocked(9, 4) and not is_blocked(10**6, None)
    assert blocked_shape(8, 4) == (8, 8) and blocked_shape(10, 4) == (3, 4, 4)
    assert blocked_shape(2048, 512) == (4, 512, 512)
    assert block_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert block_ranges(2048, 4) == [(0, 512), (512, 1024), (1024, 1536), (1536, 2048)]


def test_stacked_blocks_are_the_matrixs_own_padded_with_zeros_or_an_identity():
    matrix = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (10, 10)))
    parts = [jnp.asarray(matrix[a:b, a:b]) for a, b in block_ranges(10, 3)]
    blocks = np.asarray(stacked(parts))
    assert blocks.shape == (3, 4, 4)
    for block, (start, stop) in zip(blocks, block_ranges(10, 3), strict=True):
        side = stop - start
        np.testing.assert_array_equal(block[:side, :side], matrix[start:stop, start:stop])
        np.testing.assert_array_equal(block[side:], 0.0)
        np.testing.assert_array_equal(block[:, side:], 0.0)
    for block, part in zip(blocks_of(jnp.asarray(blocks), 10), parts, strict=True):
        np.testing.assert_array_equal(block, part)  # ``blocks_of`` undoes ``stacked``
    with_identity = np.asarray(stacked(parts, padding=1.0))
    np.testing.assert_array_equal(with_identity[:2, 3], [[0, 0, 0, 1]] * 2)  # the 3×3 ones
    np.testing.assert_array_equal(with_identity[2], blocks[2])  # the 4×4 one unpadded


@pytest.mark.parametrize("size, count", [(10, 3), (12, 3), (2, 2)])
@pytest.mark.parametrize("transpose", [False, True])
def test_a_product_with_a_stack_is_one_with_its_block_diagonal_matrix(size, count, transpose):
    """Uneven (10 in 3: sides 3, 3, 4) and equal (12 in 3: a reshape) ranges."""
    keys = jax.random.split(jax.random.PRNGKey(size), count + 1)
    side = -(-size // count)
    ranges = block_ranges(size, count)
    parts = [
        np.asarray(jax.random.normal(key, (b - a, b - a)))
        for key, (a, b) in zip(keys, ranges, strict=False)
    ]
    dense = scipy.linalg.block_diag(*parts)
    blocks = stacked([jnp.asarray(part) for part in parts])
    assert blocks.shape == (count, side, side)
    matrix = np.asarray(jax.random.normal(keys[-1], (size, 5)))
    want = (dense.T if transpose else dense) @ matrix
    got = block_matmul(blocks, jnp.asarray(matrix), transpose=transpose)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    whole = block_matmul(jnp.asarray(dense), jnp.asarray(matrix), transpose=transpose)
    np.testing.assert_allclose(whole, want, rtol=1e-12, atol=1e-14)
