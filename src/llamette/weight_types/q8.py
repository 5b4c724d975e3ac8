"""llama2.c's v2 weights (runq.c's Q8_0): int8 values with a float32 scale per group of
`group_size` values, groups running over the matrix flattened row by row.

Groups of 64 or 32 that tile the rows take the int8 family's products (runq.c's arithmetic to the
bit). Other group sizes (llama2.c's export halves 64 until it divides dim) multiply the same
quantized values in float, dequantized row by row: within float tolerance of runq.c. Where a row
is not a whole number of groups (a group spans two rows), runq.c skips each row's last columns and
reads scales from the wrong rows; the fast flavour computes the full product, `exact` keeps
runq.c's behaviour.
"""

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from llamette.kernels import (
    SMALL_BATCH,
    int8,
    internal_parallel_kernel,
    parallel_kernel,
    reference,
)
from llamette.kernels.gemm import GEMM_ROWS, as_weights, block_times_inputs, dot, row_stride
from llamette.kernels.simd import (
    dot_int8x32,
    dot_int8x64,
    gather_lanes,
    prefetch_ahead,
    row_group_dots,
)
from llamette.kernels.symbols import called_by_symbol

NAME = "llama2c-q8"
GGUF_TYPE = None  # llama2.c's own layout


class Q8Tensor(NamedTuple):
    """A matrix of int8 values with one float32 scale per `group_size` consecutive values of the
    matrix flattened row by row. (A NamedTuple, so that compiled kernels take it as it is.)"""

    values: np.ndarray  # int8 (rows, cols)
    scales: np.ndarray  # float32 (rows * cols // group_size,)
    group_size: int
    # None where groups of 64 or 32 tile the rows (products in the int8 family's integers), True
    # otherwise (any groups: products over dequantized values): None a type of its own, which
    # compiled code settles as it compiles, so that such a file compiles its products only
    float_products: bool | None = True

    @classmethod
    def of(cls, values: np.ndarray, scales: np.ndarray, group_size: int) -> "Q8Tensor":
        """values (rows, cols) with a scale per group_size of them, in integers where they can."""
        tiled = values.shape[1] % group_size == 0 and group_size in (64, 32)
        return cls(values, scales, group_size, None if tiled else True)

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    @property
    def rows_aligned(self) -> bool:
        """True when every row starts a new group (cols is a multiple of the group size)."""
        return self.values.shape[1] % self.group_size == 0

    def dequantize(self) -> np.ndarray:
        """The float32 matrix these values and scales stand for."""
        flat = self.values.reshape(-1).astype(np.float32)
        flat *= np.repeat(self.scales, self.group_size)
        return flat.reshape(self.values.shape)


Tensor = Q8Tensor


