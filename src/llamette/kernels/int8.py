"""The int8 family: products with an input quantized to int8 values and a scale per group, and
integer dot products with the weights' values: llama2.c's v2 groups of 32 or 64 and GGUF's Q8_0,
with runq.c's arithmetic to the bit; GGUF's 4- and 5-bit types of 32-value blocks (Q4_0, Q4_1,
Q5_0, Q5_1, IQ4_NL), with llama.cpp's block arithmetic over inputs in groups of 32, and the
K-quants and IQ4_XS, whose row dot products go block by block in SIMD lanes (kernels.block_dots).

An input is quantized as runq.c quantizes activations (per group, scale = max|x| / 127 and
q = round(x / scale)), once for every product that shares it (`Int8Inputs`). Each output is then
summed as runq.c sums it: per group, the int32 dot product of the values, then the float32 term
(dot * weight scale) * input scale, groups added in order. That gives the same bits however the
work is laid out, so the layout is chosen for speed alone:

- a batch's inputs 16 at a time in SIMD lanes, where they fill at least half of 16 (a prompt):
  with AVX-512 VNNI four columns per lane (`vpdpbusd`, 64 products an instruction), elsewhere
  int16 pairs;
- other inputs one dot product each, a row at a time (weights streamed from memory), or 16 rows
  at a time in lanes, for weights that stay in cache from one step to the next.

A weight type joins the family with functions of its own, found through kernels.dispatch:
`group_size(w)`, `int8_arrays(w)` (its arrays, taken out of w before the loops), `unpack_row` (a
row's values as integers in -128..127 and their scales, with `scale_group_size` and
`unpack_minimums` where it has 16-value scales or minimums), `int8_row_dot` (a row times one
quantized input, in groups of `row_group_size` where the type has one) and `sixteen_rows` (a group's
dot products and scales for 16 rows), for `product`; the 2- to 6-bit types, whose row dot products
have block terms of their own, take `lanes_and_rows_product` (lanes and row dot products, without
sixteen_rows) or, without unpack_row, `row_product` (a row at a time at any batch size). Where a
type's row dot product sums its terms in another order than the lanes (minimums, several runs in
SIMD lanes), its outputs' bits depend on whether they come from lanes; weight_types.row_blocks takes
the lanes for those only above SMALL_BATCH inputs.
"""

import math
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, typeof, types
from numba.core import cgutils
from numba.extending import intrinsic

from llamette.kernels import (
    aligned_empty,
    inlined_kernel,
    internal_kernel,
    internal_parallel_kernel,
    kernel,
    parallel_kernel,
)
from llamette.kernels.block_dots import lookup
from llamette.kernels.dispatch import (
    group_size,
    int8_arrays,
    int8_row_dot,
    int8_row_dots,
    row_group_size,
    scale_group_size,
    sixteen_rows,
    unpack_minimums,
    unpack_row,
)
from llamette.kernels.reference import round_half_away
from llamette.kernels.simd import (
    FUSED_MADD,
    LANES,
    add_float32x16,
    add_group_terms,
    add_int32x16,
    add_row_group_terms,
    add_scaled_term,
    float32x16_of,
    float32x16_zeros,
    int32x16_of,
    int32x16_zeros,
    load_lanes,
    madd_pairs,
    madd_quads,
    multiply_add,
    scaled_term,
    store_lanes,
    sum_16,
    target_features,
)
from llamette.kernels.symbols import called_by_symbol

F32 = np.float32
I32 = np.int32


