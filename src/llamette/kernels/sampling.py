"""Sampling kernels: run.c's argmax, multinomial and top-p draws, plus top-k."""

import numpy as np

from llamette.kernels import kernel
from llamette.kernels.reference import softmax

F32 = np.float32


@kernel
def argmax(x):
    """Index of the largest value; the first one wins ties."""
    best = 0
    for i in range(1, x.shape[0]):
        if x[i] > x[best]:
            best = i
    return best


@kernel
def _walk(probs, order, count, mass, coin):
    """Return order[i] for the first i where coin * mass < cumulative probability."""
    r = coin * mass
    cdf = F32(0.0)
    for i in range(count):
        cdf += probs[order[i]]
        if r < cdf:
            return order[i]
    return order[count - 1]


@kernel
def _top_p_prefix(probs, order, count, topp, mass_scale):
    """Shortest prefix of `order` whose probability exceeds topp * mass_scale: (length, its mass)."""
    cumulative = F32(0.0)
    for i in range(count):
        cumulative += probs[order[i]]
        if cumulative > topp * mass_scale:
            return i + 1, cumulative
    return count, cumulative


@kernel
def _sorted_descending(probs, candidates):
    """Candidates (ascending indices) ordered by probability, largest first; ties keep index order.

    A stable radix sort, 8 bits a pass, of the probabilities' bit patterns, which order as the
    values do for floats >= 0 (inverted, for largest first): linear time, where a comparison sort
    of a flat distribution's tens of thousands of candidates is the slowest step of a draw.
    """
    n = candidates.shape[0]
    bits = probs.view(np.uint32)
    keys, order = np.empty(n, np.uint32), candidates.copy()
    for i in range(n):
        keys[i] = np.uint32(0xFFFFFFFF) - bits[order[i]]
    next_keys, next_order = np.empty_like(keys), np.empty_like(order)
    starts = np.empty(256, np.int64)  # where each bucket goes next in the pass's output
    for shift in range(0, 32, 8):
        starts[:] = 0
        for i in range(n):
            starts[(keys[i] >> shift) & 255] += 1
        total = 0
        for bucket in range(256):
            total, starts[bucket] = total + starts[bucket], total
        for i in range(n):
            bucket = (keys[i] >> shift) & 255
            at = starts[bucket]
            starts[bucket] = at + 1
            next_keys[at], next_order[at] = keys[i], order[i]
        keys, next_keys = next_keys, keys
        order, next_order = next_order, order
    return order


@kernel
def sample_logits(work, temperature, topp, topk, coin):
    """Sample a token from logits (copied into `work`, which is overwritten), given one coin in [0, 1).

    Follows run.c: logits / temperature, softmax, then a plain multinomial draw, or top-p: keep
    probabilities >= (1 - topp) / (n - 1), sort them descending, cut after the cumulative sum
    exceeds topp and draw within. With topk > 0 only the k most probable tokens take part.
    """
    n = work.shape[0]
    for i in range(n):
        work[i] = work[i] / temperature
    softmax(work)
    use_topp = topp > 0.0 and topp < 1.0
    if 0 < topk < n:
        order = _sorted_descending(work, np.arange(n))[:topk]  # ties: lower ids first
        total = F32(0.0)
        for i in range(topk):
            total += work[order[i]]
        count, mass = topk, total
        if use_topp:
            count, mass = _top_p_prefix(work, order, topk, topp, total)
        return _walk(work, order, count, mass, coin)
    if not use_topp:
        return _walk(work, np.arange(n), n, F32(1.0), coin)
    cutoff = (F32(1.0) - topp) / F32(n - 1)
    candidates = np.nonzero(work >= cutoff)[0]
    order = _sorted_descending(work, candidates)
    count, mass = _top_p_prefix(work, order, order.shape[0], topp, F32(1.0))
    return _walk(work, order, count, mass, coin)
