"""Kernels for tests/test_symbols.py: `outer` links `inner` in as Numba links calls, and `inner`
calls `leaf` by symbol."""

import numpy as np
from numba import njit

from llamette.kernels.symbols import called_by_symbol


@called_by_symbol
@njit(cache=True)
def leaf(x):
    return 2.0 * x


@njit(cache=True)
def inner(x):
    return leaf(x) + np.float64(1.0)


@njit(cache=True)
def outer(x):
    return inner(x) * 3.0
