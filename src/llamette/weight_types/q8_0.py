"""GGUF's Q8_0: each row is blocks of 32 values, each block an fp16 scale d and 32 int8 values q,
standing for q * d. Products are the int8 family's (runq.c's arithmetic, groups of 32), so a Q8_0
file computes, to the bit, what llama2.c's v2 file of the same values computes."""

from typing import NamedTuple

import numpy as np
from numba import njit

from llamette.kernels import int8, internal_parallel_kernel, reference
from llamette.kernels.gemm import row_stride
from llamette.kernels.halves import block_scale
from llamette.kernels.int8 import biased_dot_32
from llamette.kernels.simd import (
    FUSED_MADD,
    copy_32,
    dot_int8x32,
    gather_half_lanes,
    prefetch_ahead,
    row_group_dots,
)

NAME = "q8_0"
GGUF_TYPE = 8  # gguf.GGMLQuantizationType.Q8_0
BLOCK, BLOCK_BYTES = 32, 34  # values per block; an fp16 scale, then 32 int8 values


class Q8_0Tensor(NamedTuple):
    """A matrix in Q8_0 blocks, kept as the file's bytes."""

    blocks: np.ndarray  # uint8 (rows, cols / 32 * 34)

    @property
    def shape(self) -> tuple[int, int]:
        rows, nbytes = self.blocks.shape
        return rows, nbytes // BLOCK_BYTES * BLOCK

    def dequantize(self) -> np.ndarray:
        rows, cols = self.shape
        blocks = self.blocks.reshape(rows, cols // BLOCK, BLOCK_BYTES)
        scales = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
        values = blocks[:, :, 2:].view(np.int8).astype(np.float32)  # (rows, blocks, 32)
        return (values * scales).reshape(rows, cols)


Tensor = Q8_0Tensor


def from_gguf(data: np.ndarray, shape: tuple[int, int]) -> Q8_0Tensor:
    return Q8_0Tensor(data.reshape(shape[0], -1))


@njit(inline="always")
def decode_row(out, w, i):
    """out (cols,) = row i's values times their block's scale."""
    row = w.blocks[i]
    values = row.view(np.int8)
    for block in range(out.shape[0] // BLOCK):
        start, first = block * BLOCK_BYTES, block * BLOCK
        int8.scale_into(out[first : first + BLOCK], values[start + 2 : start + BLOCK_BYTES],
                        block_scale(row, start))  # fmt: skip


@internal_parallel_kernel
def product(out, x, w, inputs, exact):
    """out (B, d) = x (B, n) @ w (d, n)^T, x quantized in groups of 32 as runq.c quantizes it."""
    if exact is None or not exact:
        int8.product(out, x, w, inputs)
        return
    n = x.shape[1]
    xq, xs = inputs.values[:n], inputs.scales[: n // BLOCK]
    for b in range(x.shape[0]):
        reference.q8_quantize(xq, xs, x[b], BLOCK)
        reference.q8_0_matmul(out[b], xq, xs, w.blocks)
    int8.new_input(inputs)  # (it holds the last row only)


# The int8 family's functions (see kernels.int8).


def input_group_size(tensor: Q8_0Tensor) -> int:
    """The groups a product quantizes its input in."""
    return BLOCK


@njit(inline="always")
def group_size(w):
    return BLOCK


@njit(inline="always")
def int8_arrays(w):
    return w.blocks, w.blocks


@njit(inline="always")
def unpack_row(values, scales, w, blocks, _, i):
    row = blocks[i]
    signed = row.view(np.int8)
    for block in range(scales.shape[0]):
        start = block * BLOCK_BYTES
        scales[block] = block_scale(row, start)
        copy_32(values, block * BLOCK, signed, start + 2)


@njit(inline="always")
def int8_row_dot(w, blocks, _, i, x, x_scales, x_sums):
    """Per block an int32 dot product, then runq.c's float32 terms (dot * weight scale) * input
    scale, summed in block order. With AVX-512 VNNI the dot product takes the weights biased to
    unsigned bytes (one vpdpbusd) and subtracts the bias, elsewhere them as they are."""
    row = blocks[i]
    signed = row.view(np.int8)
    val = np.float32(0.0)
    for g in range(row.shape[0] // BLOCK_BYTES):
        start = g * BLOCK_BYTES
        prefetch_ahead(row, start)
        if FUSED_MADD:
            dot = biased_dot_32(row, start + 2, x, g * BLOCK) - (x_sums[g] << 7)
        else:
            dot = dot_int8x32(signed, start + 2, x, g * BLOCK)
        val += (np.float32(dot) * block_scale(row, start)) * x_scales[g]
    return val


@njit(inline="always")
def sixteen_rows(w, blocks, _, first, g, groups, x):
    stride = row_stride(blocks)
    start = first * stride + g * BLOCK_BYTES  # the block's scale, then its 32 values
    dots = row_group_dots(blocks.view(np.int8), start + 2, stride, x, g * BLOCK, 32)
    return dots, gather_half_lanes(blocks, start, stride)
