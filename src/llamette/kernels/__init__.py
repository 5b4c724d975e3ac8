"""Numba-compiled hot loops, in two flavours.

`reference`: run.c's and runq.c's arithmetic to the bit (`--exact`).
`fast`: the default path, tested against the reference.
`linear`: picks the kernel for a weight type (at compile time) and a flavour (at run time).
"""

from numba import njit

# Compiled once and cached on disk; IEEE division (x / 0 is inf or nan, as in C); no fastmath, so
# float sums keep their order. `parallel_kernel` runs prange loops on all threads.
kernel = njit(cache=True, error_model="numpy")
parallel_kernel = njit(cache=True, error_model="numpy", parallel=True)
