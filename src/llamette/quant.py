"""Quantized tensor types and their conversions, in NumPy."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Q8Tensor(NamedTuple):
    """A matrix of int8 values with one float32 scale per `group_size` consecutive values.

    This is llama2.c's v2 layout: groups run over the matrix flattened row by row, so when a row's
    length is not a multiple of the group size a group spans two rows. (A NamedTuple, so that
    compiled kernels take it as it is.)
    """

    values: np.ndarray  # int8 (rows, cols)
    scales: np.ndarray  # float32 (rows * cols // group_size,)
    group_size: int

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


def quantize_q8(weights: np.ndarray, group_size: int) -> Q8Tensor:
    """Quantize a float32 matrix as llama2.c's export.py does (scale = max|w| / 127, round half to even)."""
    flat = np.asarray(weights, dtype=np.float32).reshape(-1, group_size)
    scales = np.abs(flat).max(axis=1) / np.float32(127.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.round(flat / scales[:, None])
    values = np.nan_to_num(values).astype(np.int8)
    return Q8Tensor(values.reshape(weights.shape), scales.astype(np.float32), group_size)
