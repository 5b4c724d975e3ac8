"""Calls between compiled kernels by symbol. Numba lowers a call of one compiled function from
another by linking all of the callee's code into the caller, where it is optimized and compiled to
machine code again: a kernel's code is compiled once more at each level of calls above it (a
K-quant's product task five times over, the forward pass's compile most of all). A call by symbol
leaves the callee's code where it is, compiled once, and links to it when the caller is loaded.
The symbol is one of llamette's own, the same in every process (Numba's names count the functions
a process has compiled before, so that a cached caller would name a callee that another process
compiled otherwise), made to point at the callee wherever it is compiled or loaded."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import NamedTuple

from llvmlite import binding
from numba.core import cgutils, types
from numba.core.funcdesc import default_mangler
from numba.core.imputils import lower_builtin
from numba.core.typing.templates import AbstractTemplate, infer_global

# The kernels (called_by_symbol) that another process compiles (see compiled_elsewhere).
_ELSEWHERE: ContextVar[frozenset] = ContextVar("kernels_elsewhere", default=frozenset())


class LoadKernel(NamedTuple):
    """The kernel for argtypes that a cached function calls by symbol: run, as Numba runs a cached
    function's reload_init, before that function's code is loaded, so that the symbol is there."""

    module: str
    name: str
    argtypes: tuple

    def __call__(self) -> None:
        kernel = getattr(importlib.import_module(self.module), self.name)
        published(getattr(kernel, "kernel", kernel), self.argtypes)


def published(kernel, argtypes: tuple) -> str:
    """The symbol of kernel's compiled function for argtypes, compiled (or loaded) if need be,
    pointing at it in this process."""
    if argtypes not in kernel.overloads:
        kernel.compile(argtypes)
    compiled = kernel.overloads[argtypes]
    address = compiled.library.get_pointer_to_function(compiled.fndesc.mangled_name)
    if not address:
        raise RuntimeError(f"{kernel.py_func.__name__}{argtypes}: compiled, but not found")
    symbol = _symbol(kernel, argtypes)
    binding.add_symbol(symbol, address)
    return symbol


def stood_in(kernel, argtypes: tuple) -> str:
    """The symbol of kernel's function for argtypes, which another process compiles, pointing in
    this process at C's abort(): for a caller compiled here only to be cached (the kernel is
    there, for the process that loads the caller)."""
    symbol = _symbol(kernel, argtypes)
    binding.add_symbol(symbol, ctypes.cast(ctypes.CDLL(None).abort, ctypes.c_void_p).value)
    return symbol


def _symbol(kernel, argtypes: tuple) -> str:
    name = f"by_symbol.{kernel.py_func.__module__}.{kernel.py_func.__name__}"
    return default_mangler(name, argtypes)


def call_by_symbol(context, builder, kernel, signature, args, compiled_elsewhere: bool = False):
    """A call, lowered, of the compiled function of `kernel` (a dispatcher defined at the top
    level of a module, as a kernel or called_by_symbol) for `signature`, by its symbol; of a
    function that another process compiles, if compiled_elsewhere (see stood_in)."""
    if compiled_elsewhere:
        restype, argtypes = signature.return_type, signature.args
        symbol = stood_in(kernel, argtypes)
    else:
        callee = kernel.overloads[signature.args].fndesc
        restype, argtypes = callee.restype, callee.argtypes
        symbol = published(kernel, signature.args)
    function = cgutils.get_or_insert_function(
        builder.module, context.call_conv.get_function_type(restype, argtypes), symbol
    )
    status, value = context.call_conv.call_function(builder, function, restype, argtypes, args)
    with cgutils.if_unlikely(builder, status.is_error):
        context.call_conv.return_status_propagate(builder, status)
    load = LoadKernel(kernel.py_func.__module__, kernel.py_func.__name__, signature.args)
    context.active_code_library._reload_init.add(load)  # saved with the caller in the cache
    return value


class called_by_symbol:  # noqa: N801 (a decorator)
    """A kernel (a Numba dispatcher) that compiled code calls by symbol: from Python, the kernel
    itself, unless it is compiled without a CPython wrapper (kernels.internal_kernel); its
    callers take its arguments by position."""

    def __init__(self, kernel):
        self.kernel = kernel
        functools.update_wrapper(self, kernel.py_func)

        class Call(AbstractTemplate):
            key = self

            def generic(self, args, kws):
                if kws:  # (arguments by position only)
                    return None
                if _is_elsewhere(kernel, args):  # typed as the kernel is: it returns nothing
                    return types.none(*map(types.unliteral, args))
                signature = self.context.resolve_function_type(types.Dispatcher(kernel), args, {})
                return signature.replace(pysig=None)

        infer_global(self, types.Function(Call))

        @lower_builtin(self, types.VarArg(types.Any))
        def lower(context, builder, signature, args):
            elsewhere = _is_elsewhere(kernel, signature.args)
            return call_by_symbol(context, builder, kernel, signature, args, elsewhere)

    def __call__(self, *args):
        if self.kernel.targetoptions.get("no_cpython_wrapper"):  # (Numba's call would crash)
            raise TypeError(f"{self.__name__} is called by compiled code only")
        return self.kernel(*args)


@contextlib.contextmanager
def compiled_elsewhere(kernels) -> Iterator[None]:
    """While the block runs, a function compiled here that calls one of these kernels (of those
    called_by_symbol, returning nothing), not compiled in this process, calls it by its symbol
    alone, unchecked and uncompiled, as another process compiles it: the function is then for
    the cache only (stood_in). (A cold start's helper, llamette.ahead.)"""
    token = _ELSEWHERE.set(frozenset(k.kernel for k in kernels))
    try:
        yield
    finally:
        _ELSEWHERE.reset(token)


def _is_elsewhere(kernel, args: tuple) -> bool:
    return kernel in _ELSEWHERE.get() and tuple(map(types.unliteral, args)) not in kernel.overloads
