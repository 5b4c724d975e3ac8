"""Reference kernels: run.c's and runq.c's arithmetic, to the bit.

Every sum is one float32 accumulator filled in index order, every product a separate multiply and
add (no fastmath, so no reordering and no fused multiply-add), and exp/sin/cos/pow are the float32
libm calls (Numba's math functions on float32 values call expf, sinf, cosf, powf). Integer and
float64 operands are cast to float32 first, as C does. Rows of a matmul and heads of attention run
in parallel, as run.c's OpenMP loops do: that changes no arithmetic. This is the `--exact` path;
the fast kernels are tested against it.
"""

import math

import numpy as np
from numba import prange

from llamette.kernels import kernel, parallel_kernel

F32 = np.float32


@parallel_kernel
def matmul(out, x, w):
    """out (d,) = w (d, n) @ x (n,)."""
    d, n = w.shape
    for i in prange(d):
        val = F32(0.0)
        for j in range(n):
            val += w[i, j] * x[j]
        out[i] = val


@kernel
def rmsnorm(out, x, weight, eps):
    """out = weight * x / sqrt(mean(x^2) + eps); out may be x."""
    n = x.shape[0]
    ss = F32(0.0)
    for j in range(n):
        ss += x[j] * x[j]
    ss = ss / F32(n)
    ss = ss + F32(eps)
    ss = F32(1.0) / F32(math.sqrt(ss))
    for j in range(n):
        out[j] = weight[j] * (ss * x[j])


@kernel
def softmax(x):
    """In place over all of x: subtract the max, expf, divide by the sum."""
    max_val = x[0]
    for i in range(1, x.shape[0]):
        if x[i] > max_val:
            max_val = x[i]
    total = F32(0.0)
    for i in range(x.shape[0]):
        x[i] = math.exp(x[i] - max_val)
        total += x[i]
    for i in range(x.shape[0]):
        x[i] = x[i] / total


