"""GGUF's Q6_K: each row is blocks of 256 values, each block 128 bytes of the values' low four
bits, 64 bytes of their top two bits, sixteen int8 scales (one per 16 values) and an fp16 scale
d, q standing for (d * sc) * (q - 32). In each half (128 values) of a block, run k (32 values)
takes its low bits from the low (k < 2) or high nibbles of 32 bytes (k even: the half's first
32, odd: its next 32) and its top bits from bits 2k, 2k + 1 of the half's 32 high-bit bytes.

Products quantize the input in groups of 256, one scale a block (Q8_K's groups in llama.cpp), and go
a row at a time, block by block in SIMD lanes (kernels.block_dots): each lane's int32 dot product of
four values q - 32 with the input's (q's less 32 times the input's) times its 16 values' int8 scale
sc, summed over the block in integers, then times d and the input's scale. Above SMALL_BATCH inputs,
the input in groups of 32 and rows unpacked to q - 32 go through the int8 family's lanes, 16 inputs
at a time, two 16-value scales to each input group."""

from typing import NamedTuple

import numpy as np
from numba import njit

from llamette.kernels.block_dots import BlockIR, block_step, row_dots
from llamette.kernels.halves import block_scale
from llamette.weight_types import k_quants
from llamette.weight_types.row_blocks import (  # noqa: F401 (the table's functions)
    group_size,
    input_group_size,
    int8_arrays,
)
from llamette.weight_types.row_blocks import lanes_product as product  # noqa: F401

NAME = "q6_k"
GGUF_TYPE = 14  # gguf.GGMLQuantizationType.Q6_K
BLOCK, BLOCK_BYTES = 256, 210  # values per block; 128 + 64 bytes of values, 16 scales, d
RUN = 32  # values per input group of the int8 family's lanes
ROW_GROUP = BLOCK  # the row dot products' input: one scale a block (as Q8_K)
HIGH_BITS, SCALES, D = 128, 192, 208  # where a block's parts start
F32 = np.float32
WRITTEN = True  # by quantize (gguf-py has no K-quant quantizer)


