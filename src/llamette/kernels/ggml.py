"""Kernels for GGUF's weight types that run in their own layout: F16, BF16 and Q4_0.

Products take B inputs at once, as in `fast`: each weight row is read once for all of them. For
a few inputs the row is decoded inside the dot product; for a batch it is decoded once into a
float32 row and dotted with every input. Sums are vectorized (reordered), and these types have
no run.c counterpart, so `--exact` takes the same kernels.
"""

import numpy as np
from numba import njit, prange

from llamette.kernels import SMALL_BATCH, parallel_kernel
from llamette.kernels.fast import _dot, _float32_from_bits, reassociating_kernel

F32 = np.float32
U32 = np.uint32
TWO_TO_112 = F32(5.192296858534828e33)  # rebias a half's exponent (15) to a float's (127)


@njit(inline="always")
def f16_to_f32(h):
    """The float32 value of IEEE half bits h (normal and subnormal; no infinities in weights)."""
    bits = U32(h)
    magnitude = _float32_from_bits(np.int32((bits & U32(0x7FFF)) << U32(13))) * TWO_TO_112
    return -magnitude if bits & U32(0x8000) else magnitude


@njit(inline="always")
def bf16_to_f32(h):
    """The float32 whose upper 16 bits are h."""
    return _float32_from_bits(np.int32(U32(h) << U32(16)))


@njit(inline="always", fastmath={"reassoc", "contract"})
def _half_dot(row, x, brain):
    acc = F32(0.0)
    if brain:
        for j in range(x.shape[0]):
            acc += bf16_to_f32(row[j]) * x[j]
    else:
        for j in range(x.shape[0]):
            acc += f16_to_f32(row[j]) * x[j]
    return acc


@njit(inline="always", fastmath={"reassoc", "contract"})
def decode_half_row(out, row, brain):
    if brain:
        for j in range(out.shape[0]):
            out[j] = bf16_to_f32(row[j])
    else:
        for j in range(out.shape[0]):
            out[j] = f16_to_f32(row[j])


@reassociating_kernel
def half_matmul(out, x, bits, brain):
    """out (B, d) = x (B, n) @ w.T for w (d, n) given as fp16 (or, with brain, bf16) bits."""
    n_inputs, n = x.shape
    for i in prange(bits.shape[0]):
        row = bits[i]
        if n_inputs <= SMALL_BATCH:
            for b in range(n_inputs):
                out[b, i] = _half_dot(row, x[b], brain)
        else:
            decoded = np.empty(n, F32)
            decode_half_row(decoded, row, brain)
            for b in range(n_inputs):
                out[b, i] = _dot(x[b], decoded)


@njit(inline="always", fastmath={"reassoc", "contract"})
def _q4_block_dot(row, start, x, first):
    """One Q4_0 block (bytes start..start+17 of a row) dotted with x[first:first + 32]."""
    scale = f16_to_f32(U32(row[start]) | (U32(row[start + 1]) << U32(8)))
    acc = F32(0.0)
    for j in range(16):
        byte = np.int32(row[start + 2 + j])
        acc += F32((byte & 15) - 8) * x[first + j] + F32((byte >> 4) - 8) * x[first + 16 + j]
    return scale * acc


@njit(inline="always", fastmath={"reassoc", "contract"})
def decode_q4_row(out, row):
    for block in range(out.shape[0] // 32):
        start, first = block * 18, block * 32
        scale = f16_to_f32(U32(row[start]) | (U32(row[start + 1]) << U32(8)))
        for j in range(16):
            byte = np.int32(row[start + 2 + j])
            out[first + j] = F32((byte & 15) - 8) * scale
            out[first + 16 + j] = F32((byte >> 4) - 8) * scale


@reassociating_kernel
def q4_matmul(out, x, blocks):
    """out (B, d) = x (B, n) @ w.T for w (d, n) in Q4_0 blocks (d, n / 32 * 18)."""
    n_inputs, n = x.shape
    for i in prange(blocks.shape[0]):
        row = blocks[i]
        if n_inputs <= SMALL_BATCH:
            for b in range(n_inputs):
                acc = F32(0.0)
                for block in range(n // 32):
                    acc += _q4_block_dot(row, block * 18, x[b], block * 32)
                out[b, i] = acc
        else:
            decoded = np.empty(n, F32)
            decode_q4_row(decoded, row)
            for b in range(n_inputs):
                out[b, i] = _dot(x[b], decoded)


@parallel_kernel
def half_embed_rows(out, bits, tokens, brain):
    """out (B, dim) = rows tokens[b] of an fp16 (bf16) embedding table."""
    for b in prange(tokens.shape[0]):
        decode_half_row(out[b], bits[tokens[b]], brain)


@parallel_kernel
def q4_embed_rows(out, blocks, tokens):
    """out (B, dim) = rows tokens[b] of a Q4_0 embedding table."""
    for b in prange(tokens.shape[0]):
        decode_q4_row(out[b], blocks[tokens[b]])
