"""Default-path kernels: as fast as the memory bus allows, tested against `reference`.

Matrix products take B inputs at once (decode is B = 1): each weight row is read once for all of
them. fp32: each dot product is summed in 16 SIMD lanes, an order of its own (within float
tolerance of run.c's) that does not depend on the batch. Q8 in groups of 64 or 32: runq.c's
arithmetic exactly (group dot products in int32, group terms summed in float32 in order) with the
int8 products vectorized, at any batch size. Other group sizes: the same values multiplied in
float; rows which are not a whole number of groups are computed in full, where runq.c skips their
last columns and misreads their scales.
"""

import math
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from llamette.kernels import SMALL_BATCH, kernel, parallel_kernel
from llamette.kernels.reference import (
    q8_dequantize_row,
    rmsnorm,
    rope,
    rope_angles,
    round_half_away,
)
from llamette.kernels.simd import (
    FUSED_MADD,
    LANES,
    WIDE_REGISTERS,
    add_group_terms,
    add_int32x16,
    add_row_group_terms,
    dot_int8x32,
    dot_int8x64,
    float32x16_of,
    float32x16_zeros,
    gather_lanes,
    int32x16_zeros,
    load_each,
    load_lanes,
    madd_pairs,
    madd_quads,
    multiply_add,
    row_group_dots,
    store_each,
    store_lanes,
    sum_float32x16,
    sums_float32x16,
)

F32 = np.float32
I32 = np.int32

# Reordered float sums (vectorized dot products, fused multiply-add); nothing else loosened.
reassociating_kernel = njit(
    cache=True, nogil=True, error_model="numpy", parallel=True, fastmath={"reassoc", "contract"}
)
# ...and the same for the body of such a kernel's parallel loop, compiled once as a function of its
# own: inlined into the loop, Numba's parallel passes take seconds over a large body (a cold start).
reassociating_serial_kernel = njit(
    cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"}
)


# Weight rows per block of the fp32 GEMM: with the 32 vector registers of AVX-512, 8 rows by 3
# inputs (24 sums, each input vector loaded used 8 times, so that the inputs, which stream from L2,
# keep up with the multiply-adds); with the 16 of AVX2, 4 rows (2 by 2 sums at a time).
GEMM_ROWS = 8 if WIDE_REGISTERS else 4
# Rows of more than COLUMNS_PER_PASS go through the 8 x 3 blocks in passes of that many columns,
# so that the 8 rows' part (32 KB) stays in L1 while the inputs' part passes.
COLUMNS_PER_PASS = 1024


@parallel_kernel
def matmul_f32(out, x, w):
    """out (B, d) = x (B, n) @ w (d, n)^T, each output one dot product in the fixed order of
    `_dot`: its bits depend on its input and weight row alone, never on the batch, so a sequence
    decodes to the same numbers alone, beside others or as part of a prompt.

    Up to 3 inputs (bound by memory): two weight rows half the matrix apart per task, so that each
    thread reads two long runs of memory (which the prefetchers follow; four runs are slower here)
    and uses each input value it loads twice. From 4 inputs (bound by arithmetic): blocks of
    GEMM_ROWS adjacent rows times all the inputs, in register blocks.
    """
    n_inputs, d = x.shape[0], w.shape[0]
    if n_inputs < 4:
        half = d // 2
        for task in prange(half + d % 2):
            r0, r1 = _rows_of_task(task, half)
            w0, w1 = w[r0], w[r1]
            for b in range(n_inputs):
                out[b, r0], out[b, r1] = _dots_1x2(x[b], w0, w1)
        return
    n_blocks = (d + GEMM_ROWS - 1) // GEMM_ROWS
    # Two loops, so that each is compiled with one way through the columns; np.int64: a prange
    # index may be unsigned, and an unsigned times a signed int is a float in Numba.
    if WIDE_REGISTERS and x.shape[1] > COLUMNS_PER_PASS:
        for block in prange(n_blocks):
            _block_in_passes(out, x, w, GEMM_ROWS * np.int64(block))
    else:
        for block in prange(n_blocks):
            _block_in_one_pass(out, x, w, GEMM_ROWS * np.int64(block))


# The loops above call their bodies as functions compiled once on their own (inlined into the
# loops, their code cost Numba's parallel passes 4 s of a cold start).


@kernel
def _block_in_passes(out, x, w, i):
    """out[:, i:i + GEMM_ROWS] = x @ w[i:i + GEMM_ROWS]^T, long rows in passes."""
    rows_times_inputs(out, x, w, i, i, True)


@kernel
def _block_in_one_pass(out, x, w, i):
    """out[:, i:i + GEMM_ROWS] = x @ w[i:i + GEMM_ROWS]^T, over the columns in one pass."""
    rows_times_inputs(out, x, w, i, i, False)


@njit(inline="always")
def _rows_of_task(task, half):
    """The two weight rows of a task, half the matrix apart; past the halves, the last row of an
    odd-sized matrix (twice)."""
    task = np.int64(task)
    if task < half:
        return task, task + half
    return 2 * half, 2 * half


@njit(inline="always")
def rows_times_inputs(out, x, w, r, i, in_passes):
    """out[:, i:i + GEMM_ROWS] = x (B, n) @ w[r:r + GEMM_ROWS]^T, in register blocks (over the
    columns in one pass, or in_passes for long rows); a last block with fewer rows, one row at a
    time."""
    n_inputs, rows = x.shape[0], min(GEMM_ROWS, w.shape[0] - r)
    if rows < GEMM_ROWS:
        for q in range(rows):
            for b in range(n_inputs):
                out[b, i + q] = _dot(x[b], w[r + q])
        return
    w0, w1, w2, w3 = w[r], w[r + 1], w[r + 2], w[r + 3]
    if not WIDE_REGISTERS:
        paired = n_inputs - n_inputs % 2
        for b in range(0, paired, 2):
            _dots_2x2(out, b, i, x[b], x[b + 1], w0, w1)
            _dots_2x2(out, b, i + 2, x[b], x[b + 1], w2, w3)
        for b in range(paired, n_inputs):
            out[b, i], out[b, i + 1], out[b, i + 2], out[b, i + 3] = _dots_1x4(x[b], w0, w1, w2, w3)
        return
    blocked = n_inputs - n_inputs % 3
    whole = x.shape[1] - x.shape[1] % LANES
    if in_passes:
        _blocks_8x3_in_passes(out, x, w, r, i, blocked)
    else:
        for b in range(0, blocked, 3):
            lane_sums = _sweep_8x3(_zeros_8x3(), x, b, w, r, 0, whole)
            _store_8x3(out, b, i, lane_sums)
    if whole < x.shape[1]:
        _add_last_columns(out, x, w, r, i, blocked, GEMM_ROWS, whole)
    w4, w5, w6, w7 = w[r + 4], w[r + 5], w[r + 6], w[r + 7]
    for b in range(blocked, n_inputs):
        out[b, i], out[b, i + 1], out[b, i + 2], out[b, i + 3] = _dots_1x4(x[b], w0, w1, w2, w3)
        out[b, i + 4], out[b, i + 5], out[b, i + 6], out[b, i + 7] = _dots_1x4(x[b], w4, w5, w6, w7)


