"""GGUF's Q4_K: each row is blocks of 256 values, each block an fp16 scale d and minimum scale
dmin, twelve bytes packing eight 6-bit scales sc and eight 6-bit minimums m, and 128 bytes of
4-bit values q; run j (values 32j..32j + 31) is the low (j even) or high (j odd) nibbles of bytes
32 (j // 2).., standing for (d * sc_j) * q - dmin * m_j.

Products quantize the input in groups of 256, one scale a block (Q8_K's groups in llama.cpp), and go
a row at a time, block by block in SIMD lanes (kernels.block_dots): each lane's int32 dot product of
four 4-bit values with the input's times its run's 6-bit scale sc, summed over the block in
integers, then times d and the input's scale, less the runs' 6-bit minimums m times the input's sums
over them, times dmin and the input's scale. Above SMALL_BATCH inputs, the input in groups of 32 and
rows unpacked to bytes go through the int8 family's lanes, 16 inputs at a time."""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit

from llamette.kernels.block_dots import BlockIR, block_step, row_dots
from llamette.kernels.halves import block_scale
from llamette.kernels.simd import nibbles_64
from llamette.weight_types import k_quants
from llamette.weight_types.row_blocks import (  # noqa: F401 (the table's functions)
    group_size,
    input_group_size,
    int8_arrays,
)
from llamette.weight_types.row_blocks import lanes_product as product  # noqa: F401

NAME = "q4_k"
GGUF_TYPE = 12  # gguf.GGMLQuantizationType.Q4_K
BLOCK, BLOCK_BYTES = 256, 144  # values per block; d, dmin, 12 bytes of scales, 128 of values
RUN = 32  # values per scale
ROW_GROUP = BLOCK  # the row dot products' input: one scale a block (as Q8_K)
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


# The int8 family's functions: a row unpacked (long prompts), a row dot product with its input
# in groups of a block, and the rest shared (row_blocks).


@njit(inline="always")
def row_group_size(w):
    return ROW_GROUP


@njit(inline="always")
def unpack_row(values, scales, w, blocks, _, i):
    """Row i's 4-bit values q, and its runs' scales d * sc."""
    row = blocks[i]
    for block in range(row.shape[0] // BLOCK_BYTES):
        start, first = block * BLOCK_BYTES, block * BLOCK
        d = block_scale(row, start)
        for j in range(8):
            scales[8 * block + j] = d * F32(scale_and_minimum(row, start + 4, j)[0])
        for pair in range(4):  # runs 2 pair, 2 pair + 1
            nibbles_64(values, first + 64 * pair, row, start + 16 + 32 * pair)


@njit(inline="always")
def unpack_minimums(minimums, w, blocks, _, i):
    """Row i's runs' minimums dmin * m."""
    row = blocks[i]
    for block in range(row.shape[0] // BLOCK_BYTES):
        start = block * BLOCK_BYTES
        dmin = block_scale(row, start + 2)
        for j in range(8):
            minimums[8 * block + j] = dmin * F32(scale_and_minimum(row, start + 4, j)[1])
    return True


def scales_and_minimums_in_lanes(block: BlockIR, offset: int):
    """The eight 6-bit scales (lanes 0-7) and minimums (lanes 8-15) packed in the twelve bytes
    at `offset` of a block (see six_bit_scales_and_minimums), as int32 lanes: their low bits
    (bytes 0-7 and 8-11 masked, bytes 8-11's high nibbles), then the top two bits of bytes 0-7,
    in bytes, widened once."""
    packed = block.bytes(offset, 16)  # the last four bytes are not scales: unused
    low_bits = block.pick(packed, [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11])
    masked = block.b.and_(
        low_bits, block.constant(low_bits, [63] * 4 + [15] * 4 + [63] * 4 + [0] * 4)
    )
    high_nibbles = block.b.and_(block.bits(low_bits, 4, 15),
                                block.constant(low_bits, [0] * 12 + [15] * 4))  # fmt: skip
    zeros = block.constant(packed, 0)
    tops = block.pick(packed, [16] * 4 + [0, 1, 2, 3] + [16] * 4 + [4, 5, 6, 7], zeros)
    tops = block.b.shl(block.bits(tops, 6, 3), block.constant(tops, 4))
    return block.widened(block.b.or_(block.b.or_(masked, high_nibbles), tops))


def terms_in_integers(block: BlockIR, values_of_pair: Callable, scales_offset: int) -> ir.Value:
    """acc + a block's terms, the input in one group a block: per pair of runs, each lane's dot
    product of four of its 64 values (values_of_pair(pair): runs 2 pair, 2 pair + 1) times its
    run's 6-bit scale, summed over the block in int32, times d * input scale; less each run's
    6-bit minimum times the input's sum over the run, in int32, times dmin * input scale (the
    12 packed scale bytes at scales_offset)."""
    scales_and_minimums = scales_and_minimums_in_lanes(block, scales_offset)
    total = block.scaled_sum([
        (block.dots(values_of_pair(pair), block.x(64 * pair, 64)),
         block.pick(scales_and_minimums, [2 * pair] * 8 + [2 * pair + 1] * 8))
        for pair in range(4)
    ])  # fmt: skip
    minimums = block.pick(scales_and_minimums, range(8, 16))
    minimum_terms = block.b.mul(minimums, block.x_integer_sums(8))
    minimum_terms = block.join(minimum_terms, block.constant(minimum_terms, 0))
    x_scale = block.splat(block.x_scale(), 2)
    d_and_minus_dmin = block.times(block.times(block.halves(0, 2), x_scale),
                                   block.constant(x_scale, [1.0, -1.0]))  # fmt: skip
    acc = block.multiply_add(
        block.acc, block.to_float(total), block.pick(d_and_minus_dmin, [0] * 16)
    )
    return block.multiply_add(acc, block.to_float(minimum_terms),
                              block.pick(d_and_minus_dmin, [1] * 16))  # fmt: skip


@block_step(BLOCK, BLOCK_BYTES, input_group=ROW_GROUP)
def block_terms(block: BlockIR):
    """acc + a block's terms (terms_in_integers), its values the nibbles of 32 bytes per pair
    of runs."""
    return terms_in_integers(block, lambda pair: block.nibbles_of(16 + 32 * pair), 4)


int8_row_dot, int8_row_dots = row_dots(block_terms, BLOCK_BYTES)
