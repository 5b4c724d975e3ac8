"""The decoded family: products with weights whose rows decode to float32 values (F16, BF16),
multiplied in float32 with reordered (vectorized) sums.

Up to SMALL_BATCH inputs, each output is one dot product with the row decoded inside it (the
type's `row_dot`): the same bits whatever else is in the batch. Larger batches decode each row
once into float32 (the type's `decode_row`) and take its dot product with every input (`dot`),
unless `exact` asks for the bits a row gets alone. These types have no run.c counterpart: that is
all `exact` means for them.

A weight type joins the family with `decode_row(out, w, i)` and `row_dot(w, i, x)`, found through
kernels.dispatch.
"""

import numpy as np
from numba import prange

from llamette.kernels import SMALL_BATCH, reassociating_kernel
from llamette.kernels.dispatch import decode_row, row_dot
from llamette.kernels.gemm import dot


@reassociating_kernel
def product(out, x, w, exact):
    """out (B, d) = x (B, n) @ w (d, n)^T, rows in parallel."""
    n_inputs, n = x.shape
    for i in prange(out.shape[1]):
        if n_inputs <= SMALL_BATCH or (exact is not None and exact):
            for b in range(n_inputs):
                out[b, i] = row_dot(w, i, x[b])
        else:
            decoded = np.empty(n, np.float32)
            decode_row(decoded, w, i)
            for b in range(n_inputs):
                out[b, i] = dot(x[b], decoded)
