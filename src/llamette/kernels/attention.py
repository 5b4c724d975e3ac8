"""Causal grouped-query attention, the fast flavour: vectorized dot products (16 keys' scores at
a time in SIMD lanes), a vectorizable exp, within float tolerance of `reference.attention`, over
a KV cache of any of its types (kernels.kv_cache), read back as float32 as it goes.

A row of a batch gets the bits one token decoding alone (a batch of one) gets: the same steps in
the same order, whether it attends alone or among a prompt's rows, which go in blocks that take
each chunk of keys together.
"""

import math

import numpy as np
from numba import njit, prange

from llamette.kernels import reassociating_kernel, reassociating_serial_kernel
from llamette.kernels.elementwise import exp_f32
from llamette.kernels.kv_cache import kv_lanes, kv_value
from llamette.kernels.simd import (
    LANES,
    float32x16_of,
    float32x16_zeros,
    load_lanes,
    multiply_add,
    store_lanes,
    sum_float32x16,
    sums_float32x16,
)
from llamette.kernels.symbols import called_by_symbol

F32 = np.float32


@called_by_symbol
@reassociating_kernel
def attention_rows(out, q, kv, layer, slots, positions, n_heads):
    """Causal grouped-query attention for a batch: row b attends to positions 0..positions[b] of
    its sequence's cache, which already holds the batch's own keys and values.

    out, q: (B, dim); kv: a KVCache, (n_slots, n_layers, n_kv_heads, seq_len, head_size) keys
    and values. Each row gets the bits it gets alone; a prompt's rows go in blocks that share
    each chunk of keys and values while it is in L1. Heads (and blocks) in parallel.
    """
    n_blocks = (q.shape[0] + ATTENTION_ROWS - 1) // ATTENTION_ROWS
    for task in prange(n_heads * n_blocks):  # by head, then block: a thread's share of a prompt's
        h, block = task // n_blocks, task % n_blocks  # rows (later ones attend to more) is even
        _attention_rows_task(out, q, kv, layer, slots, positions, n_heads, h, block)


@reassociating_serial_kernel
def _attention_rows_task(out, q, kv, layer, slots, positions, n_heads, h, block):
    """attention_rows' head h for rows block * ATTENTION_ROWS.. of the batch."""
    head_size = q.shape[1] // n_heads
    kv_head = h // (n_heads // kv.keys.shape[2])
    first = block * ATTENTION_ROWS
    last = min(q.shape[0], first + ATTENTION_ROWS)
    heads = slice(h * head_size, (h + 1) * head_size)
    if head_size % LANES == 0:
        b = first
        while b < last:  # each run of one sequence's consecutive positions in one go
            stop = _run_end(slots, positions, b, last)
            head = _kv_head(kv, slots[b], layer, kv_head)
            _attend_rows(out[b:stop, heads], q[b:stop, heads], head, positions[b])
            b = stop
        return
    for b in range(first, last):
        scores = np.empty(positions[b] + 1, np.float32)
        head = _kv_head(kv, slots[b], layer, kv_head)
        _attend(out[b, heads], q[b, heads], head, positions[b] + 1, scores)


@njit(inline="always")
def _kv_head(kv, slot, layer, kv_head):
    """One kv head's cache in a sequence: (keys, key scales, values, value scales), (seq_len,
    head_size) and (seq_len, scales per position) each."""
    return (kv.keys[slot, layer, kv_head], kv.key_scales[slot, layer, kv_head],
            kv.values[slot, layer, kv_head], kv.value_scales[slot, layer, kv_head])  # fmt: skip


ATTENTION_ROWS = 8  # rows of one sequence that attention_rows takes together


@njit(inline="always")
def _run_end(slots, positions, first, last):
    """The row after the run of one sequence's consecutive positions that starts at row first
    (at most last)."""
    for b in range(first + 1, last):
        if slots[b] != slots[first] or positions[b] != positions[first] + b - first:
            return b
    return last


