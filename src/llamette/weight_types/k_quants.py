"""Quantizing to the K-quants and IQ4 types as llama.cpp's quantizer does (without an importance
matrix), in NumPy, over all the sub-blocks of a matrix at once: the search for each sub-block's
scale (and minimum), then the block's scales of those scales, then each value's level under the
rounded scales. The types' modules (q4_k, q5_k, q6_k, iq4_nl, iq4_xs) pack the levels into their
layouts."""

from __future__ import annotations

import numpy as np

F32 = np.float32
BLOCK, RUN = 256, 32  # values per block, per run (Q4_K's and Q5_K's sub-blocks)
ROWS_AT_A_TIME = 64  # bounds the memory of the searches' temporaries
TINY = F32(1e-15)  # below this, a sub-block is all zeros (ggml's GROUP_MAX_EPS)


def fp16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to fp16 (nearest, ties to even), back as float32."""
    return values.astype(np.float16).astype(F32)


def in_row_chunks(w: np.ndarray, quantize_rows) -> np.ndarray:
    """quantize_rows(rows) (rows, row_bytes) over w's rows a chunk at a time."""
    w = np.asarray(w, F32)
    return np.concatenate(
        [quantize_rows(w[i : i + ROWS_AT_A_TIME]) for i in range(0, w.shape[0], ROWS_AT_A_TIME)]
    )


def scale_and_minimum_search(x: np.ndarray, weights: np.ndarray, levels: int, rmin: float,
                             rdelta: float, steps: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """For each sub-block (row of x), the scale s >= 0 and minimum m >= 0 of x ~ s * q - m with q
    in 0..levels: the weighted least-squares fit over the roundings of x at steps + 1 trial
    scales, the best by weighted squared error (llama.cpp's make_qkx2_quants)."""
    low = np.minimum(x.min(axis=1), 0)
    high = x.max(axis=1)
    flat = high == low  # all one value: scale 0
    high[flat] = low[flat] + 1  # any: keeps the trials finite
    sum_w = weights.sum(axis=1)
    sum_x = (weights * x).sum(axis=1)

    def levels_at(inverse_scale, minimum):
        return np.clip(np.rint(inverse_scale[:, None] * (x - minimum[:, None])), 0, levels)

    def error(scale, minimum, q):
        return (weights * np.square(scale[:, None] * q + minimum[:, None] - x)).sum(axis=1)

    scale, minimum = (high - low) / F32(levels), low.copy()
    best = error(scale, minimum, levels_at(F32(levels) / (high - low), low))
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(steps + 1):
            # as llama.cpp does, each trial rounds from the best minimum found so far
            inverse_scale = (F32(rmin) + F32(rdelta) * step + F32(levels)) / (high - minimum)
            q = levels_at(inverse_scale, minimum)
            sum_l, sum_l2 = (weights * q).sum(axis=1), (weights * q * q).sum(axis=1)
            sum_xl = (weights * q * x).sum(axis=1)
            determinant = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / determinant
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / determinant
            positive = this_min > 0  # a minimum above zero is not stored: fit the scale alone
            this_min[positive] = 0
            this_scale[positive] = (sum_xl / sum_l2)[positive]
            this_error = error(this_scale, this_min, q)
            better = (determinant > 0) & (this_error < best)
            scale[better], minimum[better], best[better] = (
                this_scale[better],
                this_min[better],
                this_error[better],
            )
    scale[flat], minimum[flat] = 0, low[flat]
    return scale.astype(F32), (-minimum).astype(F32)


def symmetric_scale_search(x: np.ndarray, levels: int) -> np.ndarray:
    """For each sub-block (row of x), the scale s of x ~ s * q with q in -levels..levels - 1,
    the largest-magnitude value mapping to -levels: the least-squares fit weighted by x^2 over
    the roundings at 19 trial scales, the best by that fit (llama.cpp's make_qx_quants)."""
    at_max = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)  # signed (n, 1)
    zero = np.abs(at_max[:, 0]) < TINY
    at_max[zero] = 1
    weights = x * x

    def fit(inverse_scale):
        q = np.clip(np.rint(inverse_scale * x), -levels, levels - 1)
        return (weights * x * q).sum(axis=1), (weights * q * q).sum(axis=1)

    with np.errstate(divide="ignore", invalid="ignore"):
        sum_lx, sum_l2 = fit(-F32(levels) / at_max)
        scale = np.where(sum_l2 > 0, sum_lx / sum_l2, 0).astype(F32)
        best = scale * sum_lx
        for step in (*range(-9, 0), *range(1, 10)):
            sum_lx, sum_l2 = fit(-(F32(levels) + F32(0.1) * step) / at_max)
            better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
            scale[better] = (sum_lx / sum_l2)[better]
            best[better] = (scale * sum_lx)[better]
    scale[zero] = 0
    return scale


