"""Where compiled code picks a weight type's own function: each function below, called from a
kernel, runs the function of the same name in the module of its `w` argument's weight type
(llamette.weight_types' table), chosen when the kernel is compiled. A type module defines those
it takes part in: every type `decode_row` and `product`, the decoded family `row_dot`, the int8
family `group_size` (and `row_group_size` where its row dot products take their input in other
groups), `int8_arrays`, `unpack_row` (with `scale_group_size` and `unpack_minimums` where its
scales are not one per input group or it has minimums), `int8_row_dot` (and, where it computes
several inputs at once, `int8_row_dots`) and `sixteen_rows`."""

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

from numba import njit
from numba.core import types
from numba.core.typing.templates import infer, infer_global, make_overload_template
from numba.extending import intrinsic

from llamette.kernels.symbols import call_by_symbol

COMPILED_ONLY = "runs inside compiled code only"

# The names of the weight types whose products another process compiles (see
# products_compiled_elsewhere).
_PRODUCTS_ELSEWHERE: ContextVar[frozenset[str]] = ContextVar("products", default=frozenset())


def _inlined(function):
    """Registers an implementation chooser for `function`, as numba.extending.overload does, whose
    code Numba inlines where it is called, typed but never compiled alone (see _typed_only)."""

    def register(choose):
        overload_template = make_overload_template(function, choose, _OVERLOAD_JIT_OPTIONS,
                                                   strict=True, inline="always")  # fmt: skip
        template = type(overload_template)(overload_template.__name__, (overload_template,),
                                           {"_build_impl": _typed_only})  # fmt: skip
        infer(template)
        infer_global(function, types.Function(template))
        return choose

    return register


_OVERLOAD_JIT_OPTIONS = {"no_cpython_wrapper": True}


def _typed_only(template, cache_key, args, kws):
    """The implementation `template` chooses for these argument types, as Numba's overload template
    builds it (_build_impl) but for its compile: Numba compiles each implementation as a function
    of its own, to check it, though code inlined where it is called never runs alone (a second of
    a new weight type's first run). Unable to compile, the implementation is typed only, where it
    is inlined."""
    implementation = template._overload_func(*args, **kws)
    if implementation is None:
        template._impl_cache[cache_key] = None, None
        return None, None
    dispatcher = njit(**_OVERLOAD_JIT_OPTIONS)(implementation)
    dispatcher._can_compile = False  # (disable_compile() asks for a compiled signature first)
    template._impl_cache[cache_key] = dispatcher, args
    return dispatcher, args


@contextlib.contextmanager
def products_compiled_elsewhere(type_names: Iterable[str]) -> Iterator[None]:
    """While the block runs, a function compiled here that calls the product of one of these
    weight types (not compiled in this process) calls it by its symbol alone, unchecked and
    uncompiled, as another process compiles it (a cold start's helper compiles the forward pass
    meanwhile, llamette.ahead); the function is then for the cache only (kernels.symbols.stood_in).
    Numba keeps the typing of such a call for the rest of the process: the helper compiles no
    other call of those products after it.
    """
    token = _PRODUCTS_ELSEWHERE.set(frozenset(type_names))
    try:
        yield
    finally:
        _PRODUCTS_ELSEWHERE.reset(token)


def _own(w, name: str):
    """The function `name` of the weight type whose compiled-code type is w."""
    from llamette.weight_types import type_of  # here: the types' modules import the kernels

    return getattr(type_of(w), name)


@intrinsic
def product(typingctx, out, x, w, inputs, exact):
    """out (B, d) = x (B, n) @ w (d, n)^T; `inputs`: Int8Inputs, which may hold x quantized
    already; exact: the reference flavour (run.c's arithmetic where the type has one). A call of
    the type's own product kernel by symbol (kernels.symbols), with no function between (an
    overload's would compile all the code of the type's product again)."""
    from llamette.weight_types import type_of

    kernel, argtypes = types.Dispatcher(_own(w, "product")), (out, x, w, inputs, exact)
    elsewhere = (type_of(w).NAME in _PRODUCTS_ELSEWHERE.get()
                 and argtypes not in kernel.dispatcher.overloads)  # fmt: skip
    if elsewhere:  # typed as a product is: it returns nothing
        signature = types.none(*argtypes)
    else:
        signature = typingctx.resolve_function_type(kernel, argtypes, {})

    def call(context, builder, _, args):
        return call_by_symbol(context, builder, kernel.dispatcher, signature, args, elsewhere)

    return signature, call


def decode_row(out, w, i):
    """out (n,) = row i of w as float32 values (an embedding lookup)."""
    raise NotImplementedError(COMPILED_ONLY)


def row_dot(w, i, x):
    """Row i of w times the float32 vector x, the row decoded as it goes (the decoded family)."""
    raise NotImplementedError(COMPILED_ONLY)


def group_size(w):
    """Values per scale of an int8-family type (the groups its input is quantized in)."""
    raise NotImplementedError(COMPILED_ONLY)


