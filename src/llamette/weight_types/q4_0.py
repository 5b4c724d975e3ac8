"""GGUF's Q4_0: each row is blocks of 32 values, each block an fp16 scale d and 16 bytes whose low
nibbles are values 0..15 and high nibbles values 16..31, q standing for (q - 8) * d.

Products take llama.cpp's arithmetic: the input quantized in groups of 32 (as for Q8_0), per
block an int32 dot product, times the two scales (the int8 family, a row at a time, or 16
inputs at a time in SIMD lanes, which add the blocks' terms in the same order)."""

from typing import NamedTuple

import numpy as np
from numba import njit

from llamette.kernels.halves import block_scale
from llamette.kernels.int8 import nibble_dot_32
from llamette.kernels.simd import prefetch_ahead
from llamette.weight_types.row_blocks import (  # noqa: F401 (the table's functions)
    group_size,
    input_group_size,
    int8_arrays,
)
from llamette.weight_types.row_blocks import same_bits_lanes_product as product  # noqa: F401

NAME = "q4_0"
GGUF_TYPE = 2  # gguf.GGMLQuantizationType.Q4_0
BLOCK, BLOCK_BYTES = 32, 18  # values per block; an fp16 scale, then 16 bytes of value pairs
F32 = np.float32


class Q4_0Tensor(NamedTuple):
    """A matrix in Q4_0 blocks, kept as the file's bytes."""

    blocks: np.ndarray  # uint8 (rows, cols / 32 * 18)

    @property
    def shape(self) -> tuple[int, int]:
        rows, nbytes = self.blocks.shape
        return rows, nbytes // BLOCK_BYTES * BLOCK

    def dequantize(self) -> np.ndarray:
        rows, cols = self.shape
        blocks = self.blocks.reshape(rows, cols // BLOCK, BLOCK_BYTES)
        scales = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
        low = (blocks[:, :, 2:] & 0x0F).astype(np.float32) - 8
        high = (blocks[:, :, 2:] >> 4).astype(np.float32) - 8
        return (np.concatenate([low, high], axis=2) * scales).reshape(rows, cols)


Tensor = Q4_0Tensor


def from_gguf(data: np.ndarray, shape: tuple[int, int]) -> Q4_0Tensor:
    return Q4_0Tensor(data.reshape(shape[0], -1))


@njit(inline="always")
def decode_row(out, w, i):
    row = w.blocks[i]
    for block in range(out.shape[0] // BLOCK):
        start, first = block * BLOCK_BYTES, block * BLOCK
        scale = block_scale(row, start)
        for j in range(16):
            byte = np.int32(row[start + 2 + j])
            out[first + j] = F32((byte & 15) - 8) * scale
            out[first + 16 + j] = F32((byte >> 4) - 8) * scale


# The int8 family's functions: a row unpacked (long prompts), a row dot product, and the rest
# shared (row_blocks).


@njit(inline="always")
def unpack_row(values, scales, w, blocks, _, i):
    """Row i's values q - 8, and its blocks' scales."""
    row = blocks[i]
    for block in range(row.shape[0] // BLOCK_BYTES):
        start, first = block * BLOCK_BYTES, block * BLOCK
        scales[block] = block_scale(row, start)
        for j in range(16):
            byte = np.int32(row[start + 2 + j])
            values[first + j], values[first + 16 + j] = (byte & 15) - 8, (byte >> 4) - 8


@njit(inline="always")
def int8_row_dot(w, blocks, _, i, x, x_scales, x_sums):
    """Per block the int32 dot product of q - 8 with x (q . x - 8 * sum(x)), then
    (dot * weight scale) * input scale, summed in block order."""
    row = blocks[i]
    val = F32(0.0)
    for g in range(row.shape[0] // BLOCK_BYTES):
        start = g * BLOCK_BYTES
        prefetch_ahead(row, start)
        dot = nibble_dot_32(row, start + 2, x, g * BLOCK) - (x_sums[g] << 3)
        val += (F32(dot) * block_scale(row, start)) * x_scales[g]
    return val
