"""IEEE half (fp16) and bfloat16 values as float32, from their bits: exact conversions that
compiled loops can vectorize."""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

U32 = np.uint32
F32 = np.float32
TWO_TO_112 = F32(5.192296858534828e33)  # rebias a half's exponent (15) to a float's (127)


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 `bits`."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def float32_bits(typingctx, value):
    """The IEEE bits of the float32 `value`, as an int32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@njit(inline="always")
def f16_to_f32(h):
    """The float32 value of IEEE half bits h (normal and subnormal; no infinities in weights)."""
    bits = U32(h)
    magnitude = float32_from_bits(np.int32((bits & U32(0x7FFF)) << U32(13))) * TWO_TO_112
    return -magnitude if bits & U32(0x8000) else magnitude


@njit(inline="always")
def block_scale(row, start):
    """The float32 value of the fp16 at bytes start, start + 1 of a uint8 row of blocks (GGUF's
    block scales and minimums).

    f16_to_f32 with the sign moved into the float's bits instead of negated: cheaper one value
    at a time (Q8_0's scales), but slower in vectorized loops (F16 rows).
    """
    bits = U32(row[start]) | (U32(row[start + 1]) << U32(8))
    sign_and_magnitude = ((bits & U32(0x8000)) << U32(16)) | ((bits & U32(0x7FFF)) << U32(13))
    return float32_from_bits(np.int32(sign_and_magnitude)) * TWO_TO_112


@njit(inline="always")
def bf16_to_f32(h):
    """The float32 whose upper 16 bits are h."""
    return float32_from_bits(np.int32(U32(h) << U32(16)))
