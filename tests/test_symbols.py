"""Calls between kernels by symbol (kernels.symbols) through Numba's cache: each process below
starts afresh, as runs do, with a cache of its own (a cache beside the test's kernels would outlive
a change to llamette's kernels, which Numba does not see)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llamette.kernels.int8 import _sum_groups_of_32


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


def test_a_kernel_without_a_python_wrapper_refuses_a_call_from_python():
    """Kernels that only compiled code calls are compiled without the wrapper a call from Python
    goes through; such a call is an error, not a crash."""
    with pytest.raises(TypeError, match="_sum_groups_of_32 is called by compiled code only"):
        _sum_groups_of_32(np.zeros((1, 1), np.int32), np.zeros((1, 32), np.int8))
