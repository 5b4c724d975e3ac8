"""Explicit SIMD lanes for compiled kernels: 16 int32 or float32 values that move as one LLVM
vector, for loops whose arithmetic is fixed lane by lane and which LLVM's vectorizer would not
find on its own.

Generic LLVM vector IR, which LLVM spells with the instructions the CPU has (on one with AVX-512
VNNI `madd_pairs` becomes one `vpdpwssd`); the one target intrinsic, AVX-512 VNNI's `vpdpbusd` in
`madd_quads`, is emitted only where the CPU has it, generic code elsewhere. Float
operations are emitted without fast-math flags, so LLVM keeps them in the order written, as long
as the kernel they are inlined into is not compiled with fastmath (Numba would flag them too).
"""

import numba
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16


def target_features() -> set[str]:
    """The features of the CPU that Numba compiles for, as LLVM names them ("+avx2", ...): those
    of $NUMBA_CPU_FEATURES where it is set (compiling for another CPU, as the tests do for AVX2),
    else the host's, as Numba itself chooses; none where LLVM cannot tell."""
    if numba.config.CPU_FEATURES is not None:
        return set(numba.config.CPU_FEATURES.split(","))
    try:
        return set(binding.get_host_cpu_features().flatten().split(","))
    except RuntimeError:
        return set()


_FEATURES = target_features()
# Whether a float32x16 fits one register, of 32 (AVX-512); elsewhere (AVX2) it takes two of 16,
# and kernels keep fewer of them live at once.
WIDE_REGISTERS = "+avx512f" in _FEATURES
# Whether the CPU multiplies and accumulates in one instruction (AVX-512 VNNI's vpdpwssd), so that
# a sum of madd_pairs waits for its previous value; elsewhere the products (pmaddwd) do not.
FUSED_MADD = "+avx512vnni" in _FEATURES
# Whether the CPU converts halves to floats in one instruction (F16C's vcvtph2ps: every x86-64 CPU
# with AVX2 has it); elsewhere halves are converted by their bits.
HALF_CONVERSION = "+f16c" in _FEATURES
_INT32 = ir.IntType(32)
_INT8 = ir.IntType(8)
# Row dot products ask for the row's bytes this far ahead as they go: the hardware prefetchers
# alone keep too few reads in flight for them, and they then stream a model from memory at a
# fraction of its read bandwidth.
PREFETCH_DISTANCE = 2048  # bytes; 1024 to 8192 measured alike
_INT32_LANES = ir.VectorType(_INT32, LANES)
_FLOAT32_LANES = ir.VectorType(ir.FloatType(), LANES)
_INT16_PAIRS = ir.VectorType(ir.IntType(16), 2 * LANES)
_BYTES = ir.VectorType(ir.IntType(8), 4 * LANES)
_HALF_BITS = ir.VectorType(ir.IntType(16), LANES)
_INT8_LANES = ir.VectorType(_INT8, LANES)


class Int32x16(types.Type):
    def __init__(self):
        super().__init__(name="int32x16")


class Float32x16(types.Type):
    def __init__(self):
        super().__init__(name="float32x16")


int32x16, float32x16 = Int32x16(), Float32x16()


@register_model(Int32x16)
class _Int32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _INT32_LANES)


@register_model(Float32x16)
class _Float32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _FLOAT32_LANES)


def _pointer(context, builder, array_type, array, index, element_type):
    """A pointer to array[index], as a pointer to element_type."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), element_type.as_pointer())


def _broadcast(builder, value, vector_type):
    vector = builder.insert_element(ir.Constant(vector_type, None), value, _INT32(0))
    return builder.shuffle_vector(vector, vector, ir.Constant(_INT32_LANES, None))


def prefetch_line(builder: ir.IRBuilder, address: ir.Value) -> None:
    """Ask for the cache line PREFETCH_DISTANCE bytes past address (an i8 pointer): a hint,
    which never faults, past the end of an array included."""
    function = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()] + [_INT32] * 3),
        "llvm.prefetch.p0i8",
    )
    ahead = builder.gep(address, [_INT32(PREFETCH_DISTANCE)])
    builder.call(function, [ahead, _INT32(0), _INT32(3), _INT32(1)])  # a read, for all caches


@intrinsic
def prefetch_ahead(typingctx, array, index):
    """Ask for the cache line PREFETCH_DISTANCE bytes past array[index] (see prefetch_line)."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, signature, args):
        bytes_pointer = ir.IntType(8).as_pointer()
        element = context.get_data_type(signature.args[0].dtype)
        address = _pointer(context, builder, signature.args[0], args[0], args[1], element)
        prefetch_line(builder, builder.bitcast(address, bytes_pointer))
        return context.get_dummy_value()

    return types.none(array, index), codegen


