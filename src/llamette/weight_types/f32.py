"""fp32 weights: a plain float32 matrix (rows, cols), as llama2.c's v0/v1 files and GGUF's F32
tensors hold them (and every norm weight, a vector)."""

import numpy as np
from numba import njit

from llamette.kernels import internal_parallel_kernel, reference
from llamette.kernels.gemm import matmul_f32

NAME = "f32"
Tensor = np.ndarray
GGUF_TYPE = 0  # gguf.GGMLQuantizationType.F32
BLOCK, BLOCK_BYTES = 1, 4  # values per block, its bytes


def from_gguf(data: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A GGUF tensor's data (a view of the file) as this type's tensor."""
    return data.reshape(shape)


@njit(inline="always")
def decode_row(out, w, i):
    """out (cols,) = row i."""
    for j in range(out.shape[0]):
        out[j] = w[i, j]


@internal_parallel_kernel
def product(out, x, w, inputs, exact):
    """out (B, d) = x (B, n) @ w (d, n)^T: run.c's matmul row by row (exact), or the GEMM."""
    if exact is not None and exact:
        for b in range(x.shape[0]):
            reference.matmul(out[b], x[b], w)
    else:
        matmul_f32(out, x, w)
