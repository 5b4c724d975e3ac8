"""Numba-compiled hot loops, in two flavours: `reference`, run.c's and runq.c's arithmetic to the
bit (`--exact`), and the fast kernels of the default path, tested against it.

`layers`: the steps of a transformer block over a batch of rows, in either flavour.
`gemm`: fp32 matrix products; `int8`: the family of products over inputs quantized to int8
(llama2.c's Q8, GGUF's Q8_0 and 2- to 6-bit types), with `block_dots` for the K-quants' row dot
products; `decoded`: products of weights decoded to float32
(F16, BF16); `attention`, `elementwise`: the fast flavour's other steps; `dispatch`: where
compiled code picks a weight type's own function (the types: llamette.weight_types). See
docs/kernels.md for which kernel runs for which type, batch and CPU.
"""

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import numba
import numpy as np
from numba import njit
from numba.core.errors import NumbaPerformanceWarning

from llamette.kernels import cache


def load_numpy_support() -> None:
    """Load Numba's NumPy support (which its first compile or cache load does) without the BLAS
    check it makes at import, an import of SciPy's linear algebra: 0.15 s of a start where SciPy
    is installed, for BLAS no kernel calls. The check's answer is then whether SciPy is there,
    as Numba would have found it."""
    if "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
        return
    sys.modules["scipy.linalg"] = None  # import scipy.linalg: ImportError
    try:
        from numba.np import arraymath
    except ImportError:  # a Numba that needs SciPy's linear algebra: loaded as Numba loads it
        return
    finally:
        del sys.modules["scipy.linalg"]
    if hasattr(arraymath, "_HAVE_BLAS"):
        arraymath._HAVE_BLAS = importlib.util.find_spec("scipy") is not None


load_numpy_support()
cache.install()  # before the first kernel is defined

# Compiled once and cached on disk; IEEE division (x / 0 is inf or nan, as in C); no fastmath, so
# float sums keep their order; the GIL released while they run (the server's engine thread runs
# them beside the event loop); no C-callable wrapper (Numba makes one for each function, to pass
# it as a value, which no kernel is: compile time for nothing). `parallel_kernel` runs prange loops
# on all threads. A function that calls a parallel kernel is a parallel kernel too, prange or not,
# unless it calls its parallel kernels by symbol (kernels.symbols), which load themselves and the
# threads they start: Numba's cache alone saved such a caller without the threads' start, and a
# later process crashed on a null call (numba/numba#4807, #8578; see also cache.py).
CACHED = {"cache": True, "nogil": True, "error_model": "numpy", "no_cfunc_wrapper": True}
kernel = njit(**CACHED)
parallel_kernel = njit(**CACHED, parallel=True)
# Kernels that only compiled code calls, by symbol (kernels.symbols), never Python: compiled
# without the CPython wrapper Numba makes for each function (a tenth of a second each, where the
# arguments are tuples of arrays), which a call from Python would need (called_by_symbol refuses
# it).
internal_kernel = njit(**CACHED, no_cpython_wrapper=True)
internal_parallel_kernel = njit(**CACHED, parallel=True, no_cpython_wrapper=True)
# A function that only calls kernels (choosing among them, or in order), compiled as part of each
# caller instead of on its own: a compiled function takes in the code of all it calls, so a
# separate layer of calls would compile it all twice. Its callers are parallel kernels if it calls
# any.
inlined_kernel = njit(inline="always", error_model="numpy")
# Reordered float sums (vectorized dot products, fused multiply-add), for the fast flavour's
# kernels that allow them; nothing else loosened.
reassociating_kernel = njit(**CACHED, parallel=True, fastmath={"reassoc", "contract"})
# ...and the same for the body of such a kernel's parallel loop, compiled once as a function of its
# own: inlined into the loop, Numba's parallel passes take seconds over a large body (a cold start).
reassociating_serial_kernel = njit(**CACHED, fastmath={"reassoc", "contract"})


def flavour(exact: bool) -> bool | None:
    """`exact` as compiled code takes it: True for the reference flavour, None for the fast one.
    Numba types None apart from a bool and drops the branches that `exact is not None and
    exact` (or `exact is None or not exact`) rules out as it compiles, so that the fast kernels
    compile none of the reference's code (a bool compiles both)."""
    return True if exact else None


# Matrix products with at most this many inputs compute each output as a dot product of its own,
# the same way whatever else is in the batch: a sequence decodes to the same bits alone or beside
# others, and a short prompt gets the same bits in one pass or spread over several (the server
# relies on both). Larger batches (long prompts) of F16 and BF16 weights, and of llama2.c Q8 in
# groups other than 64 or 32, take dequantized blocks; the other types' products are the same at
# any batch size.
SMALL_BATCH = 32

# ...and for those, Numba's note that it found no loop to parallelize is expected.
warnings.filterwarnings(
    "ignore",
    message=r"(?s).*The keyword argument 'parallel=True' was specified but no transformation",
    category=NumbaPerformanceWarning,
)


CACHE_LINE = 64  # bytes


def aligned_empty(shape: int | tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized array whose first byte starts a cache line. NumPy aligns to 16 bytes; a
    kernel's 64-byte loads from an array that starts elsewhere each read two cache lines (a tenth
    of a 7B model's prefill)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    memory = np.empty(size + CACHE_LINE, np.uint8)
    start = -memory.ctypes.data % CACHE_LINE
    return memory[start : start + size].view(dtype).reshape(shape)


def entry_point(dispatcher, args: tuple):
    """The compiled function that `dispatcher` runs for arguments of the types of `args` (loaded
    from the cache or compiled), to call with arguments of those same types, unchecked. It skips
    the dispatcher's typing of every argument on every call, which costs tens of microseconds
    for arguments such as typed lists."""
    return dispatcher.compile(tuple(dispatcher.typeof_pyval(a) for a in args))


def set_threads(threads: int | None = None) -> int:
    """Threads for the parallel kernels: `threads`, else $LLAMETTE_THREADS, else every core."""
    available = numba.config.NUMBA_NUM_THREADS
    if threads is None:
        setting = os.environ.get("LLAMETTE_THREADS", str(available))
        if not setting.strip().isdigit():
            raise ValueError(f"{setting!r} is not a number of threads")
        threads = int(setting)
    if not 1 <= threads <= available:
        raise ValueError(f"{threads} threads: this machine runs 1 to {available}")
    numba.set_num_threads(threads)
    return threads


def last_level_cache_bytes(cpu_caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The size of the CPU's last-level cache as Linux reports it (sysfs); 0 where it does not."""
    sizes = {}
    for index in cpu_caches.glob("index*"):
        try:
            level, size = (index / "level").read_text(), (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if size[:-1].isdigit() and size[-1] in units and level.strip().isdigit():
            sizes[int(level)] = int(size[:-1]) * units[size[-1]]
    return sizes[max(sizes)] if sizes else 0