@intrinsic
def int32x16_zeros(typingctx):
    return int32x16(), lambda context, builder, signature, args: ir.Constant(_INT32_LANES, None)


@intrinsic
def float32x16_zeros(typingctx):
    return float32x16(), lambda context, builder, signature, args: ir.Constant(_FLOAT32_LANES, None)


@intrinsic
def float32x16_of(typingctx, value):
    """A float32 in all 16 lanes."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return _broadcast(builder, args[0], _FLOAT32_LANES)

    return float32x16(value), codegen


@intrinsic
def int32x16_of(typingctx, value):
    """An int32 in all 16 lanes."""
    if value != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return _broadcast(builder, args[0], _INT32_LANES)

    return int32x16(value), codegen


@intrinsic
def add_int32x16(typingctx, a, b):
    return int32x16(a, b), lambda context, builder, signature, args: builder.add(*args)


def _store_bytes(context, builder, out_type, out, index, values):
    """Store the <n x i8> values at out[index:index + n], widened to out's integer type."""
    element = context.get_value_type(out_type.dtype)
    wide = ir.VectorType(element, values.type.count)
    if element.width > 8:
        values = builder.sext(values, wide)
    builder.store(values, _pointer(context, builder, out_type, out, index, wide), align=1)


def _loaded_bytes(context, builder, array_type, array, index, count):
    return builder.load(
        _pointer(context, builder, array_type, array, index, ir.VectorType(_INT8, count)), align=1
    )


@intrinsic
def copy_32(typingctx, out, out_index, values, index):
    """out[out_index:out_index + 32] = the 32 bytes values[index:], as int8 (out: int8 or
    int16): one vector load and store, where a loop over 32 values runs element by element."""
    if not isinstance(out.dtype, types.Integer) or values.dtype.bitwidth != 8:
        return None

    def codegen(context, builder, signature, args):
        out, out_index, values, index = args
        loaded = _loaded_bytes(context, builder, signature.args[2], values, index, 32)
        _store_bytes(context, builder, signature.args[0], out, out_index, loaded)
        return context.get_dummy_value()

    return types.none(out, out_index, values, index), codegen


@intrinsic
def sum_16(typingctx, values, index):
    """The int32 sum of the 16 int8 values[index:index + 16]: as unsigned bytes (each plus 128)
    summed by psadbw, less 16 * 128."""
    if values.dtype != types.int8:
        return None

    def codegen(context, builder, signature, args):
        values, index = args
        loaded = _loaded_bytes(context, builder, signature.args[0], values, index, 16)
        unsigned = builder.xor(loaded, ir.Constant(loaded.type, [0x80] * 16))
        psadbw = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VectorType(ir.IntType(64), 2), [loaded.type, loaded.type]),
            "llvm.x86.sse2.psad.bw",
        )
        halves = builder.call(psadbw, [unsigned, ir.Constant(loaded.type, [0] * 16)])
        total = builder.add(builder.extract_element(halves, _INT32(0)),
                            builder.extract_element(halves, _INT32(1)))  # fmt: skip
        return builder.sub(builder.trunc(total, _INT32), _INT32(16 * 128))

    return types.int32(values, index), codegen


@intrinsic
def nibbles_64(typingctx, out, out_index, packed, index):
    """out[out_index:out_index + 64] = the low nibbles of the 32 bytes packed[index:], then
    their high nibbles (out: int8 or int16)."""
    if not isinstance(out.dtype, types.Integer) or packed.dtype.bitwidth != 8:
        return None

    def codegen(context, builder, signature, args):
        out, out_index, packed, index = args
        loaded = _loaded_bytes(context, builder, signature.args[2], packed, index, 32)
        bytes32 = loaded.type
        low = builder.and_(loaded, ir.Constant(bytes32, [15] * 32))
        high = builder.lshr(loaded, ir.Constant(bytes32, [4] * 32))
        both = builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(_INT32, 64),
                                                             list(range(64))))  # fmt: skip
        _store_bytes(context, builder, signature.args[0], out, out_index, both)
        return context.get_dummy_value()

    return types.none(out, out_index, packed, index), codegen