# fp32 dot products, all in one order: lane l of a float32x16 sums the products of columns l,
# l + 16, l + 32, ... (with fused multiply-adds), the 16 lane sums are added by halves
# (sum_float32x16), then the products of the last n % 16 columns one by one. The functions below
# block rows and inputs differently for speed; each output is still this sum.


@njit(inline="always")
def _dot(x, w):
    """x . w"""
    whole = x.shape[0] - x.shape[0] % LANES
    a = float32x16_zeros()
    for j in range(0, whole, LANES):
        a = multiply_add(a, load_lanes(x, j), load_lanes(w, j))
    return _total(a, x, w, whole)


@njit(inline="always")
def _dots_1x2(x, w0, w1):
    """(x . w0, x . w1)"""
    whole = x.shape[0] - x.shape[0] % LANES
    a0 = a1 = float32x16_zeros()
    for j in range(0, whole, LANES):
        v = load_lanes(x, j)
        a0 = multiply_add(a0, v, load_lanes(w0, j))
        a1 = multiply_add(a1, v, load_lanes(w1, j))
    return _total(a0, x, w0, whole), _total(a1, x, w1, whole)


@njit(inline="always")
def _dots_1x4(x, w0, w1, w2, w3):
    """(x . w0, x . w1, x . w2, x . w3)"""
    whole = x.shape[0] - x.shape[0] % LANES
    a0 = a1 = a2 = a3 = float32x16_zeros()
    for j in range(0, whole, LANES):
        v = load_lanes(x, j)
        a0 = multiply_add(a0, v, load_lanes(w0, j))
        a1 = multiply_add(a1, v, load_lanes(w1, j))
        a2 = multiply_add(a2, v, load_lanes(w2, j))
        a3 = multiply_add(a3, v, load_lanes(w3, j))
    return (_total(a0, x, w0, whole), _total(a1, x, w1, whole),
            _total(a2, x, w2, whole), _total(a3, x, w3, whole))  # fmt: skip


@njit(inline="always")
def _dots_2x2(out, b, i, x0, x1, w0, w1):
    """out[b + k, i + r] = x_k . w_r for inputs k and rows r of 0, 1."""
    whole = x0.shape[0] - x0.shape[0] % LANES
    a00 = a01 = a10 = a11 = float32x16_zeros()
    for j in range(0, whole, LANES):
        p0, p1 = load_lanes(w0, j), load_lanes(w1, j)
        v = load_lanes(x0, j)
        a00, a01 = multiply_add(a00, v, p0), multiply_add(a01, v, p1)
        v = load_lanes(x1, j)
        a10, a11 = multiply_add(a10, v, p0), multiply_add(a11, v, p1)
    out[b, i], out[b, i + 1] = _total(a00, x0, w0, whole), _total(a01, x0, w1, whole)
    out[b + 1, i], out[b + 1, i + 1] = _total(a10, x1, w0, whole), _total(a11, x1, w1, whole)


