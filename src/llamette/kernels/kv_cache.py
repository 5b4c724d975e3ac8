"""The KV cache and its value types: float32 (run.c's), F16 (IEEE halves, kept as their bits) and
Q8_0 (blocks of 32 int8 values and a scale, llama.cpp's cache type of that name, with the scale
in float32). How a position's keys or values are stored, and how attention reads them back as
float32, one value or 16 lanes at a time.
"""

from typing import NamedTuple

import numpy as np
from numba import njit, types
from numba.extending import overload

from llamette.kernels.halves import f16_to_f32, float32_bits
from llamette.kernels.reference import round_half_away
from llamette.kernels.simd import float32x16_of, load_lanes, multiply

F32 = np.float32
Q8_BLOCK = 32  # values per Q8_0 scale

KV_TYPES = {"f32": np.float32, "f16": np.uint16, "q8_0": np.int8}  # name: the array's dtype


class KVCache(NamedTuple):
    """Every layer's keys and values for every position so far, per sequence (slot): (n_slots,
    n_layers, n_kv_heads, seq_len, head_size) each, a kv head's positions in one run of memory,
    in the cache type's dtype; Q8_0's scales (n_slots, n_layers, n_kv_heads, seq_len,
    head_size // 32) float32 (other types: a last axis of 0)."""

    keys: np.ndarray
    values: np.ndarray
    key_scales: np.ndarray
    value_scales: np.ndarray


def scale_columns(kv_type: str, head_size: int) -> int:
    """Scales per position of a kv head: head_size / 32 for Q8_0, else none."""
    return head_size // Q8_BLOCK if kv_type == "q8_0" else 0


def store_position(stored, scales, x):
    """stored (head_size,), scales (head_size // 32,) = x (head_size,) float32, in the cache's
    type: F16 rounded to nearest even, Q8_0 as llama.cpp quantizes its blocks."""


def kv_value(stored, scales, t, i):
    """The float32 value of stored[t, i] (stored (positions, head_size), scales (positions,
    head_size // 32))."""


def kv_lanes(stored, scales, t, i):
    """stored[t, i:i + 16] as a float32x16 (i a multiple of 16)."""


@overload(store_position)
def _store_position(stored, scales, x):
    if stored.dtype == types.uint16:
        return _store_halves
    if stored.dtype == types.int8:
        return _store_q8_0
    return _store_floats


def _store_floats(stored, scales, x):
    for i in range(x.shape[0]):  # (a loop: a slice assignment compiles shape checks)
        stored[i] = x[i]


def _store_halves(stored, scales, x):
    for i in range(x.shape[0]):
        stored[i] = f32_to_f16(x[i])


def _store_q8_0(stored, scales, x):
    for block in range(scales.shape[0]):
        start = block * Q8_BLOCK
        largest = F32(0.0)
        for i in range(start, start + Q8_BLOCK):
            largest = max(largest, abs(x[i]))
        scale = largest / F32(127.0)
        inverse = F32(1.0) / scale if scale != 0 else F32(0.0)
        scales[block] = scale
        for i in range(start, start + Q8_BLOCK):
            stored[i] = np.int8(round_half_away(x[i] * inverse))


@overload(kv_value)
def _kv_value(stored, scales, t, i):
    if stored.dtype == types.uint16:
        return lambda stored, scales, t, i: f16_to_f32(stored[t, i])
    if stored.dtype == types.int8:
        return lambda stored, scales, t, i: F32(stored[t, i]) * scales[t, i // Q8_BLOCK]
    return lambda stored, scales, t, i: stored[t, i]


@overload(kv_lanes)
def _kv_lanes(stored, scales, t, i):
    if stored.dtype == types.int8:
        return lambda stored, scales, t, i: multiply(
            load_lanes(stored, t * stored.shape[1] + i), float32x16_of(scales[t, i // Q8_BLOCK])
        )
    return lambda stored, scales, t, i: load_lanes(stored, t * stored.shape[1] + i)


U32 = np.uint32


@njit(inline="always")
def f32_to_f16(x):
    """The IEEE half bits (uint16) of float32 x, rounded to nearest even as NumPy's
    astype(np.float16) rounds: overflow to infinity, subnormals, NaN kept NaN."""
    bits = U32(float32_bits(x))
    sign = (bits >> U32(16)) & U32(0x8000)
    magnitude = bits & U32(0x7FFFFFFF)
    if magnitude >= U32(0x7F800000):  # infinity or NaN
        return np.uint16(sign | U32(0x7C00) | (U32(0x200) if magnitude > U32(0x7F800000) else 0))
    if magnitude >= U32(0x477FF000):  # 65520 and beyond round past the largest half
        return np.uint16(sign | U32(0x7C00))
    if magnitude < U32(0x38800000):  # below 2**-14: a subnormal half, in units of 2**-24
        units = abs(x) * F32(16777216.0)  # exact: a power of two
        rounded = (units + F32(8388608.0)) - F32(8388608.0)  # to nearest even, in float32
        return np.uint16(sign | U32(rounded))
    # a normal half: rebias the exponent (127 -> 15), round the 13 bits dropped to nearest even
    rounded = magnitude + U32(0xFFF) + ((magnitude >> U32(13)) & U32(1))
    return np.uint16(sign | ((rounded - U32(0x38000000)) >> U32(13)))
