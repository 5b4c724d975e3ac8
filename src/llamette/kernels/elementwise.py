"""Elementwise steps over a batch (B, n): RMSNorm, RoPE and the residual add with the reference
arithmetic row by row, SwiGLU with a vectorizable exp (libm's expf, which the reference calls, is
not). A batch's rows run in parallel; one row (a decode step) runs without waking the threads."""

import numpy as np
from numba import njit, prange

from llamette.kernels import internal_parallel_kernel, parallel_kernel, reassociating_kernel
from llamette.kernels.halves import float32_from_bits
from llamette.kernels.reference import add, rmsnorm, rope, rope_angles
from llamette.kernels.symbols import called_by_symbol

F32 = np.float32
I32 = np.int32


@called_by_symbol
@internal_parallel_kernel
def rmsnorm_rows(out, x, weight, eps):
    """rmsnorm each row of x (B, dim) into out (B, dim), which may be x."""
    if x.shape[0] == 1:
        rmsnorm(out[0], x[0], weight, eps)
        return
    for b in prange(x.shape[0]):
        rmsnorm(out[b], x[b], weight, eps)


@called_by_symbol
@internal_parallel_kernel
def rope_angles_rows(cos, sin, positions, head_size, theta, divisors):
    """rope_angles for each position: cos, sin (B, head_size / 2)."""
    if positions.shape[0] == 1:
        rope_angles(cos[0], sin[0], positions[0], head_size, theta, divisors)
        return
    for b in prange(positions.shape[0]):
        rope_angles(cos[b], sin[b], positions[b], head_size, theta, divisors)


@called_by_symbol
@parallel_kernel
def rope_rows(q, k, cos, sin):
    """Rotate each row of q (B, dim) and k (B, kv_dim) by its own angles (rope_angles_rows)."""
    if q.shape[0] == 1:
        rope(q[0], k[0], cos[0], sin[0])
        return
    for b in prange(q.shape[0]):
        rope(q[b], k[b], cos[b], sin[b])


@called_by_symbol
@parallel_kernel
def add_rows(x, y):
    """x += y for a batch (B, dim): the residual connection."""
    if x.shape[0] == 1:
        add(x[0], y[0])
        return
    for b in prange(x.shape[0]):
        add(x[b], y[b])


@called_by_symbol
@reassociating_kernel
def swiglu_rows(gate, up):
    """gate = silu(gate) * up for a batch (B, hidden) with the vectorizable exp."""
    if gate.shape[0] == 1:
        swiglu(gate[0], up[0])
        return
    for b in prange(gate.shape[0]):
        swiglu(gate[b], up[b])


@njit(inline="always", fastmath={"reassoc", "contract"})
def swiglu(gate, up):
    """gate = silu(gate) * up with the vectorizable exp (the reference calls libm's expf)."""
    for i in range(gate.shape[0]):
        gate[i] = gate[i] / (F32(1.0) + exp_f32(-gate[i])) * up[i]


@njit(inline="always", error_model="numpy")
def exp_f32(x):
    """e^x in float32 within 2 ulp, as straight-line code that vectorizes (libm's expf does not):
    e^x = 2^n e^r with n = round(x / ln 2), r = x - n ln 2, e^r from a degree-6 polynomial."""
    x = min(max(x, F32(-87.33)), F32(88.72))
    n = F32(np.floor(x * F32(1.44269504) + F32(0.5)))
    r = x - n * F32(0.693359375) - n * F32(-2.12194440e-4)  # ln 2 in two parts
    p = F32(1.9875691500e-4)
    p = p * r + F32(1.3981999507e-3)
    p = p * r + F32(8.3334519073e-3)
    p = p * r + F32(4.1665795894e-2)
    p = p * r + F32(1.6666665459e-1)
    p = p * r + F32(5.0000001201e-1)
    p = p * r * r + r + F32(1.0)
    return p * float32_from_bits(I32((I32(n) + I32(127)) << I32(23)))
