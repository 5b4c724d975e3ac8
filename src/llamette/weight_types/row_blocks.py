"""The int8 family's functions shared by the GGUF types whose values are not int8 (Q4_0, Q4_1, Q5_0,
Q5_1, IQ4_NL, the K-quants, IQ4_XS): each block has terms of its own, so the input is quantized in
groups of 32 (or of the type's `row_group_size`: Q4_K, Q5_K, Q6_K) and each output is one
`int8_row_dot` of the type's module, at any batch size (`product`); a type that can also unpack its
rows to int8 values (`unpack_row`) takes long prompts 16 inputs at a time in SIMD lanes
(`lanes_product`), or any batch that fills half of 16 where its row dot product adds its blocks'
terms in order, as the lanes do (`same_bits_lanes_product`). Each of those modules takes these in as
its own (kernels.dispatch finds them there); a matrix of these types is a NamedTuple holding its
file's bytes as `blocks`."""

from numba import njit

from llamette.kernels import SMALL_BATCH, int8, internal_parallel_kernel

INPUT_GROUP = 32  # values per scale of the quantized input (the lanes'; a row dot product's unless
# its type says otherwise)


@internal_parallel_kernel
def product(out, x, w, inputs, exact):
    """out (B, d) = x (B, n) @ w (d, n)^T, x quantized in the row dot products' groups, a row at
    a time (the same bits either flavour: there is no run.c counterpart)."""
    int8.row_product(out, x, w, inputs)


@internal_parallel_kernel
def lanes_product(out, x, w, inputs, exact):
    """product, but for more than SMALL_BATCH inputs (a long prompt) and not exact: inputs 16
    at a time in SIMD lanes, rows unpacked to int8 values once for all of them. Their bits then
    depend on the batch, as F16's do (see kernels.SMALL_BATCH)."""
    if (exact is not None and exact) or x.shape[0] <= SMALL_BATCH:
        int8.row_product(out, x, w, inputs)
    else:
        int8.lanes_and_rows_product(out, x, w, inputs)


@internal_parallel_kernel
def same_bits_lanes_product(out, x, w, inputs, exact):
    """product, with inputs 16 at a time in SIMD lanes wherever they fill at least half of 16:
    for types whose row dot product sums block by block in order, which the lanes do too, so
    that each input gets the same bits (as the int8 family's own types)."""
    int8.lanes_and_rows_product(out, x, w, inputs)


def input_group_size(tensor) -> int:
    """The smallest groups a product quantizes its input in (they size its memory)."""
    return INPUT_GROUP


@njit(inline="always")
def group_size(w):
    return INPUT_GROUP


@njit(inline="always")
def int8_arrays(w):
    return w.blocks, w.blocks
