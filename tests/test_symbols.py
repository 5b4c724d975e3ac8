"""Calls between kernels by symbol (kernels.symbols) through Numba's cache: each process below
starts afresh, as runs do."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from kernels_by_symbol import inner, leaf, outer


def test_a_kernel_called_by_symbol_computes_as_from_python():
    assert leaf(1.5) == 3.0
    assert inner(1.5) == 4.0
    assert outer(np.float64(1.5)) == 12.0


def test_code_that_calls_by_symbol_loads_from_the_cache_however_it_was_compiled(tmp_path):
    """inner is compiled in one process; the next loads it from the cache and compiles outer,
    which takes in inner's code; a third loads outer, whose code calls leaf by symbol: leaf must
    be there (Numba itself would not have kept, with the loaded inner, that leaf is to load)."""

    def run(call: str) -> str:
        env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path),
               "PYTHONPATH": str(Path(__file__).parent)}  # fmt: skip
        done = subprocess.run([sys.executable, "-c", f"import kernels_by_symbol as k; print({call})"],
                              capture_output=True, text=True, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run("k.inner(1.5)") == "4.0"
    assert run("k.outer(1.5), k.outer.stats.cache_misses") == "12.0 Counter({(float64,): 1})"
    assert run("k.outer(1.5), k.outer.stats.cache_hits") == "12.0 Counter({(float64,): 1})"
