"""GGUF's Q4_K: each row is blocks of 256 values, each block an fp16 scale d and minimum scale
dmin, twelve bytes packing eight 6-bit scales sc and eight 6-bit minimums m, and 128 bytes of
4-bit values q; run j (values 32j..32j + 31) is the low (j even) or high (j odd) nibbles of bytes
32 (j // 2).., standing for (d * sc_j) * q - dmin * m_j.

Products quantize the input in groups of 32, one per run: per run an int32 dot product of the
4-bit values (int8.nibbles_dot_32), times the run's scale and the input's, minus the run's
minimum times the input's sum (the int8 family, a row at a time)."""

from typing import NamedTuple

import numpy as np
from numba import njit

from llamette.kernels.halves import block_scale
from llamette.kernels.int8 import nibbles_dot_32
from llamette.weight_types import k_quants
from llamette.weight_types.row_blocks import (  # noqa: F401 (the table's functions)
    group_size,
    input_group_size,
    int8_arrays,
    product,
)

NAME = "q4_k"
GGUF_TYPE = 12  # gguf.GGMLQuantizationType.Q4_K
BLOCK, BLOCK_BYTES = 256, 144  # values per block; d, dmin, 12 bytes of scales, 128 of values
RUN = 32  # values per scale
F32 = np.float32
WRITTEN = True  # by quantize (gguf-py has no K-quant quantizer)


class Q4_KTensor(NamedTuple):
    """A matrix in Q4_K blocks, kept as the file's bytes."""

    blocks: np.ndarray  # uint8 (rows, cols / 256 * 144)

    @property
    def shape(self) -> tuple[int, int]:
        rows, nbytes = self.blocks.shape
        return rows, nbytes // BLOCK_BYTES * BLOCK

    def dequantize(self) -> np.ndarray:
        rows, cols = self.shape
        blocks = self.blocks.reshape(rows, cols // BLOCK, BLOCK_BYTES)
        halves = blocks[:, :, :4].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 2)
        scales, minimums = six_bit_scales_and_minimums(blocks[:, :, 4:16])  # (rows, blocks, 8)
        run_scales = (halves[:, :, :1] * scales.astype(np.float32))[..., None]
        run_minimums = (halves[:, :, 1:] * minimums.astype(np.float32))[..., None]
        packed = blocks[:, :, 16:].reshape(rows, cols // BLOCK, 4, 1, 32)
        values = (packed >> np.array([0, 4], np.uint8).reshape(2, 1)) & 0x0F  # (.., 4, 2, 32)
        values = values.reshape(rows, cols // BLOCK, 8, RUN).astype(np.float32)
        return (run_scales * values - run_minimums).reshape(rows, cols)


Tensor = Q4_KTensor


def six_bit_scales_and_minimums(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and minimums (..., 8) of twelve packed bytes (..., 12): bytes 0-3
    hold scales 0-3 and bytes 4-7 minimums 0-3 in their low six bits; scales and minimums 4-7 take
    their low four bits from bytes 8-11 and their top two from the top bits of bytes 0-7."""
    first, second, last = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([first & 63, (last & 15) | (first >> 6 << 4)], axis=-1)
    minimums = np.concatenate([second & 63, (last >> 4) | (second >> 6 << 4)], axis=-1)
    return scales, minimums


def quantize(w: np.ndarray) -> np.ndarray:
    """w (rows, cols) as Q4_K blocks (rows, cols / 256 * 144), as llama.cpp's reference quantizer
    makes them: per run a scale and a minimum fitted to its values, weighted by their size."""

    def blocks_of(rows):
        terms, q = k_quants.terms_and_levels_with_minimums(rows, 15, -1.0, 0.1, 20)
        return np.concatenate([terms, k_quants.nibbles(q)], axis=1).reshape(rows.shape[0], -1)

    return k_quants.in_row_chunks(w, blocks_of)


def from_gguf(data: np.ndarray, shape: tuple[int, int]) -> Q4_KTensor:
    return Q4_KTensor(data.reshape(shape[0], -1))


@njit(inline="always")
def scale_and_minimum(row, start, j):
    """Run j's 6-bit scale and minimum, from the 12 packed bytes at start (see
    six_bit_scales_and_minimums)."""
    if j < 4:
        return np.int32(row[start + j]) & 63, np.int32(row[start + 4 + j]) & 63
    last = np.int32(row[start + 4 + j])
    scale = (last & 15) | ((np.int32(row[start + j - 4]) >> 6) << 4)
    minimum = (last >> 4) | ((np.int32(row[start + j]) >> 6) << 4)
    return scale, minimum


@njit(inline="always")
def decode_row(out, w, i):
    row = w.blocks[i]
    for block in range(out.shape[0] // BLOCK):
        start, first = block * BLOCK_BYTES, block * BLOCK
        d, dmin = block_scale(row, start), block_scale(row, start + 2)
        for j in range(8):
            scale, minimum = scale_and_minimum(row, start + 4, j)
            run_scale, run_minimum = d * F32(scale), dmin * F32(minimum)
            packed, shift = start + 16 + 32 * (j >> 1), 4 * (j & 1)
            for k in range(RUN):
                q = (np.int32(row[packed + k]) >> shift) & 15
                out[first + RUN * j + k] = run_scale * F32(q) - run_minimum


# The int8 family's functions: a row dot product, and the rest shared (row_blocks).


@njit(inline="always")
def int8_row_dot(w, blocks, _, i, x, x_scales, x_sums):
    """Per run (dot * (d * sc)) * input scale - (dmin * m) * (input scale * sum(x)), runs summed
    in order."""
    row = blocks[i]
    val = F32(0.0)
    for block in range(row.shape[0] // BLOCK_BYTES):
        start = block * BLOCK_BYTES
        d, dmin = block_scale(row, start), block_scale(row, start + 2)
        for j in range(8):
            g = 8 * block + j
            scale, minimum = scale_and_minimum(row, start + 4, j)
            dot = nibbles_dot_32(row, start + 16 + 32 * (j >> 1), 4 * (j & 1), x, RUN * g)
            x_scale = x_scales[g]
            val += (F32(dot) * (d * F32(scale))) * x_scale - (dmin * F32(minimum)) * (
                x_scale * F32(x_sums[g])
            )
    return val
