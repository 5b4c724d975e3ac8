"""Numba-compiled hot loops, in two flavours with the same function names.

`reference`: run.c's and runq.c's arithmetic to the bit (`--exact`).
`fast`: the default path, checked against the reference.
"""

from numba import njit

# Compiled once and cached on disk; IEEE division (x / 0 is inf or nan, as in C), no fastmath.
kernel = njit(cache=True, error_model="numpy")
