"""Default-path kernels: as fast as the memory bus allows, tested against `reference`.

Matrix products take B inputs at once (decode is B = 1): each weight row is read once for all of
them. fp32: each dot product is vectorized, so its sum is reordered (within float tolerance of
run.c's); large batches go to BLAS instead (see model.py). Q8: runq.c's arithmetic exactly (group dot products in int32, group terms
summed in float32 in order) with the int8 products vectorized (AVX-512 VNNI where the CPU has it),
except that rows which are not a whole number of groups are computed in full, where runq.c skips
their last columns and misreads their scales.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from llamette.kernels import kernel, parallel_kernel
from llamette.kernels.reference import q8_dequantize_row, rmsnorm, rope, round_half_away

F32 = np.float32
I32 = np.int32

# Reordered float sums (vectorized dot products, fused multiply-add); nothing else loosened.
reassociating_kernel = njit(
    cache=True, error_model="numpy", parallel=True, fastmath={"reassoc", "contract"}
)


@reassociating_kernel
def matmul_f32(out, x, w):
    """out (B, d) = x (B, n) @ w (d, n)^T: blocks of 4 weight rows (in parallel) times 4 inputs,
    16 dot products in registers, so that each loaded value is used 4 times."""
    n_inputs, d = x.shape[0], w.shape[0]
    for block in prange((d + 3) // 4):
        i = 4 * block
        if i + 4 > d:  # the last rows, when d is not a multiple of 4
            for row in range(i, d):
                for b in range(n_inputs):
                    out[b, row] = _dot(x[b], w[row])
            continue
        w0, w1, w2, w3 = w[i], w[i + 1], w[i + 2], w[i + 3]
        blocked = n_inputs - n_inputs % 4
        for b in range(0, blocked, 4):
            _dots_4x4(out, b, i, x[b], x[b + 1], x[b + 2], x[b + 3], w0, w1, w2, w3)
        for b in range(blocked, n_inputs):  # decode (one input) lands here
            _dots_1x4(out, b, i, x[b], w0, w1, w2, w3)


@njit(inline="always", fastmath={"reassoc", "contract"})
def _dot(x, w):
    val = F32(0.0)
    for j in range(x.shape[0]):
        val += x[j] * w[j]
    return val


@njit(inline="always", fastmath={"reassoc", "contract"})
def _dots_1x4(out, b, i, x0, w0, w1, w2, w3):
    a0 = a1 = a2 = a3 = F32(0.0)
    for j in range(x0.shape[0]):
        v = x0[j]
        a0 += v * w0[j]
        a1 += v * w1[j]
        a2 += v * w2[j]
        a3 += v * w3[j]
    out[b, i], out[b, i + 1], out[b, i + 2], out[b, i + 3] = a0, a1, a2, a3


@njit(inline="always", fastmath={"reassoc", "contract"})
def _dots_4x4(out, b, i, x0, x1, x2, x3, w0, w1, w2, w3):
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = F32(0.0)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = F32(0.0)
    for j in range(x0.shape[0]):
        p0, p1, p2, p3 = w0[j], w1[j], w2[j], w3[j]
        v = x0[j]
        a00 += v * p0
        a01 += v * p1
        a02 += v * p2
        a03 += v * p3
        v = x1[j]
        a10 += v * p0
        a11 += v * p1
        a12 += v * p2
        a13 += v * p3
        v = x2[j]
        a20 += v * p0
        a21 += v * p1
        a22 += v * p2
        a23 += v * p3
        v = x3[j]
        a30 += v * p0
        a31 += v * p1
        a32 += v * p2
        a33 += v * p3
    out[b, i], out[b, i + 1], out[b, i + 2], out[b, i + 3] = a00, a01, a02, a03
    out[b + 1, i], out[b + 1, i + 1], out[b + 1, i + 2], out[b + 1, i + 3] = a10, a11, a12, a13
    out[b + 2, i], out[b + 2, i + 1], out[b + 2, i + 2], out[b + 2, i + 3] = a20, a21, a22, a23
    out[b + 3, i], out[b + 3, i + 1], out[b + 3, i + 2], out[b + 3, i + 3] = a30, a31, a32, a33


@kernel
def q8_quantize(xq, xs, x, group_size):
    """Quantize x in groups of group_size (the last may be shorter): scale = max|x| / 127, q = round(x / scale)."""
    n = x.shape[0]
    for g in range((n + group_size - 1) // group_size):
        start, stop = g * group_size, min(n, (g + 1) * group_size)
        wmax = F32(0.0)
        for i in range(start, stop):
            if abs(x[i]) > wmax:
                wmax = abs(x[i])
        scale = wmax / F32(127.0)
        xs[g] = scale
        for i in range(start, stop):
            quotient = x[i] / scale
            xq[i] = 0 if math.isnan(quotient) else np.int8(round_half_away(quotient))


@parallel_kernel
def q8_quantize_rows(xq, xs, x, group_size):
    """q8_quantize each row of x (B, n) into xq (B, n) and xs (B, groups)."""
    for b in prange(x.shape[0]):
        q8_quantize(xq[b], xs[b], x[b], group_size)


@parallel_kernel
def q8_matmul(out, xq, xs, wq, ws, group_size):
    """out (B, d) = x (B, n) @ w (d, n)^T from int8 values and group scales, as runq.c computes it.

    xq (B, n), xs (B, groups): the inputs quantized by q8_quantize; wq (d, n), ws: the weights.
    """
    b, n = xq.shape
    d = wq.shape[0]
    if n % group_size:
        _q8_matmul_partial_groups(out, xq, xs, wq, ws, group_size)
    elif group_size == 64:
        _q8_matmul_groups_of_64(out, xq, xs, wq, ws)
    else:
        ng = n // group_size
        _q8_matmul_whole_groups(
            out, xq.reshape(b, ng, group_size), xs, wq.reshape(d, ng, group_size), ws.reshape(d, ng)
        )


# Integer products are written as I32(acc + I32(a) * I32(b)): Numba would widen them to int64,
# and 32-bit sums of 8-bit products are what the vectorizer turns into VNNI instructions.


@parallel_kernel
def _q8_matmul_groups_of_64(out, xq, xs, wq, ws):
    """Groups of exactly 64 (llama2.c's export default): a constant trip count vectorizes best.

    Blocks of 4 weight rows (in parallel) times 4 inputs keep 16 group sums in registers, so each
    loaded and widened value serves 4 products; each (input, row) pair keeps runq.c's arithmetic.
    """
    d, n = wq.shape
    ng = n // 64
    n_inputs = xq.shape[0]
    for block in prange((d + 3) // 4):
        i = 4 * block
        if i + 4 > d:  # the last rows, when d is not a multiple of 4
            for row in range(i, d):
                for b in range(n_inputs):
                    out[b, row] = _q8_dot_64(xq[b], xs[b], wq[row], ws[row * ng : (row + 1) * ng])
            continue
        blocked = n_inputs - n_inputs % 4
        for b in range(0, blocked, 4):
            _q8_dots_4x4(out, b, i, xq, xs, wq, ws, ng)
        for b in range(blocked, n_inputs):  # decode (one input) lands here
            for row in range(i, i + 4):
                out[b, row] = _q8_dot_64(xq[b], xs[b], wq[row], ws[row * ng : (row + 1) * ng])


@njit(inline="always", error_model="numpy")
def _q8_dot_64(x, x_scales, w, w_scales):
    """One input times one weight row, groups of 64: runq.c's sum of scaled int32 group sums."""
    val = F32(0.0)
    for g in range(x_scales.shape[0]):
        ival = I32(0)
        for k in range(64):
            ival = I32(ival + I32(x[g * 64 + k]) * I32(w[g * 64 + k]))
        val += (F32(ival) * w_scales[g]) * x_scales[g]
    return val


@njit(inline="always", error_model="numpy")
def _q8_dots_4x4(out, b, i, xq, xs, wq, ws, ng):
    """out[b:b+4, i:i+4] for groups of 64, all 16 group sums of a group in one pass."""
    x0, x1, x2, x3 = xq[b], xq[b + 1], xq[b + 2], xq[b + 3]
    w0, w1, w2, w3 = wq[i], wq[i + 1], wq[i + 2], wq[i + 3]
    v00 = v01 = v02 = v03 = v10 = v11 = v12 = v13 = F32(0.0)
    v20 = v21 = v22 = v23 = v30 = v31 = v32 = v33 = F32(0.0)
    for g in range(ng):
        s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = I32(0)
        s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = I32(0)
        for k in range(g * 64, g * 64 + 64):
            p0, p1, p2, p3 = I32(w0[k]), I32(w1[k]), I32(w2[k]), I32(w3[k])
            a = I32(x0[k])
            s00, s01, s02, s03 = (
                I32(s00 + a * p0),
                I32(s01 + a * p1),
                I32(s02 + a * p2),
                I32(s03 + a * p3),
            )
            a = I32(x1[k])
            s10, s11, s12, s13 = (
                I32(s10 + a * p0),
                I32(s11 + a * p1),
                I32(s12 + a * p2),
                I32(s13 + a * p3),
            )
            a = I32(x2[k])
            s20, s21, s22, s23 = (
                I32(s20 + a * p0),
                I32(s21 + a * p1),
                I32(s22 + a * p2),
                I32(s23 + a * p3),
            )
            a = I32(x3[k])
            s30, s31, s32, s33 = (
                I32(s30 + a * p0),
                I32(s31 + a * p1),
                I32(s32 + a * p2),
                I32(s33 + a * p3),
            )
        c0, c1, c2, c3 = (
            ws[i * ng + g],
            ws[(i + 1) * ng + g],
            ws[(i + 2) * ng + g],
            ws[(i + 3) * ng + g],
        )
        e = xs[b, g]
        v00, v01, v02, v03 = (
            v00 + (F32(s00) * c0) * e,
            v01 + (F32(s01) * c1) * e,
            v02 + (F32(s02) * c2) * e,
            v03 + (F32(s03) * c3) * e,
        )
        e = xs[b + 1, g]
        v10, v11, v12, v13 = (
            v10 + (F32(s10) * c0) * e,
            v11 + (F32(s11) * c1) * e,
            v12 + (F32(s12) * c2) * e,
            v13 + (F32(s13) * c3) * e,
        )
        e = xs[b + 2, g]
        v20, v21, v22, v23 = (
            v20 + (F32(s20) * c0) * e,
            v21 + (F32(s21) * c1) * e,
            v22 + (F32(s22) * c2) * e,
            v23 + (F32(s23) * c3) * e,
        )
        e = xs[b + 3, g]
        v30, v31, v32, v33 = (
            v30 + (F32(s30) * c0) * e,
            v31 + (F32(s31) * c1) * e,
            v32 + (F32(s32) * c2) * e,
            v33 + (F32(s33) * c3) * e,
        )
    out[b, i], out[b, i + 1], out[b, i + 2], out[b, i + 3] = v00, v01, v02, v03
    out[b + 1, i], out[b + 1, i + 1], out[b + 1, i + 2], out[b + 1, i + 3] = v10, v11, v12, v13
    out[b + 2, i], out[b + 2, i + 1], out[b + 2, i + 2], out[b + 2, i + 3] = v20, v21, v22, v23
    out[b + 3, i], out[b + 3, i + 1], out[b + 3, i + 2], out[b + 3, i + 3] = v30, v31, v32, v33


@parallel_kernel
def _q8_matmul_whole_groups(out, xq, xs, wq, ws):
    """Any group size that divides the rows: wq (d, groups, group_size), xq (B, groups, group_size)."""
    d, ng, group_size = wq.shape
    for i in prange(d):
        for b in range(xq.shape[0]):
            val = F32(0.0)
            for g in range(ng):
                ival = I32(0)
                for k in range(group_size):
                    ival = I32(ival + I32(xq[b, g, k]) * I32(wq[i, g, k]))
                val += (F32(ival) * ws[i, g]) * xs[b, g]
            out[b, i] = val


@parallel_kernel
def _q8_matmul_partial_groups(out, xq, xs, wq, ws, group_size):
    """Rows that are not whole groups: int32 dot products over runs that share both scales.

    A run ends where a weight group (over w flattened) or an activation group (over the row) ends.
    """
    d, n = wq.shape
    for i in prange(d):
        for b in range(xq.shape[0]):
            val = F32(0.0)
            j = 0
            while j < n:
                flat = i * n + j
                stop = min(
                    n, j + group_size - flat % group_size, (j // group_size + 1) * group_size
                )
                ival = I32(0)
                for k in range(j, stop):
                    ival = I32(ival + I32(xq[b, k]) * I32(wq[i, k]))
                val += (F32(ival) * ws[flat // group_size]) * xs[b, j // group_size]
                j = stop
            out[b, i] = val


# Steps of a batch, row by row in parallel, each row with the reference arithmetic.


@parallel_kernel
def embed_rows(out, values, scales, tokens, group_size):
    """out (B, dim) = rows `tokens` of a Q8 embedding table, dequantized."""
    for b in prange(tokens.shape[0]):
        q8_dequantize_row(out[b], values, scales, tokens[b], group_size)


@parallel_kernel
def rmsnorm_rows(out, x, weight, eps):
    """rmsnorm each row of x (B, dim)."""
    for b in prange(x.shape[0]):
        rmsnorm(out[b], x[b], weight, eps)


@parallel_kernel
def rope_rows(q, k, positions, head_size, theta):
    """Rotate each row of q (B, dim) and k (B, kv_dim) for its own position."""
    for b in prange(q.shape[0]):
        rope(q[b], k[b], positions[b], head_size, theta)


@reassociating_kernel
def attention_rows(out, q, key_cache, value_cache, layer, slots, positions, n_heads):
    """Causal grouped-query attention for a batch: row b attends to rows 0..positions[b] of its
    sequence's cache, which already holds the batch's own keys and values.

    out, q: (B, dim); key_cache, value_cache: (n_slots, n_layers, seq_len, kv_dim). Vectorized
    dot products and exp: within float tolerance of the reference, not equal to it.
    """
    head_size = q.shape[1] // n_heads
    kv_mul = q.shape[1] // key_cache.shape[3]
    inverse_scale = F32(1.0) / F32(math.sqrt(F32(head_size)))
    for r in prange(q.shape[0] * n_heads):
        b, h = r // n_heads, r % n_heads
        query = q[b, h * head_size : (h + 1) * head_size]
        result = out[b, h * head_size : (h + 1) * head_size]
        offset = (h // kv_mul) * head_size
        keys, values = key_cache[slots[b], layer], value_cache[slots[b], layer]
        n_keys = positions[b] + 1
        scores = np.empty(n_keys, np.float32)
        for t in range(n_keys):
            key = keys[t, offset : offset + head_size]
            score = F32(0.0)
            for i in range(head_size):
                score += query[i] * key[i]
            scores[t] = score * inverse_scale
        highest = scores.max()
        total = F32(0.0)
        for t in range(n_keys):
            scores[t] = exp_f32(scores[t] - highest)
            total += scores[t]
        result[:] = 0.0
        for t in range(n_keys):
            weight = scores[t] / total
            value = values[t, offset : offset + head_size]
            for i in range(head_size):
                result[i] += weight * value[i]


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 `bits`."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


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
    return p * _float32_from_bits(I32((I32(n) + I32(127)) << I32(23)))
