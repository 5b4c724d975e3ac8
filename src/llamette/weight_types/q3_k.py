"""GGUF's Q3_K: each row is blocks of 256 values, each block 32 bytes of high bits, 64 bytes of
low two bits, twelve bytes packing sixteen 6-bit scales (one per 16 values, stored plus 32) and
an fp16 scale d. Run r (values 32r..32r + 31) takes its low bits as Q2_K's run r does and its
high bit from bit r of the 32 high-bit bytes; q = low - 4 where the high bit is clear, else low,
standing for (d * sc) * q.

Products quantize the input in groups of 32 and go a row at a time, block by block in SIMD lanes
(kernels.block_dots), each lane's dot product of four values q + 4 (less 4 times the input's)
times its 16 values' scale d * sc and the input's, as floats; above SMALL_BATCH inputs, as
Q6_K's, in the int8 family's lanes."""

from typing import NamedTuple

import numpy as np
from numba import njit

from llamette.kernels.block_dots import BlockIR, block_step, row_dots
from llamette.kernels.halves import block_scale
from llamette.weight_types.row_blocks import (  # noqa: F401 (the table's functions)
    group_size,
    input_group_size,
    int8_arrays,
)
from llamette.weight_types.row_blocks import lanes_product as product  # noqa: F401

NAME = "q3_k"
GGUF_TYPE = 11  # gguf.GGMLQuantizationType.Q3_K
BLOCK, BLOCK_BYTES = 256, 110  # values per block; 32 + 64 bytes of values, 12 of scales, d
RUN = 32  # values per input group
LOW_BITS, SCALES, D = 32, 96, 108  # where a block's parts start
F32 = np.float32
WRITTEN = False  # llamette runs it but does not write it: gguf-py has no K-quant quantizer


