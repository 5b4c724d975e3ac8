"""GGUF's Q5_1: each row is blocks of 32 values, each block an fp16 scale d, an fp16 minimum m,
the values' fifth bits and low four bits as in Q5_0, q standing for d * q + m.

Products take llama.cpp's arithmetic: the input quantized in groups of 32 (as for Q8_0), per
block an int32 dot product times the two scales, plus the minimum times the input's block sum
(the int8 family, a row at a time; above SMALL_BATCH inputs, 16 inputs at a time in SIMD
lanes, minimums through the inputs' sums)."""

from typing import NamedTuple

import numpy as np
from numba import njit

from llamette.kernels.halves import block_scale
from llamette.kernels.int8 import fivebit_dot_32
from llamette.kernels.simd import prefetch_ahead
from llamette.weight_types.q5_0 import fifth_bit, five_bit_values
from llamette.weight_types.row_blocks import (  # noqa: F401 (the table's functions)
    group_size,
    input_group_size,
    int8_arrays,
)
from llamette.weight_types.row_blocks import lanes_product as product  # noqa: F401

NAME = "q5_1"
GGUF_TYPE = 7  # gguf.GGMLQuantizationType.Q5_1
BLOCK, BLOCK_BYTES = 32, 24  # values per block; fp16 scale and minimum, 4 + 16 bytes of values
F32 = np.float32


class Q5_1Tensor(NamedTuple):
    """A matrix in Q5_1 blocks, kept as the file's bytes."""

    blocks: np.ndarray  # uint8 (rows, cols / 32 * 24)

    @property
    def shape(self) -> tuple[int, int]:
        rows, nbytes = self.blocks.shape
        return rows, nbytes // BLOCK_BYTES * BLOCK

    def dequantize(self) -> np.ndarray:
        rows, cols = self.shape
        blocks = self.blocks.reshape(rows, cols // BLOCK, BLOCK_BYTES)
        halves = blocks[:, :, :4].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 2)
        scales, minimums = halves[:, :, :1], halves[:, :, 1:]
        values = five_bit_values(blocks[:, :, 4:8], blocks[:, :, 8:]).astype(np.float32)
        return (scales * values + minimums).reshape(rows, cols)


Tensor = Q5_1Tensor


def from_gguf(data: np.ndarray, shape: tuple[int, int]) -> Q5_1Tensor:
    return Q5_1Tensor(data.reshape(shape[0], -1))


@njit(inline="always")
def decode_row(out, w, i):
    """out (cols,) = d * q + m, rounded after the product and after the sum (as ggml does)."""
    row = w.blocks[i]
    for block in range(out.shape[0] // BLOCK):
        start, first = block * BLOCK_BYTES, block * BLOCK
        scale, minimum = block_scale(row, start), block_scale(row, start + 2)
        for j in range(16):
            byte = np.int32(row[start + 8 + j])
            low = (byte & 15) | fifth_bit(row, start + 4, j)
            high = (byte >> 4) | fifth_bit(row, start + 4, j + 16)
            out[first + j] = F32(low) * scale + minimum
            out[first + 16 + j] = F32(high) * scale + minimum


# The int8 family's functions: a row unpacked (long prompts), a row dot product, and the rest
# shared (row_blocks).


@njit(inline="always")
def unpack_row(values, scales, w, blocks, _, i):
    """Row i's values q, and its blocks' scales."""
    row = blocks[i]
    for block in range(row.shape[0] // BLOCK_BYTES):
        start, first = block * BLOCK_BYTES, block * BLOCK
        scales[block] = block_scale(row, start)
        for j in range(16):
            byte = np.int32(row[start + 8 + j])
            values[first + j] = (byte & 15) | fifth_bit(row, start + 4, j)
            values[first + 16 + j] = (byte >> 4) | fifth_bit(row, start + 4, j + 16)


@njit(inline="always")
def unpack_minimums(minimums, w, blocks, _, i):
    """Row i's blocks' minimums, as subtracted: -m."""
    row = blocks[i]
    for block in range(row.shape[0] // BLOCK_BYTES):
        minimums[block] = -block_scale(row, block * BLOCK_BYTES + 2)
    return True


@njit(inline="always")
def int8_row_dot(w, blocks, _, i, x, x_scales, x_sums):
    """Per block (dot * scale) * input scale + minimum * (input scale * sum(x)), as Q4_1."""
    row = blocks[i]
    val = F32(0.0)
    for g in range(row.shape[0] // BLOCK_BYTES):
        start = g * BLOCK_BYTES
        prefetch_ahead(row, start)
        dot = fivebit_dot_32(row, start + 4, x, g * BLOCK)
        x_scale = x_scales[g]
        val += (F32(dot) * block_scale(row, start)) * x_scale + block_scale(row, start + 2) * (
            x_scale * F32(x_sums[g])
        )
    return val
