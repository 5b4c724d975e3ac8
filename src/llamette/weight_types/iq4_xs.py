"""GGUF's IQ4_XS: each row is blocks of 256 values, each block an fp16 scale d, eight 6-bit scales
(one per 32 values, stored plus 32: low four bits in the nibbles of four bytes, top two in a
uint16) and 128 bytes of 4-bit indices into IQ4_NL's table, 16 bytes per run of 32 in IQ4_NL's
order, standing for (d * sc) * table[q].

Products quantize the input in groups of 32, one per run, and go a row at a time, block by block
in SIMD lanes (kernels.block_dots): the indices looked up in the table plus 128 (a byte shuffle),
each lane's int32 dot product of four values with the input's, times its run's scale (d * sc) and
the input's, less 128 times each run's input sum times the same (the int8 family, a row at a
time). Above SMALL_BATCH inputs, rows unpacked to their table values go through the int8
family's lanes, 16 inputs at a time."""

from typing import NamedTuple

import numpy as np
from numba import njit

from llamette.kernels.block_dots import BlockIR, block_step, row_dots
from llamette.kernels.halves import block_scale
from llamette.weight_types import k_quants
from llamette.weight_types.iq4_nl import TABLE, table_values
from llamette.weight_types.row_blocks import (  # noqa: F401 (the table's functions)
    group_size,
    input_group_size,
    int8_arrays,
)
from llamette.weight_types.row_blocks import lanes_product as product  # noqa: F401

NAME = "iq4_xs"
GGUF_TYPE = 23  # gguf.GGMLQuantizationType.IQ4_XS
BLOCK, BLOCK_BYTES = 256, 136  # values per block; d, 2 + 4 bytes of scales, 128 of indices
RUN = 32  # values per scale
HIGH_SCALES, LOW_SCALES, INDICES = 2, 4, 8  # where a block's parts start
F32 = np.float32
WRITTEN = True  # by quantize (gguf-py has no IQ4 quantizer)


