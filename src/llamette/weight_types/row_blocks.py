"""The int8 family's functions shared by the types whose products go a row at a time at any batch
size (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K): their values are not int8 and each block has terms of
its own, so the input is quantized in groups of 32 and each output is one `int8_row_dot` of the
type's module. Each of those modules takes these in as its own (kernels.dispatch finds them
there); a matrix of these types is a NamedTuple holding its file's bytes as `blocks`."""

from numba import njit

from llamette.kernels import int8, parallel_kernel

INPUT_GROUP = 32  # values per scale of the quantized input


@parallel_kernel
def product(out, x, w, inputs, exact):
    """out (B, d) = x (B, n) @ w (d, n)^T, x quantized in groups of 32 (the same bits either
    flavour: there is no run.c counterpart)."""
    int8.row_product(out, x, w, inputs)


def input_group_size(tensor) -> int:
    """The groups a product quantizes its input in."""
    return INPUT_GROUP


@njit(inline="always")
def group_size(w):
    return INPUT_GROUP


@njit(inline="always")
def int8_arrays(w):
    return w.blocks, w.blocks
