"""Default-path kernels: as fast as the memory bus allows, tested against `reference`.

fp32 matvec: each row's dot product is vectorized, so its sum is reordered (within float
tolerance of run.c's). Q8: runq.c's arithmetic exactly (group dot products in int32, group terms
summed in float32 in order) with the int8 products vectorized (AVX-512 VNNI where the CPU has it),
except that rows which are not a whole number of groups are computed in full, where runq.c skips
their last columns and misreads their scales.
"""

import math

import numpy as np
from numba import njit, prange

from llamette.kernels import kernel, parallel_kernel
from llamette.kernels.reference import round_half_away

F32 = np.float32
I32 = np.int32

# Reordered float sums (vectorized dot products, fused multiply-add); nothing else loosened.
reassociating_kernel = njit(
    cache=True, error_model="numpy", parallel=True, fastmath={"reassoc", "contract"}
)


@reassociating_kernel
def matvec_f32(out, x, w):
    """out (d,) = w (d, n) @ x (n,), rows in parallel."""
    d, n = w.shape
    for i in prange(d):
        val = F32(0.0)
        for j in range(n):
            val += w[i, j] * x[j]
        out[i] = val


@kernel
def q8_quantize(xq, xs, x, group_size):
    """Quantize x in groups of group_size (the last may be shorter): scale = max|x| / 127, q = round(x / scale)."""
    n = x.shape[0]
    for g in range((n + group_size - 1) // group_size):
        start, stop = g * group_size, min(n, (g + 1) * group_size)
        wmax = F32(0.0)
        for i in range(start, stop):
            if abs(x[i]) > wmax:
                wmax = abs(x[i])
        scale = wmax / F32(127.0)
        xs[g] = scale
        for i in range(start, stop):
            quotient = x[i] / scale
            xq[i] = 0 if math.isnan(quotient) else np.int8(round_half_away(quotient))


@parallel_kernel
def q8_matvec(out, xq, xs, wq, ws, group_size):
    """out (d,) = w (d, n) @ x (n,) for int8 values and group scales, as runq.c computes it."""
    d, n = wq.shape
    if n % group_size:
        _q8_matvec_partial_groups(out, xq, xs, wq, ws, group_size)
    elif group_size == 64:
        _q8_matvec_groups_of_64(out, xq, xs, wq, ws)
    else:
        ng = n // group_size
        _q8_matvec_whole_groups(
            out, xq.reshape(ng, group_size), xs, wq.reshape(d, ng, group_size), ws.reshape(d, ng)
        )


# Integer products are written as I32(acc + I32(a) * I32(b)): Numba would widen them to int64,
# and 32-bit sums of 8-bit products are what the vectorizer turns into VNNI instructions.


@parallel_kernel
def _q8_matvec_groups_of_64(out, xq, xs, wq, ws):
    """Groups of exactly 64 (llama2.c's export default): a constant trip count vectorizes best."""
    d, n = wq.shape
    ng = n // 64
    for i in prange(d):
        row = wq[i]
        val = F32(0.0)
        for g in range(ng):
            ival = I32(0)
            for k in range(64):
                ival = I32(ival + I32(xq[g * 64 + k]) * I32(row[g * 64 + k]))
            val += (F32(ival) * ws[i * ng + g]) * xs[g]
        out[i] = val


@parallel_kernel
def _q8_matvec_whole_groups(out, xq, xs, wq, ws):
    """Any group size that divides the rows: wq (d, groups, group_size), xq (groups, group_size)."""
    d, ng, group_size = wq.shape
    for i in prange(d):
        val = F32(0.0)
        for g in range(ng):
            ival = I32(0)
            for k in range(group_size):
                ival = I32(ival + I32(xq[g, k]) * I32(wq[i, g, k]))
            val += (F32(ival) * ws[i, g]) * xs[g]
        out[i] = val


@parallel_kernel
def _q8_matvec_partial_groups(out, xq, xs, wq, ws, group_size):
    """Rows that are not whole groups: int32 dot products over runs that share both scales.

    A run ends where a weight group (over w flattened) or an activation group (over the row) ends.
    """
    d, n = wq.shape
    for i in prange(d):
        val = F32(0.0)
        j = 0
        while j < n:
            flat = i * n + j
            stop = min(n, j + group_size - flat % group_size, (j // group_size + 1) * group_size)
            ival = I32(0)
            for k in range(j, stop):
                ival = I32(ival + I32(xq[k]) * I32(wq[i, k]))
            val += (F32(ival) * ws[flat // group_size]) * xs[j // group_size]
            j = stop
        out[i] = val
