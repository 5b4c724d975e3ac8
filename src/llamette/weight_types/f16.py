"""GGUF's F16: IEEE half-precision values, kept as their raw 16 bits (the decoded family)."""

from typing import NamedTuple

import numpy as np
from numba import njit

from llamette.kernels import decoded, internal_parallel_kernel
from llamette.kernels.halves import f16_to_f32

NAME = "f16"
GGUF_TYPE = 1  # gguf.GGMLQuantizationType.F16
BLOCK, BLOCK_BYTES = 1, 2


class F16Tensor(NamedTuple):
    """A matrix of fp16 values."""

    bits: np.ndarray  # uint16 (rows, cols)

    @property
    def shape(self) -> tuple[int, int]:
        return self.bits.shape

    def dequantize(self) -> np.ndarray:
        return self.bits.view(np.float16).astype(np.float32)


Tensor = F16Tensor


def from_gguf(data: np.ndarray, shape: tuple[int, int]) -> F16Tensor:
    return F16Tensor(data.view(np.uint16).reshape(shape))


@njit(inline="always", fastmath={"reassoc", "contract"})
def decode_row(out, w, i):
    row = w.bits[i]
    for j in range(out.shape[0]):
        out[j] = f16_to_f32(row[j])


@njit(inline="always", fastmath={"reassoc", "contract"})
def row_dot(w, i, x):
    row = w.bits[i]
    acc = np.float32(0.0)
    for j in range(x.shape[0]):
        acc += f16_to_f32(row[j]) * x[j]
    return acc


@internal_parallel_kernel
def product(out, x, w, inputs, exact):
    decoded.product(out, x, w, exact)