@njit(inline="always", error_model="numpy", fastmath={"reassoc", "contract"})
def _attend_rows(out, q, head, first_position):
    """One head for rows r of one sequence at positions first_position + r (out, q: (rows,
    head_size), heads a whole number of SIMD vectors long): out[r] = softmax(q[r] . keys[t] /
    sqrt(head_size)) @ values, t <= first_position + r, in explicit lanes (`_key_scores`,
    `_add_weighted_values`); the same steps in the same order for each row whatever the rows
    beside it, taken a chunk of keys (and of values) at a time for all of them."""
    keys, key_scales, values, value_scales = head
    n_rows, head_size = q.shape
    n_keys = first_position + n_rows  # the last row's
    scores = np.empty((n_rows, n_keys), np.float32)
    chunk = max(LANES, ATTENTION_CHUNK_BYTES // (4 * head_size) // LANES * LANES)
    for start in range(0, n_keys, chunk):
        for r in range(n_rows):
            stop = min(start + chunk, first_position + r + 1)
            if stop > start:
                _key_scores(scores[r], q[r], keys, key_scales, start, stop)
    for r in range(n_rows):
        _softmax(scores[r], first_position + r + 1, head_size)
    out[:, :] = 0.0
    for start in range(0, n_keys, chunk):
        for r in range(n_rows):
            stop = min(start + chunk, first_position + r + 1)
            if stop > start:
                _add_weighted_values(out[r], scores[r], values, value_scales, start, stop)


ATTENTION_CHUNK_BYTES = 32 * 1024  # keys (or values) taken at a time by a block of rows


@njit(inline="always", error_model="numpy", fastmath={"reassoc", "contract"})
def _attend(out, q, head, n_keys, scores):
    """One head whose size is not a whole number of SIMD vectors: out (head_size,) =
    softmax(q . keys[t] / sqrt(head_size)) @ values, t < n_keys, in loops that LLVM vectorizes
    as it can; head: its kv head's cache (_kv_head)."""
    keys, key_scales, values, value_scales = head
    head_size = q.shape[0]
    for t in range(n_keys):
        score = F32(0.0)
        for i in range(head_size):
            score += q[i] * kv_value(keys, key_scales, t, i)
        scores[t] = score
    _softmax(scores, n_keys, head_size)
    out[:] = 0.0
    for t in range(n_keys):
        for i in range(head_size):
            out[i] += scores[t] * kv_value(values, value_scales, t, i)


@njit(inline="always", error_model="numpy", fastmath={"reassoc", "contract"})
def _softmax(scores, n_keys, head_size):
    """scores[:n_keys] = softmax(scores[:n_keys] / sqrt(head_size)), in place."""
    inverse_scale = F32(1.0) / F32(math.sqrt(F32(head_size)))
    highest = F32(-np.inf)
    for t in range(n_keys):
        scores[t] *= inverse_scale
        highest = max(highest, scores[t])
    total = F32(0.0)
    for t in range(n_keys):
        scores[t] = exp_f32(scores[t] - highest)
        total += scores[t]
    for t in range(n_keys):
        scores[t] /= total


@njit(inline="always")
def _key_scores(scores, q, keys, key_scales, start, stop):
    """scores[t] = q . keys[t] for t in start..stop - 1 (start a multiple of 16), each summed in
    16 lanes: whole blocks of 16 keys at a time, their lane sums added together
    (sums_float32x16), then the keys left one by one."""
    head_size = q.shape[0]
    blocked = stop - (stop - start) % LANES
    for t in range(start, blocked, LANES):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = float32x16_zeros()  # a_k: key t + k
        a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = float32x16_zeros()
        for i in range(0, head_size, LANES):
            v = load_lanes(q, i)
            a0, a1, a2, a3 = _times_4_keys(a0, a1, a2, a3, v, keys, key_scales, t, i)
            a4, a5, a6, a7 = _times_4_keys(a4, a5, a6, a7, v, keys, key_scales, t + 4, i)
            a8, a9, a10, a11 = _times_4_keys(a8, a9, a10, a11, v, keys, key_scales, t + 8, i)
            a12, a13, a14, a15 = _times_4_keys(a12, a13, a14, a15, v, keys, key_scales, t + 12, i)
        lanes = (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)
        store_lanes(scores, t, sums_float32x16(lanes))
    for t in range(blocked, stop):
        a = float32x16_zeros()
        for i in range(0, head_size, LANES):
            a = multiply_add(a, load_lanes(q, i), kv_lanes(keys, key_scales, t, i))
        scores[t] = sum_float32x16(a)


@njit(inline="always")
def _times_4_keys(a0, a1, a2, a3, v, keys, key_scales, t, i):
    """a_k + v * keys[t + k, i:i + 16], k = 0..3."""
    return (multiply_add(a0, v, kv_lanes(keys, key_scales, t, i)),
            multiply_add(a1, v, kv_lanes(keys, key_scales, t + 1, i)),
            multiply_add(a2, v, kv_lanes(keys, key_scales, t + 2, i)),
            multiply_add(a3, v, kv_lanes(keys, key_scales, t + 3, i)))  # fmt: skip


@njit(inline="always")
def _add_weighted_values(out, weights, values, value_scales, start, stop):
    """out (head_size,) += weights[t] * values[t] for t in start..stop - 1, each value summed in
    position order (fused multiply-adds); four vectors of the output at a time where they exist."""
    head_size = out.shape[0]
    in_fours = head_size - head_size % (4 * LANES)
    for i in range(0, in_fours, 4 * LANES):
        a0, a1 = load_lanes(out, i), load_lanes(out, i + LANES)
        a2, a3 = load_lanes(out, i + 2 * LANES), load_lanes(out, i + 3 * LANES)
        for t in range(start, stop):
            weight = float32x16_of(weights[t])
            a0 = multiply_add(a0, weight, kv_lanes(values, value_scales, t, i))
            a1 = multiply_add(a1, weight, kv_lanes(values, value_scales, t, i + LANES))
            a2 = multiply_add(a2, weight, kv_lanes(values, value_scales, t, i + 2 * LANES))
            a3 = multiply_add(a3, weight, kv_lanes(values, value_scales, t, i + 3 * LANES))
        store_lanes(out, i, a0)
        store_lanes(out, i + LANES, a1)
        store_lanes(out, i + 2 * LANES, a2)
        store_lanes(out, i + 3 * LANES, a3)
    for i in range(in_fours, head_size, LANES):
        a = load_lanes(out, i)
        for t in range(start, stop):
            a = multiply_add(a, float32x16_of(weights[t]), kv_lanes(values, value_scales, t, i))
        store_lanes(out, i, a)