@intrinsic
def scaled_term(typingctx, acc, scale):
    """float32(acc) * scale for an int32x16 acc, lane by lane."""

    def codegen(context, builder, signature, args):
        acc, scale = args
        return builder.fmul(builder.sitofp(acc, _FLOAT32_LANES),
                            _broadcast(builder, scale, _FLOAT32_LANES))  # fmt: skip

    return float32x16(acc, types.float32), codegen


@intrinsic
def add_scaled_term(typingctx, term, acc, scale):
    """term + float32(acc) * scale for an int32x16 acc, lane by lane, rounded once (fused)."""

    def codegen(context, builder, signature, args):
        term, acc, scale = args
        fma = ir.FunctionType(_FLOAT32_LANES, [_FLOAT32_LANES] * 3)
        fma = cgutils.get_or_insert_function(builder.module, fma, "llvm.fma.v16f32")
        scales = _broadcast(builder, scale, _FLOAT32_LANES)
        return builder.call(fma, [builder.sitofp(acc, _FLOAT32_LANES), scales, term])

    return float32x16(term, acc, types.float32), codegen


@intrinsic
def add_float32x16(typingctx, a, b):
    return float32x16(a, b), lambda context, builder, signature, args: builder.fadd(*args)


@intrinsic
def madd_pairs(typingctx, acc, pairs, offset, w, k):
    """acc + (x[2l] * w[k] + x[2l + 1] * w[k + 1] for each lane l), where x is the 32 int16
    values of `pairs` from `offset` (lane l's two) and w an int16 array: exact int32 sums."""

    def codegen(context, builder, signature, args):
        acc, pairs, offset, w, k = args
        x = builder.load(_pointer(context, builder, signature.args[1], pairs, offset,
                                  _INT16_PAIRS), align=2)  # fmt: skip
        w_pair = builder.load(_pointer(context, builder, signature.args[3], w, k, _INT32), align=2)
        w_pairs = builder.bitcast(_broadcast(builder, w_pair, _INT32_LANES), _INT16_PAIRS)
        wide = ir.VectorType(_INT32, 2 * LANES)
        products = builder.mul(builder.sext(x, wide), builder.sext(w_pairs, wide))
        even = builder.shuffle_vector(products, products, ir.Constant(_INT32_LANES, list(range(0, 2 * LANES, 2))))  # fmt: skip
        odd = builder.shuffle_vector(products, products, ir.Constant(_INT32_LANES, list(range(1, 2 * LANES, 2))))  # fmt: skip
        return builder.add(acc, builder.add(even, odd))

    return int32x16(acc, pairs, offset, w, k), codegen


@intrinsic
def madd_quads(typingctx, acc, quads, offset, w, k):
    """acc + (u[4l] * w[k] + ... + u[4l + 3] * w[k + 3] for each lane l), where u is the 64
    uint8 values of `quads` from `offset` (lane l's four) and w an int8 array: exact int32 sums.
    One AVX-512 VNNI vpdpbusd (FUSED_MADD), w's four read with it, elsewhere generic vector
    code."""

    def codegen(context, builder, signature, args):
        acc, quads, offset, w, k = args
        u = builder.load(_pointer(context, builder, signature.args[1], quads, offset, _BYTES),
                         align=1)  # fmt: skip
        w_quad = builder.load(_pointer(context, builder, signature.args[3], w, k, _INT32), align=1)
        w_quads = builder.bitcast(_broadcast(builder, w_quad, _INT32_LANES), _BYTES)
        if FUSED_MADD:  # unsigned bytes first, signed second
            vpdpbusd = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(_INT32_LANES, [_INT32_LANES, _BYTES, _BYTES]),
                "llvm.x86.avx512.vpdpbusd.512",
            )
            return builder.call(vpdpbusd, [acc, u, w_quads])
        wide = ir.VectorType(_INT32, 4 * LANES)
        products = builder.mul(builder.zext(u, wide), builder.sext(w_quads, wide))
        for j in range(4):
            lane_terms = ir.Constant(_INT32_LANES, list(range(j, 4 * LANES, 4)))
            acc = builder.add(acc, builder.shuffle_vector(products, products, lane_terms))
        return acc

    return int32x16(acc, quads, offset, w, k), codegen


