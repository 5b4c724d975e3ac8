"""A row's dot product with a quantized input, block by block, with the work in SIMD lanes: for
the GGUF types whose values are packed in bit fields and scaled per run of 16 or 32 (the
K-quants, IQ4_XS).

Each type writes one block's step in LLVM IR through `BlockIR`: it unpacks the block's values
into bytes, multiplies them with the input's int8 values four at a time into int32 lanes (one
`vpdpbusd` per 64 values with AVX-512 VNNI), and adds each lane's partial sum times its run's
scale into a float32x16 of running sums, which the row dot adds up once at its end. No lane is
summed across a run boundary before it is scaled, so no per-run horizontal sum is needed (the
cost of a run at a time); a row's bits depend on the row and the input alone, not on the batch
around it. With GFNI, a block's bit fields come out by affine transforms of its bytes
(`fields_of`), one instruction for 64 values.

The input is quantized in groups of 32 (one per run, as for the other int8-family types), each
lane's sum then scaled by its run's float scale and the input's (Q2_K, Q3_K, IQ4_XS); or, for a
type whose block step says so, in groups of a whole block (Q8_K's groups in llama.cpp): one
input scale a block lets the step scale the lanes by its runs' integer scales in integers
(`scaled_sum`; Q4_K, Q5_K, Q6_K) and convert to float once a block. Either way the int32 sums of
each run of 32 input values (`x_sums`) are there for the types with minimums or offsets.
"""

from collections.abc import Callable

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from llamette.kernels.simd import (
    WIDE_REGISTERS,
    float32x16,
    float32x16_zeros,
    prefetch_line,
    sum_float32x16,
    target_features,
)

_FEATURES = target_features()
_VNNI = "+avx512vnni" in _FEATURES
_AVX512BW = "+avx512bw" in _FEATURES
_AVX2 = "+avx2" in _FEATURES
_SSSE3 = "+ssse3" in _FEATURES
_GFNI_512 = "+gfni" in _FEATURES and "+avx512f" in _FEATURES and _AVX512BW

I8, I16, I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
F32 = ir.FloatType()


def vector(element: ir.Type, count: int) -> ir.VectorType:
    return ir.VectorType(element, count)


