"""fp32 matrix products: x (B, n) @ w (d, n)^T, each output one dot product summed in one fixed
order (`dot`), so that its bits depend on its input and weight row alone, never on the batch: a
sequence decodes to the same numbers alone, beside others or as part of a prompt.

A few inputs (decoding) stream the weights from memory, two rows per task; a batch (a prompt)
goes through register blocks of weight rows times inputs, which reuse each loaded vector.
"""

import numpy as np
from numba import njit, prange
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic

from llamette.kernels import internal_kernel, parallel_kernel
from llamette.kernels.simd import (
    LANES,
    WIDE_REGISTERS,
    float32x16_zeros,
    load_each,
    load_lanes,
    multiply_add,
    store_each,
    sum_float32x16,
)
from llamette.kernels.symbols import called_by_symbol

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
    `dot`: its bits depend on its input and weight row alone, never on the batch, so a sequence
    decodes to the same numbers alone, beside others or as part of a prompt.

    Up to 3 inputs (bound by memory): two weight rows half the matrix apart per task, so that each
    thread reads two long runs of memory (which the prefetchers follow; four runs stream more slowly)
    and uses each input value it loads twice. From 4 inputs (bound by arithmetic): blocks of
    GEMM_ROWS adjacent rows times all the inputs, in register blocks.
    """
    n_inputs, d = x.shape[0], w.shape[0]
    streaming, half = n_inputs < 4, d // 2
    n_tasks = half + d % 2 if streaming else (d + GEMM_ROWS - 1) // GEMM_ROWS
    for task in prange(n_tasks):
        if streaming:
            r0, r1 = _rows_of_task(task, half)
            w0, w1 = w[r0], w[r1]
            for b in range(n_inputs):
                out[b, r0], out[b, r1] = _dots_1x2(x[b], w0, w1)
        else:  # np.int64: a prange index may be unsigned, and unsigned times signed is a float
            i = GEMM_ROWS * np.int64(task)
            block_times_inputs(out, x, w, i, i)


# One parallel loop, the blocks' code a function compiled once on its own, called by symbol: each
# parallel loop, and each copy of the register blocks' code, costs seconds of a cold start.


@called_by_symbol
@internal_kernel
def block_times_inputs(out, x, w, r, i):
    """out[:, i:i + GEMM_ROWS] = x (B, n) @ w[r:r + GEMM_ROWS]^T (rows_times_inputs)."""
    rows_times_inputs(out, x, w, r, i)


@intrinsic
def as_weights(typingctx, a):
    """The array a, typed read-only as memory-mapped weights are: weights decoded into memory
    of a kernel's own then take the fp32 weights' compiled code, with no compile of their own."""

    def codegen(context, builder, signature, args):
        return impl_ret_borrowed(context, builder, signature.return_type, args[0])

    return a.copy(readonly=True)(a), codegen


@njit(inline="always")
def _rows_of_task(task, half):
    """The two weight rows of a task, half the matrix apart; past the halves, the last row of an
    odd-sized matrix (twice)."""
    task = np.int64(task)
    if task < half:
        return task, task + half
    return 2 * half, 2 * half


@njit(inline="always")
def rows_times_inputs(out, x, w, r, i):
    """out[:, i:i + GEMM_ROWS] = x (B, n) @ w[r:r + GEMM_ROWS]^T, in register blocks; a last
    block with fewer rows, one row at a time."""
    n_inputs, rows = x.shape[0], min(GEMM_ROWS, w.shape[0] - r)
    if rows < GEMM_ROWS:
        for q in range(rows):
            for b in range(n_inputs):
                out[b, i + q] = dot(x[b], w[r + q])
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
    _blocks_8x3(out, x, w, r, i, blocked)
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
def dot(x, w):
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
def _blocks_8x3(out, x, w, r, i, blocked):
    """out[:blocked, i:i + 8] = x[:blocked] @ w[r:r + 8]^T, in blocks of 3 inputs; rows of more
    than COLUMNS_PER_PASS in passes of that many columns, each block's lane sums kept between
    passes (the same sums as in one pass)."""
    whole = x.shape[1] - x.shape[1] % LANES
    if x.shape[1] <= COLUMNS_PER_PASS:
        for b in range(0, blocked, 3):
            _store_8x3(out, b, i, _sweep_8x3(_zeros_8x3(), x, b, w, r, 0, whole))
        return
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
    xs, ws = row_stride(x), row_stride(w)
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
def row_stride(a):
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
