"""GGUF's Q5_0: each row is blocks of 32 values, each block an fp16 scale d, a little-endian
uint32 whose bit j is value j's fifth bit, and 16 bytes of low four bits (value j in the low
nibble of byte j, value 16 + j in its high nibble), q standing for (q - 16) * d.

Products take llama.cpp's arithmetic: the input quantized in groups of 32 (as for Q8_0), per
block an int32 dot product, times the two scales (the int8 family, a row at a time, or 16
inputs at a time in SIMD lanes, which add the blocks' terms in the same order)."""

from typing import NamedTuple

import numpy as np
from numba import njit

from llamette.kernels.halves import block_scale
from llamette.kernels.int8 import fivebit_dot_32
from llamette.kernels.simd import prefetch_ahead
from llamette.weight_types.row_blocks import (  # noqa: F401 (the table's functions)
    group_size,
    input_group_size,
    int8_arrays,
)
from llamette.weight_types.row_blocks import same_bits_lanes_product as product  # noqa: F401

NAME = "q5_0"
GGUF_TYPE = 6  # gguf.GGMLQuantizationType.Q5_0
BLOCK, BLOCK_BYTES = 32, 22  # values per block; fp16 scale, 4 bytes of fifth bits, 16 of nibbles
F32 = np.float32


class Q5_0Tensor(NamedTuple):
    """A matrix in Q5_0 blocks, kept as the file's bytes."""

    blocks: np.ndarray  # uint8 (rows, cols / 32 * 22)

    @property
    def shape(self) -> tuple[int, int]:
        rows, nbytes = self.blocks.shape
        return rows, nbytes // BLOCK_BYTES * BLOCK

    def dequantize(self) -> np.ndarray:
        rows, cols = self.shape
        blocks = self.blocks.reshape(rows, cols // BLOCK, BLOCK_BYTES)
        scales = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
        values = five_bit_values(blocks[:, :, 2:6], blocks[:, :, 6:]).astype(np.float32) - 16
        return (values * scales).reshape(rows, cols)


Tensor = Q5_0Tensor


def five_bit_values(high_bits: np.ndarray, nibbles: np.ndarray) -> np.ndarray:
    """The 32 values 0..31 of each block (..., 32) from its 4 bytes of fifth bits (..., 4) and
    16 bytes of nibbles (..., 16)."""
    fifth = high_bits.copy().view("<u4") >> np.arange(32, dtype=np.uint32) & 1  # (..., 32)
    low = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
    return low | (fifth.astype(np.uint8) << 4)


def from_gguf(data: np.ndarray, shape: tuple[int, int]) -> Q5_0Tensor:
    return Q5_0Tensor(data.reshape(shape[0], -1))


@njit(inline="always")
def fifth_bit(row, start, j):
    """Value j's fifth bit, from the 4 bytes of a block's fifth bits at start (shifted to 16)."""
    return ((np.int32(row[start + (j >> 3)]) >> (j & 7)) & 1) << 4


@njit(inline="always")
def decode_row(out, w, i):
    row = w.blocks[i]
    for block in range(out.shape[0] // BLOCK):
        start, first = block * BLOCK_BYTES, block * BLOCK
        scale = block_scale(row, start)
        for j in range(16):
            byte = np.int32(row[start + 6 + j])
            low = (byte & 15) | fifth_bit(row, start + 2, j)
            high = (byte >> 4) | fifth_bit(row, start + 2, j + 16)
            out[first + j] = F32(low - 16) * scale
            out[first + 16 + j] = F32(high - 16) * scale


# The int8 family's functions: a row unpacked (long prompts), a row dot product, and the rest
# shared (row_blocks).


@njit(inline="always")
def unpack_row(values, scales, w, blocks, _, i):
    """Row i's values q - 16, and its blocks' scales."""
    row = blocks[i]
    for block in range(row.shape[0] // BLOCK_BYTES):
        start, first = block * BLOCK_BYTES, block * BLOCK
        scales[block] = block_scale(row, start)
        for j in range(16):
            byte = np.int32(row[start + 6 + j])
            values[first + j] = ((byte & 15) | fifth_bit(row, start + 2, j)) - 16
            values[first + 16 + j] = ((byte >> 4) | fifth_bit(row, start + 2, j + 16)) - 16


@njit(inline="always")
def int8_row_dot(w, blocks, _, i, x, x_scales, x_sums):
    """Per block the int32 dot product of q - 16 with x (q . x - 16 * sum(x)), then
    (dot * weight scale) * input scale, summed in block order."""
    row = blocks[i]
    val = F32(0.0)
    for g in range(row.shape[0] // BLOCK_BYTES):
        start = g * BLOCK_BYTES
        prefetch_ahead(row, start)
        dot = fivebit_dot_32(row, start + 2, x, g * BLOCK) - (x_sums[g] << 4)
        val += (F32(dot) * block_scale(row, start)) * x_scales[g]
    return val
