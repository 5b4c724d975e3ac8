"""This machine's memory read bandwidth: the ceiling for a decode step that reads every weight.

Usage: python bandwidth.py THREADS         (prints GB/s)
       python bandwidth.py THREADS FILE    the same, reading FILE through a read-only mapping of
                                           it (from the page cache once read: what a model's
                                           weights stream at)

On this shared host the figure is bimodal: runs land near 31 or near 46 GB/s (2 threads), whatever
the page size, as the host's other tenants come and go; the benchmark measures it again before
each model.
"""

from __future__ import annotations

import sys
import time

import numba
import numpy as np
from numba import njit, prange

SIZE_BYTES = 2 << 30  # far beyond any cache


@njit(parallel=True, fastmath=True, cache=False)
def read_all(data):
    """Sum of every element, in as many streams as threads: a pure read of the array."""
    chunk = data.shape[0] // numba.get_num_threads()
    total = 0.0
    for part in prange(numba.get_num_threads()):
        mine = data[part * chunk : (part + 1) * chunk]  # indexed from 0: the loop vectorizes
        s = np.float32(0.0)
        for j in range(mine.shape[0]):
            s += mine[j]
        total += s
    return total


def main() -> None:
    numba.set_num_threads(int(sys.argv[1]))
    if len(sys.argv) > 2:
        mapped = np.memmap(sys.argv[2], np.uint8, mode="r")
        data = mapped[: mapped.shape[0] // 4 * 4].view(np.float32)
    else:
        data = np.ones(SIZE_BYTES // 4, np.float32)
    read_all(data)  # a mapping's first read also maps its pages
    best = min(_timed(read_all, data) for _ in range(7))
    print(f"{data.nbytes / best / 1e9:.2f}")


def _timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
