"""Kernels for GGUF's weight types that run in their own layout: F16, BF16, Q4_0 and Q8_0.

Products take B inputs at once, as in `fast`: each weight row is read once for all of them. For
F16, BF16 and Q4_0, a few inputs get the row decoded inside the dot product; a batch gets it
decoded once into a float32 row and dotted with every input. Their sums are vectorized
(reordered), and these types have no run.c counterpart, so `--exact` takes the same kernels. Q8_0
computes what `fast.q8_linear` computes for the same values regrouped as a `Q8Tensor` (group size
32), bit for bit: runq.c's arithmetic, for any number of inputs.
"""

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from llamette.kernels import SMALL_BATCH, parallel_kernel
from llamette.kernels.fast import (
    ROWS_PER_TASK,
    _dot,
    _float32_from_bits,
    _inputs_across_lanes,
    _inputs_in_quads,
    _row_stride,
    _scale_into,
    _widen_into,
    flip_into,
    inputs_in_lanes,
    q8_quantize_rows,
    reassociating_kernel,
    rows_times_lanes,
    rows_times_quads,
    zeros_named,
)
from llamette.kernels.simd import (
    FUSED_MADD,
    LANES,
    add_row_group_terms,
    dot_int8x32,
    float32x16_zeros,
    gather_half_lanes,
    row_group_dots,
    store_lanes,
)

F32 = np.float32
I32 = np.int32
U32 = np.uint32
TWO_TO_112 = F32(5.192296858534828e33)  # rebias a half's exponent (15) to a float's (127)


@njit(inline="always")
def f16_to_f32(h):
    """The float32 value of IEEE half bits h (normal and subnormal; no infinities in weights)."""
    bits = U32(h)
    magnitude = _float32_from_bits(np.int32((bits & U32(0x7FFF)) << U32(13))) * TWO_TO_112
    return -magnitude if bits & U32(0x8000) else magnitude


@njit(inline="always")
def block_scale(row, start):
    """The float32 value of the fp16 scale at bytes start, start + 1 of a uint8 row of blocks.

    f16_to_f32 with the sign moved into the float's bits instead of negated: cheaper one value
    at a time (Q8_0 products run about a tenth faster), but slower in vectorized loops (F16 rows).
    """
    bits = U32(row[start]) | (U32(row[start + 1]) << U32(8))
    sign_and_magnitude = ((bits & U32(0x8000)) << U32(16)) | ((bits & U32(0x7FFF)) << U32(13))
    return _float32_from_bits(np.int32(sign_and_magnitude)) * TWO_TO_112


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
    scale = block_scale(row, start)
    acc = F32(0.0)
    for j in range(16):
        byte = np.int32(row[start + 2 + j])
        acc += F32((byte & 15) - 8) * x[first + j] + F32((byte >> 4) - 8) * x[first + 16 + j]
    return scale * acc