class Int8Inputs(NamedTuple):
    """Memory for a batch's inputs quantized for int8 products: up to `capacity` inputs of up to
    `width` values, in flat arrays from which each batch takes views of its own shape. `held`
    says what the memory holds: the group size of the input quantized last, or 0 once the input
    has changed (`new_input`); products that share an input quantize it once (unless their
    group sizes differ)."""

    values: np.ndarray  # int8 (capacity * width,): the inputs' values
    scales: np.ndarray  # float32 (capacity * groups,): their groups' scales
    sums: np.ndarray  # int32 (capacity * width / 32,): each group of 32 values summed
    quads: np.ndarray  # uint8 (blocks * width * 16,): inputs + 128 in lanes, 4 columns each
    pairs: np.ndarray  # int16 (blocks * width * 16,): inputs in lanes, 2 columns each
    lane_scales: np.ndarray  # float32 (blocks * groups * 16,): the lanes' group scales
    lane_sums: np.ndarray  # float32 (blocks * width,): per 16 values, their sum times its scale
    held: np.ndarray  # int64 (1,)
    weights_in_cache: bool  # the weights stay in cache between steps: rows go 16 in lanes

    @classmethod
    def sized(cls, capacity: int, width: int, smallest_group: int = 32,
              weights_in_cache: bool = False) -> "Int8Inputs":  # fmt: skip
        """Memory for `capacity` inputs of `width` values in groups of at least smallest_group."""
        blocks = -(-capacity // LANES)
        groups = -(-width // smallest_group)
        in_lanes = blocks * width * LANES

        empty = aligned_empty  # inputs in lanes are read 64 bytes at a time
        return cls(
            empty(capacity * width, np.int8), empty(capacity * groups, np.float32),
            empty(capacity * -(-width // 32), np.int32),
            empty(in_lanes if FUSED_MADD else 0, np.uint8),
            empty(0 if FUSED_MADD else in_lanes, np.int16),
            empty(blocks * groups * LANES, np.float32),
            empty(blocks * width, np.float32), np.zeros(1, np.int64), weights_in_cache,
        )  # fmt: skip


class Quantized(NamedTuple):
    """A batch of inputs x (B, n) quantized in groups: views of Int8Inputs."""

    values: np.ndarray  # int8 (B, n)
    scales: np.ndarray  # float32 (B, groups)
    sums: np.ndarray  # int32 (B, n / 32): each group's sum, for the row dot products' block terms
    quads: np.ndarray  # uint8 (blocks, n * 16): inputs 0..in_lanes - 1, plus 128 (VNNI)
    pairs: np.ndarray  # int16 (blocks, n * 16): the same, as they are, elsewhere
    lane_scales: np.ndarray  # float32 (blocks, groups * 16)
    lane_sums: np.ndarray  # float32 (blocks, n / 16 * 16)
    in_lanes: int  # inputs taken in SIMD lanes (the first ones)


@njit(inline="always")
def new_input(inputs):
    """Say that the next product's input is not the last one's."""
    inputs.held[0] = 0


# Linked into each product as Numba links calls, not called by symbol (kernels.symbols): by symbol,
# this and the kernels it calls took 4% off a prompt's speed (stories110M Q4_K_M, 217 tokens).
@internal_kernel
def quantized(x, inputs, group_size):
    """x (B, n) quantized in groups of group_size into views of `inputs`, with what the products
    read besides (lanes, group sums), unless they hold it already (see Int8Inputs). Callers pass
    group_size as an int64, never a literal: a literal compiles this, and all it calls, once per
    size."""
    n_inputs, n = x.shape
    groups = (n + group_size - 1) // group_size
    whole_groups = n % group_size == 0 and (group_size == 32 or group_size == 64)
    in_lanes = inputs_in_lanes(n_inputs) if whole_groups else 0
    blocks = (in_lanes + LANES - 1) // LANES
    quad_blocks, pair_blocks = (blocks, 0) if FUSED_MADD else (0, blocks)  # one layout or the other
    sums = n // 32 if n % 32 == 0 else 0
    q = Quantized(
        inputs.values[: n_inputs * n].reshape(n_inputs, n),
        inputs.scales[: n_inputs * groups].reshape(n_inputs, groups),
        inputs.sums[: n_inputs * sums].reshape(n_inputs, sums),
        inputs.quads[: quad_blocks * n * LANES].reshape(quad_blocks, n * LANES),
        inputs.pairs[: pair_blocks * n * LANES].reshape(pair_blocks, n * LANES),
        inputs.lane_scales[: blocks * groups * LANES].reshape(blocks, groups * LANES),
        inputs.lane_sums[: blocks * n].reshape(blocks, n),
        in_lanes,
    )
    if inputs.held[0] == group_size:
        return q
    q8_quantize_rows(q.values, q.scales, x, group_size)
    if sums:
        _sum_groups_of_32(q.sums, q.values)
    if in_lanes:
        _into_lanes(q, group_size)
    inputs.held[0] = group_size
    return q


@inlined_kernel
def product(out, x, w, inputs):
    """out (B, d) = x (B, n) @ w (d, n)^T for int8-family weights whose rows are whole groups of
    32 or 64: runq.c's arithmetic to the bit, for any number of inputs (a prompt's rows get the
    bits that decoding them one at a time gives)."""
    q = quantized(x, inputs, np.int64(group_size(w)))
    in_lanes = q.in_lanes
    if in_lanes:
        _matmul_in_lanes(out[:in_lanes], q, w)
    if in_lanes == x.shape[0]:
        return
    values, scales, sums = q.values[in_lanes:], q.scales[in_lanes:], q.sums[in_lanes:]
    if inputs.weights_in_cache:
        _matmul_rows_in_lanes(out[in_lanes:], values, scales, sums, w)
    else:
        _matmul_rows(out[in_lanes:], values, scales, sums, w)


@inlined_kernel
def lanes_and_rows_product(out, x, w, inputs):
    """out (B, d) = x (B, n) @ w (d, n)^T for int8-family weights with an unpack_row and a row
    dot product of their own (int8_row_dot): inputs 16 at a time in SIMD lanes where they fill
    at least half of 16, the rest a row at a time (whether the two give the same bits is the
    type's matter: weight_types.row_blocks). Where the row dot products take the input in other
    groups (row_group_size), the input is quantized again in those for the rest (all of it: a
    fraction of the product's time, and no other specialization to compile)."""
    q = quantized(x, inputs, np.int64(group_size(w)))
    in_lanes = q.in_lanes
    if in_lanes:
        _matmul_in_lanes(out[:in_lanes], q, w)
    if in_lanes == x.shape[0]:
        return
    if row_group_size(w) != group_size(w):
        q = quantized(x, inputs, np.int64(row_group_size(w)))
    rest = slice(in_lanes, x.shape[0])
    _matmul_rows(out[rest], q.values[rest], q.scales[rest], q.sums[rest], w)


@inlined_kernel
def row_product(out, x, w, inputs):
    """out (B, d) = x (B, n) @ w (d, n)^T for int8-family weights that have a row dot product
    only (int8_row_dot): x quantized in the row dot products' groups (row_group_size), each
    output one row dot product, whatever the batch."""
    q = quantized(x, inputs, np.int64(row_group_size(w)))
    _matmul_rows(out, q.values, q.scales, q.sums, w)


@njit(inline="always")
def inputs_in_lanes(n_inputs):
    """How many of n_inputs a product takes in SIMD lanes, 16 at a time: all but a last block
    that would fill less than half the lanes, whose inputs go one dot product each. Both compute
    the same sums to the bit, in different orders."""
    if n_inputs % LANES >= LANES // 2:
        return n_inputs
    return n_inputs - n_inputs % LANES


# Quantizing an input.


@kernel
def q8_quantize(xq, xs, x, group_size):
    """Quantize x in groups of group_size (the last may be shorter): scale = max|x| / 127,
    q = round(x / scale), halves away from zero (runq.c's arithmetic, in loops that vectorize)."""
    n = x.shape[0]
    for g in range((n + group_size - 1) // group_size):
        start, stop = g * group_size, min(n, (g + 1) * group_size)
        wmax = F32(0.0)
        for i in range(start, stop):
            wmax = max(wmax, abs(x[i]))  # a NaN is passed over, as by `if abs(x[i]) > wmax`
        scale = wmax / F32(127.0)
        xs[g] = scale
        if F32(0.0) < scale < F32(np.inf):
            _quantize_into(xq[start:stop], x[start:stop], scale)
            continue
        for i in range(start, stop):  # all zeros (0 / 0) or an infinity: no vector loop
            quotient = x[i] / scale
            xq[i] = 0 if math.isnan(quotient) else np.int8(round_half_away(quotient))


@njit(inline="always")
def _quantize_into(xq, x, scale):
    """xq = round_half_away(x / scale) for a finite, positive scale, a NaN to 0. The fraction is
    compared with 1/2 (exact in float32), not added to it: 0.49999997 + 0.5 rounds up to 1."""
    for i in range(x.shape[0]):
        quotient = abs(x[i] / scale)
        whole = np.trunc(quotient)
        rounded = whole + F32(1.0) if quotient - whole >= F32(0.5) else whole
        rounded = -rounded if x[i] < 0 else rounded
        xq[i] = np.int8(rounded) if rounded == rounded else np.int8(0)


@called_by_symbol
@internal_parallel_kernel
def q8_quantize_rows(xq, xs, x, group_size):
    """q8_quantize each row of x (B, n) into xq (B, n) and xs (B, groups)."""
    if x.shape[0] == 1:  # decode: not worth waking the other threads
        q8_quantize(xq[0], xs[0], x[0], group_size)
        return
    for b in prange(x.shape[0]):
        q8_quantize(xq[b], xs[b], x[b], group_size)


@called_by_symbol
@internal_kernel
def _sum_groups_of_32(sums, xq):
    """sums (B, n / 32) = the int8 values xq (B, n) summed in groups of 32."""
    for b in range(xq.shape[0]):
        for g in range(sums.shape[1]):
            total = I32(0)
            for k in range(32):
                total = I32(total + I32(xq[b, g * 32 + k]))
            sums[b, g] = total


# A row at a time.


@called_by_symbol
@internal_parallel_kernel
def _matmul_rows(out, xq, xs, x_sums, w):
    """out (B, d) = x @ w^T, one row at a time (the type's int8_row_dot), each weight row read
    once for all inputs."""
    a, b = int8_arrays(w)
    for i in prange(out.shape[1]):
        int8_row_dots(out, w, a, b, i, xq, xs, x_sums)


@called_by_symbol
@internal_parallel_kernel
def _matmul_rows_in_lanes(out, xq, xs, x_sums, w):
    """What _matmul_rows computes, to the bit, with 16 rows in SIMD lanes: per group the 16
    rows' int32 dot products at once (the type's sixteen_rows), then runq.c's float steps lane
    by lane.

    Twice as fast as a row at a time where the weights come from cache (stories15M's
    classifier); from memory, 16 rows read side by side stream more slowly than one row read
    through, so models that do not fit in cache keep the row at a time (Transformer decides).
    """
    d, groups = out.shape[1], xs.shape[1]
    a, b = int8_arrays(w)
    blocks = d // LANES
    for block in prange(blocks):
        first = block * LANES
        for k in range(xq.shape[0]):
            x, x_scales = xq[k], xs[k]
            val = float32x16_zeros()  # (16,) the rows' sums
            for g in range(groups):
                dots, w_scales = sixteen_rows(w, a, b, first, g, groups, x)
                val = add_row_group_terms(val, dots, w_scales, x_scales[g])
            store_lanes(out[k], first, val)
    for i in range(blocks * LANES, d):  # the last rows, fewer than 16
        for k in range(xq.shape[0]):
            out[k, i] = int8_row_dot(w, a, b, i, xq[k], xs[k], x_sums[k])


def compile_kernels(w, in_lanes: bool) -> None:
    """Compile (or load) the kernels of int8-family weights w that their product reaches after
    the input's quantization, for the argument types it gives them: the inputs in lanes, then the
    rows in lanes if in_lanes, then a row at a time. A cold start's first process compiles them
    before the product, while its helper compiles the quantization (llamette.ahead)."""
    matrix = types.float32[:, ::1]
    lanes = types.uint8[:, ::1] if FUSED_MADD else types.int16[:, ::1]
    lanes_kernel = _matmul_quads if FUSED_MADD else _matmul_across_inputs
    lanes_kernel.kernel.compile((matrix, lanes, matrix, matrix, typeof(w)))
    quantized_rows = (matrix, types.int8[:, ::1], matrix, types.int32[:, ::1])  # xq, xs, x_sums
    for row_kernel in (_matmul_rows_in_lanes, _matmul_rows) if in_lanes else (_matmul_rows,):
        row_kernel.kernel.compile((*quantized_rows, typeof(w)))


@intrinsic
def biased_dot_32(typingctx, row, start, x, first):
    """The int32 sum of (w_j + 128) * x[first + j] over the 32 int8 values w_j at bytes start..
    of a uint8 row (w + 128 is the byte with its top bit flipped): w . x plus 128 * sum(x).

    Written as one vector expression, because a 32-step loop is unrolled and not vectorized (and
    64-step windows over blocks of 34 bytes do twice the work): LLVM compiles it to AVX-512 VNNI's
    unsigned-by-signed byte dot product (vpdpbusd), hence the bias, and a sum of 8 lanes.
    """

    def biased(builder, load):
        bytes32 = ir.VectorType(ir.IntType(8), 32)
        return builder.xor(load(bytes32), ir.Constant(bytes32, [0x80] * 32))

    return _unsigned_dot_32(row, start, x, first, biased)


@intrinsic
def nibble_dot_32(typingctx, row, start, x, first):
    """The int32 sum of q_j * x[first + j] over the 32 4-bit values q_j (0..15) packed in the 16
    bytes at start.. of a uint8 row, GGML's way: value j in the low nibble of byte j, value
    16 + j in its high nibble.

    One vector expression, like biased_dot_32: unsigned nibbles times signed bytes is what
    AVX-512 VNNI's vpdpbusd multiplies, with no bias to take off.
    """

    return _unsigned_dot_32(row, start, x, first, _nibbles)


@intrinsic
def fivebit_dot_32(typingctx, row, start, x, first):
    """The int32 sum of q_j * x[first + j] over the 32 5-bit values q_j (0..31) at bytes start..
    of a uint8 row, GGML's way (Q5_0, Q5_1): bit j of the little-endian uint32 at start is value
    j's fifth bit, and the 16 bytes after it hold the low four bits as nibble_dot_32 reads them."""

    def five_bits(builder, load):
        ints32 = ir.VectorType(ir.IntType(32), 32)
        high_bits = builder.bitcast(load(ir.VectorType(ir.IntType(8), 4)), ir.IntType(32))
        bit_j = builder.and_(builder.lshr(_splat(builder, high_bits, ints32),
                                          ir.Constant(ints32, list(range(32)))),
                             ir.Constant(ints32, [1] * 32))  # fmt: skip
        fifth = builder.shl(builder.trunc(bit_j, ir.VectorType(ir.IntType(8), 32)),
                            ir.Constant(ir.VectorType(ir.IntType(8), 32), [4] * 32))  # fmt: skip
        return builder.or_(fifth, _nibbles(builder, lambda vector: load(vector, 4)))

    return _unsigned_dot_32(row, start, x, first, five_bits)


def _nibbles(builder, load):
    """The 32 4-bit values in 16 bytes, GGML's order: the low nibbles, then the high ones."""
    bytes16 = ir.VectorType(ir.IntType(8), 16)
    packed = load(bytes16)
    low = builder.and_(packed, ir.Constant(bytes16, [0x0F] * 16))
    high = builder.lshr(packed, ir.Constant(bytes16, [4] * 16))
    in_order = ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32)))
    return builder.shuffle_vector(low, high, in_order)


def _unsigned_dot_32(row, start, x, first, unsigned_bytes):
    """The signature and code of an intrinsic that sums 32 unsigned bytes times 32 int8 values
    x[first..]: unsigned_bytes(builder, load) makes the 32 bytes from the row's bytes at start
    (load(vector type, offset=0) reads them from start + offset), as one vector."""
    if not (row.dtype == types.uint8 and x.dtype == types.int8):
        return None

    def codegen(context, builder, signature, args):
        row_array = context.make_array(signature.args[0])(context, builder, args[0])
        x_array = context.make_array(signature.args[2])(context, builder, args[2])
        bytes32 = ir.VectorType(ir.IntType(8), 32)

        def load(array, index, vector):
            address = builder.bitcast(builder.gep(array.data, [index]), vector.as_pointer())
            return builder.load(address, align=1)

        def load_row(vector, offset=0):
            return load(row_array, builder.add(args[1], ir.Constant(args[1].type, offset)), vector)

        weights = unsigned_bytes(builder, load_row)
        return _sum_products(builder, weights, load(x_array, args[3], bytes32), signed=False)

    return types.int32(row, start, x, first), codegen


# IQ4: 4-bit indices into a table of 16 int8 values.

IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def table_dot(byte_shuffle: bool):
    """An intrinsic (row, start, x, first) summing IQ4_VALUES[q_j] * x[first + j] (int32) over the
    32 4-bit indices q_j of the 16 bytes at start, in nibble_dot_32's order. byte_shuffle: look
    the values up with SSSE3's byte shuffle (pshufb, a 16-entry table lookup per instruction);
    otherwise with a compare and select per table entry."""

    def dot(typingctx, row, start, x, first):
        if not (row.dtype == types.uint8 and x.dtype == types.int8):
            return None

        def codegen(context, builder, signature, args):
            row_bytes, x_bytes = _byte_loader(context, builder, signature, args, 0, 2)
            bytes16 = ir.VectorType(ir.IntType(8), 16)
            packed = row_bytes(args[1], bytes16)
            low = builder.and_(packed, ir.Constant(bytes16, [0x0F] * 16))
            high = builder.lshr(packed, ir.Constant(bytes16, [4] * 16))
            values = builder.shuffle_vector(lookup(builder, low, IQ4_VALUES, byte_shuffle),
                                            lookup(builder, high, IQ4_VALUES, byte_shuffle),
                                            ir.Constant(ir.VectorType(ir.IntType(32), 32),
                                                        list(range(32))))  # fmt: skip
            return _sum_products(builder, values, x_bytes(args[3]), signed=True)

        return types.int32(row, start, x, first), codegen

    dot.__name__ = dot.__qualname__ = "table_dot_32" if byte_shuffle else "table_dot_32_selected"
    return intrinsic(dot)


table_dot_32 = table_dot(byte_shuffle="+ssse3" in target_features())


def _byte_loader(context, builder, signature, args, row_arg, x_arg):
    """Loaders of bytes (32 unless another vector type is asked for) of the row (argument
    row_arg) and of x (x_arg) at an index."""
    bytes32 = ir.VectorType(ir.IntType(8), 32)

    def loader(arg):
        array = context.make_array(signature.args[arg])(context, builder, args[arg])

        def load(index, vector=bytes32):
            address = builder.bitcast(builder.gep(array.data, [index]), vector.as_pointer())
            return builder.load(address, align=1)

        return load

    return loader(row_arg), loader(x_arg)


def _splat(builder, value, vector):
    """A vector of type `vector` with value in every lane."""
    first = builder.insert_element(ir.Constant(vector, None), value, ir.Constant(ir.IntType(32), 0))
    everywhere = ir.Constant(ir.VectorType(ir.IntType(32), vector.count), [0] * vector.count)
    return builder.shuffle_vector(first, ir.Constant(vector, None), everywhere)


def _sum_products(builder, values, x, signed):
    """The int32 sum of values (32 bytes, unsigned or signed) times x (32 int8)."""
    ints32 = ir.VectorType(ir.IntType(32), 32)
    widened = builder.sext(values, ints32) if signed else builder.zext(values, ints32)
    return _reduce(builder, builder.mul(widened, builder.sext(x, ints32)), 32)


def _reduce(builder, vector, lanes):
    """The int32 sum of an int32 vector of `lanes` lanes."""
    vector_sum = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(ir.IntType(32), [ir.VectorType(ir.IntType(32), lanes)]),
        f"llvm.vector.reduce.add.v{lanes}i32",
    )
    return builder.call(vector_sum, [vector])


# Inputs in SIMD lanes: each lane one input, 16 inputs a block.


@called_by_symbol
@internal_parallel_kernel
def _into_lanes(q, group_size):
    """q's first in_lanes inputs in the layout of the lane kernels: with VNNI, quads (each four
    columns of 16 inputs side by side, plus 128); elsewhere pairs; and each group's 16 scales and
    each 16 values' sums times their scale, side by side."""
    values = q.values[: q.in_lanes]
    if FUSED_MADD:
        _interleave(q.quads, values, 4, 128)
    else:
        _interleave(q.pairs, values, 2, 0)
    _lanes_of_groups(q.lane_scales, q.scales[: q.in_lanes])
    _lane_sums_into(q.lane_sums, values, q.scales[: q.in_lanes], group_size)


@inlined_kernel
def _matmul_in_lanes(out, q, w):
    """out (B, d) = x @ w^T for the B = q.in_lanes inputs in lanes: quads with VNNI, else
    pairs."""
    if FUSED_MADD:
        _matmul_quads(out, q.quads, q.lane_scales, q.lane_sums, w)
    else:
        _matmul_across_inputs(out, q.pairs, q.lane_scales, q.lane_sums, w)


@njit(inline="always")
def _interleave(out, xq, per_lane, offset):
    """out (blocks, n * 16) = xq (B, n) + offset in blocks of 16 inputs, runs of per_lane columns
    (k..k + per_lane - 1) of the 16 inputs side by side (n is a multiple of per_lane: whole
    groups of 32 or 64); a last block's missing inputs are zeros (their outputs are not kept)."""
    n = xq.shape[1]
    _zero(out[out.shape[0] - 1])
    for run in prange(n // per_lane):
        k = per_lane * np.int64(run)
        for b in range(xq.shape[0]):
            block, lane = b // LANES, b % LANES
            for j in range(per_lane):
                out[block, k * LANES + per_lane * lane + j] = I32(xq[b, k + j]) + offset


@njit(inline="always")
def _zero(values):
    """values (n,) = 0, in a loop: in a parallel kernel, `values[:] = 0` would be a parallel loop
    of its own, compiled as a function of its own (a tenth of a second or more of a first run)."""
    for k in range(values.shape[0]):
        values[k] = 0


@njit(inline="always")
def _lanes_of_groups(lanes, per_group):
    """lanes (blocks, groups * 16) = per_group (B, groups), each group's values of 16 inputs side
    by side, zeros past the last input."""
    n_inputs, groups = per_group.shape
    _zero(lanes[lanes.shape[0] - 1])
    for b in range(n_inputs):
        for g in range(groups):
            lanes[b // LANES, g * LANES + b % LANES] = per_group[b, g]


@njit(inline="always")
def _lane_sums_into(lanes, xq, xs, group_size):
    """lanes (blocks, n / 16 * 16) = each 16 values of each input summed, times their group's
    scale (the input's part of a minimum's term), 16 inputs side by side."""
    _zero(lanes[lanes.shape[0] - 1])
    for b in range(xq.shape[0]):
        for s in range(xq.shape[1] // 16):
            total = F32(_sum_int8(xq[b, 16 * s : 16 * (s + 1)]))
            lanes[b // LANES, s * LANES + b % LANES] = total * xs[b, 16 * s // group_size]


ROWS_PER_TASK = 64


@called_by_symbol
@parallel_kernel
def _matmul_across_inputs(out, pairs, lane_scales, lane_sums, w):
    """out (B, d) = x @ w^T, 16 inputs at a time in SIMD lanes (one lane per input),
    ROWS_PER_TASK rows a task (_pairs_task)."""
    d = out.shape[1]
    a, b = int8_arrays(w)
    for task in prange((d + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _pairs_task(out, pairs, lane_scales, lane_sums, w, a, b, task * ROWS_PER_TASK)


@called_by_symbol
@internal_kernel
def _pairs_task(out, pairs, lane_scales, lane_sums, w, a, b, first):
    """out[:, first..first + ROWS_PER_TASK]: each pair of rows unpacked once into int16 values,
    float32 scales (and minimums), then rows_times_lanes. (A function of its own: see
    _quads_task.)"""
    d, n = out.shape[1], pairs.shape[1] // LANES
    size = scale_group_size(w)
    rows = np.empty((2, n), np.int16)
    scales = np.empty((2, n // size), np.float32)
    minimums = np.empty((2, n // size), np.float32)
    lanes = np.empty(LANES, np.float32)
    for i0 in range(first, min(d, first + ROWS_PER_TASK), 2):
        i1 = min(i0 + 1, d - 1)  # an odd last row goes with itself
        unpack_row(rows[0], scales[0], w, a, b, i0)
        unpack_row(rows[1], scales[1], w, a, b, i1)
        has_minimums = unpack_minimums(minimums[0], w, a, b, i0)
        unpack_minimums(minimums[1], w, a, b, i1)
        rows_times_lanes(out, pairs, lane_scales, lane_sums, rows, scales, minimums,
                         has_minimums, size, i0, i1, lanes)  # fmt: skip


@njit(inline="always")
def rows_times_lanes(out, pairs, lane_scales, lane_sums, rows, scales, minimums, has_minimums,
                     size, i0, i1, lanes):  # fmt: skip
    """out[:, i0] and out[:, i1] for two weight rows (2, n) widened to int16, with their scales
    (2, n / size) and, if has_minimums, minimums: each lane (input) sums a group's int32 products
    over pairs of columns, then adds the group's float32 term (less the minimum's), groups in
    order. The same operations per output as a row at a time, so the same bits, without their
    per-group horizontal sums; each input load serves both rows."""
    row0, row1 = rows[0], rows[1]
    groups = scales.shape[1]
    halves = groups // (lane_scales.shape[1] // LANES) - 1  # 1: two scales per input group
    for block in range(pairs.shape[0]):
        x_pairs, x_scales, x_sums = pairs[block], lane_scales[block], lane_sums[block]
        val0, val1 = float32x16_zeros(), float32x16_zeros()
        for g in range(groups):
            start = g * size
            sum0, sum1 = _group_sums(x_pairs, row0, row1, start, size)
            at = (g >> halves) * LANES  # the input group's scales
            val0 = add_group_terms(val0, sum0, scales[0, g], x_scales, at)
            val1 = add_group_terms(val1, sum1, scales[1, g], x_scales, at)
            if has_minimums:
                sums = _scaled_sums(x_sums, start, size)
                val0 = _less_minimum(val0, sums, minimums[0, g])
                val1 = _less_minimum(val1, sums, minimums[1, g])
        _store_column(out, i0, block * LANES, val0, lanes)
        _store_column(out, i1, block * LANES, val1, lanes)


@njit(inline="always")
def _scaled_sums(x_sums, start, size):
    """Each lane's input's values start..start + size summed, times their scale, from the sums
    per 16 values (lane_sums): what a minimum multiplies."""
    total = load_lanes(x_sums, start // 16 * LANES)
    for sixteen in range(start // 16 + 1, (start + size) // 16):
        total = add_float32x16(total, load_lanes(x_sums, sixteen * LANES))
    return total


@njit(inline="always")
def _less_minimum(val, scaled_sums, minimum):
    """val - minimum * scaled_sums, lane by lane, rounded once."""
    return multiply_add(val, scaled_sums, float32x16_of(-minimum))


@njit(inline="always")
def _store_column(out, i, first, v, lanes):
    """out[first + l, i] = lane l of v for the inputs that exist (a last block may be padded);
    lanes: 16 float32 of scratch."""
    store_lanes(lanes, 0, v)
    for lane in range(min(LANES, out.shape[0] - first)):
        out[first + lane, i] = lanes[lane]


@njit(inline="always")
def _group_sums(x_pairs, row0, row1, start, group_size):
    """The int32 sums of one group (columns start.. of group_size) for rows 0 and 1, each lane
    one input. Where a multiply-accumulate waits on its previous sum (FUSED_MADD), four partial
    sums per row (exact in any order) keep the multiplier busy; elsewhere one per row leaves the
    registers (16 on AVX2, each int32x16 takes two) to the rest of the loop."""
    if not FUSED_MADD:
        sum0 = sum1 = int32x16_zeros()
        for k in range(start, start + group_size, 2):
            sum0 = madd_pairs(sum0, x_pairs, k * LANES, row0, k)
            sum1 = madd_pairs(sum1, x_pairs, k * LANES, row1, k)
        return sum0, sum1
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = int32x16_zeros()
    for k in range(start, start + group_size, 8):
        a0 = madd_pairs(a0, x_pairs, k * LANES, row0, k)
        b0 = madd_pairs(b0, x_pairs, k * LANES, row1, k)
        a1 = madd_pairs(a1, x_pairs, (k + 2) * LANES, row0, k + 2)
        b1 = madd_pairs(b1, x_pairs, (k + 2) * LANES, row1, k + 2)
        a2 = madd_pairs(a2, x_pairs, (k + 4) * LANES, row0, k + 4)
        b2 = madd_pairs(b2, x_pairs, (k + 4) * LANES, row1, k + 4)
        a3 = madd_pairs(a3, x_pairs, (k + 6) * LANES, row0, k + 6)
        b3 = madd_pairs(b3, x_pairs, (k + 6) * LANES, row1, k + 6)
    sum0 = add_int32x16(add_int32x16(a0, a1), add_int32x16(a2, a3))
    sum1 = add_int32x16(add_int32x16(b0, b1), add_int32x16(b2, b3))
    return sum0, sum1


# With AVX-512 VNNI, lanes take inputs four columns each: one vpdpbusd multiplies 64 bytes,
# where int16 pairs multiply 32 values. It multiplies unsigned bytes by signed ones, four of a
# lane's with the same four of all lanes (a weight row's, read with the instruction), so the
# inputs go in as x + 128 and a lane's sum over a group exceeds the true one by 128 times the
# row's values in the group summed: the sum starts from minus that (the row's bias, computed
# once per row), and ends exact.


@called_by_symbol
@parallel_kernel
def _matmul_quads(out, quads, lane_scales, lane_sums, w):
    """out (B, d) = x @ w^T, 16 inputs at a time in SIMD lanes, four columns each (AVX-512
    VNNI), ROWS_PER_TASK rows a task (_quads_task)."""
    d, n = out.shape[1], quads.shape[1] // LANES
    groups = n // scale_group_size(w)
    a, b = int8_arrays(w)
    for task in prange((d + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        rows = np.empty((ROWS_PER_TASK, n), np.int8)
        scales = np.empty((ROWS_PER_TASK, groups), np.float32)
        minimums = np.empty((ROWS_PER_TASK, groups), np.float32)
        biases = np.empty((ROWS_PER_TASK, groups), np.int32)
        _quads_task(out, quads, lane_scales, lane_sums, w, a, b, task * ROWS_PER_TASK, rows,
                    scales, minimums, biases)  # fmt: skip


@called_by_symbol
@internal_kernel
def _quads_task(out, quads, lane_scales, lane_sums, w, a, b, first, rows, scales, minimums,
                biases):  # fmt: skip
    """out[:, first..first + R] (R = ROWS_PER_TASK): the rows unpacked in one sweep (which the
    prefetchers follow) into int8 values `rows` (R, n), float32 scales (and minimums) and biases
    (R, n / scale_group_size), then times the inputs (_rows_times_quads). (A function of its
    own, not the body of _matmul_quads' parallel loop: Numba's parallel passes over a body this
    large take seconds of a cold start.)"""
    d, size = out.shape[1], scale_group_size(w)
    has_minimums = False
    for r in range(ROWS_PER_TASK):
        row = min(first + r, d - 1)  # past the last row, the last again (not stored)
        unpack_row(rows[r], scales[r], w, a, b, row)
        has_minimums = unpack_minimums(minimums[r], w, a, b, row)
        _biases_into(biases[r], rows[r], size)
    _rows_times_quads(out, quads, lane_scales, lane_sums, rows, scales, minimums, biases,
                      has_minimums, size, first)  # fmt: skip


@called_by_symbol
@internal_kernel
def _rows_times_quads(out, quads, lane_scales, lane_sums, rows, scales, minimums, biases,
                      has_minimums, size, first):  # fmt: skip
    """out[:, first..first + R] for R unpacked rows (see _quads_task), eight at a time: code
    that every weight type shares, compiled (or loaded from the cache) once. size, has_minimums
    and whether two weight scales share an input group: run-time values, branched on per group,
    not per product of four columns."""
    d = out.shape[1]
    lanes = np.empty(LANES, np.float32)
    for r in range(0, min(ROWS_PER_TASK, d - first), 8):
        _eight_rows_times_quads(out, quads, lane_scales, lane_sums, rows[r : r + 8],
                                scales[r : r + 8], minimums[r : r + 8], biases[r : r + 8],
                                has_minimums, size, first + r, lanes)  # fmt: skip


# The lane kernels that every int8-family weight type shares, which a cold start's helper leaves to
# the first process (llamette.ahead).
SHARED_LANE_KERNELS = (_rows_times_quads,)


@njit(inline="always")
def _biases_into(biases, row, size):
    """biases (groups,) = -128 * each group of size (a multiple of 16) values of row summed."""
    for g in range(biases.shape[0]):
        total = I32(0)
        for start in range(g * size, (g + 1) * size, 16):
            total += sum_16(row, start)
        biases[g] = -128 * total


@njit(inline="always")
def widen_into(out, values):
    """out = values (a whole row: a loop from 0 over a 1-d slice vectorizes, a 2-d index not)."""
    for k in range(values.shape[0]):
        out[k] = values[k]


@njit(inline="always")
def scale_into(out, values, scale):
    """out = values * scale, as float32. (Slices indexed from 0, so that the loop vectorizes: Numba
    checks every index for negative wraparound unless it can tell it is not negative.)"""
    for j in range(values.shape[0]):
        out[j] = F32(values[j]) * scale


@njit(inline="always")
def _sum_int8(values):
    """The int32 sum of int8 values (a slice indexed from 0, so that the loop vectorizes)."""
    total = I32(0)
    for k in range(values.shape[0]):
        total += I32(values[k])
    return total


@njit(inline="always")
def _eight_rows_times_quads(out, quads, lane_scales, lane_sums, rows, scales, minimums, biases,
                            has_minimums, size, i, lanes):  # fmt: skip
    """out[:, i..i + 7] for eight rows (8, n) with their scales, biases (8, n / size) and, if
    has_minimums, minimums: each lane (input) sums a weight group's int32 products four columns
    at a time (from the row's bias), then adds the group's float32 term (less the minimum's),
    groups in order; the same bits as rows_times_lanes and a row at a time. Each load of four
    columns of 16 inputs serves eight rows. Where two weight scales (of 16 values) share an input
    group, their two terms are added before the input's scale multiplies them. Outputs past out's
    last column are not stored. (size: the values per weight scale.)"""
    w = (rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], rows[6], rows[7])
    halves = scales.shape[1] // (lane_scales.shape[1] // LANES) - 1  # 1: two scales per group
    for block in range(quads.shape[0]):
        x_quads, x_scales, x_sums = quads[block], lane_scales[block], lane_sums[block]
        zeros = float32x16_zeros()
        v = (zeros, zeros, zeros, zeros, zeros, zeros, zeros, zeros)
        first_half = v  # the terms of an input group's first weight group, where it has two
        for g in range(scales.shape[1]):
            dots = _eight_dots(x_quads, w, biases, g, size)
            at = (g >> halves) * LANES  # the input group's scales
            if halves == 0:
                v = _add_terms(v, dots, scales, g, x_scales, at)
            elif g % 2 == 0:
                first_half = _terms(dots, scales, g)
                continue
            else:
                v = _add_second_terms(v, first_half, dots, scales, g, load_lanes(x_scales, at))
            if has_minimums:
                for h in range(g - halves, g + 1):  # the minimums of the groups just added
                    v = _less_minimums(v, _scaled_sums(x_sums, h * size, size), minimums, h)
        _store_columns(out, i, block * LANES, v, lanes)


@njit(inline="always")
def _store_columns(out, i, first, v, lanes):
    """out[first.., i + r] = each of the eight rows' v[r] (columns past out's last not stored)."""
    for r in range(8):
        if i + r < out.shape[1]:
            _store_column(out, i + r, first, v[r], lanes)


@njit(inline="always")
def _eight_dots(x_quads, w, biases, g, size):
    """Eight rows' int32 sums over weight group g (size values), each lane's input's, from the
    rows' biases."""
    w0, w1, w2, w3, w4, w5, w6, w7 = w
    a0, a1 = int32x16_of(biases[0, g]), int32x16_of(biases[1, g])
    a2, a3 = int32x16_of(biases[2, g]), int32x16_of(biases[3, g])
    a4, a5 = int32x16_of(biases[4, g]), int32x16_of(biases[5, g])
    a6, a7 = int32x16_of(biases[6, g]), int32x16_of(biases[7, g])
    for k in range(g * size, (g + 1) * size, 4):
        x = k * LANES
        a0, a1 = madd_quads(a0, x_quads, x, w0, k), madd_quads(a1, x_quads, x, w1, k)
        a2, a3 = madd_quads(a2, x_quads, x, w2, k), madd_quads(a3, x_quads, x, w3, k)
        a4, a5 = madd_quads(a4, x_quads, x, w4, k), madd_quads(a5, x_quads, x, w5, k)
        a6, a7 = madd_quads(a6, x_quads, x, w6, k), madd_quads(a7, x_quads, x, w7, k)
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit(inline="always")
def _add_terms(v, dots, scales, g, x_scales, at):
    """Each row's v + (float32(dots) * its scale g) * the lanes' input scales (runq.c's order)."""
    return (
        add_group_terms(v[0], dots[0], scales[0, g], x_scales, at),
        add_group_terms(v[1], dots[1], scales[1, g], x_scales, at),
        add_group_terms(v[2], dots[2], scales[2, g], x_scales, at),
        add_group_terms(v[3], dots[3], scales[3, g], x_scales, at),
        add_group_terms(v[4], dots[4], scales[4, g], x_scales, at),
        add_group_terms(v[5], dots[5], scales[5, g], x_scales, at),
        add_group_terms(v[6], dots[6], scales[6, g], x_scales, at),
        add_group_terms(v[7], dots[7], scales[7, g], x_scales, at),
    )


@njit(inline="always")
def _terms(dots, scales, g):
    """Each row's float32(dots) * its scale g."""
    return (
        scaled_term(dots[0], scales[0, g]),
        scaled_term(dots[1], scales[1, g]),
        scaled_term(dots[2], scales[2, g]),
        scaled_term(dots[3], scales[3, g]),
        scaled_term(dots[4], scales[4, g]),
        scaled_term(dots[5], scales[5, g]),
        scaled_term(dots[6], scales[6, g]),
        scaled_term(dots[7], scales[7, g]),
    )


@njit(inline="always")
def _add_second_terms(v, first, dots, scales, g, x_scale):
    """Each row's v + (first + float32(dots) * its scale g) * x_scale, each step fused."""
    return (
        multiply_add(v[0], add_scaled_term(first[0], dots[0], scales[0, g]), x_scale),
        multiply_add(v[1], add_scaled_term(first[1], dots[1], scales[1, g]), x_scale),
        multiply_add(v[2], add_scaled_term(first[2], dots[2], scales[2, g]), x_scale),
        multiply_add(v[3], add_scaled_term(first[3], dots[3], scales[3, g]), x_scale),
        multiply_add(v[4], add_scaled_term(first[4], dots[4], scales[4, g]), x_scale),
        multiply_add(v[5], add_scaled_term(first[5], dots[5], scales[5, g]), x_scale),
        multiply_add(v[6], add_scaled_term(first[6], dots[6], scales[6, g]), x_scale),
        multiply_add(v[7], add_scaled_term(first[7], dots[7], scales[7, g]), x_scale),
    )


@njit(inline="always")
def _less_minimums(v, scaled_sums, minimums, g):
    """Each row's v - its minimum g * scaled_sums."""
    return (
        _less_minimum(v[0], scaled_sums, minimums[0, g]),
        _less_minimum(v[1], scaled_sums, minimums[1, g]),
        _less_minimum(v[2], scaled_sums, minimums[2, g]),
        _less_minimum(v[3], scaled_sums, minimums[3, g]),
        _less_minimum(v[4], scaled_sums, minimums[4, g]),
        _less_minimum(v[5], scaled_sums, minimums[5, g]),
        _less_minimum(v[6], scaled_sums, minimums[6, g]),
        _less_minimum(v[7], scaled_sums, minimums[7, g]),
    )
