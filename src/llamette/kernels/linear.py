"""The steps of a decode that differ by weight type or flavour, callable from compiled code:
the linear layer, the embedding lookup, attention and SwiGLU.

The weight type (an fp32 array, a `Q8Tensor`, or GGUF's `HalfTensor`, `BF16Tensor`, `Q4Tensor`,
`Q8_0Tensor`) picks the kernel when the caller is compiled; the `exact` flag picks the flavour (reference or
fast) when it runs.
"""

from numba import types
from numba.extending import overload

from llamette.kernels import fast, ggml, reference
from llamette.quant import BF16Tensor, HalfTensor, Q4Tensor, Q8_0Tensor, Q8Tensor


def linear(outs, x, weights, exact, s):
    """outs[i] (d_i,) = weights[i] (d_i, n) @ x (n,) for matrices that share their input x.

    Q8 and Q8_0 weights quantize x once, into the scratch of the decode step's buffers s.
    """
    raise NotImplementedError("linear() runs inside compiled code only")


def attention(out, q, key_cache, value_cache, pos, n_heads, att, exact):
    """One token's attention over cache rows 0..pos (see reference.attention)."""
    raise NotImplementedError("attention() runs inside compiled code only")


def swiglu(gate, up, exact):
    """gate = silu(gate) * up (see reference.swiglu)."""
    raise NotImplementedError("swiglu() runs inside compiled code only")


def embed(out, table, token):
    """out (dim,) = row `token` of the embedding table."""
    raise NotImplementedError("embed() runs inside compiled code only")


def is_q8(numba_type) -> bool:
    return is_a(numba_type, Q8Tensor)


def is_a(numba_type, tensor_class) -> bool:
    """Whether a compiled-code type is the NamedTuple tensor_class."""
    return (
        isinstance(numba_type, types.BaseNamedTuple) and numba_type.instance_class is tensor_class
    )


@overload(linear, jit_options={"cache": True, "parallel": True})  # calls parallel kernels
def _linear(outs, x, weights, exact, s):
    if is_q8(weights[0]):

        def linear_q8(outs, x, weights, exact, s):
            n, group_size = x.shape[0], weights[0].group_size
            groups = (n + group_size - 1) // group_size
            if exact:
                reference.q8_quantize(s.xq[:n], s.xs, x, group_size)
                for i in range(len(weights)):
                    w = weights[i]
                    reference.q8_matmul(outs[i], s.xq[:n], s.xs, w.values, w.scales, group_size)
                return
            scratch = fast.Q8Scratch(
                s.xq[:n].reshape(1, n), s.xs[:groups].reshape(1, groups),
                s.x_dequantized[:n].reshape(1, n),
            )  # fmt: skip
            fast.q8_linear(as_rows(outs), x.reshape(1, n), weights, scratch, s.weights_in_cache)

        return linear_q8
    if is_a(weights[0], Q8_0Tensor):

        def linear_q8_0(outs, x, weights, exact, s):
            n = x.shape[0]
            groups = n // 32
            if exact:
                reference.q8_quantize(s.xq[:n], s.xs, x, 32)
                for i in range(len(weights)):
                    reference.q8_0_matmul(outs[i], s.xq[:n], s.xs, weights[i].blocks)
                return
            scratch = ggml.Q8_0Scratch(
                s.xq[:n].reshape(1, n), s.xs[:groups].reshape(1, groups),
                s.x_sums[:groups].reshape(1, groups),
            )  # fmt: skip
            ggml.q8_0_linear(as_rows(outs), x.reshape(1, n), weights, scratch, s.weights_in_cache)

        return linear_q8_0
    if is_a(weights[0], HalfTensor) or is_a(weights[0], BF16Tensor):
        brain = is_a(weights[0], BF16Tensor)

        def linear_half(outs, x, weights, exact, s):
            for i in range(len(weights)):
                out = outs[i].reshape(1, outs[i].shape[0])
                ggml.half_matmul(out, x.reshape(1, x.shape[0]), weights[i].bits, brain)

        return linear_half
    if is_a(weights[0], Q4Tensor):

        def linear_q4(outs, x, weights, exact, s):
            for i in range(len(weights)):
                out = outs[i].reshape(1, outs[i].shape[0])
                ggml.q4_matmul(out, x.reshape(1, x.shape[0]), weights[i].blocks)

        return linear_q4

    def linear_f32(outs, x, weights, exact, s):
        for i in range(len(weights)):
            if exact:
                reference.matmul(outs[i], x, weights[i])
            else:
                fast.matmul_f32(
                    outs[i].reshape(1, outs[i].shape[0]), x.reshape(1, x.shape[0]), weights[i]
                )

    return linear_f32


def as_rows(vectors):
    """A tuple of vectors (d_i,) as a tuple of one-row matrices (1, d_i), the same memory."""
    raise NotImplementedError("as_rows() runs inside compiled code only")


@overload(as_rows, jit_options={"cache": True})
def _as_rows(vectors):
    # Tuples cannot grow in compiled code, so the tuple is written out for its length.
    if vectors.count == 1:
        return lambda vectors: (vectors[0].reshape(1, vectors[0].shape[0]),)
    if vectors.count == 2:
        return lambda vectors: (
            vectors[0].reshape(1, vectors[0].shape[0]),
            vectors[1].reshape(1, vectors[1].shape[0]),
        )
    if vectors.count == 3:
        return lambda vectors: (
            vectors[0].reshape(1, vectors[0].shape[0]),
            vectors[1].reshape(1, vectors[1].shape[0]),
            vectors[2].reshape(1, vectors[2].shape[0]),
        )
    return None


@overload(attention, jit_options={"cache": True, "parallel": True})
def _attention(out, q, key_cache, value_cache, pos, n_heads, att, exact):
    def attention_either(out, q, key_cache, value_cache, pos, n_heads, att, exact):
        if exact:
            reference.attention(out, q, key_cache, value_cache, pos, n_heads, att)
        else:
            fast.attention(out, q, key_cache, value_cache, pos, n_heads, att)

    return attention_either


@overload(swiglu, jit_options={"cache": True, "parallel": True})
def _swiglu(gate, up, exact):
    def swiglu_either(gate, up, exact):
        if exact:
            reference.swiglu(gate, up)
        else:
            fast.swiglu_rows(gate.reshape(1, gate.shape[0]), up.reshape(1, up.shape[0]))

    return swiglu_either


@overload(embed, jit_options={"cache": True, "parallel": True})
def _embed(out, table, token):
    if is_q8(table):

        def embed_q8(out, table, token):
            reference.q8_dequantize_row(out, table.values, table.scales, token, table.group_size)

        return embed_q8
    if is_a(table, HalfTensor) or is_a(table, BF16Tensor):
        brain = is_a(table, BF16Tensor)

        def embed_half(out, table, token):
            ggml.decode_half_row(out, table.bits[token], brain)

        return embed_half
    if is_a(table, Q4Tensor):

        def embed_q4(out, table, token):
            ggml.decode_q4_row(out, table.blocks[token])

        return embed_q4
    if is_a(table, Q8_0Tensor):

        def embed_q8_0(out, table, token):
            ggml.decode_q8_0_row(out, table.blocks[token])

        return embed_q8_0

    def embed_f32(out, table, token):
        out[:] = table[token]

    return embed_f32
