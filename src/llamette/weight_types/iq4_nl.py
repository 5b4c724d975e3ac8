"""GGUF's IQ4_NL: each row is blocks of 32 values, each block an fp16 scale d and 16 bytes of 4-bit
indices q (value j in the low nibble of byte j, value 16 + j in its high nibble) into a fixed
table of 16 non-uniformly spaced int8 values, standing for d * table[q].

Products quantize the input in groups of 32, one per block: per block an int32 dot product of the
table's values (int8.table_dot_32, a byte shuffle looks them up), times the block's scale and the
input's (the int8 family, a row at a time, or 16 inputs at a time in SIMD lanes, which add
the blocks' terms in the same order)."""

from typing import NamedTuple

import numpy as np
from numba import njit

from llamette.kernels.halves import block_scale
from llamette.kernels.int8 import IQ4_VALUES, table_dot_32
from llamette.kernels.simd import prefetch_ahead
from llamette.weight_types import k_quants
from llamette.weight_types.row_blocks import (  # noqa: F401 (the table's functions)
    group_size,
    input_group_size,
    int8_arrays,
)
from llamette.weight_types.row_blocks import same_bits_lanes_product as product  # noqa: F401

NAME = "iq4_nl"
GGUF_TYPE = 20  # gguf.GGMLQuantizationType.IQ4_NL
BLOCK, BLOCK_BYTES = 32, 18  # values per block; d, 16 bytes of indices
TABLE = np.array(IQ4_VALUES, np.int8)
F32 = np.float32
WRITTEN = True  # by quantize (gguf-py has no IQ4 quantizer)


class IQ4_NLTensor(NamedTuple):
    """A matrix in IQ4_NL blocks, kept as the file's bytes."""

    blocks: np.ndarray  # uint8 (rows, cols / 32 * 18)

    @property
    def shape(self) -> tuple[int, int]:
        rows, nbytes = self.blocks.shape
        return rows, nbytes // BLOCK_BYTES * BLOCK

    def dequantize(self) -> np.ndarray:
        rows, cols = self.shape
        blocks = self.blocks.reshape(rows, cols // BLOCK, BLOCK_BYTES)
        d = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
        return (d * table_values(blocks[:, :, 2:])).reshape(rows, cols)


Tensor = IQ4_NLTensor


def table_values(packed: np.ndarray) -> np.ndarray:
    """The 32 float32 table values (..., 32) that 16 bytes of indices (..., 16) stand for."""
    indices = np.concatenate([packed & 15, packed >> 4], axis=-1)
    return TABLE[indices].astype(np.float32)


def quantize(w: np.ndarray) -> np.ndarray:
    """w (rows, cols) as IQ4_NL blocks (rows, cols / 32 * 18), as llama.cpp's quantizer makes
    them: per block the scale whose nearest table values fit it best, weighted by their squares."""

    def blocks_of(rows):
        x = rows.reshape(-1, BLOCK)
        scale = k_quants.table_scale_search(x, TABLE)
        with np.errstate(divide="ignore"):
            inverse = np.where(scale != 0, F32(1) / scale, 0).astype(F32)[:, None]
        indices = k_quants.nearest_in_table(TABLE, inverse * x)
        d = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
        return np.concatenate([d, k_quants.table_nibbles(indices)], axis=1).reshape(
            rows.shape[0], -1
        )

    return k_quants.in_row_chunks(w, blocks_of)


def from_gguf(data: np.ndarray, shape: tuple[int, int]) -> IQ4_NLTensor:
    return IQ4_NLTensor(data.reshape(shape[0], -1))


@njit(inline="always")
def decode_row(out, w, i):
    row = w.blocks[i]
    for block in range(out.shape[0] // BLOCK):
        start, first = block * BLOCK_BYTES, block * BLOCK
        d = block_scale(row, start)
        for j in range(16):
            byte = np.int32(row[start + 2 + j])
            out[first + j] = d * F32(TABLE[byte & 15])
            out[first + 16 + j] = d * F32(TABLE[byte >> 4])


# The int8 family's functions: a row unpacked (long prompts), a row dot product, and the rest
# shared (row_blocks).


@njit(inline="always")
def unpack_row(values, scales, w, blocks, _, i):
    """Row i's table values, and its blocks' scales."""
    row = blocks[i]
    for block in range(row.shape[0] // BLOCK_BYTES):
        start, first = block * BLOCK_BYTES, block * BLOCK
        scales[block] = block_scale(row, start)
        for j in range(16):
            byte = row[start + 2 + j]
            values[first + j], values[first + 16 + j] = TABLE[byte & 15], TABLE[byte >> 4]


@njit(inline="always")
def int8_row_dot(w, blocks, _, i, x, x_scales, x_sums):
    """Per block (dot * d) * input scale, blocks summed in order (as Q4_0)."""
    row = blocks[i]
    val = F32(0.0)
    for g in range(row.shape[0] // BLOCK_BYTES):
        start = g * BLOCK_BYTES
        prefetch_ahead(row, start)
        dot = table_dot_32(row, start + 2, x, g * BLOCK)
        val += (F32(dot) * block_scale(row, start)) * x_scales[g]
    return val