class Q3_KTensor(NamedTuple):
    """A matrix in Q3_K blocks, kept as the file's bytes."""

    blocks: np.ndarray  # uint8 (rows, cols / 256 * 110)

    @property
    def shape(self) -> tuple[int, int]:
        rows, nbytes = self.blocks.shape
        return rows, nbytes // BLOCK_BYTES * BLOCK

    def dequantize(self) -> np.ndarray:
        rows, cols = self.shape
        blocks = self.blocks.reshape(rows, cols // BLOCK, BLOCK_BYTES)
        d = blocks[:, :, D:].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
        scales = (d * sixteen_scales(blocks[:, :, SCALES:D]).astype(np.float32))[..., None]
        low = blocks[:, :, LOW_BITS:SCALES].reshape(rows, -1, 2, 1, 32)
        low = (low >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3  # (.., 2, 4, 32)
        high = blocks[:, :, None, :LOW_BITS] >> np.arange(8, dtype=np.uint8)[:, None] & 1
        values = low.reshape(high.shape).astype(np.int8) - 4 * (1 - high.astype(np.int8))
        return (scales * values.reshape(rows, -1, 16, 16).astype(np.float32)).reshape(rows, cols)


Tensor = Q3_KTensor


def sixteen_scales(packed: np.ndarray) -> np.ndarray:
    """The sixteen scales (..., 16), int8 in -32..31, of twelve packed bytes (..., 12): scale s
    has its low four bits in the low (s < 8) or high nibble of byte s % 8, its top two in bits
    2 (s // 4) of byte 8 + s % 4."""
    low = np.concatenate([packed[..., :8] & 15, packed[..., :8] >> 4], axis=-1)
    high = packed[..., None, 8:12] >> np.array([0, 2, 4, 6], np.uint8)[:, None] & 3  # (.., 4, 4)
    return (low | high.reshape(low.shape) << 4).astype(np.int8) - 32


def from_gguf(data: np.ndarray, shape: tuple[int, int]) -> Q3_KTensor:
    return Q3_KTensor(data.reshape(shape[0], -1))


@njit(inline="always")
def scale(row, start, s):
    """Sub-block s's scale from the 12 packed bytes at start (see sixteen_scales)."""
    low = (np.int32(row[start + (s & 7)]) >> (4 * (s >> 3))) & 15
    high = (np.int32(row[start + 8 + (s & 3)]) >> (2 * (s >> 2))) & 3
    return (low | (high << 4)) - 32


@njit(inline="always")
def decode_row(out, w, i):
    row = w.blocks[i]
    for block in range(out.shape[0] // BLOCK):
        start, first = block * BLOCK_BYTES, block * BLOCK
        d = block_scale(row, start + D)
        for run in range(8):
            low, shift = start + LOW_BITS + 32 * (run >> 2), 2 * (run & 3)
            for j in range(RUN):
                sub_block_scale = d * F32(scale(row, start + SCALES, 2 * run + (j >> 4)))
                q = (np.int32(row[low + j]) >> shift) & 3
                q -= 4 * (1 - ((np.int32(row[start + j]) >> run) & 1))
                out[first + RUN * run + j] = sub_block_scale * F32(q)


# The int8 family's functions: a row unpacked (long prompts), a row dot product, and the rest
# shared (row_blocks).


@njit(inline="always")
def scale_group_size(w):
    return 16


@njit(inline="always")
def unpack_row(values, scales, w, blocks, _, i):
    """Row i's values (-4..3), and the scales d * sc of its 16 values."""
    row = blocks[i]
    for block in range(row.shape[0] // BLOCK_BYTES):
        start, first = block * BLOCK_BYTES, block * BLOCK
        d = block_scale(row, start + D)
        for s in range(16):
            scales[16 * block + s] = d * F32(scale(row, start + SCALES, s))
        for run in range(8):
            low, shift = start + LOW_BITS + 32 * (run >> 2), 2 * (run & 3)
            for j in range(RUN):  # (a constant count: the loop vectorizes)
                q = (np.int32(row[low + j]) >> shift) & 3
                q -= 4 * (1 - ((np.int32(row[start + j]) >> run) & 1))
                values[first + RUN * run + j] = q


def sixteen_scales_in_lanes(block: BlockIR):
    """The sixteen scales (see sixteen_scales) as int32 lanes, -32..31."""
    packed = block.widened(block.bytes(D - 14, 16))  # ends at D: the scales are lanes 2..13
    sub_blocks = range(16)
    low = block.bits(block.pick(packed, [2 + s % 8 for s in sub_blocks]),
                     [4 * (s // 8) for s in sub_blocks], 15)  # fmt: skip
    high = block.bits(block.pick(packed, [10 + s % 4 for s in sub_blocks]),
                      [2 * (s // 4) for s in sub_blocks], 3)  # fmt: skip
    scales = block.b.or_(low, block.b.shl(high, block.constant(high, 4)))
    return block.b.sub(scales, block.constant(scales, 32))


@block_step(BLOCK, BLOCK_BYTES)
def block_terms(block: BlockIR):
    """acc + a block's terms: per pair of runs (two bit pairs of 32 bytes and two high bits of
    the block's first 32), each lane's dot product of four values (q + 4, less 4 times the
    input's dot product) times (d * sc) * input scale, the scale of its 16 values."""
    scales = block.to_float(sixteen_scales_in_lanes(block))
    x_scales = block.x_scales(8)
    terms = block.times(block.times(scales, block.splat(block.half(D), 16)),
                        block.pick(x_scales, [k // 2 for k in range(16)]))  # fmt: skip
    high_bits = block.bytes(0, 32)
    acc = block.acc
    for pair in range(4):
        low_bits = block.bytes(LOW_BITS + 32 * (pair // 2), 32)
        shift = 4 * (pair % 2)
        low = block.join(block.bits(low_bits, shift, 3), block.bits(low_bits, shift + 2, 3))
        high = block.join(
            block.bits(high_bits, 2 * pair, 1), block.bits(high_bits, 2 * pair + 1, 1)
        )
        values = block.b.or_(low, block.b.shl(high, block.constant(high, 2)))  # q + 4
        acc = block.add_per_sixteen(acc, values, pair, terms, offset=4)
    return acc


int8_row_dot, int8_row_dots = row_dots(block_terms, BLOCK_BYTES)