def terms_and_levels_with_minimums(rows: np.ndarray, levels: int, rmin: float, rdelta: float,
                                    steps: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Q4_K's (levels 15) and Q5_K's (31) quantization of rows (n, cols): each block's first 16
    bytes (fp16 d and dmin, 12 bytes of 6-bit scales and minimums) (blocks, 16), and the values'
    levels (blocks, 256). Each run of 32 values gets the scale and minimum that fit it best,
    weighted by the values' size (their magnitude plus the run's RMS)."""
    runs = rows.reshape(-1, RUN)
    weights = np.sqrt(np.mean(runs * runs, axis=1, keepdims=True)) + np.abs(runs)
    scales, minimums = scale_and_minimum_search(runs, weights, levels, rmin, rdelta, steps)
    d, dmin, scale_levels, min_levels, packed = six_bit_scales(
        scales.reshape(-1, 8), minimums.reshape(-1, 8)
    )
    q = levels_with_minimum(rows.reshape(-1, BLOCK), d, dmin, scale_levels, min_levels, levels)
    halves = np.concatenate([d, dmin], axis=1).astype(np.float16).view(np.uint8)
    return np.concatenate([halves, packed], axis=1), q


def six_bit_scales(scales: np.ndarray, minimums: np.ndarray):
    """Q4_K's and Q5_K's block terms from its eight sub-blocks' scales and minimums (blocks, 8):
    d and dmin (fp16-rounded, (blocks, 1)), the 6-bit levels of the scales and minimums, and the
    12 bytes packing them."""
    max_scale, max_min = scales.max(axis=1, keepdims=True), minimums.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inverse_scale = np.where(max_scale > 0, F32(63) / max_scale, 0).astype(F32)
        inverse_min = np.where(max_min > 0, F32(63) / max_min, 0).astype(F32)
    scale_levels = np.minimum(np.rint(inverse_scale * scales), 63).astype(np.uint8)
    min_levels = np.minimum(np.rint(inverse_min * minimums), 63).astype(np.uint8)
    packed = np.zeros((scales.shape[0], 12), np.uint8)
    packed[:, 0:4] = scale_levels[:, :4] | (scale_levels[:, 4:] >> 4 << 6)
    packed[:, 4:8] = min_levels[:, :4] | (min_levels[:, 4:] >> 4 << 6)
    packed[:, 8:12] = (scale_levels[:, 4:] & 15) | ((min_levels[:, 4:] & 15) << 4)
    d, dmin = fp16(max_scale / F32(63)), fp16(max_min / F32(63))
    return d, dmin, scale_levels, min_levels, packed


def levels_with_minimum(x: np.ndarray, d: np.ndarray, dmin: np.ndarray, scale_levels: np.ndarray,
                        min_levels: np.ndarray, levels: int) -> np.ndarray:  # fmt: skip
    """Each value's level q in 0..levels under the rounded terms: x (blocks, 256) ~ (d * sc) * q -
    dmin * m for its run; 0 where a run's scale is 0."""
    blocks = x.shape[0]
    run_scale = (d * scale_levels.astype(F32))[..., None]  # (blocks, runs, 1)
    run_min = (dmin * min_levels.astype(F32))[..., None]
    values = x.reshape(blocks, -1, RUN)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint((values + run_min) / run_scale), 0, levels)
    return np.where(run_scale == 0, 0, q).astype(np.uint8).reshape(blocks, -1)


def nibbles(q: np.ndarray) -> np.ndarray:
    """(blocks, 256) levels of four bits as the 4-bit K-quants pack them: for each 64 values, 32
    bytes, value j in the low nibble of byte j and value 32 + j in its high nibble."""
    pairs = (q & 15).reshape(q.shape[0], 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(q.shape[0], 128)


def nearest_in_table(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The index of the table value (ascending int8) nearest to each x; halfway: the higher."""
    values = table.astype(F32)
    upper = np.clip(np.searchsorted(values, x, side="right"), 1, len(values) - 1)
    lower_is_nearer = x - values[upper - 1] < values[upper] - x
    return np.where(lower_is_nearer, upper - 1, upper).astype(np.uint8)


def table_scale_search(x: np.ndarray, table: np.ndarray, trials: int = 7) -> np.ndarray:
    """For each sub-block (row of x), the scale d of x ~ d * table[i]: the least-squares fit
    weighted by x^2 for the table indices nearest x / d at 2 trials + 2 trial scales, the best
    by that fit; 0 for an all-zero sub-block (llama.cpp's IQ4 search)."""
    at_max = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)  # signed (n, 1)
    zero = np.abs(at_max[:, 0]) < TINY
    at_max[zero] = 1
    weights = x * x
    values = table.astype(F32)

    def fit(inverse_scale):
        q = values[nearest_in_table(table, inverse_scale * x)]
        return (weights * q * x).sum(axis=1), (weights * q * q).sum(axis=1)

    with np.errstate(divide="ignore", invalid="ignore"):
        sum_qx, sum_q2 = fit(F32(1) / (-at_max / values[0]))
        scale = np.where(sum_q2 > 0, sum_qx / sum_q2, 0).astype(F32)
        best = scale * sum_qx
        for trial in range(-trials, trials + 1):
            sum_qx, sum_q2 = fit((F32(trial) + values[0]) / at_max)
            better = (sum_q2 > 0) & (sum_qx * sum_qx > best * sum_q2)
            scale[better] = (sum_qx / sum_q2)[better]
            best[better] = (scale * sum_qx)[better]
    scale[zero] = 0
    return scale


def table_nibbles(indices: np.ndarray) -> np.ndarray:
    """(n, 32) 4-bit indices as IQ4 packs them: value j in the low nibble of byte j, 16 + j in
    its high nibble (n, 16)."""
    return indices[:, :16] | (indices[:, 16:] << 4)
