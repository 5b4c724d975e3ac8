"""Kernels against NumPy: float64 formulas for the fp32 steps, runq.c's integer arithmetic for the
int8 family. (Each weight type's own products: test_weight_types.)"""

import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from conftest import kv_cache_of, randn, runq_matmul, runq_quantize
from llamette.kernels import (
    SMALL_BATCH,
    attention,
    elementwise,
    gemm,
    halves,
    int8,
    last_level_cache_bytes,
    reference,
    simd,
)
from llamette.weight_types import quantize_q8


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
    reference.rope_angles(cos, sin, pos, head_size, theta, np.ones(head_size // 2, np.float32))
    reference.rope(q, k, cos, sin)
    np.testing.assert_allclose(q[0::2] + 1j * q[1::2], expected_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k[0::2] + 1j * k[1::2], expected_k, rtol=1e-5, atol=1e-5)


def test_rope_scaling_divides_each_frequencys_angle():
    head_size, pos, theta = 16, 300, 500000.0
    divisors = np.linspace(1, 8, head_size // 2).astype(np.float32)
    cos, sin = np.empty(head_size // 2, np.float32), np.empty(head_size // 2, np.float32)
    reference.rope_angles(cos, sin, pos, head_size, theta, divisors)
    angle = pos * theta ** (-np.arange(0, head_size, 2) / head_size) / divisors
    np.testing.assert_allclose(cos + 1j * sin, np.exp(1j * angle), rtol=0, atol=1e-5)


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
    gemm.matmul_f32(fast_out.reshape(1, -1), x.reshape(1, -1), w)
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


QUANTIZERS = {"reference": reference.q8_quantize, "fast": int8.q8_quantize}


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


def in_lanes(per_input, per_lane):
    """per_input (B, k) in the lane kernels' layout, 16 inputs a block: runs of per_lane values
    of each input side by side (int8.quantized makes it, in one layout, for this CPU)."""
    blocks = -(-len(per_input) // 16)
    lanes = np.full((blocks, per_input.shape[1] * 16), 99, per_input.dtype)  # padding: not zeros
    for b, values in enumerate(per_input):
        runs = values.reshape(-1, per_lane)
        lanes[b // 16].reshape(-1, 16, per_lane)[:, b % 16] = runs
    return lanes


def lanes_int16_pairs(out, xq, xs, w):
    no_minimums = in_lanes(np.zeros((len(xq), xq.shape[1] // 16), np.float32), 1)
    pairs = in_lanes(xq.astype(np.int16), 2)
    int8._matmul_across_inputs(out, pairs, in_lanes(xs, 1), no_minimums, w)


def lanes_uint8_quads(out, xq, xs, w):
    no_minimums = in_lanes(np.zeros((len(xq), xq.shape[1] // 16), np.float32), 1)
    quads = in_lanes((xq.astype(np.int16) + 128).astype(np.uint8), 4)
    int8._matmul_quads(out, quads, in_lanes(xs, 1), no_minimums, w)


@pytest.mark.parametrize("layout", [lanes_int16_pairs, lanes_uint8_quads])
@pytest.mark.parametrize("rows", [43, 130])  # blocks of 4 and a rest; tasks of 64 and a rest
@pytest.mark.parametrize("group_size", [64, 32])
def test_both_lane_layouts_are_runq_to_the_bit(layout, rows, group_size):
    """A CPU with AVX-512 VNNI takes quads, others pairs (int8.product): both run on any CPU."""
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
    def madd(acc, quads, w, k):
        lanes = np.empty(16, np.int32)
        total = simd.madd_quads(simd.load_lanes(acc, 0), quads, 0, w, k)
        simd.store_lanes(lanes, 0, total)
        return lanes

    rng = np.random.default_rng(0)
    acc = rng.integers(-(2**20), 2**20, 16).astype(np.int32)
    quads = rng.integers(0, 256, 64).astype(np.uint8)  # each lane's four
    w = rng.integers(-128, 128, 10).astype(np.int8)  # four of them, the same for every lane
    expected = acc + quads.reshape(16, 4).astype(np.int32) @ w[3:7].astype(np.int32)
    np.testing.assert_array_equal(madd(acc, quads, w, 3), expected)


def test_the_small_vector_helpers_are_numpy_s_arithmetic():
    @njit  # compiled now, uncached
    def helpers(bytes_in, out8, out16):
        simd.copy_32(out8, 0, bytes_in, 5)
        simd.nibbles_64(out16, 0, bytes_in.view(np.uint8), 1)
        return simd.sum_16(bytes_in, 7)

    rng = np.random.default_rng(0)
    bytes_in = rng.integers(-128, 128, 40).astype(np.int8)
    out8, out16 = np.zeros(32, np.int8), np.zeros(64, np.int16)
    total = helpers(bytes_in, out8, out16)
    packed = bytes_in.view(np.uint8)[1:33]
    np.testing.assert_array_equal(out8, bytes_in[5:37])
    np.testing.assert_array_equal(out16, np.concatenate([packed & 15, packed >> 4]))
    assert total == bytes_in[7:23].astype(np.int32).sum()


def test_the_last_level_cache_is_the_highest_level_linux_lists(tmp_path):
    for index, level, size in [(0, 1, "48K"), (2, 2, "1024K"), (3, 3, "32M"), (4, 1, "32K")]:
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(f"{level}\n")
        (tmp_path / f"index{index}" / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 32 << 20
    assert last_level_cache_bytes(tmp_path / "absent") == 0


@pytest.mark.parametrize("inputs", [3, 7, SMALL_BATCH + 7])  # row pairs; register blocks
def test_matmul_f32_on_a_batch(inputs):
    w, x = randn(42, 300), randn(inputs, 300)
    out = np.empty((inputs, 42), np.float32)
    gemm.matmul_f32(out, x, w)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)


def test_matmul_f32_reads_inputs_and_weights_that_are_rows_of_wider_arrays():
    wide_w, wide_x = randn(42, 320), randn(SMALL_BATCH + 7, 333)
    w, x = wide_w[:, 5:305], wide_x[:, 17:317]
    out = np.empty((len(x), 42), np.float32)
    gemm.matmul_f32(out, x, w)
    contiguous = np.empty_like(out)
    gemm.matmul_f32(contiguous, np.ascontiguousarray(x), np.ascontiguousarray(w))
    np.testing.assert_array_equal(out, contiguous)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("columns", [256, 300, 7, 2100])  # 16s; a tail; only a tail; passes
def test_matmul_f32_bits_do_not_depend_on_the_batch(columns):
    """Each output is one sum in one order, however rows and inputs are blocked: a prompt's rows
    get the numbers that feeding them one at a time gives."""
    w, x = randn(43, columns), randn(2 * SMALL_BATCH + 3, columns)
    together = np.empty((len(x), 43), np.float32)
    gemm.matmul_f32(together, x, w)
    for size in (1, 2, 3, 4, 5, 9):
        for start in range(0, len(x) - size + 1, 7):
            part = np.empty((size, 43), np.float32)
            gemm.matmul_f32(part, x[start : start + size], w)
            np.testing.assert_array_equal(part, together[start : start + size])


@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("head_size", [8, 16, 64, 80])  # in scalar loops; SIMD vectors: 1, 4, 4 + 1
def test_fast_attention_agrees_with_the_reference(head_size, kv_type):
    """Over each KV-cache type, the reference's attention over the values it holds."""
    if kv_type == "q8_0" and head_size % 32:
        pytest.skip("Q8_0 caches hold whole blocks of 32")
    n_heads, seq_len = 4, 40
    kv, keys, values = kv_cache_of(randn(1, 1, 2, seq_len, head_size),
                                   randn(1, 1, 2, seq_len, head_size), kv_type)  # fmt: skip
    q = randn(1, n_heads * head_size)  # one token, decoding
    att = np.zeros((n_heads, seq_len), np.float32)
    for pos in (0, 14, 15, 16, 33):  # keys: a few; whole blocks of 16; blocks and the rest
        expected, out = np.empty_like(q[0]), np.empty_like(q)
        reference.attention(expected, q[0], keys[0, 0], values[0, 0], pos, n_heads, att)
        attention.attention_rows(out, q, kv, 0, np.zeros(1, np.int64), np.array([pos]), n_heads)
        np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("positions", [np.arange(99, 200), np.array([0, 15, 16, 17, 39])])
def test_a_row_of_a_batch_attends_as_one_token_decoding_alone(positions, kv_type):
    """The engine's batches and the run loop's decode steps give a sequence the same bits: a
    prompt's rows (taken in blocks that share chunks of 128 keys and values) as rows alone."""
    n_heads, n_kv_heads, head_size, seq_len = 4, 2, 64, 200
    kv, _, _ = kv_cache_of(randn(1, 1, n_kv_heads, seq_len, head_size),
                           randn(1, 1, n_kv_heads, seq_len, head_size), kv_type)  # fmt: skip
    q = randn(len(positions), n_heads * head_size)
    batched = np.empty_like(q)
    slots = np.zeros(len(positions), np.int64)
    attention.attention_rows(batched, q, kv, 0, slots, positions, n_heads)
    for b, pos in enumerate(positions):
        alone = np.empty((1, q.shape[1]), np.float32)
        attention.attention_rows(alone, q[b : b + 1], kv, 0, slots[:1], np.array([pos]), n_heads)
        np.testing.assert_array_equal(batched[b], alone[0])


@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
def test_batched_attention_agrees_with_the_reference(kv_type):
    """Eight rows of two sequences (slots) at different positions, grouped-query heads."""
    n_heads, n_kv_heads, head_size, seq_len = 4, 2, 32, 20
    kv, keys, values = kv_cache_of(randn(2, 1, n_kv_heads, seq_len, head_size),
                                   randn(2, 1, n_kv_heads, seq_len, head_size), kv_type)  # fmt: skip
    slots = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    positions = np.array([0, 1, 2, 3, 10, 11, 12, 19])
    q = randn(8, n_heads * head_size)
    out = np.empty_like(q)
    attention.attention_rows(out, q, kv, 0, slots, positions, n_heads)
    for b in range(8):
        expected, att = np.empty(q.shape[1], np.float32), np.zeros((n_heads, seq_len), np.float32)
        reference.attention(expected, q[b], keys[slots[b], 0], values[slots[b], 0],
                            positions[b], n_heads, att)  # fmt: skip
        np.testing.assert_allclose(out[b], expected, rtol=1e-5, atol=1e-6)


def test_swiglu_rows_agrees_with_the_reference():
    gate, up = randn(5, 300) * 4, randn(5, 300)
    expected = gate.copy()
    reference.swiglu(expected.reshape(-1), up.reshape(-1))
    elementwise.swiglu_rows(gate, up)
    np.testing.assert_allclose(gate, expected, rtol=1e-6, atol=1e-7)


def test_vectorizable_exp_is_within_two_ulp():
    @njit
    def exps(x):
        return np.array([elementwise.exp_f32(v) for v in x], np.float32)

    x = np.linspace(-87, 88, 100_001).astype(np.float32)
    expected = np.exp(x.astype(np.float64))
    assert np.max(np.abs(exps(x) - expected) / expected) < 2 * 2.0**-24


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
        return np.array([halves.block_scale(row, start) for start in range(0, len(row), 2)])

    bits = finite_halves()
    expected = bits.view(np.float16).astype(np.float32)
    fast_ones = decode_all(bits, halves.f16_to_f32)
    reference_ones = decode_all(bits.astype(np.int32), reference.half_to_float)
    from_bytes = block_scales(bits.astype("<u2").view(np.uint8))
    for decoded in (fast_ones, reference_ones, from_bytes):
        np.testing.assert_array_equal(decoded.view(np.uint32), expected.view(np.uint32))  # -0 too


def test_loading_kernels_leaves_scipy_s_linear_algebra_unimported():
    # Numba's NumPy support checks for BLAS by importing scipy.linalg (0.15 s of a start); no
    # kernel calls BLAS, so llamette loads that support without it, and the answer stays true
    pytest.importorskip("scipy")
    program = (
        "import sys, numpy as np; from llamette.kernels import elementwise;"
        "from numba.np import arraymath;"
        "x = np.ones((2, 8), np.float32); elementwise.add_rows(x, x);"
        "print('scipy.linalg' in sys.modules, arraymath._HAVE_BLAS)"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.stdout.split() == ["False", "True"], done.stderr