@njit(inline="always")
def _blocks_8x3_in_passes(out, x, w, r, i, blocked):
    """out[:blocked, i:i + 8] = x[:blocked] @ w[r:r + 8]^T for long rows, in passes over
    COLUMNS_PER_PASS columns, each block of 3 inputs' lane sums kept between passes: the same
    sums as in one pass."""
    whole = x.shape[1] - x.shape[1] % LANES
    kept = np.zeros((blocked // 3, 24 * LANES), np.float32)
    for start in range(0, whole, COLUMNS_PER_PASS):
        stop = min(whole, start + COLUMNS_PER_PASS)
        for b in range(0, blocked, 3):
            lane_sums = _sweep_8x3(load_each(kept[b // 3], 0, 24), x, b, w, r, start, stop)
            store_each(kept[b // 3], 0, lane_sums)
    for b in range(0, blocked, 3):
        _store_8x3(out, b, i, load_each(kept[b // 3], 0, 24))


@njit(inline="always")
def _sweep_8x3(lane_sums, x, b, w, r, start, stop):
    """The 24 lane sums (a_kq) of x[b + k] . w[r + q], inputs k of 0..2 and rows q of 0..7,
    carried on over columns start..stop (whole vectors): in registers, each loaded input vector
    used eight times. Rows are addressed from the arrays' starts, not as views (each view costs
    two atomic reference counts)."""
    xs, ws = _row_stride(x), _row_stride(w)
    x0, x1, x2 = b * xs, (b + 1) * xs, (b + 2) * xs
    w0, w1, w2, w3 = r * ws, (r + 1) * ws, (r + 2) * ws, (r + 3) * ws
    w4, w5, w6, w7 = (r + 4) * ws, (r + 5) * ws, (r + 6) * ws, (r + 7) * ws
    (a00, a01, a02, a03, a04, a05, a06, a07,
     a10, a11, a12, a13, a14, a15, a16, a17,
     a20, a21, a22, a23, a24, a25, a26, a27) = lane_sums  # fmt: skip
    for j in range(start, stop, LANES):
        v0, v1, v2 = load_lanes(x, x0 + j), load_lanes(x, x1 + j), load_lanes(x, x2 + j)
        a00, a10, a20 = _times_row(a00, a10, a20, v0, v1, v2, load_lanes(w, w0 + j))
        a01, a11, a21 = _times_row(a01, a11, a21, v0, v1, v2, load_lanes(w, w1 + j))
        a02, a12, a22 = _times_row(a02, a12, a22, v0, v1, v2, load_lanes(w, w2 + j))
        a03, a13, a23 = _times_row(a03, a13, a23, v0, v1, v2, load_lanes(w, w3 + j))
        a04, a14, a24 = _times_row(a04, a14, a24, v0, v1, v2, load_lanes(w, w4 + j))
        a05, a15, a25 = _times_row(a05, a15, a25, v0, v1, v2, load_lanes(w, w5 + j))
        a06, a16, a26 = _times_row(a06, a16, a26, v0, v1, v2, load_lanes(w, w6 + j))
        a07, a17, a27 = _times_row(a07, a17, a27, v0, v1, v2, load_lanes(w, w7 + j))
    return (a00, a01, a02, a03, a04, a05, a06, a07,
            a10, a11, a12, a13, a14, a15, a16, a17,
            a20, a21, a22, a23, a24, a25, a26, a27)  # fmt: skip


@njit(inline="always")
def _zeros_8x3():
    """24 vectors of zeros: the lane sums of a block before its first column."""
    z = float32x16_zeros()
    return (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)


@njit(inline="always")
def _store_8x3(out, b, i, lane_sums):
    """out[b + k, i + q] = the totals of the 24 lane sums of `_sweep_8x3`."""
    (a00, a01, a02, a03, a04, a05, a06, a07,
     a10, a11, a12, a13, a14, a15, a16, a17,
     a20, a21, a22, a23, a24, a25, a26, a27) = lane_sums  # fmt: skip
    _store_row_of_8(out, b, i, a00, a01, a02, a03, a04, a05, a06, a07)
    _store_row_of_8(out, b + 1, i, a10, a11, a12, a13, a14, a15, a16, a17)
    _store_row_of_8(out, b + 2, i, a20, a21, a22, a23, a24, a25, a26, a27)


@njit(inline="always")
def _row_stride(a):
    """Elements from one row of a 2-D array to the next."""
    return a.strides[0] // a.itemsize


@njit(inline="always")
def _store_row_of_8(out, b, i, a0, a1, a2, a3, a4, a5, a6, a7):
    """out[b, i + q] = the total of lane sums a_q, q = 0..7."""
    out[b, i], out[b, i + 1] = sum_float32x16(a0), sum_float32x16(a1)
    out[b, i + 2], out[b, i + 3] = sum_float32x16(a2), sum_float32x16(a3)
    out[b, i + 4], out[b, i + 5] = sum_float32x16(a4), sum_float32x16(a5)
    out[b, i + 6], out[b, i + 7] = sum_float32x16(a6), sum_float32x16(a7)


@njit(inline="always")
def _add_last_columns(out, x, w, r, i, n_inputs, rows, whole):
    """out[b, i + q] += x[b, j] * w[r + q, j] for the columns j past the whole vectors, one by
    one (the float32 steps of `_total`, after its lane sums are stored)."""
    for b in range(n_inputs):
        for q in range(rows):
            total = out[b, i + q]
            for j in range(whole, x.shape[1]):
                total += x[b, j] * w[r + q, j]
            out[b, i + q] = total


@njit(inline="always")
def _times_row(a0, a1, a2, v0, v1, v2, p):
    """Three inputs' vectors times one row's: (a0 + v0 * p, a1 + v1 * p, a2 + v2 * p)."""
    return multiply_add(a0, v0, p), multiply_add(a1, v1, p), multiply_add(a2, v2, p)


@njit(inline="always")
def _total(lanes, x, w, whole):
    """A dot product's 16 lane sums added, then the products of columns whole.. in order."""
    total = sum_float32x16(lanes)
    for j in range(whole, x.shape[0]):
        total += x[j] * w[j]
    return total


@kernel
def q8_quantize(xq, xs, x, group_size):
    """Quantize x in groups of group_size (the last may be shorter): scale = max|x| / 127,
    q = round(x / scale), halves away from zero (runq.c's arithmetic, in loops that vectorize)."""
    n = x.shape[0]
    for g in range((n + group_size - 1) // group_size):
        start, stop = g * group_size, min(n, (g + 1) * group_size)
        wmax = F32(0.0)
        for i in range(start, stop):
            wmax = max(wmax, abs(x[i]))  # a NaN is passed over, as by `if abs(x[i]) > wmax`
        scale = wmax / F32(127.0)
        xs[g] = scale
        if F32(0.0) < scale < F32(np.inf):
            _quantize_into(xq[start:stop], x[start:stop], scale)
            continue
        for i in range(start, stop):  # all zeros (0 / 0) or an infinity: no vector loop
            quotient = x[i] / scale
            xq[i] = 0 if math.isnan(quotient) else np.int8(round_half_away(quotient))


@njit(inline="always")
def _quantize_into(xq, x, scale):
    """xq = round_half_away(x / scale) for a finite, positive scale, a NaN to 0. The fraction is
    compared with 1/2 (exact in float32), not added to it: 0.49999997 + 0.5 rounds up to 1."""
    for i in range(x.shape[0]):
        quotient = abs(x[i] / scale)
        whole = np.trunc(quotient)
        rounded = whole + F32(1.0) if quotient - whole >= F32(0.5) else whole
        rounded = -rounded if x[i] < 0 else rounded
        xq[i] = np.int8(rounded) if rounded == rounded else np.int8(0)


@parallel_kernel
def q8_quantize_rows(xq, xs, x, group_size):
    """q8_quantize each row of x (B, n) into xq (B, n) and xs (B, groups)."""
    if x.shape[0] == 1:  # decode: not worth waking the other threads
        q8_quantize(xq[0], xs[0], x[0], group_size)
        return
    for b in prange(x.shape[0]):
        q8_quantize(xq[b], xs[b], x[b], group_size)


class Q8Scratch(NamedTuple):
    """Working memory for q8_linear, for B inputs of n values: passed in, so that a decode step
    allocates nothing."""

    values: np.ndarray  # (B, n) int8: the inputs quantized
    scales: np.ndarray  # (B, groups) float32
    dequantized: np.ndarray  # (B, n) float32: values * scales


def q8_scratch(n_inputs: int, n: int, group_size: int, get=None) -> Q8Scratch:
    """Scratch for q8_linear: fresh zeros, or the arrays of get(name, shape, dtype) (a model's
    Activations.get, which reuses them)."""
    get = get or zeros_named
    groups = -(-n // group_size)
    return Q8Scratch(
        get("xq", (n_inputs, n), np.int8), get("xs", (n_inputs, groups), np.float32),
        get("x_dequantized", (n_inputs, n), np.float32),
    )  # fmt: skip


def zeros_named(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.zeros(shape, dtype), called as Activations.get is (the name unused)."""
    return np.zeros(shape, dtype)


@parallel_kernel
def q8_linear(outs, x, weights, scratch, weights_in_cache):
    """outs[i] (B, d_i) = x (B, n) @ weights[i] (d_i, n)^T for Q8 weights that share their input,
    which is quantized once (q8_quantize) as runq.c quantizes activations. weights_in_cache: the
    weights stay in cache from one call to the next (a small model), where inputs that are not
    in SIMD lanes take 16 rows at a time in lanes instead (the same bits, fewer instructions).

    Groups of 64 or 32 that tile the rows: runq.c's arithmetic to the bit, for any number of
    inputs (a prompt's rows get the bits one-at-a-time decoding gives them). Other group sizes:
    dequantized rows (a few inputs) or blocks of rows in the fp32 GEMM's register blocks, the same
    quantized values multiplied in float, sums reordered (within float tolerance of runq.c).
    """
    group_size = weights[0].group_size
    n_inputs, n = x.shape
    q8_quantize_rows(scratch.values, scratch.scales, x, group_size)
    if n % group_size == 0 and group_size in (64, 32):
        in_lanes = inputs_in_lanes(n_inputs)
        if in_lanes and FUSED_MADD:
            quads, biases, lane_scales = _inputs_in_quads(
                scratch.values[:in_lanes], scratch.scales[:in_lanes]
            )
            for i in range(len(weights)):
                w = weights[i]
                _q8_matmul_quads(
                    outs[i][:in_lanes], quads, biases, lane_scales, w.values, w.scales, group_size
                )
        elif in_lanes:
            pairs, lane_scales = _inputs_across_lanes(
                scratch.values[:in_lanes], scratch.scales[:in_lanes]
            )
            for i in range(len(weights)):
                w = weights[i]
                _q8_matmul_across_inputs(
                    outs[i][:in_lanes], pairs, lane_scales, w.values, w.scales, group_size
                )
        if in_lanes == n_inputs:
            return
        values, scales = scratch.values[in_lanes:], scratch.scales[in_lanes:]
        for i in range(len(weights)):
            w, out = weights[i], outs[i][in_lanes:]
            if weights_in_cache:
                _q8_matmul_rows_in_lanes(out, values, scales, w.values, w.scales, group_size)
            else:
                _q8_matmul_groups(out, values, scales, w.values, w.scales, group_size)
        return
    _dequantize_rows(scratch.dequantized, scratch.values, scratch.scales, group_size)
    for i in range(len(weights)):
        w = weights[i]
        if n_inputs <= SMALL_BATCH:
            _q8_matmul_dequantized(outs[i], scratch.dequantized, w.values, w.scales, group_size)
        else:
            _q8_matmul_dequantized_blocks(
                outs[i], scratch.dequantized, w.values, w.scales, group_size
            )


@njit(inline="always")
def inputs_in_lanes(n_inputs):
    """How many of n_inputs a Q8 product takes in SIMD lanes, 16 at a time: all but a last block
    that would fill less than half the lanes, whose inputs go one dot product each. Both compute
    the same sums to the bit, in different orders."""
    if n_inputs % LANES >= LANES // 2:
        return n_inputs
    return n_inputs - n_inputs % LANES


@parallel_kernel
def _q8_matmul_groups(out, xq, xs, wq, ws, group_size):
    """out (B, d) = x @ wq^T with runq.c's arithmetic, groups of 64 or 32, one row at a time: per
    group an int32 dot product (SIMD products and a horizontal sum), then the float32 term
    (dot * weight scale) * input scale, groups summed in order. Each weight row is read once for
    all inputs."""
    d, n = wq.shape
    groups = n // group_size
    for i in prange(d):
        row, row_scales = wq[i], ws[i * groups : (i + 1) * groups]
        for b in range(xq.shape[0]):
            out[b, i] = _q8_row_dot(row, row_scales, xq[b], xs[b], groups, group_size)


@njit(inline="always")
def _q8_row_dot(row, row_scales, x, x_scales, groups, group_size):
    """One row's product with one input, as runq.c computes it."""
    val = F32(0.0)
    if group_size == 64:
        for g in range(groups):
            val += (F32(dot_int8x64(row, g * 64, x, g * 64)) * row_scales[g]) * x_scales[g]
    else:
        for g in range(groups):
            val += (F32(dot_int8x32(row, g * 32, x, g * 32)) * row_scales[g]) * x_scales[g]
    return val


@parallel_kernel
def _q8_matmul_rows_in_lanes(out, xq, xs, wq, ws, group_size):
    """What _q8_matmul_groups computes, to the bit, with 16 rows in SIMD lanes: per group the 16
    rows' int32 dot products at once (row_group_dots), then runq.c's float steps lane by lane.

    Twice as fast as a row at a time where the weights come from cache (stories15M's classifier,
    32000 x 288: 92 us against 196); from memory, 16 rows read side by side stream more slowly
    than one row read through (25-35 GB/s against 41-46 on stories110M's shapes), so models that
    do not fit in cache keep the row at a time.
    """
    d, n = wq.shape
    groups, stride = n // group_size, _row_stride(wq)
    blocks = d // LANES
    for block in prange(blocks):
        first = block * LANES
        for b in range(xq.shape[0]):
            x, x_scales = xq[b], xs[b]
            val = float32x16_zeros()  # (16,) the rows' sums
            for g in range(groups):
                if group_size == 64:
                    dots = row_group_dots(wq, first * stride + g * 64, stride, x, g * 64, 64)
                else:
                    dots = row_group_dots(wq, first * stride + g * 32, stride, x, g * 32, 32)
                w_scales = gather_lanes(ws, first * groups + g, groups)
                val = add_row_group_terms(val, dots, w_scales, x_scales[g])
            store_lanes(out[b], first, val)
    for i in range(blocks * LANES, d):  # the last rows, fewer than 16
        row, row_scales = wq[i], ws[i * groups : (i + 1) * groups]
        for b in range(xq.shape[0]):
            out[b, i] = _q8_row_dot(row, row_scales, xq[b], xs[b], groups, group_size)


@parallel_kernel
def _inputs_across_lanes(xq, xs):
    """The quantized inputs xq (B, n), xs (B, groups) laid out for _q8_matmul_across_inputs:
    pairs (blocks, n * 16) int16 holds for each pair of columns (k, k + 1) the 16 inputs' values
    side by side (see _interleave), lane_scales (blocks, groups * 16) each group's 16 scales."""
    pairs = np.zeros((_lane_blocks(xq), xq.shape[1] * LANES), np.int16)
    _interleave(pairs, xq, 2)
    return pairs, _lanes_of_groups(xs)


@njit(inline="always")
def _lane_blocks(per_input):
    """Blocks of 16 inputs (one per SIMD lane) that hold the B rows of per_input, the last block
    padded with zeros."""
    return (per_input.shape[0] + LANES - 1) // LANES


@parallel_kernel
def _interleave(out, xq, per_lane):
    """out (blocks, n * 16) = xq (B, n) in blocks of 16 inputs, runs of per_lane columns
    (k..k + per_lane - 1) of the 16 inputs side by side (n is a multiple of per_lane: whole
    groups of 32 or 64)."""
    n = xq.shape[1]
    for run in prange(n // per_lane):
        k = per_lane * np.int64(run)
        for b in range(xq.shape[0]):
            block, lane = b // LANES, b % LANES
            for j in range(per_lane):
                out[block, k * LANES + per_lane * lane + j] = xq[b, k + j]


@njit(inline="always")
def _lanes_of_groups(per_group):
    """per_group (B, groups) as (blocks, groups * 16): each group's values of 16 inputs side by
    side."""
    n_inputs, groups = per_group.shape
    lanes = np.zeros((_lane_blocks(per_group), groups * LANES), per_group.dtype)
    for b in range(n_inputs):
        for g in range(groups):
            lanes[b // LANES, g * LANES + b % LANES] = per_group[b, g]
    return lanes


ROWS_PER_TASK = 64


@parallel_kernel
def _q8_matmul_across_inputs(out, pairs, lane_scales, wq, ws, group_size):
    """out (B, d) = x @ wq^T with runq.c's arithmetic, 16 inputs at a time in SIMD lanes (one
    lane per input; see _inputs_across_lanes and rows_times_lanes). Rows are widened to int16
    once, two at a time."""
    d, n = wq.shape
    groups = n // group_size
    for task in prange((d + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        row0, row1 = np.empty(n, np.int16), np.empty(n, np.int16)
        lanes = np.empty(LANES, np.float32)
        for i0 in range(task * ROWS_PER_TASK, min(d, (task + 1) * ROWS_PER_TASK), 2):
            i1 = min(i0 + 1, d - 1)  # an odd last row goes with itself
            _widen_into(row0, wq[i0])
            _widen_into(row1, wq[i1])
            scales0, scales1 = (
                ws[i0 * groups : (i0 + 1) * groups],
                ws[i1 * groups : (i1 + 1) * groups],
            )
            rows_times_lanes(out, pairs, lane_scales, row0, row1, scales0, scales1, i0, i1, lanes)


@njit(inline="always")
def rows_times_lanes(out, pairs, lane_scales, row0, row1, scales0, scales1, i0, i1, lanes):
    """out[:, i0] and out[:, i1] for two weight rows, widened to int16, with their group scales:
    each lane (input) sums a group's int32 products over pairs of columns, then adds the group's
    float32 term, groups in order. The same operations per output as _q8_matmul_groups, so the
    same bits, without their per-group horizontal sums; each input load serves both rows."""
    groups = scales0.shape[0]
    group_size = row0.shape[0] // groups
    for block in range(pairs.shape[0]):
        x_pairs, x_scales = pairs[block], lane_scales[block]
        val0, val1 = float32x16_zeros(), float32x16_zeros()
        for g in range(groups):
            sum0, sum1 = _group_sums(x_pairs, row0, row1, g * group_size, group_size)
            val0 = add_group_terms(val0, sum0, scales0[g], x_scales, g * LANES)
            val1 = add_group_terms(val1, sum1, scales1[g], x_scales, g * LANES)
        _store_column(out, i0, block * LANES, val0, lanes)
        _store_column(out, i1, block * LANES, val1, lanes)


@njit(inline="always")
def _store_column(out, i, first, v, lanes):
    """out[first + l, i] = lane l of v for the inputs that exist (a last block may be padded);
    lanes: 16 float32 of scratch."""
    store_lanes(lanes, 0, v)
    for lane in range(min(LANES, out.shape[0] - first)):
        out[first + lane, i] = lanes[lane]


@njit(inline="always")
def _group_sums(x_pairs, row0, row1, start, group_size):
    """The int32 sums of one group (columns start.. of group_size) for rows 0 and 1, each lane
    one input. Where a multiply-accumulate waits on its previous sum (FUSED_MADD), four partial
    sums per row (exact in any order) keep the multiplier busy; elsewhere one per row leaves the
    registers (16 on AVX2, each int32x16 takes two) to the rest of the loop."""
    if not FUSED_MADD:
        sum0 = sum1 = int32x16_zeros()
        for k in range(start, start + group_size, 2):
            sum0 = madd_pairs(sum0, x_pairs, k * LANES, row0, k)
            sum1 = madd_pairs(sum1, x_pairs, k * LANES, row1, k)
        return sum0, sum1
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = int32x16_zeros()
    for k in range(start, start + group_size, 8):
        a0 = madd_pairs(a0, x_pairs, k * LANES, row0, k)
        b0 = madd_pairs(b0, x_pairs, k * LANES, row1, k)
        a1 = madd_pairs(a1, x_pairs, (k + 2) * LANES, row0, k + 2)
        b1 = madd_pairs(b1, x_pairs, (k + 2) * LANES, row1, k + 2)
        a2 = madd_pairs(a2, x_pairs, (k + 4) * LANES, row0, k + 4)
        b2 = madd_pairs(b2, x_pairs, (k + 4) * LANES, row1, k + 4)
        a3 = madd_pairs(a3, x_pairs, (k + 6) * LANES, row0, k + 6)
        b3 = madd_pairs(b3, x_pairs, (k + 6) * LANES, row1, k + 6)
    sum0 = add_int32x16(add_int32x16(a0, a1), add_int32x16(a2, a3))
    sum1 = add_int32x16(add_int32x16(b0, b1), add_int32x16(b2, b3))
    return sum0, sum1


# With AVX-512 VNNI, lanes take inputs four columns each: one vpdpbusd multiplies 64 bytes,
# where the int16 pairs above multiply 32 values. It multiplies unsigned bytes by signed ones, so
# the weights go in as w + 128 (their top bit flipped) and a lane's sum over a group exceeds the
# true one by 128 times its input's values in the group summed: the lane's sum starts from minus
# that (its bias, computed once per input), and ends exact.


@parallel_kernel
def _inputs_in_quads(xq, xs):
    """The quantized inputs xq (B, n), xs (B, groups) laid out for _q8_matmul_quads: quads
    (blocks, n * 16) int8 holds for each four columns k..k + 3 the 16 inputs' values side by
    side (see _interleave); biases and lane_scales (blocks, groups * 16) each group's 16 biases
    (int32) and scales."""
    n_inputs, n = xq.shape
    groups = xs.shape[1]
    group_size = n // groups
    quads = np.zeros((_lane_blocks(xq), n * LANES), np.int8)
    _interleave(quads, xq, 4)
    biases = np.empty((n_inputs, groups), np.int32)
    for b in range(n_inputs):
        for g in range(groups):
            biases[b, g] = -128 * _sum_int8(xq[b, g * group_size : (g + 1) * group_size])
    return quads, _lanes_of_groups(biases), _lanes_of_groups(xs)


@parallel_kernel
def _q8_matmul_quads(out, quads, biases, lane_scales, wq, ws, group_size):
    """out (B, d) = x @ wq^T with runq.c's arithmetic, 16 inputs at a time in SIMD lanes (see
    _inputs_in_quads and rows_times_quads), four rows at a time."""
    d, n = wq.shape
    groups = n // group_size
    for task in prange((d + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        first = task * ROWS_PER_TASK
        rows = np.empty((ROWS_PER_TASK, n), np.uint8)
        scales = np.empty((ROWS_PER_TASK, groups), np.float32)
        for r in range(ROWS_PER_TASK):  # read in one sweep, which the prefetchers follow
            row = min(first + r, d - 1)  # past the last row, the last again (not stored)
            flip_into(rows[r], wq[row])
            scales[r] = ws[row * groups : (row + 1) * groups]
        rows_times_quads(out, quads, biases, lane_scales, rows, scales, first)


@njit(inline="always")
def flip_into(out, values):
    """out (uint8) = int8 values + 128: each byte's top bit flipped."""
    for k in range(values.shape[0]):
        out[k] = np.uint8(values[k]) ^ np.uint8(0x80)


@njit(inline="always")
def _sum_int8(values):
    """The int32 sum of int8 values (a slice indexed from 0, so that the loop vectorizes)."""
    total = I32(0)
    for k in range(values.shape[0]):
        total += I32(values[k])
    return total


@njit(inline="always")
def rows_times_quads(out, quads, biases, lane_scales, rows, scales, first):
    """out[:, first..first + R] for R weight rows (R, n) as uint8 (w + 128), R a multiple of 4,
    with their group scales (R, groups), four rows at a time. Outputs past out's last column
    are not stored."""
    lanes = np.empty(LANES, np.float32)
    for r in range(0, min(rows.shape[0], out.shape[1] - first), 4):
        _four_rows_times_quads(out, quads, biases, lane_scales, rows[r : r + 4],
                               scales[r : r + 4], first + r, lanes)  # fmt: skip


@njit(inline="always")
def _four_rows_times_quads(out, quads, biases, lane_scales, rows, scales, i, lanes):
    """out[:, i..i + 3] for four rows: each lane (input) sums a group's int32 products four
    columns at a time (two partial sums per row), then adds the group's float32 term, groups in
    order; the same bits as rows_times_lanes and _q8_matmul_groups."""
    w0, w1, w2, w3 = rows[0], rows[1], rows[2], rows[3]
    groups = scales.shape[1]
    group_size = w0.shape[0] // groups
    for block in range(quads.shape[0]):
        x_quads, x_biases, x_scales = quads[block], biases[block], lane_scales[block]
        v0 = v1 = v2 = v3 = float32x16_zeros()
        for g in range(groups):
            at = g * LANES
            a0 = a1 = a2 = a3 = load_lanes(x_biases, at)
            b0 = b1 = b2 = b3 = int32x16_zeros()
            for k in range(g * group_size, (g + 1) * group_size, 8):
                x = k * LANES
                a0, a1 = madd_quads(a0, x_quads, x, w0, k), madd_quads(a1, x_quads, x, w1, k)
                a2, a3 = madd_quads(a2, x_quads, x, w2, k), madd_quads(a3, x_quads, x, w3, k)
                x = (k + 4) * LANES
                b0, b1 = (
                    madd_quads(b0, x_quads, x, w0, k + 4),
                    madd_quads(b1, x_quads, x, w1, k + 4),
                )
                b2, b3 = (
                    madd_quads(b2, x_quads, x, w2, k + 4),
                    madd_quads(b3, x_quads, x, w3, k + 4),
                )
            v0 = add_group_terms(v0, add_int32x16(a0, b0), scales[0, g], x_scales, at)
            v1 = add_group_terms(v1, add_int32x16(a1, b1), scales[1, g], x_scales, at)
            v2 = add_group_terms(v2, add_int32x16(a2, b2), scales[2, g], x_scales, at)
            v3 = add_group_terms(v3, add_int32x16(a3, b3), scales[3, g], x_scales, at)
        for r, v in ((0, v0), (1, v1), (2, v2), (3, v3)):
            if i + r < out.shape[1]:
                _store_column(out, i + r, block * LANES, v, lanes)


@njit(inline="always")
def _widen_into(out, values):
    """out = values (a whole row: a loop from 0 over a 1-d slice vectorizes, a 2-d index not)."""
    for k in range(values.shape[0]):
        out[k] = values[k]


@parallel_kernel
def _dequantize_rows(out, xq, xs, group_size):
    """out (B, n) float32 = int8 values times the scales of groups along each row."""
    n = xq.shape[1]
    for b in prange(xq.shape[0]):
        for g in range(xs.shape[1]):
            start, stop = g * group_size, min(n, (g + 1) * group_size)
            _scale_into(out[b, start:stop], xq[b, start:stop], xs[b, g])


@njit(inline="always")
def _scale_into(out, values, scale):
    """out = values * scale. (Slices indexed from 0, so that the loop vectorizes: Numba checks
    every index for negative wraparound unless it can tell it is not negative.)"""
    for j in range(values.shape[0]):
        out[j] = F32(values[j]) * scale


@parallel_kernel
def _q8_matmul_dequantized(out, x, wq, ws, group_size):
    """out (B, d) = x (B, n) @ w (d, n)^T for a few inputs: each weight row dequantized once
    (any group size; rows may start mid-group), then vectorized float dot products."""
    d, n = wq.shape
    for task in prange((d + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        row = np.empty(n, np.float32)
        for i in range(task * ROWS_PER_TASK, min(d, (task + 1) * ROWS_PER_TASK)):
            _dequantize_row(row, wq[i], ws, i * n, group_size)
            for b in range(x.shape[0]):
                out[b, i] = _dot(x[b], row)


@parallel_kernel
def _q8_matmul_dequantized_blocks(out, x, wq, ws, group_size):
    """out (B, d) = x (B, n) @ w (d, n)^T for a batch: blocks of GEMM_ROWS weight rows (in
    parallel), dequantized once, times the inputs in the fp32 GEMM's register blocks."""
    d, n = wq.shape
    for block in prange((d + GEMM_ROWS - 1) // GEMM_ROWS):
        i = GEMM_ROWS * np.int64(block)
        rows = np.empty((min(GEMM_ROWS, d - i), n), np.float32)
        for r in range(rows.shape[0]):
            _dequantize_row(rows[r], wq[i + r], ws, (i + r) * n, group_size)
        rows_times_inputs(out, x, rows, 0, i, False)


@njit(inline="always")
def _dequantize_row(out, row, ws, flat_start, group_size):
    """out = row's int8 values times their scales; groups run over the matrix flattened, so the
    row (starting at flat index flat_start) may start and end mid-group."""
    n = row.shape[0]
    k = 0
    while k < n:  # runs of values that share a scale
        flat = flat_start + k
        stop = min(n, k + group_size - flat % group_size)
        _scale_into(out[k:stop], row[k:stop], ws[flat // group_size])
        k = stop


# Steps of a batch, row by row in parallel, each row with the reference arithmetic.


@parallel_kernel
def embed_rows(out, values, scales, tokens, group_size):
    """out (B, dim) = rows `tokens` of a Q8 embedding table, dequantized."""
    for b in prange(tokens.shape[0]):
        q8_dequantize_row(out[b], values, scales, tokens[b], group_size)


@parallel_kernel
def rmsnorm_rows(out, x, weight, eps):
    """rmsnorm each row of x (B, dim)."""
    for b in prange(x.shape[0]):
        rmsnorm(out[b], x[b], weight, eps)


@parallel_kernel
def rope_angles_rows(cos, sin, positions, head_size, theta):
    """rope_angles for each position: cos, sin (B, head_size / 2)."""
    for b in prange(positions.shape[0]):
        rope_angles(cos[b], sin[b], positions[b], head_size, theta)


@parallel_kernel
def rope_rows(q, k, cos, sin):
    """Rotate each row of q (B, dim) and k (B, kv_dim) by its own angles (rope_angles_rows)."""
    for b in prange(q.shape[0]):
        rope(q[b], k[b], cos[b], sin[b])


@reassociating_kernel
def attention(out, q, key_cache, value_cache, pos, n_heads, att):
    """Causal grouped-query attention of one token, heads in parallel (decode).

    out, q: (dim,); key_cache, value_cache: (n_kv_heads, seq_len, head_size); att: (n_heads,
    seq_len) scratch. Vectorized dot products and exp: within float tolerance of the reference,
    not equal to it.
    """
    for h in prange(n_heads):
        _attention_head(out, q, key_cache, value_cache, pos, n_heads, att, h)


@reassociating_serial_kernel
def _attention_head(out, q, key_cache, value_cache, pos, n_heads, att, h):
    """attention's head h."""
    head_size = q.shape[0] // n_heads
    kv_head = h // (n_heads // key_cache.shape[0])
    heads = slice(h * head_size, (h + 1) * head_size)
    _attend(out[heads], q[heads], key_cache[kv_head], value_cache[kv_head], pos + 1, att[h])


@reassociating_kernel
def attention_rows(out, q, key_cache, value_cache, layer, slots, positions, n_heads):
    """Causal grouped-query attention for a batch: row b attends to positions 0..positions[b] of
    its sequence's cache, which already holds the batch's own keys and values.

    out, q: (B, dim); key_cache, value_cache: (n_slots, n_layers, n_kv_heads, seq_len, head_size).
    Each row gets the bits of `attention` for one token; a prompt's rows go in blocks that share
    each chunk of keys and values while it is in L1.
    """
    n_blocks = (q.shape[0] + ATTENTION_ROWS - 1) // ATTENTION_ROWS
    for task in prange(n_heads * n_blocks):  # by head, then block: a thread's share of a prompt's
        h, block = task // n_blocks, task % n_blocks  # rows (later ones attend to more) is even
        _attention_rows_task(out, q, key_cache, value_cache, layer, slots, positions, n_heads, h,
                             block)  # fmt: skip


@reassociating_serial_kernel
def _attention_rows_task(
    out, q, key_cache, value_cache, layer, slots, positions, n_heads, h, block
):
    """attention_rows' head h for rows block * ATTENTION_ROWS.. of the batch."""
    head_size = q.shape[1] // n_heads
    kv_head = h // (n_heads // key_cache.shape[2])
    first = block * ATTENTION_ROWS
    last = min(q.shape[0], first + ATTENTION_ROWS)
    heads = slice(h * head_size, (h + 1) * head_size)
    if head_size % LANES == 0 and _one_run(slots, positions, first, last):
        keys = key_cache[slots[first], layer, kv_head]
        values = value_cache[slots[first], layer, kv_head]
        _attend_rows(out[first:last, heads], q[first:last, heads], keys, values, positions[first])
        return
    for b in range(first, last):
        slot = slots[b]
        keys, values = key_cache[slot, layer, kv_head], value_cache[slot, layer, kv_head]
        scores = np.empty(positions[b] + 1, np.float32)
        _attend(out[b, heads], q[b, heads], keys, values, positions[b] + 1, scores)


ATTENTION_ROWS = 8  # rows of one sequence that attention_rows takes together


@njit(inline="always")
def _one_run(slots, positions, first, last):
    """Whether rows first..last - 1 are one sequence's consecutive positions."""
    for b in range(first + 1, last):
        if slots[b] != slots[first] or positions[b] != positions[first] + b - first:
            return False
    return True


@njit(inline="always", error_model="numpy", fastmath={"reassoc", "contract"})
def _attend_rows(out, q, keys, values, first_position):
    """`_attend` for rows r of one sequence at positions first_position + r (out, q: (rows,
    head_size), heads a whole number of SIMD vectors long): the same steps in the same order for
    each row, taken a chunk of keys (and of values) at a time for all the rows."""
    n_rows, head_size = q.shape
    n_keys = first_position + n_rows  # the last row's
    scores = np.empty((n_rows, n_keys), np.float32)
    chunk = max(LANES, ATTENTION_CHUNK_BYTES // (4 * head_size) // LANES * LANES)
    for start in range(0, n_keys, chunk):
        for r in range(n_rows):
            stop = min(start + chunk, first_position + r + 1)
            if stop > start:
                _key_scores(scores[r], q[r], keys, start, stop)
    for r in range(n_rows):
        _softmax(scores[r], first_position + r + 1, head_size)
    out[:, :] = 0.0
    for start in range(0, n_keys, chunk):
        for r in range(n_rows):
            stop = min(start + chunk, first_position + r + 1)
            if stop > start:
                _add_weighted_values(out[r], scores[r], values, start, stop)


ATTENTION_CHUNK_BYTES = 32 * 1024  # keys (or values) taken at a time by a block of rows


@njit(inline="always", error_model="numpy", fastmath={"reassoc", "contract"})
def _attend(out, q, keys, values, n_keys, scores):
    """One head: out (head_size,) = softmax(q . keys[t] / sqrt(head_size)) @ values, t < n_keys;
    keys, values (seq_len, head_size): its kv head's cache, each position's vector contiguous.
    Heads a whole number of SIMD vectors long take explicit lanes (`_key_scores`,
    `_add_weighted_values`); others, loops that LLVM vectorizes as it can."""
    head_size = q.shape[0]
    whole_vectors = head_size % LANES == 0
    if whole_vectors:
        _key_scores(scores, q, keys, 0, n_keys)
    else:
        for t in range(n_keys):
            score = F32(0.0)
            for i in range(head_size):
                score += q[i] * keys[t, i]
            scores[t] = score
    _softmax(scores, n_keys, head_size)
    out[:] = 0.0
    if whole_vectors:
        _add_weighted_values(out, scores, values, 0, n_keys)
        return
    for t in range(n_keys):
        for i in range(head_size):
            out[i] += scores[t] * values[t, i]


@njit(inline="always", error_model="numpy", fastmath={"reassoc", "contract"})
def _softmax(scores, n_keys, head_size):
    """scores[:n_keys] = softmax(scores[:n_keys] / sqrt(head_size)), in place."""
    inverse_scale = F32(1.0) / F32(math.sqrt(F32(head_size)))
    highest = F32(-np.inf)
    for t in range(n_keys):
        scores[t] *= inverse_scale
        highest = max(highest, scores[t])
    total = F32(0.0)
    for t in range(n_keys):
        scores[t] = exp_f32(scores[t] - highest)
        total += scores[t]
    for t in range(n_keys):
        scores[t] /= total


@njit(inline="always")
def _key_scores(scores, q, keys, start, stop):
    """scores[t] = q . keys[t] for t in start..stop - 1 (start a multiple of 16), each summed in
    16 lanes as `_dot` sums: whole blocks of 16 keys at a time, their lane sums added together
    (sums_float32x16), then the keys left with `_dot` itself."""
    head_size, stride = q.shape[0], _row_stride(keys)
    blocked = stop - (stop - start) % LANES
    for t in range(start, blocked, LANES):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = float32x16_zeros()  # a_k: key t + k
        a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = float32x16_zeros()
        for i in range(0, head_size, LANES):
            v, at = load_lanes(q, i), t * stride + i
            a0, a1, a2, a3 = _times_4_keys(a0, a1, a2, a3, v, keys, at, stride)
            a4, a5, a6, a7 = _times_4_keys(a4, a5, a6, a7, v, keys, at + 4 * stride, stride)
            a8, a9, a10, a11 = _times_4_keys(a8, a9, a10, a11, v, keys, at + 8 * stride, stride)
            a12, a13, a14, a15 = _times_4_keys(
                a12, a13, a14, a15, v, keys, at + 12 * stride, stride
            )
        lanes = (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)
        store_lanes(scores, t, sums_float32x16(lanes))
    for t in range(blocked, stop):
        scores[t] = _dot(q, keys[t])


@njit(inline="always")
def _times_4_keys(a0, a1, a2, a3, v, keys, at, stride):
    """a_k + v * (16 values of key k), k = 0..3: key 0's from flat index `at`, the next ones
    `stride` further each."""
    return (multiply_add(a0, v, load_lanes(keys, at)),
            multiply_add(a1, v, load_lanes(keys, at + stride)),
            multiply_add(a2, v, load_lanes(keys, at + 2 * stride)),
            multiply_add(a3, v, load_lanes(keys, at + 3 * stride)))  # fmt: skip


@njit(inline="always")
def _add_weighted_values(out, weights, values, start, stop):
    """out (head_size,) += weights[t] * values[t] for t in start..stop - 1, each value summed in
    position order (fused multiply-adds); four vectors of the output at a time where they exist."""
    head_size, stride = out.shape[0], _row_stride(values)
    in_fours = head_size - head_size % (4 * LANES)
    for i in range(0, in_fours, 4 * LANES):
        a0, a1 = load_lanes(out, i), load_lanes(out, i + LANES)
        a2, a3 = load_lanes(out, i + 2 * LANES), load_lanes(out, i + 3 * LANES)
        for t in range(start, stop):
            weight, value = float32x16_of(weights[t]), t * stride + i
            a0 = multiply_add(a0, weight, load_lanes(values, value))
            a1 = multiply_add(a1, weight, load_lanes(values, value + LANES))
            a2 = multiply_add(a2, weight, load_lanes(values, value + 2 * LANES))
            a3 = multiply_add(a3, weight, load_lanes(values, value + 3 * LANES))
        store_lanes(out, i, a0)
        store_lanes(out, i + LANES, a1)
        store_lanes(out, i + 2 * LANES, a2)
        store_lanes(out, i + 3 * LANES, a3)
    for i in range(in_fours, head_size, LANES):
        a = load_lanes(out, i)
        for t in range(start, stop):
            a = multiply_add(a, float32x16_of(weights[t]), load_lanes(values, t * stride + i))
        store_lanes(out, i, a)


@reassociating_kernel
def swiglu_rows(gate, up):
    """gate = silu(gate) * up for a batch (B, hidden), rows in parallel, with the vectorizable exp."""
    for b in prange(gate.shape[0]):
        swiglu(gate[b], up[b])


@njit(inline="always", fastmath={"reassoc", "contract"})
def swiglu(gate, up):
    """gate = silu(gate) * up with the vectorizable exp (the reference calls libm's expf)."""
    for i in range(gate.shape[0]):
        gate[i] = gate[i] / (F32(1.0) + exp_f32(-gate[i])) * up[i]


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 `bits`."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(inline="always", error_model="numpy")
def exp_f32(x):
    """e^x in float32 within 2 ulp, as straight-line code that vectorizes (libm's expf does not):
    e^x = 2^n e^r with n = round(x / ln 2), r = x - n ln 2, e^r from a degree-6 polynomial."""
    x = min(max(x, F32(-87.33)), F32(88.72))
    n = F32(np.floor(x * F32(1.44269504) + F32(0.5)))
    r = x - n * F32(0.693359375) - n * F32(-2.12194440e-4)  # ln 2 in two parts
    p = F32(1.9875691500e-4)
    p = p * r + F32(1.3981999507e-3)
    p = p * r + F32(8.3334519073e-3)
    p = p * r + F32(4.1665795894e-2)
    p = p * r + F32(1.6666665459e-1)
    p = p * r + F32(5.0000001201e-1)
    p = p * r * r + r + F32(1.0)
    return p * _float32_from_bits(I32((I32(n) + I32(127)) << I32(23)))
