"""Default-path kernels, tested against `reference`.

Q8: runq.c's group arithmetic, except that rows whose length is not a multiple of the group size
are computed in full (runq.c skips their last columns and misreads their scales).
"""

import math

import numpy as np

from llamette.kernels import kernel
from llamette.kernels.reference import (  # noqa: F401  (the same arithmetic as the reference)
    add,
    attention,
    matmul,
    q8_dequantize_row,
    rmsnorm,
    rope,
    round_half_away,
    swiglu,
)

F32 = np.float32


@kernel
def q8_quantize(xq, xs, x, group_size):
    """Quantize x in groups of group_size (the last group may be shorter): scale = max|x| / 127."""
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


@kernel
def q8_matmul(out, xq, xs, wq, ws, group_size):
    """out (d,) = w (d, n) @ x (n,), int32 dot products over runs that share both scales.

    A run ends where a weight group (over w flattened) or an activation group (over the row) ends;
    when rows are whole groups the runs are exactly runq.c's groups.
    """
    d, n = wq.shape
    for i in range(d):
        val = F32(0.0)
        j = 0
        while j < n:
            flat = i * n + j
            stop = min(n, j + group_size - flat % group_size, (j // group_size + 1) * group_size)
            ival = np.int32(0)
            for k in range(j, stop):
                ival += np.int32(xq[k]) * np.int32(wq[i, k])
            val += (F32(ival) * ws[flat // group_size]) * xs[j // group_size]
            j = stop
        out[i] = val
