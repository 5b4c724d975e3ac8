"""GGUF's BF16: bfloat16 values (a float32's upper 16 bits), kept as their raw bits (the decoded
family)."""

from typing import NamedTuple

import numpy as np
from numba import njit

from llamette.kernels import decoded, internal_parallel_kernel
from llamette.kernels.halves import bf16_to_f32

NAME = "bf16"
GGUF_TYPE = 30  # gguf.GGMLQuantizationType.BF16
BLOCK, BLOCK_BYTES = 1, 2


class BF16Tensor(NamedTuple):
    """A matrix of bfloat16 values."""

    bits: np.ndarray  # uint16 (rows, cols)

    @property
    def shape(self) -> tuple[int, int]:
        return self.bits.shape

    def dequantize(self) -> np.ndarray:
        return (self.bits.astype(np.uint32) << 16).view(np.float32)


Tensor = BF16Tensor


def from_gguf(data: np.ndarray, shape: tuple[int, int]) -> BF16Tensor:
    return BF16Tensor(data.view(np.uint16).reshape(shape))


@njit(inline="always", fastmath={"reassoc", "contract"})
def decode_row(out, w, i):
    row = w.bits[i]
    for j in range(out.shape[0]):
        out[j] = bf16_to_f32(row[j])


@njit(inline="always", fastmath={"reassoc", "contract"})
def row_dot(w, i, x):
    row = w.bits[i]
    acc = np.float32(0.0)
    for j in range(x.shape[0]):
        acc += bf16_to_f32(row[j]) * x[j]
    return acc


@internal_parallel_kernel
def product(out, x, w, inputs, exact):
    decoded.product(out, x, w, exact)
