"""The steps of a transformer block over a batch of rows (token b at positions[b] of the sequence
in KV-cache slot slots[b]), each in the flavour asked for: `exact`, run.c's arithmetic to the
bit, row by row; otherwise the fast kernels. A decode step is a batch of one.

The products with weights (and the embedding lookup) are the weight types' own: see
kernels.dispatch and llamette.weight_types.
"""

from llamette.kernels import internal_kernel, kernel, parallel_kernel, reference
from llamette.kernels.attention import attention_rows
from llamette.kernels.dispatch import decode_row
from llamette.kernels.elementwise import (
    add_rows,
    rmsnorm_rows,
    rope_angles_rows,
    rope_rows,
    swiglu_rows,
)
from llamette.kernels.kv_cache import store_position
from llamette.kernels.symbols import called_by_symbol

# The steps whose arithmetic is the reference's in both flavours.
rmsnorm, rope, rope_angles, add = rmsnorm_rows, rope_rows, rope_angles_rows, add_rows


@called_by_symbol
@kernel
def embed(out, table, tokens):
    """out (B, dim) = rows tokens[b] of the embedding table, as float32."""
    for b in range(tokens.shape[0]):
        decode_row(out[b], table, tokens[b])


@called_by_symbol
@kernel
def store_kv(kv, layer, slots, positions, k, v):
    """The batch's keys and values k, v (B, kv_dim) into the cache at their sequences' positions,
    in its type."""
    n_kv_heads, head_size = kv.keys.shape[2], kv.keys.shape[4]
    for b in range(k.shape[0]):
        slot, pos = slots[b], positions[b]
        for h in range(n_kv_heads):
            head = slice(h * head_size, (h + 1) * head_size)
            store_position(kv.keys[slot, layer, h, pos], kv.key_scales[slot, layer, h, pos],
                           k[b, head])  # fmt: skip
            store_position(kv.values[slot, layer, h, pos], kv.value_scales[slot, layer, h, pos],
                           v[b, head])  # fmt: skip


@called_by_symbol
@internal_kernel
def gather_rows(out, x, rows):
    """out (m, n) = x[rows] (x: (B, n))."""
    for r in range(rows.shape[0]):
        for j in range(x.shape[1]):
            out[r, j] = x[rows[r], j]


@called_by_symbol
@parallel_kernel
def attention(out, q, kv, layer, slots, positions, n_heads, scores, exact):
    """Causal grouped-query attention: row b of out (B, dim) from its query q[b] and keys and
    values 0..positions[b] of its sequence (the batch's own already stored). scores (n_heads,
    seq_len): the reference's scratch, for one row at a time. (`exact`: a float32 cache.)"""
    if exact is not None and exact:
        for b in range(q.shape[0]):
            keys, values = kv.keys[slots[b], layer], kv.values[slots[b], layer]
            reference.attention(out[b], q[b], keys, values, positions[b], n_heads, scores)
    else:
        attention_rows(out, q, kv, layer, slots, positions, n_heads)


@called_by_symbol
@parallel_kernel
def swiglu(gate, up, exact):
    """gate = silu(gate) * up, (B, hidden_dim): the feed-forward's gated activation."""
    if exact is not None and exact:
        for b in range(gate.shape[0]):
            reference.swiglu(gate[b], up[b])
    else:
        swiglu_rows(gate, up)