class IQ4_XSTensor(NamedTuple):
    """A matrix in IQ4_XS blocks, kept as the file's bytes."""

    blocks: np.ndarray  # uint8 (rows, cols / 256 * 136)

    @property
    def shape(self) -> tuple[int, int]:
        rows, nbytes = self.blocks.shape
        return rows, nbytes // BLOCK_BYTES * BLOCK

    def dequantize(self) -> np.ndarray:
        rows, cols = self.shape
        blocks = self.blocks.reshape(rows, cols // BLOCK, BLOCK_BYTES)
        d = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
        high = blocks[:, :, HIGH_SCALES:LOW_SCALES].copy().view(np.uint16)  # (.., 1)
        high = (high >> np.arange(0, 16, 2, dtype=np.uint16)) & 3  # (.., 8)
        low = blocks[:, :, LOW_SCALES:INDICES, None] >> np.array([0, 4], np.uint8) & 15
        scales = (low.reshape(high.shape) | high << 4).astype(np.int8) - 32  # (.., 8)
        run_scales = (d * scales.astype(np.float32))[..., None]
        values = table_values(blocks[:, :, INDICES:].reshape(rows, -1, 8, 16))  # (.., 8, 32)
        return (run_scales * values).reshape(rows, cols)


Tensor = IQ4_XSTensor


def quantize(w: np.ndarray) -> np.ndarray:
    """w (rows, cols) as IQ4_XS blocks (rows, cols / 256 * 136), as llama.cpp's quantizer makes
    them: IQ4_NL's search per run, the runs' scales in 6-bit steps of d (the largest at -32), then
    each value's nearest table value under its rounded run scale."""

    def blocks_of(rows):
        runs = rows.reshape(-1, RUN)
        scales = k_quants.table_scale_search(runs, TABLE).reshape(-1, 8)  # (blocks, 8)
        largest = np.take_along_axis(scales, np.abs(scales).argmax(axis=1)[:, None], axis=1)
        d = -largest / F32(32)  # (blocks, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            inverse = np.where(d != 0, F32(1) / d, 0).astype(F32)
            levels = np.clip(np.rint(inverse * scales), -32, 31)
            run_scale = (d * levels).reshape(-1, 1)
            run_inverse = np.where(run_scale != 0, F32(1) / run_scale, 0).astype(F32)
        indices = k_quants.nearest_in_table(TABLE, run_inverse * runs)
        stored = (levels + 32).astype(np.uint16)  # (blocks, 8), 0..63
        low = (stored[:, 0::2] & 15) | ((stored[:, 1::2] & 15) << 4)  # (blocks, 4)
        high = np.bitwise_or.reduce((stored >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1)
        blocks = np.concatenate([
            d.astype(np.float16).view(np.uint8), high.astype("<u2").view(np.uint8).reshape(-1, 2),
            low.astype(np.uint8), k_quants.table_nibbles(indices).reshape(-1, 128),
        ], axis=1)  # fmt: skip
        return blocks.reshape(rows.shape[0], -1)

    return k_quants.in_row_chunks(w, blocks_of)


def from_gguf(data: np.ndarray, shape: tuple[int, int]) -> IQ4_XSTensor:
    return IQ4_XSTensor(data.reshape(shape[0], -1))


@njit(inline="always")
def run_scale(row, start, j):
    """Run j's scale, -32..31, from the block at start."""
    low = (np.int32(row[start + LOW_SCALES + (j >> 1)]) >> (4 * (j & 1))) & 15
    high = (np.int32(row[start + HIGH_SCALES + (j >> 2)]) >> (2 * (j & 3))) & 3
    return (low | (high << 4)) - 32


@njit(inline="always")
def decode_row(out, w, i):
    row = w.blocks[i]
    for block in range(out.shape[0] // BLOCK):
        start, first = block * BLOCK_BYTES, block * BLOCK
        d = block_scale(row, start)
        for j in range(8):
            scale = d * F32(run_scale(row, start, j))
            indices, run = start + INDICES + 16 * j, first + RUN * j
            for k in range(16):
                byte = np.int32(row[indices + k])
                out[run + k] = scale * F32(TABLE[byte & 15])
                out[run + 16 + k] = scale * F32(TABLE[byte >> 4])


# The int8 family's functions: a row unpacked (long prompts), a row dot product, and the rest
# shared (row_blocks).


@njit(inline="always")
def unpack_row(values, scales, w, blocks, _, i):
    """Row i's table values, and its runs' scales d * sc."""
    row = blocks[i]
    for block in range(row.shape[0] // BLOCK_BYTES):
        start, first = block * BLOCK_BYTES, block * BLOCK
        d = block_scale(row, start)
        for j in range(8):
            scales[8 * block + j] = d * F32(run_scale(row, start, j))
            indices, run = start + INDICES + 16 * j, first + RUN * j
            for k in range(16):
                byte = row[indices + k]
                values[run + k], values[run + 16 + k] = TABLE[byte & 15], TABLE[byte >> 4]


BIASED_TABLE = [int(value) + 128 for value in TABLE]  # unsigned bytes, for vpdpbusd


@block_step(BLOCK, BLOCK_BYTES)
def block_terms(block: BlockIR):
    """acc + a block's terms: per pair of runs (the nibbles of 32 bytes, looked up in the table
    plus 128), each lane's dot product of four values times (d * sc) * input scale, less 128
    times each run's input sum times the same."""
    packed = block.widened(block.bytes(HIGH_SCALES, 8))  # 2 bytes of top bits, 4 of low nibbles
    high = block.b.or_(block.pick(packed, [0] * 8), block.b.shl(block.pick(packed, [1] * 8),
                                                                block.constant(packed, 8)))  # fmt: skip
    high = block.b.shl(block.bits(high, [2 * j for j in range(8)], 3), block.constant(high, 4))
    low = block.bits(block.pick(packed, [2 + j // 2 for j in range(8)]), [0, 4] * 4, 15)
    scales = block.b.sub(block.b.or_(low, high), block.constant(low, 32))  # (8,) -32..31
    terms = block.times(block.times(block.to_float(scales), block.splat(block.half(0), 8)),
                        block.x_scales(8))  # fmt: skip
    acc = block.acc
    for pair in range(4):
        packed = block.bytes(INDICES + 32 * pair, 32)
        indices = block.pick(block.nibbles(packed), [*range(16), *range(32, 48), *range(16, 32),
                                                     *range(48, 64)])  # fmt: skip
        values = block.lookup(indices, BIASED_TABLE)
        dots = block.dots(values, block.x(64 * pair, 64), below_128=False)
        scales = block.pick(terms, [2 * pair] * 8 + [2 * pair + 1] * 8)
        acc = block.multiply_add(acc, block.to_float(dots), scales)
    sums = block.x_sums(8)
    unbiased = block.times(sums, block.constant(sums, -128.0))
    zeros = block.constant(sums, 0.0)
    return block.multiply_add(acc, block.join(terms, zeros), block.join(unbiased, zeros))


int8_row_dot, int8_row_dots = row_dots(block_terms, BLOCK_BYTES)