class BlockIR:
    """The IR of one block's step of a row dot product with one input: loads from the row at the
    block's first byte and from the input at the block's first value (its scale and sums at its
    first group and run of 32), and the lane arithmetic the types need. Offsets are Python
    integers, in bytes of the block or values of the input block."""

    def __init__(self, builder, acc, row, x, x_scales, x_sums):
        self.b = builder
        self.acc = acc  # the input's running sums, float32x16
        self._row, self._x, self._x_scales, self._x_sums = row, x, x_scales, x_sums

    # Loads.

    def _load(self, base, offset: int, vector_type: ir.VectorType):
        address = self.b.gep(base, [ir.Constant(I32, offset)])
        return self.b.load(self.b.bitcast(address, vector_type.as_pointer()), align=1)

    def bytes(self, offset: int, count: int) -> ir.Value:
        """count bytes of the block from `offset`, <count x i8>."""
        return self._load(self._row, offset, vector(I8, count))

    def half(self, offset: int) -> ir.Value:
        """The fp16 at bytes offset, offset + 1 of the block, as a float."""
        address = self.b.gep(self._row, [ir.Constant(I32, offset)])
        bits = self.b.load(self.b.bitcast(address, I16.as_pointer()), align=1)
        return self.b.fpext(self.b.bitcast(bits, ir.HalfType()), F32)

    def halves(self, offset: int, count: int) -> ir.Value:
        """The `count` fp16 at bytes offset.. of the block, as floats."""
        address = self.b.gep(self._row, [ir.Constant(I32, offset)])
        halves_type = vector(ir.HalfType(), count)
        loaded = self.b.load(self.b.bitcast(address, halves_type.as_pointer()), align=1)
        return self.b.fpext(loaded, vector(F32, count))

    def x(self, offset: int, count: int) -> ir.Value:
        """count int8 values of the input from value `offset` of the block."""
        return self._load(self._x, offset, vector(I8, count))

    def x_scales(self, count: int) -> ir.Value:
        """The scales of the block's first `count` input groups of 32, <count x float>."""
        return self._load(self._x_scales, 0, vector(F32, count))

    def x_scale(self) -> ir.Value:
        """The scale of the block's first input group (the block's only one, for inputs in
        groups of a block), a float."""
        return self.b.load(self._x_scales)

    def x_sums(self, count: int) -> ir.Value:
        """The int32 sums of the block's first `count` runs of 32 input values, as floats."""
        return self.to_float(self.x_integer_sums(count))

    def x_integer_sums(self, count: int) -> ir.Value:
        """The int32 sums of the block's first `count` runs of 32 input values."""
        return self._load(self._x_sums, 0, vector(I32, count))

    # Lanes.

    def constant(self, like: ir.Value, values) -> ir.Value:
        """A constant vector of like's type: values, or one value in every lane."""
        count = like.type.count
        values = list(values) if hasattr(values, "__len__") else [values] * count
        return ir.Constant(like.type, values)

    def pick(self, v: ir.Value, lanes, other: ir.Value | None = None) -> ir.Value:
        """The lanes of v (then of other, numbered on) at the given indices."""
        return self.b.shuffle_vector(v, v if other is None else other,
                                     ir.Constant(vector(I32, len(lanes)), list(lanes)))  # fmt: skip

    def join(self, a: ir.Value, b: ir.Value) -> ir.Value:
        """a's lanes, then b's (vectors of one type)."""
        return self.pick(a, range(2 * a.type.count), b)

    def splat(self, value: ir.Value, count: int) -> ir.Value:
        one = self.b.insert_element(ir.Constant(vector(value.type, 1), None), value, I32(0))
        return self.pick(one, [0] * count)

    def bits(self, v: ir.Value, shift: int, mask: int) -> ir.Value:
        """(v >> shift) & mask, lane by lane, for bytes."""
        if shift:
            v = self.b.lshr(v, self.constant(v, shift))
        return self.b.and_(v, self.constant(v, mask))

    def nibbles(self, packed: ir.Value) -> ir.Value:
        """The low nibbles of the bytes, then their high nibbles (twice as many lanes). (For
        IQ4_XS, whose bytes are looked up 16 at a time next: its nibbles through fields_of's
        affine transform measured 18% slower there.)"""
        return self.join(self.bits(packed, 0, 0x0F), self.bits(packed, 4, 0x0F))

    def nibbles_of(self, offset: int) -> ir.Value:
        """The low nibbles of the block's 32 bytes from `offset`, then their high nibbles (64
        lanes)."""
        return self.fields_of(offset, (0, 4, 0), (4, 4, 0))

    def fields_of(self, offset: int, first: tuple, second: tuple) -> ir.Value:
        """A bit field of each of the block's 32 bytes from `offset`, then another (64 lanes):
        each field (shift, width, to) is (byte >> shift) & (2^width - 1), moved up `to` bits.
        With GFNI and AVX-512, the bytes loaded into both halves of one register and one affine
        transform of bits per half, where the halves apart take three instructions or more."""
        if not _GFNI_512:
            packed = self.bytes(offset, 32)

            def field(shift: int, width: int, to: int) -> ir.Value:
                value = self.bits(packed, shift, (1 << width) - 1)
                return self.b.shl(value, self.constant(value, to)) if to else value

            return self.join(field(*first), field(*second))
        both = self.pick(self.bytes(offset, 32), [*range(32), *range(32)])
        matrices = [
            byte for field in (first,) * 4 + (second,) * 4 for byte in _field_matrix(*field)
        ]
        return self._call("llvm.x86.vgf2p8affineqb.512", vector(I8, 64),
                          [both, ir.Constant(vector(I8, 64), matrices), ir.Constant(I8, 0)])  # fmt: skip

    def lookup(self, indices: ir.Value, table) -> ir.Value:
        """table[i] for each byte i of indices (all below 16; table: 16 byte values), 16 bytes
        at a time (see lookup)."""
        parts = [lookup(self.b, self.pick(indices, range(k, k + 16)), table, _SSSE3)
                 for k in range(0, indices.type.count, 16)]  # fmt: skip
        while len(parts) > 1:
            parts = [self.join(a, b) for a, b in zip(parts[::2], parts[1::2], strict=True)]
        return parts[0]

    def widened(self, v: ir.Value, signed: bool = False) -> ir.Value:
        """Bytes (unsigned unless `signed`) as int32 lanes."""
        return (self.b.sext if signed else self.b.zext)(v, vector(I32, v.type.count))

    def to_float(self, v: ir.Value) -> ir.Value:
        return self.b.sitofp(v, vector(F32, v.type.count))

    def times(self, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.b.fmul(a, b)

    def multiply_add(self, acc: ir.Value, a: ir.Value, b: ir.Value) -> ir.Value:
        """acc + a * b, lane by lane, rounded once."""
        fma = cgutils.get_or_insert_function(
            self.b.module,
            ir.FunctionType(acc.type, [acc.type] * 3),
            f"llvm.fma.v{acc.type.count}f32",
        )
        return self.b.call(fma, [a, b, acc])

    def dots(self, unsigned: ir.Value, x: ir.Value, below_128: bool = True) -> ir.Value:
        """Lane l: the int32 sum of unsigned[4l + j] * x[4l + j], j < 4, for 64 unsigned bytes and
        64 int8 input values: AVX-512 VNNI's vpdpbusd; elsewhere pmaddubsw then pmaddwd, which
        is exact where the unsigned bytes are below 128 (two products then stay in int16), or,
        for larger ones, the products widened."""
        b, lanes = self.b, vector(I32, 16)
        zeros = ir.Constant(lanes, None)
        if _VNNI:
            return self._call("llvm.x86.avx512.vpdpbusd.512", lanes, [zeros, unsigned, x])
        if below_128 and (_AVX512BW or _AVX2):
            width = 64 if _AVX512BW else 32  # bytes an instruction multiplies
            pairs_type, quads_type = vector(I16, width // 2), vector(I32, width // 4)
            ones = ir.Constant(pairs_type, [1] * (width // 2))
            names = (
                ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512")
                if _AVX512BW
                else ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd")
            )
            quads = []
            for k in range(0, 64, width):
                u, s = self.pick(unsigned, range(k, k + width)), self.pick(x, range(k, k + width))
                pairs = self._call(names[0], pairs_type, [u, s])
                quads.append(self._call(names[1], quads_type, [pairs, ones]))
            return quads[0] if len(quads) == 1 else self.join(*quads)
        wide = vector(I32, 64)
        products = b.mul(b.zext(unsigned, wide), b.sext(x, wide))
        total = zeros
        for j in range(4):
            total = b.add(total, self.pick(products, range(j, 64, 4)))
        return total

    def scaled_sum(self, dots_and_scales: list) -> ir.Value:
        """int32 lanes whose sum is that of each (dots, scales) pair's lanes multiplied, for an
        even number of pairs of int32x16 within int16 (a block's dot products of four values
        below 64, 8-bit scales): two dots vectors packed into one of int16 (packssdw), times
        their scales packed alike in int16 pairs (pmaddwd), a multiply per 32 lanes. The
        lanes' order is not kept: only their sum is."""
        assert len(dots_and_scales) % 2 == 0, "packed two at a time"
        terms = []
        for k in range(0, len(dots_and_scales), 2):
            (dots_a, scales_a), (dots_b, scales_b) = dots_and_scales[k : k + 2]
            terms.append(self._multiply_pairs(self._packed(dots_a, dots_b),
                                              self._packed(scales_a, scales_b)))  # fmt: skip
        total = terms[0]
        for term in terms[1:]:
            total = self.b.add(total, term)
        return total

    def _packed(self, a: ir.Value, b: ir.Value) -> ir.Value:
        """Two int32x16 within int16 as one int16x32, in packssdw's order (per 128 bits: four
        of a's lanes, then four of b's)."""
        if _AVX512BW:
            return self._call("llvm.x86.avx512.packssdw.512", vector(I16, 32), [a, b])
        order = [base + k for block in range(4) for base in (4 * block, 16 + 4 * block)
                 for k in range(4)]  # fmt: skip
        return self.b.trunc(self.pick(a, order, b), vector(I16, 32))

    def _multiply_pairs(self, a: ir.Value, b: ir.Value) -> ir.Value:
        """Lane l: a[2l] * b[2l] + a[2l + 1] * b[2l + 1], for int16x32 (pmaddwd)."""
        if _AVX512BW:
            return self._call("llvm.x86.avx512.pmaddw.d.512", vector(I32, 16), [a, b])
        if _AVX2:
            halves = [self._call("llvm.x86.avx2.pmadd.wd", vector(I32, 8),
                                 [self.pick(a, range(k, k + 16)), self.pick(b, range(k, k + 16))])
                      for k in (0, 16)]  # fmt: skip
            return self.join(*halves)
        wide = vector(I32, 32)
        products = self.b.mul(self.b.sext(a, wide), self.b.sext(b, wide))
        return self.b.add(
            self.pick(products, range(0, 32, 2)), self.pick(products, range(1, 32, 2))
        )

    def add_per_sixteen(self, acc, values, pair: int, terms, offset: int = 0) -> ir.Value:
        """acc + each lane's dot product of four of the 64 values (each less offset) with the
        input's values of runs 2 pair and 2 pair + 1, times the lane of terms (16) for its 16
        values (the types with a scale per 16 values)."""
        x = self.x(64 * pair, 64)
        dots = self.dots(values, x)
        if offset:  # offsets make the values signed: taken off as offset times the input's
            dots = self.b.sub(dots, self.dots(self.constant(values, offset), x))
        lanes = [4 * pair + k // 4 for k in range(16)]
        return self.multiply_add(acc, self.to_float(dots), self.pick(terms, lanes))

    def _call(self, name: str, returns: ir.Type, args: list) -> ir.Value:
        function = cgutils.get_or_insert_function(
            self.b.module, ir.FunctionType(returns, [a.type for a in args]), name
        )
        return self.b.call(function, args)


def _field_matrix(shift: int, width: int, to: int) -> list[int]:
    """The eight bytes (of a 64-bit lane, in memory order) of GF2P8AFFINEQB's bit matrix that
    maps a byte to ((byte >> shift) & (2^width - 1)) << to: its byte 7 - i picks output bit i."""
    matrix = [0] * 8
    for i in range(to, to + width):
        matrix[7 - i] = 1 << (i - to + shift)
    return matrix


def lookup(builder: ir.IRBuilder, indices: ir.Value, table, byte_shuffle: bool) -> ir.Value:
    """table[i] for each byte i of 16 indices (all below 16; table: 16 byte values): with
    byte_shuffle, SSSE3's byte shuffle (pshufb, one instruction); otherwise a compare and select
    per table entry."""
    bytes16 = vector(I8, 16)
    if byte_shuffle:
        shuffle = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(bytes16, [bytes16, bytes16]),
            "llvm.x86.ssse3.pshuf.b.128",
        )
        return builder.call(shuffle, [ir.Constant(bytes16, [v & 0xFF for v in table]), indices])
    looked_up = ir.Constant(bytes16, [0] * 16)
    for index, value in enumerate(table):
        chosen = builder.icmp_unsigned("==", indices, ir.Constant(bytes16, [index] * 16))
        looked_up = builder.select(chosen, ir.Constant(bytes16, [value & 0xFF] * 16), looked_up)
    return looked_up


PREFETCH_LINES = 3  # at most, per block: more slowed Q6_K's 210-byte blocks


def prefetch(builder: ir.IRBuilder, address: ir.Value, block_bytes: int) -> None:
    """Ask for the cache lines of a block simd.PREFETCH_DISTANCE bytes past address."""
    for line in range(min(PREFETCH_LINES, -(-block_bytes // 64))):
        prefetch_line(builder, builder.gep(address, [ir.Constant(I32, 64 * line)]))


def block_step(block_values: int, block_bytes: int, input_group: int = 32) -> Callable:
    """Decorator: an intrinsic step(sums, row, start, x, x_scales, x_sums, block, first) -> sums
    from a function of a BlockIR that returns an input's new running sums: block `block` of a
    uint8 row, which starts at its byte `start`, times the values of that block of inputs
    first, first + 1, ... (rows of the int8 x (B, n), with the scales of their groups of
    input_group values (B, n / input_group) and the int32 sums of their runs of 32 (B, n / 32)),
    one input for each float32x16 of the tuple `sums`. The row's side is emitted once per input,
    alike, and LLVM computes it once."""
    assert block_values % input_group == 0 and input_group % 32 == 0

    def decorate(emit: Callable[[BlockIR], ir.Value]):
        def step(typingctx, sums, row, start, x, x_scales, x_sums, block, first):
            if not (isinstance(sums, types.UniTuple) and sums.dtype == float32x16
                    and row.dtype == types.uint8 and x.dtype == types.int8):  # fmt: skip
                return None

            def codegen(context, builder, signature, args):
                sums, row, start, _, _, _, block, first = args

                def pointer(arg: int, k: int, index) -> ir.Value:
                    """&array[first + k, index] of the 2-d array argument `arg`."""
                    array = context.make_array(signature.args[arg])(context, builder, args[arg])
                    row_length = builder.extract_value(array.shape, 1)
                    at = builder.add(first, ir.Constant(first.type, k))
                    return builder.gep(
                        array.data, [builder.add(builder.mul(at, row_length), index)]
                    )

                first_value = builder.mul(block, ir.Constant(block.type, block_values))
                group = builder.mul(block, ir.Constant(block.type, block_values // input_group))
                run = builder.mul(block, ir.Constant(block.type, block_values // 32))
                row_bytes = builder.gep(
                    context.make_array(signature.args[1])(context, builder, row).data, [start]
                )
                prefetch(builder, row_bytes, block_bytes)
                new_sums = []
                for k in range(signature.args[0].count):
                    block_ir = BlockIR(builder, builder.extract_value(sums, k), row_bytes,
                                       pointer(3, k, first_value), pointer(4, k, group),
                                       pointer(5, k, run))  # fmt: skip
                    new_sums.append(emit(block_ir))
                return context.make_tuple(builder, signature.return_type, new_sums)

            return sums(sums, row, start, x, x_scales, x_sums, block, first), codegen

        step.__name__ = step.__qualname__ = emit.__name__
        return intrinsic(step)

    return decorate


# Inputs whose dot products with a row go through its blocks together, sharing its unpacking: each
# keeps a float32x16 of running sums live. AVX-512's 32 registers hold eight and the row's values
# (a 16-token prompt on Llama-2-7B Q4_K_M: 0.84 s with four, 0.75 with eight); AVX2's 16, of half
# the width, take four.
INPUTS_AT_ONCE = 8 if WIDE_REGISTERS else 4


@intrinsic
def _zero_sums(typingctx):
    """INPUTS_AT_ONCE float32x16 of zeros, a tuple."""
    sums = types.UniTuple(float32x16, INPUTS_AT_ONCE)

    def codegen(context, builder, signature, args):
        zeros = ir.Constant(vector(F32, 16), None)
        return context.make_tuple(builder, sums, [zeros] * INPUTS_AT_ONCE)

    return sums(), codegen


def row_dots(block_terms, block_bytes: int):
    """The int8 family's `int8_row_dot` and `int8_row_dots` for a type whose block step (see
    block_step) is block_terms: each input's blocks' terms in lanes, summed once at the end;
    several inputs at once share the row's unpacking, and each gets the bits it gets alone."""

    @njit(inline="always")
    def int8_row_dots(out, w, blocks, _, i, xq, xs, x_sums):
        """out[k, i] = row i times input k, for each input of xq (B, n)."""
        row = blocks[i]
        n_blocks = row.shape[0] // block_bytes
        n_inputs = xq.shape[0]
        for first in range(0, n_inputs - n_inputs % INPUTS_AT_ONCE, INPUTS_AT_ONCE):
            sums = _zero_sums()
            for block in range(n_blocks):
                sums = block_terms(sums, row, block * block_bytes, xq, xs, x_sums, block, first)
            for k in range(INPUTS_AT_ONCE):
                out[first + k, i] = sum_float32x16(sums[k])
        for first in range(n_inputs - n_inputs % INPUTS_AT_ONCE, n_inputs):
            one = (float32x16_zeros(),)
            for block in range(n_blocks):
                one = block_terms(one, row, block * block_bytes, xq, xs, x_sums, block, first)
            out[first, i] = sum_float32x16(one[0])

    @njit(inline="always")
    def int8_row_dot(w, blocks, _, i, x, x_scales, x_sums):
        """Row i times one input (x (n,), its group scales and sums)."""
        row = blocks[i]
        one = (float32x16_zeros(),)
        xq, xs, sums = x.reshape(1, -1), x_scales.reshape(1, -1), x_sums.reshape(1, -1)
        for block in range(row.shape[0] // block_bytes):
            one = block_terms(one, row, block * block_bytes, xq, xs, sums, block, 0)
        return sum_float32x16(one[0])

    return int8_row_dot, int8_row_dots