@intrinsic
def add_group_terms(typingctx, val, acc, w_scale, x_scales, offset):
    """val + (float32(acc) * w_scale) * x_scales[offset + l] for each lane l, in that order."""

    def codegen(context, builder, signature, args):
        val, acc, w_scale, x_scales, offset = args
        w_scale = context.cast(builder, w_scale, signature.args[2], types.float32)
        x_scale = builder.load(_pointer(context, builder, signature.args[3], x_scales, offset,
                                        _FLOAT32_LANES), align=4)  # fmt: skip
        term = builder.fmul(
            builder.sitofp(acc, _FLOAT32_LANES), _broadcast(builder, w_scale, _FLOAT32_LANES)
        )
        return builder.fadd(val, builder.fmul(term, x_scale))  # fmt: skip

    return float32x16(val, acc, w_scale, x_scales, offset), codegen


@intrinsic
def store_lanes(typingctx, out, index, v):
    """out[index:index + 16] = v: a float32x16 into a contiguous float32 array, an int32x16 into
    an int32 one."""
    if out.dtype != {float32x16: types.float32, int32x16: types.int32}.get(v):
        return None

    def codegen(context, builder, signature, args):
        out, index, v = args
        pointer = _pointer(context, builder, signature.args[0], out, index, v.type)
        builder.store(v, pointer, align=4)
        return context.get_dummy_value()

    return types.none(out, index, v), codegen


@intrinsic
def load_lanes(typingctx, array, index):
    """array[index:index + 16] of a contiguous array as 16 lanes: float32 (int32) values as a
    float32x16 (int32x16); IEEE halves kept as uint16 bits, and int8 values, as a float32x16."""
    lanes = {types.float32: float32x16, types.int32: int32x16, types.uint16: float32x16,
             types.int8: float32x16}.get(array.dtype)  # fmt: skip
    if lanes is None:
        return None

    def codegen(context, builder, signature, args):
        array, index = args
        dtype = signature.args[0].dtype
        stored = {types.int32: _INT32_LANES, types.uint16: _HALF_BITS,
                  types.int8: _INT8_LANES}.get(dtype, _FLOAT32_LANES)  # fmt: skip
        pointer = _pointer(context, builder, signature.args[0], array, index, stored)
        loaded = builder.load(pointer, align=dtype.bitwidth // 8)
        if dtype == types.uint16:
            return _float32_of_halves(builder, loaded)
        if dtype == types.int8:
            return builder.sitofp(loaded, _FLOAT32_LANES)
        return loaded

    return lanes(array, index), codegen


def _float32_of_halves(builder: ir.IRBuilder, bits: ir.Value) -> ir.Value:
    """IEEE halves (16 x i16 bits; finite) as float32 lanes, exactly: F16C's conversion where the
    CPU has it; elsewhere the magnitude's bits moved into a float's and rescaled by 2**112
    (subnormals included), then the sign, in integer and float operations every vector unit
    has."""
    if HALF_CONVERSION:
        return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), LANES)),
                             _FLOAT32_LANES)  # fmt: skip

    def splat(value: int) -> ir.Constant:
        return ir.Constant(_INT32_LANES, [value] * LANES)

    widened = builder.zext(bits, _INT32_LANES)
    magnitude = builder.shl(builder.and_(widened, splat(0x7FFF)), splat(13))
    rescaled = builder.fmul(builder.bitcast(magnitude, _FLOAT32_LANES),
                            ir.Constant(_FLOAT32_LANES, [2.0**112] * LANES))  # fmt: skip
    sign = builder.shl(builder.and_(widened, splat(0x8000)), splat(16))
    signed = builder.or_(builder.bitcast(rescaled, _INT32_LANES), sign)
    return builder.bitcast(signed, _FLOAT32_LANES)


@intrinsic
def multiply(typingctx, a, b):
    """a * b lane by lane."""

    def codegen(context, builder, signature, args):
        return builder.fmul(*args)

    return float32x16(a, b), codegen


@intrinsic
def load_each(typingctx, array, index, count):
    """A tuple of `count` (a constant) float32x16: array[index:index + 16], the next 16, ..."""
    if array.dtype != types.float32 or not isinstance(count, types.IntegerLiteral):
        return None
    tuple_type = types.UniTuple(float32x16, count.literal_value)

    def codegen(context, builder, signature, args):
        array, index, _ = args
        vectors = context.get_value_type(tuple_type)(None)
        for k in range(count.literal_value):
            offset = builder.add(index, ir.Constant(index.type, LANES * k))
            pointer = _pointer(context, builder, signature.args[0], array, offset, _FLOAT32_LANES)
            vectors = builder.insert_value(vectors, builder.load(pointer, align=4), k)
        return vectors

    return tuple_type(array, index, count), codegen