def quantize_q8(weights: np.ndarray, group_size: int) -> Q8Tensor:
    """Quantize a float32 matrix as llama2.c's export.py does (scale = max|w| / 127, round half to even)."""
    flat = np.asarray(weights, dtype=np.float32).reshape(-1, group_size)
    scales = np.abs(flat).max(axis=1) / np.float32(127.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.round(flat / scales[:, None])
    values = np.nan_to_num(values).astype(np.int8)
    return Q8Tensor.of(values.reshape(weights.shape), scales.astype(np.float32), group_size)


@njit(inline="always")
def decode_row(out, w, i):
    """out (cols,) = row i dequantized, its scales read over the flattened matrix."""
    reference.q8_dequantize_row(out, w.values, w.scales, i, w.group_size)


@internal_parallel_kernel
def product(out, x, w, inputs, exact):
    """out (B, d) = x (B, n) @ w (d, n)^T, x quantized as runq.c quantizes it."""
    n = x.shape[1]
    if exact is not None and exact:
        groups = n // w.group_size
        xq, xs = inputs.values[:n], inputs.scales[:groups]
        for b in range(x.shape[0]):
            reference.q8_quantize(xq, xs, x[b], w.group_size)
            reference.q8_matmul(out[b], xq, xs, w.values, w.scales, w.group_size)
        int8.new_input(inputs)  # (it holds the last row only)
    else:
        _fast_product(out, x, w, inputs, w.float_products)


@called_by_symbol
@internal_parallel_kernel
def _fast_product(out, x, w, inputs, float_products):
    """The fast flavour's product: the int8 family's where groups of 64 or 32 tile the rows
    (float_products None), else the quantized input and the rows dequantized, products in float.
    (An argument, which Numba settles as it compiles where it is None: such a file compiles the
    int8 family's product only.)"""
    if float_products is None:
        int8.product(out, x, w, inputs)
    else:
        q = int8.quantized(x, inputs, w.group_size)
        x_dequantized = np.empty(x.shape, np.float32)
        _dequantize_rows(x_dequantized, q.values, q.scales, w.group_size)
        if x.shape[0] <= SMALL_BATCH:
            _dequantized_rows_times_inputs(out, x_dequantized, w.values, w.scales, w.group_size)
        else:
            _dequantized_blocks_times_inputs(out, x_dequantized, w.values, w.scales, w.group_size)


# The int8 family's functions (see kernels.int8): groups of 64 or 32 that tile the rows.


def runs_int8_kernels(tensor: Q8Tensor) -> bool:
    """Whether products with the tensor run the int8 family's row and lane kernels."""
    return tensor.float_products is None


def input_group_size(tensor: Q8Tensor) -> int:
    """The groups a product quantizes its input in."""
    return tensor.group_size


@njit(inline="always")
def group_size(w):
    return w.group_size


@njit(inline="always")
def int8_arrays(w):
    return w.values, w.scales


@njit(inline="always")
def unpack_row(values, scales, w, wq, ws, i):
    int8.widen_into(values, wq[i])
    groups = scales.shape[0]
    for g in range(groups):
        scales[g] = ws[i * groups + g]


@njit(inline="always")
def int8_row_dot(w, wq, ws, i, x, x_scales, x_sums):
    """Per group an int32 dot product (SIMD products and a horizontal sum), then the float32
    term (dot * weight scale) * input scale, groups summed in order: runq.c's steps."""
    groups = x_scales.shape[0]
    row, row_scales = wq[i], ws[i * groups : (i + 1) * groups]
    val = np.float32(0.0)
    if w.group_size == 64:
        for g in range(groups):
            prefetch_ahead(row, g * 64)
            val += (np.float32(dot_int8x64(row, g * 64, x, g * 64)) * row_scales[g]) * x_scales[g]
    else:
        for g in range(groups):
            prefetch_ahead(row, g * 32)
            val += (np.float32(dot_int8x32(row, g * 32, x, g * 32)) * row_scales[g]) * x_scales[g]
    return val


@njit(inline="always")
def sixteen_rows(w, wq, ws, first, g, groups, x):
    stride = row_stride(wq)
    at = first * stride + g * w.group_size
    if w.group_size == 64:
        dots = row_group_dots(wq, at, stride, x, g * 64, 64)
    else:
        dots = row_group_dots(wq, at, stride, x, g * 32, 32)
    return dots, gather_lanes(ws, first * groups + g, groups)


# Other group sizes: the quantized input dequantized, rows dequantized, products in float.


@parallel_kernel
def _dequantize_rows(out, xq, xs, group_size):
    """out (B, n) float32 = int8 values times the scales of groups along each row."""
    n = xq.shape[1]
    for b in prange(xq.shape[0]):
        for g in range(xs.shape[1]):
            start, stop = g * group_size, min(n, (g + 1) * group_size)
            int8.scale_into(out[b, start:stop], xq[b, start:stop], xs[b, g])


ROWS_PER_TASK = 64


@parallel_kernel
def _dequantized_rows_times_inputs(out, x, wq, ws, group_size):
    """out (B, d) = x (B, n) @ w (d, n)^T for a few inputs: each weight row dequantized once
    (rows may start mid-group), then vectorized float dot products."""
    d, n = wq.shape
    for task in prange((d + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        row = np.empty(n, np.float32)
        for i in range(task * ROWS_PER_TASK, min(d, (task + 1) * ROWS_PER_TASK)):
            _dequantize_row(row, wq[i], ws, i * n, group_size)
            for b in range(x.shape[0]):
                out[b, i] = dot(x[b], row)


@parallel_kernel
def _dequantized_blocks_times_inputs(out, x, wq, ws, group_size):
    """out (B, d) = x (B, n) @ w (d, n)^T for a batch: blocks of GEMM_ROWS weight rows (in
    parallel), dequantized once, times the inputs in the fp32 GEMM's register blocks."""
    d, n = wq.shape
    for block in prange((d + GEMM_ROWS - 1) // GEMM_ROWS):
        i = GEMM_ROWS * np.int64(block)
        rows = np.empty((min(GEMM_ROWS, d - i), n), np.float32)
        for r in range(rows.shape[0]):
            _dequantize_row(rows[r], wq[i + r], ws, (i + r) * n, group_size)
        block_times_inputs(out, x, as_weights(rows), 0, i)


@njit(inline="always")
def _dequantize_row(out, row, ws, flat_start, group_size):
    """out = row's int8 values times their scales; groups run over the matrix flattened, so the
    row (starting at flat index flat_start) may start and end mid-group."""
    n = row.shape[0]
    k = 0
    while k < n:  # runs of values that share a scale
        flat = flat_start + k
        stop = min(n, k + group_size - flat % group_size)
        int8.scale_into(out[k:stop], row[k:stop], ws[flat // group_size])
        k = stop
