"""GGUF's Q2_K: each row is blocks of 256 values, each block sixteen bytes of 4-bit scales sc (low
nibble) and minimums m (high nibble), one pair per 16 values, 64 bytes of 2-bit values q, an fp16
scale d and minimum scale dmin, q standing for (d * sc) * q - dmin * m. Run r (values 32r..32r +
31, two sub-blocks of 16) takes bits 2 (r % 4) of the block's first (r < 4) or second 32 value
bytes.

Products quantize the input in groups of 32 and go a row at a time, block by block in SIMD lanes
(kernels.block_dots): each lane's int32 dot product of four 2-bit values with the input's times
its 16 values' scale (d * sc) and the input's scale, less the sum of its four input values times
their minimum (dmin * m) and the input's scale (the int8 family, a row at a time). Above
SMALL_BATCH inputs, rows unpacked to bytes go through the int8 family's lanes, 16 inputs at a
time."""

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

NAME = "q2_k"
GGUF_TYPE = 10  # gguf.GGMLQuantizationType.Q2_K
BLOCK, BLOCK_BYTES = 256, 84  # values per block; 16 bytes of scales, 64 of values, d, dmin
RUN = 32  # values per input group
VALUES, D, DMIN = 16, 80, 82  # where a block's parts start
F32 = np.float32
WRITTEN = False  # llamette runs it but does not write it: gguf-py has no K-quant quantizer


class Q2_KTensor(NamedTuple):
    """A matrix in Q2_K blocks, kept as the file's bytes."""

    blocks: np.ndarray  # uint8 (rows, cols / 256 * 84)

    @property
    def shape(self) -> tuple[int, int]:
        rows, nbytes = self.blocks.shape
        return rows, nbytes // BLOCK_BYTES * BLOCK

    def dequantize(self) -> np.ndarray:
        rows, cols = self.shape
        blocks = self.blocks.reshape(rows, cols // BLOCK, BLOCK_BYTES)
        halves = blocks[:, :, D:].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 2)
        packed = blocks[:, :, :VALUES]  # (.., 16)
        scales = (halves[:, :, :1] * (packed & 15).astype(np.float32))[..., None]
        minimums = (halves[:, :, 1:] * (packed >> 4).astype(np.float32))[..., None]
        values = blocks[:, :, VALUES:D].reshape(rows, -1, 2, 1, 32)
        values = (values >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3  # (.., 2, 4, 32)
        values = values.reshape(rows, -1, 16, 16).astype(np.float32)
        return (scales * values - minimums).reshape(rows, cols)


Tensor = Q2_KTensor


def from_gguf(data: np.ndarray, shape: tuple[int, int]) -> Q2_KTensor:
    return Q2_KTensor(data.reshape(shape[0], -1))


@njit(inline="always")
def decode_row(out, w, i):
    row = w.blocks[i]
    for block in range(out.shape[0] // BLOCK):
        start, first = block * BLOCK_BYTES, block * BLOCK
        d, dmin = block_scale(row, start + D), block_scale(row, start + DMIN)
        for run in range(8):
            values, shift = start + VALUES + 32 * (run >> 2), 2 * (run & 3)
            for j in range(RUN):
                packed = np.int32(row[start + 2 * run + (j >> 4)])
                scale, minimum = d * F32(packed & 15), dmin * F32(packed >> 4)
                q = (np.int32(row[values + j]) >> shift) & 3
                out[first + RUN * run + j] = scale * F32(q) - minimum


# The int8 family's functions: a row unpacked (long prompts), a row dot product, and the rest
# shared (row_blocks).


@njit(inline="always")
def scale_group_size(w):
    return 16


@njit(inline="always")
def unpack_row(values, scales, w, blocks, _, i):
    """Row i's 2-bit values q, and the scales d * sc of its 16 values."""
    row = blocks[i]
    for block in range(row.shape[0] // BLOCK_BYTES):
        start, first = block * BLOCK_BYTES, block * BLOCK
        d = block_scale(row, start + D)
        for s in range(16):
            scales[16 * block + s] = d * F32(np.int32(row[start + s]) & 15)
        for run in range(8):
            packed, shift = start + VALUES + 32 * (run >> 2), 2 * (run & 3)
            for j in range(RUN):  # (a constant count: the loop vectorizes)
                values[first + RUN * run + j] = (np.int32(row[packed + j]) >> shift) & 3


@njit(inline="always")
def unpack_minimums(minimums, w, blocks, _, i):
    """Row i's minimums dmin * m, one per 16 values."""
    row = blocks[i]
    for block in range(row.shape[0] // BLOCK_BYTES):
        start = block * BLOCK_BYTES
        dmin = block_scale(row, start + DMIN)
        for s in range(16):
            minimums[16 * block + s] = dmin * F32(np.int32(row[start + s]) >> 4)
    return True


@block_step(BLOCK, BLOCK_BYTES)
def block_terms(block: BlockIR):
    """acc + a block's terms: per pair of runs (two bit pairs of 32 bytes), each lane's dot
    product of four values times (d * sc) * input scale, less its four input values' sum times
    (dmin * m) * input scale, the scale and minimum of its 16 values."""
    packed = block.widened(block.bytes(0, 16))
    x_scales = block.pick(block.x_scales(8), [k // 2 for k in range(16)])
    scales = block.times(block.times(block.to_float(block.bits(packed, 0, 15)),
                                     block.splat(block.half(D), 16)), x_scales)  # fmt: skip
    minimums = block.times(block.times(block.to_float(block.bits(packed, 4, 15)),
                                       block.splat(block.half(DMIN), 16)), x_scales)  # fmt: skip
    minimums = block.times(minimums, block.constant(minimums, -1.0))
    acc = block.acc
    for pair in range(4):
        packed = block.bytes(VALUES + 32 * (pair // 2), 32)
        shift = 4 * (pair % 2)
        values = block.join(block.bits(packed, shift, 3), block.bits(packed, shift + 2, 3))
        acc = block.add_per_sixteen(acc, values, pair, scales)
        acc = block.add_per_sixteen(acc, block.constant(values, 1), pair, minimums)  # sums
    return acc


int8_row_dot, int8_row_dots = row_dots(block_terms, BLOCK_BYTES)