class Q6_KTensor(NamedTuple):
    """A matrix in Q6_K blocks, kept as the file's bytes."""

    blocks: np.ndarray  # uint8 (rows, cols / 256 * 210)

    @property
    def shape(self) -> tuple[int, int]:
        rows, nbytes = self.blocks.shape
        return rows, nbytes // BLOCK_BYTES * BLOCK

    def dequantize(self) -> np.ndarray:
        rows, cols = self.shape
        blocks = self.blocks.reshape(rows, cols // BLOCK, BLOCK_BYTES)
        d = blocks[:, :, D:].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
        scales = d * blocks[:, :, SCALES:D].view(np.int8).astype(np.float32)  # (.., 16)
        low = blocks[:, :, :HIGH_BITS].reshape(rows, -1, 2, 1, 2, 32)  # half, nibble, k & 1
        low = (low >> np.array([0, 4], np.uint8).reshape(2, 1, 1)) & 15  # (.., 2, 2, 2, 32)
        high = blocks[:, :, HIGH_BITS:SCALES].reshape(rows, -1, 2, 1, 32)
        high = (high >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3  # (.., 2, 4, 32)
        values = (low.reshape(high.shape) | high << 4).astype(np.float32) - 32
        values = values.reshape(rows, -1, 16, 16)
        return (scales[..., None] * values).reshape(rows, cols)


Tensor = Q6_KTensor


def quantize(w: np.ndarray) -> np.ndarray:
    """w (rows, cols) as Q6_K blocks (rows, cols / 256 * 210), as llama.cpp's reference quantizer
    makes them: per 16 values the scale that fits them best, weighted by their squares; the
    scales in int8 steps of d, the largest at -128."""
    return k_quants.in_row_chunks(w, _blocks_of)


def _blocks_of(rows: np.ndarray) -> np.ndarray:
    sixteens = rows.reshape(-1, 16)
    scales = k_quants.symmetric_scale_search(sixteens, 32).reshape(-1, 16)  # (blocks, 16)
    largest = np.take_along_axis(scales, np.abs(scales).argmax(axis=1)[:, None], axis=1)
    zero = np.abs(largest[:, 0]) < k_quants.TINY
    largest[zero] = 1
    inverse = F32(-128) / largest
    d = k_quants.fp16(F32(1) / inverse)  # (blocks, 1)
    levels = np.minimum(np.rint(inverse * scales), 127).astype(np.int8)
    d[zero], levels[zero] = 0, 0
    step = (d * levels.astype(F32))[..., None]  # (blocks, 16, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint(sixteens.reshape(step.shape[0], 16, 16) / step), -32, 31) + 32
    q = np.where(step == 0, 32, q).astype(np.uint8).reshape(-1, 2, 4, 32)  # half, run, value
    low = (q[:, :, :2] & 15) | ((q[:, :, 2:] & 15) << 4)  # runs 0, 1 low nibbles; 2, 3 high
    high = np.bitwise_or.reduce((q >> 4) << (2 * np.arange(4, dtype=np.uint8))[:, None], axis=2)
    blocks = np.concatenate([low.reshape(-1, 128), high.reshape(-1, 64), levels.view(np.uint8),
                             d.astype(np.float16).view(np.uint8)], axis=1)  # fmt: skip
    return blocks.reshape(rows.shape[0], -1)


def from_gguf(data: np.ndarray, shape: tuple[int, int]) -> Q6_KTensor:
    return Q6_KTensor(data.reshape(shape[0], -1))


@njit(inline="always")
def decode_row(out, w, i):
    row = w.blocks[i]
    for block in range(out.shape[0] // BLOCK):
        start, first = block * BLOCK_BYTES, block * BLOCK
        d = block_scale(row, start + D)
        for run in range(8):
            half, k = run >> 2, run & 3
            low = start + 64 * half + 32 * (k & 1)
            high = start + HIGH_BITS + 32 * half
            for j in range(RUN):
                q = (np.int32(row[low + j]) >> (4 * (k >> 1))) & 15
                q |= ((np.int32(row[high + j]) >> (2 * k)) & 3) << 4
                scale = d * F32(np.int8(row[start + SCALES + 2 * run + (j >> 4)]))
                out[first + RUN * run + j] = scale * F32(q - 32)


# The int8 family's functions: a row unpacked (long prompts), a row dot product with its input
# in groups of a block, and the rest shared (row_blocks).


@njit(inline="always")
def scale_group_size(w):
    return 16


@njit(inline="always")
def unpack_row(values, scales, w, blocks, _, i):
    """Row i's values q - 32, and the scales d * sc of its 16 values."""
    row = blocks[i]
    for block in range(row.shape[0] // BLOCK_BYTES):
        start, first = block * BLOCK_BYTES, block * BLOCK
        d = block_scale(row, start + D)
        for k in range(16):
            scales[16 * block + k] = d * F32(np.int8(row[start + SCALES + k]))
        for half in range(2):
            low, high = start + 64 * half, start + HIGH_BITS + 32 * half
            _six_bits_into(values[first + 128 * half : first + 128 * (half + 1)],
                           row[low : low + 64], row[high : high + 32])  # fmt: skip


@njit(inline="always")
def _six_bits_into(out, low, high):
    """out (128,) = a half block's values less 32: runs 0-3 from the low nibbles of low's first
    and next 32 bytes, then their high nibbles, each with two bits of high (32 bytes) on top."""
    for j in range(32):
        top = np.int32(high[j])
        out[j] = np.int8(((np.int32(low[j]) & 15) | ((top & 3) << 4)) - 32)
        out[32 + j] = np.int8(((np.int32(low[32 + j]) & 15) | (((top >> 2) & 3) << 4)) - 32)
        out[64 + j] = np.int8(((np.int32(low[j]) >> 4) | (((top >> 4) & 3) << 4)) - 32)
        out[96 + j] = np.int8(((np.int32(low[32 + j]) >> 4) | (((top >> 6) & 3) << 4)) - 32)


@njit(inline="always")
def row_group_size(w):
    return ROW_GROUP


@block_step(BLOCK, BLOCK_BYTES, input_group=ROW_GROUP)
def block_terms(block: BlockIR):
    """acc + a block's terms, the input in one group a block: per pair of runs (64 values: a
    half's low or high nibbles and two of its top-bit pairs), each lane's dot product of four
    values q - 32 (q's dot product less 32 times the input's) times the int8 scale of its 16
    values, summed over the block in int32, then times d and the input's scale."""
    scales = block.widened(block.bytes(SCALES, 16), signed=True)  # sc, one per 16 values
    dots_and_scales = []
    for pair in range(4):
        half, nibble = divmod(pair, 2)
        low = block.bits(block.bytes(64 * half, 64), 4 * nibble, 0x0F)
        top = block.fields_of(HIGH_BITS + 32 * half, (4 * nibble, 2, 4), (4 * nibble + 2, 2, 4))
        values, x = block.b.or_(low, top), block.x(64 * pair, 64)
        dots = block.b.sub(block.dots(values, x), block.dots(block.constant(values, 32), x))
        dots_and_scales.append((dots, block.pick(scales, [4 * pair + k // 4 for k in range(16)])))
    total = block.to_float(block.scaled_sum(dots_and_scales))
    d = block.b.fmul(block.half(D), block.x_scale())
    return block.multiply_add(block.acc, total, block.splat(d, 16))


int8_row_dot, int8_row_dots = row_dots(block_terms, BLOCK_BYTES)