@intrinsic
def store_each(typingctx, out, index, vectors):
    """out[index:index + 16 * len(vectors)] = the float32x16 vectors, one after another."""
    if out.dtype != types.float32 or not (
        isinstance(vectors, types.UniTuple) and vectors.dtype == float32x16
    ):
        return None

    def codegen(context, builder, signature, args):
        out, index, vectors = args
        for k in range(signature.args[2].count):
            offset = builder.add(index, ir.Constant(index.type, LANES * k))
            pointer = _pointer(context, builder, signature.args[0], out, offset, _FLOAT32_LANES)
            builder.store(builder.extract_value(vectors, k), pointer, align=4)
        return context.get_dummy_value()

    return types.none(out, index, vectors), codegen


@intrinsic
def multiply_add(typingctx, acc, a, b):
    """acc + a * b lane by lane, rounded once (a fused multiply-add)."""

    def codegen(context, builder, signature, args):
        acc, a, b = args
        fma = ir.FunctionType(_FLOAT32_LANES, [_FLOAT32_LANES] * 3)
        fma = cgutils.get_or_insert_function(builder.module, fma, "llvm.fma.v16f32")
        return builder.call(fma, [a, b, acc])

    return float32x16(acc, a, b), codegen


@intrinsic
def sum_float32x16(typingctx, v):
    """The 16 lanes added in a fixed order: upper half onto lower half, down to one lane."""

    def codegen(context, builder, signature, args):
        (v,) = args
        width = LANES
        while width > 1:
            width //= 2
            half = ir.VectorType(_INT32, width)
            lower = builder.shuffle_vector(v, v, ir.Constant(half, list(range(width))))
            upper = builder.shuffle_vector(v, v, ir.Constant(half, list(range(width, 2 * width))))
            v = builder.fadd(lower, upper)
        return builder.extract_element(v, _INT32(0))

    return types.float32(v), codegen


def _sums_of_sixteen(builder, vectors, add):
    """Lane k of the result: the 16 lanes of vectors[k] added as sum_float32x16 adds them (upper
    half onto lower half), 15 vector adds in all: a tree of shuffles that pairs up the vectors as
    it halves their lanes."""
    partials = list(vectors)
    width = LANES  # partial sums per vector in each block of lanes
    while len(partials) > 1:  # two vectors of blocks of `width` -> one of blocks of width / 2
        half = width // 2
        lower = [b + k for b in range(0, 2 * LANES, width) for k in range(half)]
        upper = [j + half for j in lower]
        partials = [
            add(builder.shuffle_vector(p, q, ir.Constant(_INT32_LANES, lower)),
                builder.shuffle_vector(p, q, ir.Constant(_INT32_LANES, upper)))
            for p, q in zip(partials[::2], partials[1::2], strict=True)
        ]  # fmt: skip
        width = half
    return partials[0]


@intrinsic
def sums_float32x16(typingctx, vectors):
    """Sixteen float32x16 sums at once: lane k of the result is sum_float32x16(vectors[k]), with
    the same additions in the same order."""
    if not (isinstance(vectors, types.UniTuple) and vectors.count == LANES
            and vectors.dtype == float32x16):  # fmt: skip
        return None

    def codegen(context, builder, signature, args):
        vectors = [builder.extract_value(args[0], k) for k in range(LANES)]
        return _sums_of_sixteen(builder, vectors, builder.fadd)

    return float32x16(vectors), codegen


