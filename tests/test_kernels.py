"""Kernels against NumPy: float64 formulas for the fp32 steps, runq.c's integer arithmetic for Q8."""

import gguf
import numpy as np
import pytest
from numba import njit

from llamette.kernels import SMALL_BATCH, fast, ggml, last_level_cache_bytes, reference, simd
from llamette.quant import Q8_0Tensor, Q8Tensor, quantize_q8

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_matmul():
    w, x, out = randn(37, 53), randn(53), np.empty(37, np.float32)
    reference.matmul(out, x, w)
    np.testing.assert_allclose(out, w.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)


def test_matmul_sums_in_index_order_like_run_c():
    # float32 sums are order dependent; run.c adds w[j] * x[j] for j = 0, 1, ... in float32
    w, x, out = randn(3, 300), randn(300), np.empty(3, np.float32)
    reference.matmul(out, x, w)
    for i in range(3):
        total = np.float32(0)
        for j in range(300):
            total = np.float32(total + w[i, j] * x[j])
        assert out[i] == total


def test_rmsnorm():
    x, weight, out = randn(64), randn(64), np.empty(64, np.float32)
    reference.rmsnorm(out, x, weight, 1e-5)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(out, weight * x64 / np.sqrt(np.mean(x64**2) + 1e-5), rtol=1e-6)


def test_softmax():
    x = randn(100) * 5
    expected = np.exp(x.astype(np.float64) - x.max())
    reference.softmax(x)
    np.testing.assert_allclose(x, expected / expected.sum(), rtol=1e-6, atol=1e-9)


