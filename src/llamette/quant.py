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


class HalfTensor(NamedTuple):
    """A matrix of IEEE half-precision (fp16) values, kept as their raw 16 bits."""

    bits: np.ndarray  # uint16 (rows, cols)

    @property
    def shape(self) -> tuple[int, int]:
        return self.bits.shape

    def dequantize(self) -> np.ndarray:
        return self.bits.view(np.float16).astype(np.float32)


class BF16Tensor(NamedTuple):
    """A matrix of bfloat16 values (a float32's upper 16 bits), kept as their raw bits."""

    bits: np.ndarray  # uint16 (rows, cols)

    @property
    def shape(self) -> tuple[int, int]:
        return self.bits.shape

    def dequantize(self) -> np.ndarray:
        return (self.bits.astype(np.uint32) << 16).view(np.float32)


Q4_BLOCK = 32  # values per Q4_0 block
Q4_BLOCK_BYTES = 18  # an fp16 scale, then 16 bytes of value pairs


class Q4Tensor(NamedTuple):
    """A matrix in GGUF's Q4_0 layout: each row is blocks of 32 values, each block an fp16 scale d
    and 16 bytes whose low nibbles are values 0..15 and high nibbles values 16..31, as (q - 8) * d."""

    blocks: np.ndarray  # uint8 (rows, cols / 32 * 18)

    @property
    def shape(self) -> tuple[int, int]:
        rows, nbytes = self.blocks.shape
        return rows, nbytes // Q4_BLOCK_BYTES * Q4_BLOCK

    def dequantize(self) -> np.ndarray:
        rows, cols = self.shape
        blocks = self.blocks.reshape(rows, cols // Q4_BLOCK, Q4_BLOCK_BYTES)
        scales = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
        low = (blocks[:, :, 2:] & 0x0F).astype(np.float32) - 8
        high = (blocks[:, :, 2:] >> 4).astype(np.float32) - 8
        return (np.concatenate([low, high], axis=2) * scales).reshape(rows, cols)


Q8_0_BLOCK = 32  # values per Q8_0 block
Q8_0_BLOCK_BYTES = 34  # an fp16 scale, then 32 int8 values


class Q8_0Tensor(NamedTuple):
    """A matrix in GGUF's Q8_0 layout, kept as the file's bytes: each row is blocks of 32 values,
    each block an fp16 scale d and 32 int8 values q, standing for q * d."""

    blocks: np.ndarray  # uint8 (rows, cols / 32 * 34)

    @property
    def shape(self) -> tuple[int, int]:
        rows, nbytes = self.blocks.shape
        return rows, nbytes // Q8_0_BLOCK_BYTES * Q8_0_BLOCK

    def dequantize(self) -> np.ndarray:
        rows, cols = self.shape
        blocks = self.blocks.reshape(rows, cols // Q8_0_BLOCK, Q8_0_BLOCK_BYTES)
        scales = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
        values = blocks[:, :, 2:].view(np.int8).astype(np.float32)  # (rows, blocks, 32)
        return (values * scales).reshape(rows, cols)


def tensor_nbytes(tensor) -> int:
    """Bytes a tensor of any type occupies (what a product with it reads)."""
    if isinstance(tensor, Q8Tensor):
        return tensor.values.nbytes + tensor.scales.nbytes
    if isinstance(tensor, Q4Tensor | Q8_0Tensor):
        return tensor.blocks.nbytes
    if isinstance(tensor, HalfTensor | BF16Tensor):
        return tensor.bits.nbytes
    return tensor.nbytes


def to_float32(tensor) -> np.ndarray:
    """Any tensor's values as a float32 array (a float32 array itself is returned as it is)."""
    return tensor.dequantize() if hasattr(tensor, "dequantize") else tensor