@intrinsic
def row_group_dots(typingctx, w, start, row_stride, x, x_start, group_size):
    """The int32 dot products of 16 rows' groups with one of x: lane l is the sum over
    j < group_size (32 or 64) of w[start + l * row_stride + j] * x[x_start + j], int8 arrays
    (flat indices). Exact: each row's products summed in pairs (pmaddwd), the 16 rows' partial
    sums then reduced together (_sums_of_sixteen)."""
    if not (w.dtype == types.int8 and x.dtype == types.int8
            and isinstance(group_size, types.IntegerLiteral)
            and group_size.literal_value in (32, 64)):  # fmt: skip
        return None
    width = group_size.literal_value
    values, wide = ir.VectorType(ir.IntType(8), width), ir.VectorType(_INT32, width)

    def codegen(context, builder, signature, args):
        w, start, row_stride, x, x_start, _ = args
        w_type, x_type = signature.args[0], signature.args[3]
        x_wide = builder.sext(
            builder.load(_pointer(context, builder, x_type, x, x_start, values), align=1), wide
        )
        partials = []
        for row in range(LANES):
            at = builder.add(start, builder.mul(row_stride, ir.Constant(row_stride.type, row)))
            row_values = builder.load(_pointer(context, builder, w_type, w, at, values), align=1)
            products = builder.mul(builder.sext(row_values, wide), x_wide)
            pairs = [builder.shuffle_vector(products, products, ir.Constant(
                ir.VectorType(_INT32, width // 2), list(range(parity, width, 2))))
                for parity in (0, 1)]  # fmt: skip
            partial = builder.add(*pairs)
            if width == 64:  # 32 pair sums -> 16
                halves = [builder.shuffle_vector(partial, partial, ir.Constant(
                    _INT32_LANES, list(range(h, h + LANES)))) for h in (0, LANES)]  # fmt: skip
                partial = builder.add(*halves)
            partials.append(partial)
        return _sums_of_sixteen(builder, partials, builder.add)

    return int32x16(w, start, row_stride, x, x_start, group_size), codegen


@intrinsic
def gather_lanes(typingctx, array, index, stride):
    """array[index + l * stride] for lanes l = 0..15 of a float32 array, as a float32x16."""
    if array.dtype != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return _gather(context, builder, signature.args[0], *args, ir.FloatType(), align=4)

    return float32x16(array, index, stride), codegen


@intrinsic
def gather_half_lanes(typingctx, data, index, stride):
    """The IEEE halves stored (little-endian) at bytes index + l * stride of a uint8 array, for
    lanes l = 0..15, as a float32x16 (converted exactly)."""
    if data.dtype != types.uint8:
        return None

    def codegen(context, builder, signature, args):
        bits = _gather(context, builder, signature.args[0], *args, ir.IntType(16), align=1)
        halves = builder.bitcast(bits, ir.VectorType(ir.HalfType(), LANES))
        return builder.fpext(halves, _FLOAT32_LANES)

    return float32x16(data, index, stride), codegen


def _gather(context, builder, array_type, array, index, stride, element_type, align):
    """The 16 values of element_type at array[index + l * stride] (flat, in elements of the
    array), l = 0..15, as one vector."""
    v = ir.Constant(ir.VectorType(element_type, LANES), None)
    for lane in range(LANES):
        at = builder.add(index, builder.mul(stride, ir.Constant(stride.type, lane)))
        pointer = _pointer(context, builder, array_type, array, at, element_type)
        v = builder.insert_element(v, builder.load(pointer, align=align), _INT32(lane))
    return v


@intrinsic
def add_row_group_terms(typingctx, val, acc, w_scales, x_scale):
    """val + (float32(acc) * w_scales) * x_scale lane by lane, in that order: runq.c's float
    steps for 16 rows' group dot products acc, each row's weight scale in its lane."""
    if x_scale != types.float32:
        return None

    def codegen(context, builder, signature, args):
        val, acc, w_scales, x_scale = args
        term = builder.fmul(builder.sitofp(acc, _FLOAT32_LANES), w_scales)
        return builder.fadd(val, builder.fmul(term, _broadcast(builder, x_scale, _FLOAT32_LANES)))

    return float32x16(val, acc, w_scales, x_scale), codegen


def _int8_dot(width: int):
    """An intrinsic dot_int8x<width>(a, a_start, b, b_start): the int32 sum of
    a[a_start + j] * b[b_start + j] for j < width, over two contiguous int8 arrays.

    One vector expression, which LLVM compiles to SIMD multiply-adds (pmaddwd; VNNI where there
    is one) and a horizontal sum: a loop of 32 steps would be unrolled into scalar code instead.
    """
    values = ir.VectorType(ir.IntType(8), width)
    products = ir.VectorType(_INT32, width)

    @intrinsic
    def dot(typingctx, a, a_start, b, b_start):
        if not (a.dtype == types.int8 and b.dtype == types.int8):
            return None

        def codegen(context, builder, signature, args):
            a_type, _, b_type, _ = signature.args
            a, a_start, b, b_start = args
            a = builder.load(_pointer(context, builder, a_type, a, a_start, values), align=1)
            b = builder.load(_pointer(context, builder, b_type, b, b_start, values), align=1)
            product = builder.mul(builder.sext(a, products), builder.sext(b, products))
            total = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(_INT32, [products]),
                f"llvm.vector.reduce.add.v{width}i32",
            )
            return builder.call(total, [product])

        return types.int32(a, a_start, b, b_start), codegen

    return dot


dot_int8x32, dot_int8x64 = _int8_dot(32), _int8_dot(64)