def test_rope_rotates_pairs_as_complex_numbers():
    head_size, pos, theta = 16, 7, 10000.0
    q, k = randn(64), randn(32)  # 4 query heads, 2 kv heads
    i = np.arange(0, 64, 2) % head_size
    angle = pos * theta ** (-i / head_size)
    expected_q = (q[0::2] + 1j * q[1::2]) * np.exp(1j * angle)
    expected_k = (k[0::2] + 1j * k[1::2]) * np.exp(1j * angle[:16])
    cos, sin = np.empty(head_size // 2, np.float32), np.empty(head_size // 2, np.float32)
    reference.rope_angles(cos, sin, pos, head_size, theta)
    reference.rope(q, k, cos, sin)
    np.testing.assert_allclose(q[0::2] + 1j * q[1::2], expected_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k[0::2] + 1j * k[1::2], expected_k, rtol=1e-5, atol=1e-5)


def test_grouped_query_attention():
    n_heads, n_kv_heads, head_size, seq_len, pos = 8, 2, 16, 32, 9
    q = randn(n_heads * head_size)
    keys, values = randn(n_kv_heads, seq_len, head_size), randn(n_kv_heads, seq_len, head_size)
    out, att = np.empty_like(q), np.zeros((n_heads, seq_len), np.float32)
    reference.attention(out, q, keys, values, pos, n_heads, att)
    for h in range(n_heads):
        kv = h // (n_heads // n_kv_heads)  # query heads share kv heads in consecutive groups
        k = keys[kv, : pos + 1].astype(np.float64)
        v = values[kv, : pos + 1].astype(np.float64)
        scores = k @ q[h * head_size : (h + 1) * head_size] / np.sqrt(head_size)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        np.testing.assert_allclose(
            out[h * head_size : (h + 1) * head_size], weights @ v, rtol=1e-5, atol=1e-6
        )


def test_fast_matvec_f32_within_float_tolerance_of_the_reference():
    w, x = randn(300, 517), randn(517)
    exact, fast_out = np.empty(300, np.float32), np.empty(300, np.float32)
    reference.matmul(exact, x, w)
    fast.matmul_f32(fast_out.reshape(1, -1), x.reshape(1, -1), w)
    np.testing.assert_allclose(fast_out, exact, rtol=1e-4, atol=1e-4)


def test_swiglu_and_add():
    a, b = randn(50), randn(50)
    expected = a / (1 + np.exp(-a.astype(np.float64))) * b
    reference.swiglu(a, b)
    np.testing.assert_allclose(a, expected, rtol=1e-6, atol=1e-7)
    y = randn(50)
    before = a.copy()
    reference.add(a, y)
    np.testing.assert_array_equal(a, before + y)


def fast_q8_product(w, x, weights_in_cache=False):
    """fast.q8_linear for inputs x (B, n): the product (B, d) and the quantized inputs it used."""
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    scratch = fast.q8_scratch(x.shape[0], x.shape[1], w.group_size)
    fast.q8_linear((out,), x, (w,), scratch, weights_in_cache)
    return out, scratch.values, scratch.scales


def runq_quantize(x, group_size):
    """runq.c's quantize in NumPy: float32 scale and quotient, C round (halves away from zero)."""
    groups = x[: len(x) // group_size * group_size].reshape(-1, group_size)
    scales = (np.abs(groups).max(axis=1) / np.float32(127)).astype(np.float32)
    quotient = (groups / scales[:, None]).astype(np.float64)  # C's round() takes a double
    return (np.sign(quotient) * np.floor(np.abs(quotient) + 0.5)).astype(np.int8).ravel(), scales


def runq_matmul(xq, xs, wq, ws, group_size):
    """runq.c's matmul in NumPy: group dot products in integers, float32 sums in group order,
    weight scales read over the matrix flattened, trailing columns of a row skipped."""
    d, n = wq.shape
    out = np.zeros(d, np.float32)
    for j in range(0, n - group_size + 1, group_size):
        ival = wq[:, j : j + group_size].astype(np.int32) @ xq[j : j + group_size].astype(np.int32)
        w_scale = ws[(np.arange(d) * n + j) // group_size]
        out = out + (ival.astype(np.float32) * w_scale) * xs[j // group_size]
    return out


QUANTIZERS = {"reference": reference.q8_quantize, "fast": fast.q8_quantize}


@pytest.mark.parametrize("path", QUANTIZERS)
@pytest.mark.parametrize("n", [64, 96])
def test_q8_quantize_like_runq(n, path):
    x = randn(n)
    x[5] = 0.0
    x[40:48] *= 1e-30  # tiny values next to large ones round to zero
    xq, xs = np.zeros(n, np.int8), np.zeros(n, np.float32)
    QUANTIZERS[path](xq, xs, x, 32)
    expected_q, expected_s = runq_quantize(x, 32)
    np.testing.assert_array_equal(xq[: len(expected_q)], expected_q)
    np.testing.assert_array_equal(xs[: len(expected_s)], expected_s)


@pytest.mark.parametrize("path", QUANTIZERS)
def test_q8_quantize_rounds_halves_away_from_zero(path):
    x = np.array([127.0, 2.5, -2.5, 0.5, -0.5, 1.5, 0, 0], np.float32)  # scale exactly 1
    xq, xs = np.zeros(8, np.int8), np.zeros(1, np.float32)
    QUANTIZERS[path](xq, xs, x, 8)
    assert xs[0] == 1.0 and xq.tolist() == [127, 3, -3, 1, -1, 2, 0, 0]


@pytest.mark.parametrize("path", QUANTIZERS)
def test_q8_quantize_rounds_just_below_a_half_down(path):
    x = np.array([127.0, 0.49999997, -0.49999997, 1.4999999], np.float32)  # scale exactly 1
    xq, xs = np.zeros(4, np.int8), np.zeros(1, np.float32)
    QUANTIZERS[path](xq, xs, x, 4)
    assert xq.tolist() == [127, 0, 0, 1]


@pytest.mark.parametrize("path", QUANTIZERS)
def test_q8_quantize_makes_a_nan_zero(path):
    x = np.array([2.0, np.nan, -1.0, 0.5], np.float32)
    xq, xs = np.zeros(4, np.int8), np.zeros(1, np.float32)
    QUANTIZERS[path](xq, xs, x, 4)
    assert xs[0] == np.float32(2.0) / np.float32(127.0) and xq.tolist() == [127, 0, -64, 32]


@pytest.mark.parametrize("path", QUANTIZERS)
def test_an_all_zero_group_quantizes_to_zeros(path):
    x, xq, xs = np.zeros(16, np.float32), np.ones(16, np.int8), np.ones(2, np.float32)
    QUANTIZERS[path](xq, xs, x, 8)
    assert not xq.any() and not xs.any()


@pytest.mark.parametrize("group_size", [64, 32, 16])
def test_q8_reference_is_runq_to_the_bit(group_size):
    w, x = quantize_q8(randn(40, 256), group_size), randn(256)
    xq, xs = np.zeros(256, np.int8), np.zeros(256 // group_size, np.float32)
    reference.q8_quantize(xq, xs, x, group_size)
    out = np.empty(40, np.float32)
    reference.q8_matmul(out, xq, xs, w.values, w.scales, group_size)
    np.testing.assert_array_equal(out, runq_matmul(xq, xs, w.values, w.scales, group_size))


@pytest.mark.parametrize("weights_in_cache", [False, True])  # rows one at a time, 16 in lanes
@pytest.mark.parametrize("inputs", [1, 3, 25, SMALL_BATCH, 3 * SMALL_BATCH + 7])  # 25: padded lanes
@pytest.mark.parametrize("group_size, columns", [(64, 256), (32, 256), (32, 288)])  # 288: 9 groups
def test_q8_fast_with_groups_of_64_and_32_is_runq_to_the_bit(
    group_size, columns, inputs, weights_in_cache
):
    """40 rows: two blocks of 16 in lanes and 8 rows left over."""
    w, x = quantize_q8(randn(40, columns), group_size), randn(inputs, columns)
    out, xq, xs = fast_q8_product(w, x, weights_in_cache)
    for b in range(inputs):
        expected_q, expected_s = runq_quantize(x[b], group_size)
        np.testing.assert_array_equal(xq[b], expected_q)
        np.testing.assert_array_equal(xs[b], expected_s)
        np.testing.assert_array_equal(
            out[b], runq_matmul(xq[b], xs[b], w.values, w.scales, group_size)
        )


def lanes_int16_pairs(out, xq, xs, w):
    pairs, lane_scales = fast._inputs_across_lanes(xq, xs)
    fast._q8_matmul_across_inputs(out, pairs, lane_scales, w.values, w.scales, w.group_size)


def lanes_uint8_quads(out, xq, xs, w):
    quads, biases, lane_scales = fast._inputs_in_quads(xq, xs)
    fast._q8_matmul_quads(out, quads, biases, lane_scales, w.values, w.scales, w.group_size)


@pytest.mark.parametrize("layout", [lanes_int16_pairs, lanes_uint8_quads])
@pytest.mark.parametrize("rows", [43, 130])  # blocks of 4 and a rest; tasks of 64 and a rest
@pytest.mark.parametrize("group_size", [64, 32])
def test_both_lane_layouts_are_runq_to_the_bit(layout, rows, group_size):
    """A CPU with AVX-512 VNNI takes quads, others pairs (q8_linear): both run on any CPU."""
    w, x = quantize_q8(randn(rows, 256), group_size), randn(21, 256)  # 21: a padded block
    quantized = [runq_quantize(x[b], group_size) for b in range(21)]
    xq, xs = np.stack([q for q, _ in quantized]), np.stack([s for _, s in quantized])
    out = np.full((21, rows), np.nan, np.float32)
    layout(out, xq, xs, w)
    for b in range(21):
        np.testing.assert_array_equal(
            out[b], runq_matmul(xq[b], xs[b], w.values, w.scales, group_size)
        )


def test_sums_float32x16_adds_sixteen_vectors_as_sum_float32x16_adds_each():
    @njit  # compiled now, uncached
    def both(x):
        def v(k):
            return simd.load_lanes(x, 16 * k)

        together = np.empty(16, np.float32)
        vectors = (v(0), v(1), v(2), v(3), v(4), v(5), v(6), v(7),
                   v(8), v(9), v(10), v(11), v(12), v(13), v(14), v(15))  # fmt: skip
        simd.store_lanes(together, 0, simd.sums_float32x16(vectors))
        one_by_one = np.array([simd.sum_float32x16(v(k)) for k in range(16)], np.float32)
        return together, one_by_one

    rng = np.random.default_rng(0)  # magnitudes from 1e-8 to 1e8, so that the order shows
    values = rng.standard_normal(256) * 10.0 ** rng.integers(-8, 9, 256)
    together, one_by_one = both(values.astype(np.float32))
    np.testing.assert_array_equal(together, one_by_one)


@pytest.mark.parametrize("vnni", [False, True])
def test_madd_quads_multiplies_unsigned_by_signed_bytes(vnni, monkeypatch):
    """The intrinsic as vpdpbusd and as generic vector code (chosen when it is compiled)."""
    if vnni and not simd.FUSED_MADD:
        pytest.skip("this CPU has no AVX-512 VNNI")
    monkeypatch.setattr(simd, "FUSED_MADD", vnni)

    @njit  # compiled now, uncached
    def madd(acc, quads, u, k):
        lanes = np.empty(16, np.int32)
        total = simd.madd_quads(simd.load_lanes(acc, 0), quads, 0, u, k)
        simd.store_lanes(lanes, 0, total)
        return lanes

    rng = np.random.default_rng(0)
    acc = rng.integers(-(2**20), 2**20, 16).astype(np.int32)
    quads = rng.integers(-128, 128, 64).astype(np.int8)
    u = rng.integers(0, 256, 10).astype(np.uint8)
    expected = acc + quads.reshape(16, 4).astype(np.int32) @ u[3:7].astype(np.int32)
    np.testing.assert_array_equal(madd(acc, quads, u, 3), expected)


@pytest.mark.parametrize("inputs", [1, SMALL_BATCH + 7])  # register blocks of 4, then leftovers
@pytest.mark.parametrize("group_size", [16, 8])
def test_q8_fast_is_runq_within_float_tolerance(group_size, inputs):
    """Other group sizes: the same quantized values multiplied in float."""
    w, x = quantize_q8(randn(42, 256), group_size), randn(inputs, 256)
    out, xq, xs = fast_q8_product(w, x)
    for b in range(inputs):
        expected = runq_matmul(xq[b], xs[b], w.values, w.scales, group_size)
        np.testing.assert_allclose(out[b], expected, rtol=1e-5, atol=1e-5)


def test_the_last_level_cache_is_the_highest_level_linux_lists(tmp_path):
    for index, level, size in [(0, 1, "48K"), (2, 2, "1024K"), (3, 3, "32M"), (4, 1, "32K")]:
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(f"{level}\n")
        (tmp_path / f"index{index}" / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 32 << 20
    assert last_level_cache_bytes(tmp_path / "absent") == 0


def test_q8_linear_quantizes_a_shared_input_once_for_every_matrix():
    w1, w2, x = quantize_q8(randn(24, 128), 64), quantize_q8(randn(40, 128), 64), randn(2, 128)
    out1, out2 = np.empty((2, 24), np.float32), np.empty((2, 40), np.float32)
    fast.q8_linear((out1, out2), x, (w1, w2), fast.q8_scratch(2, 128, 64), False)
    np.testing.assert_array_equal(out1, fast_q8_product(w1, x)[0])
    np.testing.assert_array_equal(out2, fast_q8_product(w2, x)[0])


def test_q8_matmul_reference_keeps_runq_quirk_on_partial_groups():
    w = quantize_q8(randn(16, 172), 8)  # 172 = 21 groups of 8 + 4: groups straddle rows
    x = randn(172)
    xq, xs = np.zeros(172, np.int8), np.zeros(22, np.float32)
    reference.q8_quantize(xq, xs, x, 8)
    out = np.empty(16, np.float32)
    reference.q8_matmul(out, xq, xs, w.values, w.scales, 8)
    np.testing.assert_array_equal(out, runq_matmul(xq, xs, w.values, w.scales, 8))


def test_q8_fast_computes_partial_groups_in_full():
    w = quantize_q8(randn(16, 172), 8)  # 172 = 21 groups of 8 + 4: groups straddle rows
    x = randn(1, 172)
    out, xq, xs = fast_q8_product(w, x)
    x_dequantized = xq[0] * np.repeat(xs[0], 8)[:172]
    np.testing.assert_allclose(
        out[0], w.dequantize().astype(np.float64) @ x_dequantized, rtol=1e-4, atol=1e-4
    )
    # and that is close to the float product: the quantization error only
    exact = w.dequantize().astype(np.float64) @ x[0]
    assert np.abs(out[0] - exact).max() < 0.02 * np.abs(exact).max()


def test_q8_dequantize_row_reads_scales_over_the_flattened_matrix():
    w = quantize_q8(randn(6, 20), 8)  # 120 values, 15 groups; rows start mid-group
    out = np.empty(20, np.float32)
    reference.q8_dequantize_row(out, w.values, w.scales, 3, 8)
    np.testing.assert_array_equal(out, w.dequantize()[3])


@pytest.mark.parametrize("inputs", [3, 7, SMALL_BATCH + 7])  # row pairs; register blocks
def test_matmul_f32_on_a_batch(inputs):
    w, x = randn(42, 300), randn(inputs, 300)
    out = np.empty((inputs, 42), np.float32)
    fast.matmul_f32(out, x, w)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)


def test_matmul_f32_reads_inputs_and_weights_that_are_rows_of_wider_arrays():
    wide_w, wide_x = randn(42, 320), randn(SMALL_BATCH + 7, 333)
    w, x = wide_w[:, 5:305], wide_x[:, 17:317]
    out = np.empty((len(x), 42), np.float32)
    fast.matmul_f32(out, x, w)
    contiguous = np.empty_like(out)
    fast.matmul_f32(contiguous, np.ascontiguousarray(x), np.ascontiguousarray(w))
    np.testing.assert_array_equal(out, contiguous)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("columns", [256, 300, 7, 2100])  # 16s; a tail; only a tail; passes
def test_matmul_f32_bits_do_not_depend_on_the_batch(columns):
    """Each output is one sum in one order, however rows and inputs are blocked: a prompt's rows
    get the numbers that feeding them one at a time gives."""
    w, x = randn(43, columns), randn(2 * SMALL_BATCH + 3, columns)
    together = np.empty((len(x), 43), np.float32)
    fast.matmul_f32(together, x, w)
    for size in (1, 2, 3, 4, 5, 9):
        for start in range(0, len(x) - size + 1, 7):
            part = np.empty((size, 43), np.float32)
            fast.matmul_f32(part, x[start : start + size], w)
            np.testing.assert_array_equal(part, together[start : start + size])


@pytest.mark.parametrize("head_size", [8, 16, 64, 80])  # in scalar loops; SIMD vectors: 1, 4, 4 + 1
def test_fast_attention_agrees_with_the_reference(head_size):
    n_heads, seq_len = 4, 40
    keys, values = randn(2, seq_len, head_size), randn(2, seq_len, head_size)  # 2 kv heads
    q = randn(n_heads * head_size)
    att = np.zeros((n_heads, seq_len), np.float32)
    for pos in (0, 14, 15, 16, 33):  # keys: a few; whole blocks of 16; blocks and the rest
        expected, out = np.empty_like(q), np.empty_like(q)
        reference.attention(expected, q, keys, values, pos, n_heads, att)
        fast.attention(out, q, keys, values, pos, n_heads, att)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("positions", [np.arange(99, 200), np.array([0, 15, 16, 17, 39])])
def test_a_row_of_a_batch_attends_as_one_token_decoding_alone(positions):
    """The engine's batches and the run loop's decode steps give a sequence the same bits: a
    prompt's rows (taken in blocks that share chunks of 128 keys and values) as rows alone."""
    n_heads, n_kv_heads, head_size, seq_len = 4, 2, 64, 200
    key_cache = randn(1, 1, n_kv_heads, seq_len, head_size)
    value_cache = randn(1, 1, n_kv_heads, seq_len, head_size)
    q = randn(len(positions), n_heads * head_size)
    batched = np.empty_like(q)
    slots = np.zeros(len(positions), np.int64)
    fast.attention_rows(batched, q, key_cache, value_cache, 0, slots, positions, n_heads)
    att = np.zeros((n_heads, seq_len), np.float32)
    for b, pos in enumerate(positions):
        alone = np.empty(q.shape[1], np.float32)
        fast.attention(alone, q[b], key_cache[0, 0], value_cache[0, 0], pos, n_heads, att)
        np.testing.assert_array_equal(batched[b], alone)


def test_batched_attention_agrees_with_the_reference():
    """Eight rows of two sequences (slots) at different positions, grouped-query heads."""
    n_heads, n_kv_heads, head_size, seq_len = 4, 2, 16, 20
    key_cache = randn(2, 1, n_kv_heads, seq_len, head_size)  # (slots, layers, kv heads, ...)
    value_cache = randn(2, 1, n_kv_heads, seq_len, head_size)
    slots = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    positions = np.array([0, 1, 2, 3, 10, 11, 12, 19])
    q = randn(8, n_heads * head_size)
    out = np.empty_like(q)
    fast.attention_rows(out, q, key_cache, value_cache, 0, slots, positions, n_heads)
    for b in range(8):
        expected, att = np.empty(q.shape[1], np.float32), np.zeros((n_heads, seq_len), np.float32)
        reference.attention(expected, q[b], key_cache[slots[b], 0], value_cache[slots[b], 0],
                            positions[b], n_heads, att)  # fmt: skip
        np.testing.assert_allclose(out[b], expected, rtol=1e-5, atol=1e-6)


def test_swiglu_rows_agrees_with_the_reference():
    gate, up = randn(5, 300) * 4, randn(5, 300)
    expected = gate.copy()
    reference.swiglu(expected.reshape(-1), up.reshape(-1))
    fast.swiglu_rows(gate, up)
    np.testing.assert_allclose(gate, expected, rtol=1e-6, atol=1e-7)


def test_vectorizable_exp_is_within_two_ulp():
    @njit
    def exps(x):
        return np.array([fast.exp_f32(v) for v in x], np.float32)

    x = np.linspace(-87, 88, 100_001).astype(np.float32)
    expected = np.exp(x.astype(np.float64))
    assert np.max(np.abs(exps(x) - expected) / expected) < 2 * 2.0**-24


def gguf_product(kind: str, w: np.ndarray):
    """(product(out, x), w as the kernel sees it) for a GGUF weight type, via gguf-py's encoding."""
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    encoded = gguf.quants.quantize(w, qtype)
    values = gguf.quants.dequantize(encoded, qtype).reshape(w.shape)
    if kind == "q4_0":
        return (lambda out, x: ggml.q4_matmul(out, x, encoded)), values
    if kind == "q8_0":
        return (lambda out, x: q8_0_product(Q8_0Tensor(encoded), x, out)), values
    bits = encoded.view(np.uint16)
    return (lambda out, x: ggml.half_matmul(out, x, bits, kind == "bf16")), values


@pytest.mark.parametrize("inputs", [1, SMALL_BATCH + 5])  # row by row; rows decoded once
@pytest.mark.parametrize("kind", ["f16", "bf16", "q4_0"])
def test_gguf_type_products_against_gguf_py(kind, inputs):
    product, values = gguf_product(kind, randn(40, 256))
    x, out = randn(inputs, 256), np.empty((inputs, 40), np.float32)
    product(out, x)
    expected = x.astype(np.float64) @ values.astype(np.float64).T
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def products_by_kind():
    w = randn(41, 256)  # an odd number of rows: kernels that take rows in pairs end on one alone
    q8 = {f"q8 groups of {g}": quantize_q8(w, g) for g in (64, 32, 16)}
    kinds = {"f32": lambda out, x: fast.matmul_f32(out, x, w)}
    for name, wq in q8.items():
        kinds[name] = lambda out, x, wq=wq: fast.q8_linear(
            (out,), x, (wq,), fast.q8_scratch(x.shape[0], 256, wq.group_size), False
        )
    for kind in ("f16", "bf16", "q4_0", "q8_0"):
        kinds[kind] = gguf_product(kind, w)[0]
    return kinds


@pytest.mark.parametrize("batch", [SMALL_BATCH, 20])  # Q8: 16 inputs in SIMD lanes, 4 not
@pytest.mark.parametrize("kind", list(products_by_kind()))
def test_small_batches_compute_each_row_as_it_is_computed_alone(kind, batch):
    """What the server relies on: a sequence's numbers do not depend on its batch."""
    product = products_by_kind()[kind]
    x = randn(batch, 256)
    together = np.empty((batch, 41), np.float32)
    product(together, x)
    for b in (0, 1, 5, 17, batch - 1):
        alone = np.empty((1, 41), np.float32)
        product(alone, x[b : b + 1])
        np.testing.assert_array_equal(alone[0], together[b])


def finite_halves():
    """Every fp16 bit pattern but infinities and NaNs (which weights do not hold), as uint16."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    return bits[np.isfinite(bits.view(np.float16))]


def test_fp16_decoders_agree_with_numpy_on_every_finite_half():
    @njit
    def decode_all(bits, decoder):
        return np.array([decoder(h) for h in bits], np.float32)

    @njit
    def block_scales(row):
        return np.array([ggml.block_scale(row, start) for start in range(0, len(row), 2)])

    bits = finite_halves()
    expected = bits.view(np.float16).astype(np.float32)
    fast_ones = decode_all(bits, ggml.f16_to_f32)
    reference_ones = decode_all(bits.astype(np.int32), reference.half_to_float)
    from_bytes = block_scales(bits.astype("<u2").view(np.uint8))
    for decoded in (fast_ones, reference_ones, from_bytes):
        np.testing.assert_array_equal(decoded.view(np.uint32), expected.view(np.uint32))  # -0 too


def q8_0_blocks(values, scales):
    """GGUF Q8_0 rows (d, n / 32 * 34), built by hand: per block the fp16 scale's two bytes
    (little-endian), then the 32 int8 values."""
    d, n = values.shape
    blocks = np.empty((d, n // 32, 34), np.uint8)
    blocks[:, :, :2] = scales.astype("<f2").reshape(d, n // 32, 1).view(np.uint8)
    blocks[:, :, 2:] = values.reshape(d, n // 32, 32).view(np.uint8)
    return blocks.reshape(d, -1)


def random_q8_0(d, n):
    """(Q8_0Tensor, the same values as a Q8Tensor of group size 32): int8 values over their
    whole range (-128 too, which gguf's quantizer never writes) and fp16 scales of all sizes,
    subnormal ones included."""
    values = rng.integers(-128, 128, (d, n), dtype=np.int8)
    scales = rng.uniform(0.5, 2, (d, n // 32)) * 2.0 ** rng.integers(-24, 2, (d, n // 32))
    scales = (scales * rng.choice([-1, 1], scales.shape)).astype(np.float16)
    regrouped = Q8Tensor(values, scales.astype(np.float32).ravel(), 32)
    return Q8_0Tensor(q8_0_blocks(values, scales)), regrouped


def q8_0_product(w, x, out=None, weights_in_cache=False):
    """ggml.q8_0_linear for inputs x (B, n): the product (B, d) and the quantized inputs it used."""
    out = np.empty((x.shape[0], w.shape[0]), np.float32) if out is None else out
    scratch = ggml.q8_0_scratch(x.shape[0], x.shape[1])
    ggml.q8_0_linear((out,), x, (w,), scratch, weights_in_cache)
    return out, scratch.values, scratch.scales


def test_q8_0_tensor_reads_its_blocks():
    w, regrouped = random_q8_0(6, 96)
    assert w.shape == (6, 96)
    np.testing.assert_array_equal(w.dequantize(), regrouped.dequantize())
    np.testing.assert_array_equal(
        w.dequantize(), gguf.quants.dequantize(w.blocks, gguf.GGMLQuantizationType.Q8_0)
    )


@pytest.mark.parametrize("weights_in_cache", [False, True])  # rows one at a time, 16 in lanes
@pytest.mark.parametrize("inputs", [1, 3, SMALL_BATCH, 3 * SMALL_BATCH + 7])  # decode to prompts
@pytest.mark.parametrize("columns", [256, 288])  # 288: 9 blocks
def test_q8_0_products_are_runq_to_the_bit(columns, inputs, weights_in_cache):
    """40 rows: two blocks of 16 in lanes and 8 rows left over."""
    w, regrouped = random_q8_0(40, columns)
    x = randn(inputs, columns)
    out, xq, xs = q8_0_product(w, x, weights_in_cache=weights_in_cache)
    for b in range(inputs):
        expected_q, expected_s = runq_quantize(x[b], 32)
        np.testing.assert_array_equal(xq[b], expected_q)
        np.testing.assert_array_equal(xs[b], expected_s)
        expected = runq_matmul(xq[b], xs[b], regrouped.values, regrouped.scales, 32)
        np.testing.assert_array_equal(out[b], expected)


@pytest.mark.parametrize("inputs", [1, 3, SMALL_BATCH, SMALL_BATCH + 7])
@pytest.mark.parametrize("rows, columns", [(40, 256), (42, 288)])  # 42: 4-row blocks and a rest
def test_q8_0_products_equal_q8_products_of_the_same_values(rows, columns, inputs):
    """What keeps a Q8_0 GGUF's tokens as they were when its blocks were regrouped at load."""
    w, regrouped = random_q8_0(rows, columns)
    x = randn(inputs, columns)
    np.testing.assert_array_equal(q8_0_product(w, x)[0], fast_q8_product(regrouped, x)[0])


def test_q8_0_reference_is_runq_to_the_bit():
    w, regrouped = random_q8_0(40, 288)
    x = randn(288)
    xq, xs = np.zeros(288, np.int8), np.zeros(9, np.float32)
    reference.q8_quantize(xq, xs, x, 32)
    out = np.empty(40, np.float32)
    reference.q8_0_matmul(out, xq, xs, w.blocks)
    np.testing.assert_array_equal(out, runq_matmul(xq, xs, regrouped.values, regrouped.scales, 32))


def test_q8_0_embedding_rows_are_the_dequantized_rows():
    w, regrouped = random_q8_0(10, 96)
    tokens = np.array([3, 0, 9, 3])
    out = np.empty((4, 96), np.float32)
    ggml.q8_0_embed_rows(out, w.blocks, tokens)
    np.testing.assert_array_equal(out, regrouped.dequantize()[tokens])