@kernel
def rope_angles(cos, sin, pos, head_size, theta, divisors):
    """cos and sin (head_size / 2,) of the angles pos * theta^(-2j / head_size) / divisors[j],
    computed as run.c computes them for each pair of a head (they are the same in every head and
    every layer; the divisors, Llama 3.1's RoPE scaling, are ones elsewhere: exact)."""
    for j in range(head_size // 2):
        freq = F32(1.0) / math.pow(F32(theta), F32(2 * j) / F32(head_size))
        val = F32(pos) * freq / divisors[j]
        cos[j] = math.cos(val)
        sin[j] = math.sin(val)


@kernel
def rope(q, k, cos, sin):
    """Rotate each (even, odd) pair of q (dim,) and k (kv_dim,) by the angle of its place in its
    head: pair j of a head turns by the angle whose cos and sin are cos[j], sin[j]."""
    half = cos.shape[0]
    for i in range(0, q.shape[0], 2):
        fcr, fci = cos[(i // 2) % half], sin[(i // 2) % half]
        v0 = q[i]
        v1 = q[i + 1]
        q[i] = v0 * fcr - v1 * fci
        q[i + 1] = v0 * fci + v1 * fcr
        if i < k.shape[0]:
            v0 = k[i]
            v1 = k[i + 1]
            k[i] = v0 * fcr - v1 * fci
            k[i + 1] = v0 * fci + v1 * fcr


@kernel
def attend(out, q, keys, values, pos, att):
    """One head's attention over cache rows 0..pos: out (head_size,) = softmax(q . k / sqrt) @ v.

    q: (head_size,); keys, values: (seq_len, head_size), its kv head's cache; att: (seq_len,)
    scratch for the scores.
    """
    head_size = q.shape[0]
    scale = F32(math.sqrt(F32(head_size)))
    for t in range(pos + 1):
        score = F32(0.0)
        for i in range(head_size):
            score += q[i] * keys[t, i]
        att[t] = score / scale
    softmax(att[: pos + 1])
    for i in range(head_size):
        out[i] = F32(0.0)
    for t in range(pos + 1):
        a = att[t]
        for i in range(head_size):
            out[i] += a * values[t, i]


@parallel_kernel
def attention(out, q, key_cache, value_cache, pos, n_heads, att):
    """Causal grouped-query attention of one token, heads in parallel.

    out, q: (dim,); key_cache, value_cache: (n_kv_heads, seq_len, head_size); att: (n_heads,
    seq_len) scratch. Query heads share kv heads in consecutive groups of n_heads / n_kv_heads.
    """
    head_size = q.shape[0] // n_heads
    kv_mul = n_heads // key_cache.shape[0]  # query heads per kv head
    for h in prange(n_heads):
        heads = slice(h * head_size, (h + 1) * head_size)
        kv_head = h // kv_mul
        attend(out[heads], q[heads], key_cache[kv_head], value_cache[kv_head], pos, att[h])


@kernel
def store_kv(cache, kv, pos):
    """cache (n_kv_heads, seq_len, head_size)[:, pos] = kv (kv_dim,), head by head."""
    head_size = cache.shape[2]
    for h in range(cache.shape[0]):
        cache[h, pos, :] = kv[h * head_size : (h + 1) * head_size]


@kernel
def swiglu(hb, hb2):
    """hb = silu(hb) * hb2, in place."""
    for i in range(hb.shape[0]):
        val = hb[i]
        val = val * (F32(1.0) / (F32(1.0) + math.exp(-val)))
        hb[i] = val * hb2[i]


@kernel
def add(x, y):
    """x += y (the residual connection)."""
    for i in range(x.shape[0]):
        x[i] += y[i]


@kernel
def round_half_away(x):
    """C's round(): halves go away from zero (NumPy's round goes to even)."""
    r = math.floor(abs(x) + 0.5)
    return -r if x < 0 else r


@kernel
def q8_quantize(xq, xs, x, group_size):
    """runq.c's quantize: scale = max|x| / 127 per group, q = round(x / scale).

    Like runq.c, only the first len(x) // group_size groups are written.
    """
    for g in range(x.shape[0] // group_size):
        wmax = F32(0.0)
        for i in range(g * group_size, (g + 1) * group_size):
            if abs(x[i]) > wmax:
                wmax = abs(x[i])
        scale = wmax / F32(127.0)
        xs[g] = scale
        for i in range(g * group_size, (g + 1) * group_size):
            quotient = x[i] / scale
            xq[i] = 0 if math.isnan(quotient) else np.int8(round_half_away(quotient))


@parallel_kernel
def q8_matmul(out, xq, xs, wq, ws, group_size):
    """runq.c's matmul: out (d,) = w (d, n) @ x (n,) from int8 values and per-group scales.

    Groups run over w flattened; like runq.c, a row's trailing n % group_size columns are skipped
    and its scales are read at (i * n + j) / group_size.
    """
    d, n = wq.shape
    for i in prange(d):
        val = F32(0.0)
        for j in range(0, n - group_size + 1, group_size):
            ival = np.int32(0)
            for k in range(group_size):
                ival += np.int32(xq[j + k]) * np.int32(wq[i, j + k])
            val += (F32(ival) * ws[(i * n + j) // group_size]) * xs[j // group_size]
        out[i] = val


@kernel
def q8_dequantize_row(out, wq, ws, row, group_size):
    """out (n,) = row `row` of a Q8 matrix, scales read over the flattened matrix as runq.c does."""
    n = wq.shape[1]
    for j in range(n):
        out[j] = F32(wq[row, j]) * ws[(row * n + j) // group_size]


@kernel
def half_to_float(bits):
    """The float32 value of IEEE half-precision bits (0..65535): sign, 5-bit exponent, 10-bit
    mantissa; exponent 0 is subnormal (infinities and NaNs do not occur in weights)."""
    exponent, mantissa = (bits >> 10) & 0x1F, bits & 0x3FF
    if exponent == 0:
        magnitude = math.ldexp(float(mantissa), -24)
    else:
        magnitude = math.ldexp(float(mantissa + 1024), exponent - 25)
    return F32(-magnitude if bits & 0x8000 else magnitude)


@parallel_kernel
def q8_0_matmul(out, xq, xs, blocks):
    """runq.c's matmul over GGUF Q8_0 blocks: out (d,) = w (d, n) @ x (n,), w given as blocks
    (d, n / 32 * 34) of an fp16 scale and 32 int8 values, x quantized in groups of 32."""
    for i in prange(blocks.shape[0]):
        val = F32(0.0)
        for g in range(blocks.shape[1] // 34):
            start = g * 34
            ival = np.int32(0)
            for k in range(32):
                ival += np.int32(xq[g * 32 + k]) * np.int32(np.int8(blocks[i, start + 2 + k]))
            scale = half_to_float(
                np.int32(blocks[i, start]) | (np.int32(blocks[i, start + 1]) << 8)
            )
            val += (F32(ival) * scale) * xs[g]
        out[i] = val