@njit(inline="always", fastmath={"reassoc", "contract"})
def decode_q4_row(out, row):
    for block in range(out.shape[0] // 32):
        start, first = block * 18, block * 32
        scale = block_scale(row, start)
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


# Q8_0: blocks of 34 bytes, an fp16 scale then 32 int8 values.


class Q8_0Scratch(NamedTuple):
    """Working memory for q8_0_linear, for B inputs of n values (n / 32 blocks): passed in, so
    that a decode step allocates nothing."""

    values: np.ndarray  # (B, n) int8: the inputs quantized in groups of 32
    scales: np.ndarray  # (B, n / 32) float32
    sums: np.ndarray  # (B, n / 32) int32: each group's values summed


def q8_0_scratch(n_inputs: int, n: int, get=None) -> Q8_0Scratch:
    """Scratch for q8_0_linear: fresh zeros, or the arrays of get(name, shape, dtype) (a model's
    Activations.get, which reuses them)."""
    get = get or zeros_named
    groups = n // 32
    return Q8_0Scratch(
        get("xq", (n_inputs, n), np.int8), get("xs", (n_inputs, groups), np.float32),
        get("x_sums", (n_inputs, groups), np.int32),
    )  # fmt: skip


@parallel_kernel
def q8_0_linear(outs, x, weights, scratch, weights_in_cache):
    """outs[i] (B, d_i) = x (B, n) @ weights[i] (d_i, n)^T for Q8_0 weights that share their
    input, which is quantized once in groups of 32 as runq.c quantizes activations.

    runq.c's arithmetic to the bit, for any number of inputs, as fast.q8_linear computes it:
    inputs in SIMD lanes where they fill at least half of 16, the rest one dot product each, or
    with weights that stay in cache (weights_in_cache) 16 rows at a time in lanes.
    """
    n_inputs = x.shape[0]
    q8_quantize_rows(scratch.values, scratch.scales, x, 32)
    in_lanes = inputs_in_lanes(n_inputs)
    if in_lanes and FUSED_MADD:
        quads, biases, lane_scales = _inputs_in_quads(
            scratch.values[:in_lanes], scratch.scales[:in_lanes]
        )
        for i in range(len(weights)):
            _q8_0_matmul_quads(outs[i][:in_lanes], quads, biases, lane_scales, weights[i].blocks)
    elif in_lanes:
        pairs, lane_scales = _inputs_across_lanes(
            scratch.values[:in_lanes], scratch.scales[:in_lanes]
        )
        for i in range(len(weights)):
            _q8_0_matmul_across_inputs(outs[i][:in_lanes], pairs, lane_scales, weights[i].blocks)
    if in_lanes == n_inputs:
        return
    values, scales, sums = (
        scratch.values[in_lanes:],
        scratch.scales[in_lanes:],
        scratch.sums[in_lanes:],
    )
    if FUSED_MADD:  # the biased dot products subtract these
        _sum_groups_of_32(sums, values)
    for i in range(len(weights)):
        if weights_in_cache:
            _q8_0_matmul_rows_in_lanes(outs[i][in_lanes:], values, scales, sums, weights[i].blocks)
        else:
            _q8_0_matmul(outs[i][in_lanes:], values, scales, sums, weights[i].blocks)


@parallel_kernel
def _q8_0_matmul_across_inputs(out, pairs, lane_scales, blocks):
    """out (B, d) = x @ w^T for w in Q8_0 blocks, 16 inputs at a time in SIMD lanes: each pair of
    rows decoded once into int16 values and float32 scales, then fast.rows_times_lanes."""
    d, groups = blocks.shape[0], blocks.shape[1] // 34
    for task in prange((d + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        row0, row1 = np.empty(groups * 32, np.int16), np.empty(groups * 32, np.int16)
        scales0, scales1 = np.empty(groups, np.float32), np.empty(groups, np.float32)
        lanes = np.empty(LANES, np.float32)
        for i0 in range(task * ROWS_PER_TASK, min(d, (task + 1) * ROWS_PER_TASK), 2):
            i1 = min(i0 + 1, d - 1)  # an odd last row goes with itself
            _unpack_q8_0_row(row0, scales0, blocks[i0], _widen_into)
            _unpack_q8_0_row(row1, scales1, blocks[i1], _widen_into)
            rows_times_lanes(out, pairs, lane_scales, row0, row1, scales0, scales1, i0, i1, lanes)


@parallel_kernel
def _q8_0_matmul_quads(out, quads, biases, lane_scales, blocks):
    """out (B, d) = x @ w^T for w in Q8_0 blocks, 16 inputs at a time in SIMD lanes (AVX-512
    VNNI): a task's rows unpacked into values + 128 and float32 scales, then
    fast.rows_times_quads."""
    d, groups = blocks.shape[0], blocks.shape[1] // 34
    for task in prange((d + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        first = task * ROWS_PER_TASK
        rows = np.empty((ROWS_PER_TASK, groups * 32), np.uint8)
        scales = np.empty((ROWS_PER_TASK, groups), np.float32)
        for r in range(ROWS_PER_TASK):
            row = blocks[min(first + r, d - 1)]  # past the last row, the last again (not stored)
            _unpack_q8_0_row(rows[r], scales[r], row, flip_into)
        rows_times_quads(out, quads, biases, lane_scales, rows, scales, first)


@njit(inline="always")
def _unpack_q8_0_row(values, scales, row, copy_into):
    """values (n,) and scales (n / 32,) float32 of a row of Q8_0 blocks, each block's int8 values
    written by copy_into (fast._widen_into for int16, fast.flip_into for uint8 + 128)."""
    signed = row.view(np.int8)
    for block in range(scales.shape[0]):
        start = block * 34
        scales[block] = block_scale(row, start)
        copy_into(values[block * 32 : block * 32 + 32], signed[start + 2 : start + 34])


@parallel_kernel
def _sum_groups_of_32(sums, xq):
    """sums (B, n / 32) = the int8 values xq (B, n) summed in groups of 32."""
    for b in range(xq.shape[0]):
        for g in range(sums.shape[1]):
            total = I32(0)
            for k in range(32):
                total = I32(total + I32(xq[b, g * 32 + k]))
            sums[b, g] = total


@parallel_kernel
def _q8_0_matmul(out, xq, xs, x_sums, blocks):
    """out (B, d) = x (B, n) @ w (d, n)^T for w in Q8_0 blocks (d, n / 32 * 34) and x quantized
    (xq, xs, x_sums from Q8_0Scratch), one row at a time (_q8_0_row_dot)."""
    for i in prange(blocks.shape[0]):
        for b in range(xq.shape[0]):
            out[b, i] = _q8_0_row_dot(blocks[i], xq[b], xs[b], x_sums[b])


@njit(inline="always")
def _q8_0_row_dot(row, x, x_scales, x_sums):
    """A row of Q8_0 blocks times a quantized input: per block an int32 dot product, then runq.c's
    float32 terms (dot * weight scale) * input scale, summed in block order. With AVX-512 VNNI the
    dot product takes the weights biased to unsigned bytes (one vpdpbusd), elsewhere them as they
    are."""
    signed = row.view(np.int8)
    val = F32(0.0)
    for g in range(row.shape[0] // 34):
        start = g * 34
        if FUSED_MADD:
            dot = _biased_block_dot(row, start + 2, x, g * 32) - (x_sums[g] << 7)
        else:
            dot = dot_int8x32(signed, start + 2, x, g * 32)
        val += (F32(dot) * block_scale(row, start)) * x_scales[g]
    return val


@parallel_kernel
def _q8_0_matmul_rows_in_lanes(out, xq, xs, x_sums, blocks):
    """What _q8_0_matmul computes, to the bit, with 16 rows in SIMD lanes, as
    fast._q8_matmul_rows_in_lanes: for weights that stay in cache."""
    d, n_blocks = blocks.shape[0], blocks.shape[1] // 34
    signed, stride = blocks.view(np.int8), _row_stride(blocks)
    full_blocks = d // LANES
    for block in prange(full_blocks):
        first = block * LANES * stride
        for b in range(xq.shape[0]):
            x, x_scales = xq[b], xs[b]
            val = float32x16_zeros()  # (16,) the rows' sums
            for g in range(n_blocks):
                start = first + g * 34  # the block's scale, then its 32 values
                dots = row_group_dots(signed, start + 2, stride, x, g * 32, 32)
                w_scales = gather_half_lanes(blocks, start, stride)
                val = add_row_group_terms(val, dots, w_scales, x_scales[g])
            store_lanes(out[b], block * LANES, val)
    for i in range(full_blocks * LANES, d):  # the last rows, fewer than 16
        for b in range(xq.shape[0]):
            out[b, i] = _q8_0_row_dot(blocks[i], xq[b], xs[b], x_sums[b])


@intrinsic
def _biased_block_dot(typingctx, row, start, x, first):
    """The int32 sum of (w_j + 128) * x[first + j] over the 32 int8 values w_j at bytes start..
    of a uint8 row (w + 128 is the byte with its top bit flipped): w . x plus 128 * sum(x).

    Written as one vector expression, because a 32-step loop is unrolled and not vectorized (and
    64-step windows over blocks of 34 bytes do twice the work): LLVM compiles it to AVX-512 VNNI's
    unsigned-by-signed byte dot product (vpdpbusd), hence the bias, and a sum of 8 lanes.
    """
    if not (row.dtype == types.uint8 and x.dtype == types.int8):
        return None

    def codegen(context, builder, signature, args):
        row_array = context.make_array(signature.args[0])(context, builder, args[0])
        x_array = context.make_array(signature.args[2])(context, builder, args[2])
        bytes32, ints32 = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(32), 32)

        def load_32(array, index):
            address = builder.bitcast(builder.gep(array.data, [index]), bytes32.as_pointer())
            return builder.load(address, align=1)

        biased = builder.xor(load_32(row_array, args[1]), ir.Constant(bytes32, [0x80] * 32))
        products = builder.mul(
            builder.zext(biased, ints32), builder.sext(load_32(x_array, args[3]), ints32)
        )
        vector_sum = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.IntType(32), [ints32]),
            "llvm.vector.reduce.add.v32i32",
        )
        return builder.call(vector_sum, [products])

    return types.int32(row, start, x, first), codegen


@njit(inline="always")
def decode_q8_0_row(out, row):
    """out (n,) = a row of Q8_0 blocks (n / 32 * 34 bytes) as float32 values, value * scale."""
    values = row.view(np.int8)
    for block in range(out.shape[0] // 32):
        start, first = block * 34, block * 32
        _scale_into(
            out[first : first + 32], values[start + 2 : start + 34], block_scale(row, start)
        )


@parallel_kernel
def q8_0_embed_rows(out, blocks, tokens):
    """out (B, dim) = rows tokens[b] of a Q8_0 embedding table."""
    for b in prange(tokens.shape[0]):
        decode_q8_0_row(out[b], blocks[tokens[b]])
