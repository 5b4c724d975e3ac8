"""Each weight type against its references: gguf-py's dequantize (the GGUF types), runq.c's
arithmetic in NumPy (llama2.c's Q8 and GGUF's Q8_0) and float64 products of the dequantized
values; and what the server relies on, a row of a batch computed as it is alone."""

import gguf
import numpy as np
import pytest
from numba import njit

from conftest import randn, rounded_to_8_bits, runq_matmul, runq_quantize
from llamette.kernels import SMALL_BATCH, flavour, int8, reference
from llamette.kernels.int8 import Int8Inputs, new_input
from llamette.kernels.layers import embed
from llamette.weight_types import (
    BY_GGUF_TYPE,
    TYPES,
    Q8_0Tensor,
    Q8Tensor,
    call_product,
    quantize_q8,
    to_float32,
    weight_type,
)

GGUF_KINDS = [kind.NAME for kind in BY_GGUF_TYPE.values() if kind.NAME != "f32"]


# where each type that gguf-py does not quantize keeps its fp16 fields, by byte offset in a block
HALVES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
          "IQ4_NL": (0,), "IQ4_XS": (0,)}  # fmt: skip


def encoded(kind: str, w: np.ndarray) -> np.ndarray:
    """w's blocks in a GGUF type, by gguf-py's quantizer; for the K-quants and IQ4 types, which it
    does not quantize, random blocks of w's shape instead (any bytes are valid values), their fp16
    scales drawn from w's scale."""
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    if kind.upper() not in HALVES:
        return gguf.quants.quantize(w, qtype)
    rng = np.random.default_rng(w.size)
    blocks = rng.integers(0, 256, gguf.quants.quant_shape_to_byte_shape(w.shape, qtype), np.uint8)
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    per_block = blocks.reshape(-1, block_bytes)
    for offset in HALVES[kind.upper()]:
        scales = (rng.uniform(0.2, 1.0, len(per_block)) * np.abs(w).max() / 64).astype(np.float16)
        per_block[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks


def gguf_tensor(kind: str, w: np.ndarray):
    """w in a GGUF type (see encoded), as llamette holds it (a view of the bytes)."""
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    return BY_GGUF_TYPE[int(qtype)].from_gguf(encoded(kind, w), w.shape)


def tensors(w: np.ndarray) -> dict:
    """w in every weight type: f32, llama2.c's Q8 in three group sizes, each GGUF type."""
    made = {"f32": w} | {f"q8 groups of {g}": quantize_q8(w, g) for g in (64, 32, 16)}
    return made | {kind: gguf_tensor(kind, w) for kind in GGUF_KINDS}


KINDS = list(tensors(randn(4, 256)))


def product(w, x, exact=False, weights_in_cache=False, inputs=None):
    """x (B, n) @ w^T through the weight type's own product, exact given as the forward pass
    gives it; and the Int8Inputs it used."""
    out = np.full((x.shape[0], w.shape[0]), np.nan, np.float32)
    if inputs is None:
        inputs = Int8Inputs.sized(x.shape[0], x.shape[1], 8, weights_in_cache)
        new_input(inputs)
    call_product(out, x, w, inputs, flavour(exact))
    return out, inputs


def quantized_inputs(inputs, x, group_size):
    """The int8 values and scales (B, n), (B, groups) that a product quantized x into."""
    n_inputs, n = x.shape
    groups = -(-n // group_size)
    return (inputs.values[: n_inputs * n].reshape(n_inputs, n),
            inputs.scales[: n_inputs * groups].reshape(n_inputs, groups))  # fmt: skip


def test_the_table_holds_one_module_per_type():
    names = [kind.NAME for kind in TYPES]
    assert len(set(names)) == len(names) and {"f32", "q4_1", "q8_0"} <= set(names)
    for kind in TYPES:
        assert callable(kind.product) and callable(kind.decode_row)


@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_dequantize_is_gguf_py_to_the_bit(kind):
    w = randn(6, 512)
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    blocks = encoded(kind, w)
    expected = gguf.quants.dequantize(blocks, qtype).reshape(w.shape)
    ours = BY_GGUF_TYPE[int(qtype)].from_gguf(blocks, w.shape)
    assert ours.shape == w.shape
    np.testing.assert_array_equal(ours.dequantize().view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("kind", KINDS)
def test_each_row_decodes_to_its_dequantized_values(kind):
    """The embedding lookup (decode_row) is the NumPy reference's row, bit for bit."""
    w = tensors(randn(10, 512))[kind]
    tokens = np.array([3, 0, 9, 3])
    out = np.empty((4, 512), np.float32)
    embed(out, w, tokens)
    expected = to_float32(w)[tokens]
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("inputs", [1, SMALL_BATCH + 5])  # row by row; rows decoded once
@pytest.mark.parametrize("kind", KINDS)
def test_products_are_the_float64_products_of_the_values(kind, inputs):
    """The int8 family (Q8, Q8_0, Q4_0, Q4_1) quantizes its input too (runq.c's error: about
    1%; its bits: below)."""
    w = tensors(randn(40, 256))[kind]
    x = randn(inputs, 256)
    expected = x.astype(np.float64) @ to_float32(w).astype(np.float64).T
    tolerance = 2e-2 if hasattr(weight_type(w), "input_group_size") else 1e-5
    out, _ = product(w, x)
    assert np.abs(out - expected).max() < tolerance * np.abs(expected).max()


@pytest.mark.parametrize("inputs", [1, 3, 16, SMALL_BATCH + 5, 40])
@pytest.mark.parametrize("kind", [k for k in GGUF_KINDS if k not in ("f16", "bf16")])
def test_gguf_int8_products_round_their_input_as_llama_cpp_does(kind, inputs):
    """Products of the quantized GGUF types: the input rounded to 8 bits in groups of 32 (the row
    dot products of Q4_K, Q5_K and Q6_K: of 256, Q8_K's groups in llama.cpp), times the weights'
    values; float32 sums aside, no other error. Above SMALL_BATCH, inputs go 16 in lanes (groups
    of 32) and a last few, fewer than 8, by row dot products."""
    w = gguf_tensor(kind, randn(40, 512))
    x = randn(inputs, 512)
    in_lanes = int8.inputs_in_lanes(inputs) if inputs > SMALL_BATCH else 0
    row_group = getattr(weight_type(w), "ROW_GROUP", 32)
    rounded = np.concatenate(
        [rounded_to_8_bits(x[:in_lanes]), rounded_to_8_bits(x[in_lanes:], row_group)]
    )
    expected = rounded @ to_float32(w).astype(np.float64).T
    out, _ = product(w, x)
    assert np.abs(out - expected).max() < 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("batch", [SMALL_BATCH, 20])  # int8: 16 inputs in SIMD lanes, 4 not
@pytest.mark.parametrize("kind", KINDS)
def test_small_batches_compute_each_row_as_it_is_computed_alone(kind, batch):
    """What the server relies on: a sequence's numbers do not depend on its batch."""
    w = tensors(randn(41, 256))[kind]  # 41 rows: kernels that take rows in pairs end on one alone
    x = randn(batch, 256)
    together, _ = product(w, x)
    for b in (0, 1, 5, 17, batch - 1):
        np.testing.assert_array_equal(product(w, x[b : b + 1])[0][0], together[b])


@pytest.mark.parametrize("kind", KINDS)
def test_exact_batches_compute_each_row_as_it_is_computed_alone(kind):
    """With exact, any batch (a long prompt's too) gives each row the bits it gets alone."""
    w = tensors(randn(41, 256))[kind]
    x = randn(2 * SMALL_BATCH + 3, 256)
    together, _ = product(w, x, exact=True)
    for b in range(0, len(x), 5):
        np.testing.assert_array_equal(product(w, x[b : b + 1], exact=True)[0][0], together[b])


# llama2.c's Q8 (runq.c) and GGUF's Q8_0: runq.c's arithmetic, to the bit


@pytest.mark.parametrize("weights_in_cache", [False, True])  # rows one at a time, 16 in lanes
@pytest.mark.parametrize("inputs", [1, 3, 25, SMALL_BATCH, 3 * SMALL_BATCH + 7])  # 25: padded lanes
@pytest.mark.parametrize("group_size, columns", [(64, 256), (32, 256), (32, 288)])  # 288: 9 groups
def test_q8_with_groups_of_64_and_32_is_runq_to_the_bit(
    group_size, columns, inputs, weights_in_cache
):
    """40 rows: two blocks of 16 in lanes and 8 rows left over."""
    w, x = quantize_q8(randn(40, columns), group_size), randn(inputs, columns)
    out, used = product(w, x, weights_in_cache=weights_in_cache)
    xq, xs = quantized_inputs(used, x, group_size)
    for b in range(inputs):
        expected_q, expected_s = runq_quantize(x[b], group_size)
        np.testing.assert_array_equal(xq[b], expected_q)
        np.testing.assert_array_equal(xs[b], expected_s)
        np.testing.assert_array_equal(
            out[b], runq_matmul(xq[b], xs[b], w.values, w.scales, group_size)
        )


@pytest.mark.parametrize("inputs", [1, SMALL_BATCH + 7])  # register blocks of 4, then leftovers
@pytest.mark.parametrize("group_size", [16, 8])
def test_q8_in_other_groups_is_runq_within_float_tolerance(group_size, inputs):
    """Other group sizes: the same quantized values multiplied in float."""
    w, x = quantize_q8(randn(42, 256), group_size), randn(inputs, 256)
    out, used = product(w, x)
    xq, xs = quantized_inputs(used, x, group_size)
    for b in range(inputs):
        expected = runq_matmul(xq[b], xs[b], w.values, w.scales, group_size)
        np.testing.assert_allclose(out[b], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size", [64, 32, 16])
def test_q8_reference_is_runq_to_the_bit(group_size):
    w, x = quantize_q8(randn(40, 256), group_size), randn(256)
    xq, xs = np.zeros(256, np.int8), np.zeros(256 // group_size, np.float32)
    reference.q8_quantize(xq, xs, x, group_size)
    out = np.empty(40, np.float32)
    reference.q8_matmul(out, xq, xs, w.values, w.scales, group_size)
    np.testing.assert_array_equal(out, runq_matmul(xq, xs, w.values, w.scales, group_size))


@pytest.mark.parametrize("group_size", [64, 8])
def test_q8_exact_is_runq_row_by_row(group_size):
    w, x = quantize_q8(randn(16, 172), group_size), randn(3, 172)  # groups straddle rows
    out, _ = product(w, x, exact=True)
    for b in range(3):
        xq, xs = np.zeros(172, np.int8), np.zeros(172 // group_size, np.float32)
        reference.q8_quantize(xq, xs, x[b], group_size)
        np.testing.assert_array_equal(out[b], runq_matmul(xq, xs, w.values, w.scales, group_size))


def test_products_that_share_an_input_compute_what_they_compute_alone():
    """q, k and v (or w1 and w3) take one input, quantized once for the int8 family; the next
    input (after new_input) is quantized anew."""
    w1, w2 = quantize_q8(randn(24, 128), 64), random_q8_0(40, 128)[0]
    x, y = randn(2, 128), randn(2, 128)
    out1, shared = product(w1, x)
    out2, _ = product(w2, x, inputs=shared)
    np.testing.assert_array_equal(out1, product(w1, x)[0])
    np.testing.assert_array_equal(out2, product(w2, x)[0])
    new_input(shared)
    np.testing.assert_array_equal(product(w2, y, inputs=shared)[0], product(w2, y)[0])


def test_products_that_share_an_input_after_re_quantized_last_rows():
    """Above SMALL_BATCH, Q4_K takes 32 inputs in lanes (groups of 32) and its last 5 by row dot
    products (groups of 256: the input quantized again); the next products sharing the input
    (Q4_K by row dot products only, exact; Q3_K) still compute what they compute alone."""
    w1, w2 = gguf_tensor("q4_k", randn(24, 512)), gguf_tensor("q3_k", randn(40, 512))
    x = randn(SMALL_BATCH + 5, 512)
    out1, shared = product(w1, x)
    out2, _ = product(w1, x, exact=True, inputs=shared)
    out3, _ = product(w2, x, inputs=shared)
    np.testing.assert_array_equal(out1, product(w1, x)[0])
    np.testing.assert_array_equal(out2, product(w1, x, exact=True)[0])
    np.testing.assert_array_equal(out3, product(w2, x)[0])


def test_q8_reference_keeps_runq_quirk_on_partial_groups():
    w = quantize_q8(randn(16, 172), 8)  # 172 = 21 groups of 8 + 4: groups straddle rows
    x = randn(172)
    xq, xs = np.zeros(172, np.int8), np.zeros(22, np.float32)
    reference.q8_quantize(xq, xs, x, 8)
    out = np.empty(16, np.float32)
    reference.q8_matmul(out, xq, xs, w.values, w.scales, 8)
    np.testing.assert_array_equal(out, runq_matmul(xq, xs, w.values, w.scales, 8))


def test_q8_computes_partial_groups_in_full():
    w = quantize_q8(randn(16, 172), 8)  # 172 = 21 groups of 8 + 4: groups straddle rows
    x = randn(1, 172)
    out, used = product(w, x)
    xq, xs = quantized_inputs(used, x, 8)
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


_rng = np.random.default_rng(1)


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
    values = _rng.integers(-128, 128, (d, n), dtype=np.int8)
    scales = _rng.uniform(0.5, 2, (d, n // 32)) * 2.0 ** _rng.integers(-24, 2, (d, n // 32))
    scales = (scales * _rng.choice([-1, 1], scales.shape)).astype(np.float16)
    regrouped = Q8Tensor.of(values, scales.astype(np.float32).ravel(), 32)
    return Q8_0Tensor(q8_0_blocks(values, scales)), regrouped


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
    out, used = product(w, x, weights_in_cache=weights_in_cache)
    xq, xs = quantized_inputs(used, x, 32)
    for b in range(inputs):
        expected_q, expected_s = runq_quantize(x[b], 32)
        np.testing.assert_array_equal(xq[b], expected_q)
        np.testing.assert_array_equal(xs[b], expected_s)
        expected = runq_matmul(xq[b], xs[b], regrouped.values, regrouped.scales, 32)
        np.testing.assert_array_equal(out[b], expected)


@pytest.mark.parametrize("inputs", [1, 3, SMALL_BATCH, SMALL_BATCH + 7])
@pytest.mark.parametrize("rows, columns", [(40, 256), (42, 288)])  # 42: 4-row blocks and a rest
def test_q8_0_products_equal_q8_products_of_the_same_values(rows, columns, inputs):
    """What keeps a Q8_0 GGUF's tokens those of its llama2.c twin."""
    w, regrouped = random_q8_0(rows, columns)
    x = randn(inputs, columns)
    np.testing.assert_array_equal(product(w, x)[0], product(regrouped, x)[0])
    np.testing.assert_array_equal(
        product(w, x, exact=True)[0], product(regrouped, x, exact=True)[0]
    )


def test_q8_0_reference_is_runq_to_the_bit():
    w, regrouped = random_q8_0(40, 288)
    x = randn(288)
    xq, xs = np.zeros(288, np.int8), np.zeros(9, np.float32)
    reference.q8_quantize(xq, xs, x, 32)
    out = np.empty(40, np.float32)
    reference.q8_0_matmul(out, xq, xs, w.blocks)
    np.testing.assert_array_equal(out, runq_matmul(xq, xs, regrouped.values, regrouped.scales, 32))


def test_iq4_values_are_looked_up_alike_by_shuffle_and_by_select():
    """The byte-shuffle lookup (x86) and the portable one give the same dot products."""
    shuffled, selected = int8.table_dot(byte_shuffle=True), int8.table_dot(byte_shuffle=False)

    @njit
    def dots(row, x):
        return [(shuffled(row, 16 * i, x, 32 * i), selected(row, 16 * i, x, 32 * i))
                for i in range(row.shape[0] // 16)]  # fmt: skip

    rng = np.random.default_rng(0)
    row = rng.integers(0, 256, 16 * 8, np.uint8)
    x = rng.integers(-127, 128, 32 * 8, np.int8)
    table = np.array(int8.IQ4_VALUES, np.int64)
    values = table[np.concatenate([row.reshape(8, 16) & 15, row.reshape(8, 16) >> 4], axis=1)]
    expected = (values * x.reshape(8, 32)).sum(axis=1)
    for (by_shuffle, by_select), want in zip(dots(row, x), expected, strict=True):
        assert by_shuffle == by_select == want
