"""The steps of a decode that differ by weight type or flavour, callable from compiled code:
the linear layer, the embedding lookup and attention.

The weight type (an fp32 array or a `Q8Tensor`) picks the kernel when the caller is compiled; the
`exact` flag picks the flavour (reference or fast) when it runs.
"""

from numba import types
from numba.extending import overload

from llamette.kernels import fast, reference
from llamette.quant import Q8Tensor


def linear(out, x, w, exact, xq, xs):
    """out (d,) = w (d, n) @ x (n,). Q8 weights quantize x into the scratch xq, xs first."""
    raise NotImplementedError("linear() runs inside compiled code only")


def attention(out, q, key_cache, value_cache, pos, n_heads, att, exact):
    """One token's attention over cache rows 0..pos (see reference.attention)."""
    raise NotImplementedError("attention() runs inside compiled code only")


def embed(out, table, token):
    """out (dim,) = row `token` of the embedding table."""
    raise NotImplementedError("embed() runs inside compiled code only")


def is_q8(numba_type) -> bool:
    return isinstance(numba_type, types.NamedTuple) and numba_type.instance_class is Q8Tensor


@overload(linear, jit_options={"cache": True, "parallel": True})  # calls parallel kernels
def _linear(out, x, w, exact, xq, xs):
    if is_q8(w):

        def linear_q8(out, x, w, exact, xq, xs):
            n = x.shape[0]
            if exact:
                reference.q8_quantize(xq[:n], xs, x, w.group_size)
                reference.q8_matmul(out, xq[:n], xs, w.values, w.scales, w.group_size)
            else:
                groups = (n + w.group_size - 1) // w.group_size
                inputs, scales = xq[:n].reshape(1, n), xs[:groups].reshape(1, groups)
                fast.q8_quantize_rows(inputs, scales, x.reshape(1, n), w.group_size)
                fast.q8_matmul(
                    out.reshape(1, out.shape[0]), inputs, scales, w.values, w.scales, w.group_size
                )

        return linear_q8

    def linear_f32(out, x, w, exact, xq, xs):
        if exact:
            reference.matmul(out, x, w)
        else:
            fast.matmul_f32(out.reshape(1, out.shape[0]), x.reshape(1, x.shape[0]), w)

    return linear_f32


@overload(attention, jit_options={"cache": True, "parallel": True})
def _attention(out, q, key_cache, value_cache, pos, n_heads, att, exact):
    def attention_either(out, q, key_cache, value_cache, pos, n_heads, att, exact):
        if exact:
            reference.attention(out, q, key_cache, value_cache, pos, n_heads, att)
        else:
            fast.attention(out, q, key_cache, value_cache, pos, n_heads, att)

    return attention_either


@overload(embed, jit_options={"cache": True, "parallel": True})
def _embed(out, table, token):
    if is_q8(table):

        def embed_q8(out, table, token):
            reference.q8_dequantize_row(out, table.values, table.scales, token, table.group_size)

        return embed_q8

    def embed_f32(out, table, token):
        out[:] = table[token]

    return embed_f32
