"""GGUF's Q5_K: Q4_K's blocks of 256 values (an fp16 scale d and minimum scale dmin, eight 6-bit
scales sc and minimums m packed in twelve bytes) with a fifth bit per value: run j (values
32j..32j + 31) takes its low four bits as Q4_K's run j does, from the 128 bytes at the end of the
block, and its fifth from bit j of the 32 bytes before them, standing for (d * sc_j) * q -
dmin * m_j.

Products go as Q4_K's, with 5-bit values: a row at a time with the input in groups of 256
(kernels.block_dots), above SMALL_BATCH inputs in the int8 family's lanes."""

from typing import NamedTuple

import numpy as np
from numba import njit

from llamette.kernels.block_dots import BlockIR, block_step, row_dots
from llamette.kernels.halves import block_scale
from llamette.weight_types import k_quants
from llamette.weight_types.q4_k import (  # noqa: F401 (row_group_size: the table's)
    ROW_GROUP,
    row_group_size,
    scale_and_minimum,
    six_bit_scales_and_minimums,
    terms_in_integers,
)
from llamette.weight_types.row_blocks import (  # noqa: F401 (the table's functions)
    group_size,
    input_group_size,
    int8_arrays,
)
from llamette.weight_types.row_blocks import lanes_product as product  # noqa: F401

NAME = "q5_k"
GGUF_TYPE = 13  # gguf.GGMLQuantizationType.Q5_K
BLOCK, BLOCK_BYTES = 256, 176  # values per block; d, dmin, 12 bytes of scales, 32 + 128 of values
RUN = 32  # values per scale
SCALES, HIGH_BITS, LOW_BITS = 4, 16, 48  # where a block's parts start
F32 = np.float32
WRITTEN = True  # by quantize (gguf-py has no K-quant quantizer)


class Q5_KTensor(NamedTuple):
    """A matrix in Q5_K blocks, kept as the file's bytes."""

    blocks: np.ndarray  # uint8 (rows, cols / 256 * 176)

    @property
    def shape(self) -> tuple[int, int]:
        rows, nbytes = self.blocks.shape
        return rows, nbytes // BLOCK_BYTES * BLOCK

    def dequantize(self) -> np.ndarray:
        rows, cols = self.shape
        blocks = self.blocks.reshape(rows, cols // BLOCK, BLOCK_BYTES)
        halves = blocks[:, :, :4].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 2)
        scales, minimums = six_bit_scales_and_minimums(blocks[:, :, SCALES:HIGH_BITS])  # (.., 8)
        run_scales = (halves[:, :, :1] * scales.astype(np.float32))[..., None]
        run_minimums = (halves[:, :, 1:] * minimums.astype(np.float32))[..., None]
        packed = blocks[:, :, LOW_BITS:].reshape(rows, cols // BLOCK, 4, 1, 32)
        low = (packed >> np.array([0, 4], np.uint8).reshape(2, 1)) & 0x0F  # (.., 4, 2, 32)
        high = blocks[:, :, None, HIGH_BITS:LOW_BITS] >> np.arange(8, dtype=np.uint8)[:, None] & 1
        values = (low.reshape(high.shape) | high << 4).astype(np.float32)  # (.., 8, 32)
        return (run_scales * values - run_minimums).reshape(rows, cols)


Tensor = Q5_KTensor


def quantize(w: np.ndarray) -> np.ndarray:
    """w (rows, cols) as Q5_K blocks (rows, cols / 256 * 176), as llama.cpp's reference quantizer
    makes them (Q4_K's fit, with 32 levels)."""

    def blocks_of(rows):
        terms, q = k_quants.terms_and_levels_with_minimums(rows, 31, -0.5, 0.1, 15)
        fifth_bits = (q.reshape(-1, 8, RUN) >> 4) << np.arange(8, dtype=np.uint8)[:, None]
        high = np.bitwise_or.reduce(fifth_bits, axis=1)  # (blocks, 32): bit j from run j
        blocks = np.concatenate([terms, high, k_quants.nibbles(q)], axis=1)
        return blocks.reshape(rows.shape[0], -1)

    return k_quants.in_row_chunks(w, blocks_of)


def from_gguf(data: np.ndarray, shape: tuple[int, int]) -> Q5_KTensor:
    return Q5_KTensor(data.reshape(shape[0], -1))


@njit(inline="always")
def decode_row(out, w, i):
    row = w.blocks[i]
    for block in range(out.shape[0] // BLOCK):
        start, first = block * BLOCK_BYTES, block * BLOCK
        d, dmin = block_scale(row, start), block_scale(row, start + 2)
        for j in range(8):
            scale, minimum = scale_and_minimum(row, start + SCALES, j)
            run_scale, run_minimum = d * F32(scale), dmin * F32(minimum)
            low, shift = start + LOW_BITS + 32 * (j >> 1), 4 * (j & 1)
            for k in range(RUN):
                q = (np.int32(row[low + k]) >> shift) & 15
                q |= ((np.int32(row[start + HIGH_BITS + k]) >> j) & 1) << 4
                out[first + RUN * j + k] = run_scale * F32(q) - run_minimum


# The int8 family's functions: a row unpacked (long prompts), a row dot product, and the rest
# shared (row_blocks).


@njit(inline="always")
def unpack_row(values, scales, w, blocks, _, i):
    """Row i's 5-bit values q, and its runs' scales d * sc."""
    row = blocks[i]
    for block in range(row.shape[0] // BLOCK_BYTES):
        start, first = block * BLOCK_BYTES, block * BLOCK
        d = block_scale(row, start)
        for j in range(8):
            scales[8 * block + j] = d * F32(scale_and_minimum(row, start + SCALES, j)[0])
            low, shift = start + LOW_BITS + 32 * (j >> 1), 4 * (j & 1)
            run = values[first + RUN * j : first + RUN * (j + 1)]
            fifth_bits = row[start + HIGH_BITS : start + LOW_BITS]
            for k in range(RUN):
                run[k] = ((row[low + k] >> shift) & 15) | (((fifth_bits[k] >> j) & 1) << 4)


@njit(inline="always")
def unpack_minimums(minimums, w, blocks, _, i):
    """Row i's runs' minimums dmin * m."""
    row = blocks[i]
    for block in range(row.shape[0] // BLOCK_BYTES):
        start = block * BLOCK_BYTES
        dmin = block_scale(row, start + 2)
        for j in range(8):
            minimums[8 * block + j] = dmin * F32(scale_and_minimum(row, start + SCALES, j)[1])
    return True


@block_step(BLOCK, BLOCK_BYTES, input_group=ROW_GROUP)
def block_terms(block: BlockIR):
    """acc + a block's terms, as Q4_K's (q4_k.terms_in_integers) with each value's fifth bit."""

    def values_of_pair(pair: int):  # runs 2 pair, 2 pair + 1
        low = block.nibbles_of(LOW_BITS + 32 * pair)
        top = block.fields_of(HIGH_BITS, (2 * pair, 1, 4), (2 * pair + 1, 1, 4))
        return block.b.or_(low, top)

    return terms_in_integers(block, values_of_pair, SCALES)


int8_row_dot, int8_row_dots = row_dots(block_terms, BLOCK_BYTES)