def row_group_size(w):
    """Values per scale of the input of an int8-family type's row dot products (int8_row_dot):
    the type's own, else group_size(w)."""
    raise NotImplementedError(COMPILED_ONLY)


def int8_arrays(w):
    """The two arrays that hold int8-family weights (a type with one passes it twice): kernels
    take them out of w once, before their loops, and pass them to the three functions below
    (an array read from a tuple inside a parallel loop costs a reference count each time)."""
    raise NotImplementedError(COMPILED_ONLY)


def unpack_row(values, scales, w, a, b, i):
    """Row i of int8-family weights w (arrays a, b): its values, each in -128..127, into the
    integer array `values`, its scales into `scales` (float32, one per scale_group_size)."""
    raise NotImplementedError(COMPILED_ONLY)


def scale_group_size(w):
    """Values per scale of the rows unpack_row unpacks: the type's own, else group_size(w)."""
    raise NotImplementedError(COMPILED_ONLY)


def unpack_minimums(minimums, w, a, b, i):
    """Whether the int8-family weights w have minimums (a value stands for its int8 value times
    its scale, less its minimum); if so, row i's minimums into `minimums` (float32, one per
    scale)."""
    raise NotImplementedError(COMPILED_ONLY)


def int8_row_dot(w, a, b, i, x, x_scales, x_sums):
    """Row i of int8-family weights w (arrays a, b) times one quantized input (int8 x, its group
    scales and sums of 32), with runq.c's arithmetic."""
    raise NotImplementedError(COMPILED_ONLY)


def int8_row_dots(out, w, a, b, i, xq, xs, x_sums):
    """out[k, i] = row i of int8-family weights w (arrays a, b) times each quantized input k
    (xq (B, n), its group scales and sums), each as int8_row_dot computes it alone: the type's
    own where it has one (several inputs at once), else int8_row_dot input by input."""
    raise NotImplementedError(COMPILED_ONLY)


def sixteen_rows(w, a, b, first, g, groups, x):
    """Rows first..first + 15 of int8-family weights w (arrays a, b; `groups` a row) at group g:
    their int32 dot products with the group of the int8 input x (an int32x16) and their scales
    (a float32x16)."""
    raise NotImplementedError(COMPILED_ONLY)


@_inlined(decode_row)
def _decode_row(out, w, i):
    impl = _own(w, "decode_row")
    return lambda out, w, i: impl(out, w, i)


@_inlined(row_dot)
def _row_dot(w, i, x):
    impl = _own(w, "row_dot")
    return lambda w, i, x: impl(w, i, x)


@_inlined(group_size)
def _group_size(w):
    impl = _own(w, "group_size")
    return lambda w: impl(w)


@_inlined(row_group_size)
def _row_group_size(w):
    from llamette.weight_types import type_of

    impl = getattr(type_of(w), "row_group_size", None) or type_of(w).group_size
    return lambda w: impl(w)


@_inlined(int8_arrays)
def _int8_arrays(w):
    impl = _own(w, "int8_arrays")
    return lambda w: impl(w)


@_inlined(unpack_row)
def _unpack_row(values, scales, w, a, b, i):
    impl = _own(w, "unpack_row")
    return lambda values, scales, w, a, b, i: impl(values, scales, w, a, b, i)


@_inlined(scale_group_size)
def _scale_group_size(w):
    from llamette.weight_types import type_of

    impl = getattr(type_of(w), "scale_group_size", None) or type_of(w).group_size
    return lambda w: impl(w)


@_inlined(unpack_minimums)
def _unpack_minimums(minimums, w, a, b, i):
    from llamette.weight_types import type_of

    impl = getattr(type_of(w), "unpack_minimums", None)
    if impl is None:
        return lambda minimums, w, a, b, i: False
    return lambda minimums, w, a, b, i: impl(minimums, w, a, b, i)


@_inlined(int8_row_dot)
def _int8_row_dot(w, a, b, i, x, x_scales, x_sums):
    impl = _own(w, "int8_row_dot")
    return lambda w, a, b, i, x, x_scales, x_sums: impl(w, a, b, i, x, x_scales, x_sums)


@_inlined(int8_row_dots)
def _int8_row_dots(out, w, a, b, i, xq, xs, x_sums):
    from llamette.weight_types import type_of

    kind = type_of(w)
    if hasattr(kind, "int8_row_dots"):
        impl = kind.int8_row_dots
        return lambda out, w, a, b, i, xq, xs, x_sums: impl(out, w, a, b, i, xq, xs, x_sums)
    row_dot = kind.int8_row_dot

    def each_input(out, w, a, b, i, xq, xs, x_sums):
        for k in range(xq.shape[0]):
            out[k, i] = row_dot(w, a, b, i, xq[k], xs[k], x_sums[k])

    return each_input


@_inlined(sixteen_rows)
def _sixteen_rows(w, a, b, first, g, groups, x):
    impl = _own(w, "sixteen_rows")
    return lambda w, a, b, first, g, groups, x: impl(w, a, b, first, g, groups, x)
