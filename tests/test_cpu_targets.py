"""The kernel tests again, compiled for CPUs other than this one: most users' CPUs have AVX2 and
neither AVX-512 nor VNNI, whose branches the host's own run never takes. Numba compiles for the
CPU that $NUMBA_CPU_NAME and $NUMBA_CPU_FEATURES name, and llamette's SIMD choices follow them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamette.kernels.simd import target_features

HASWELL = (  # AVX2 and FMA, no AVX-512: the CPUs of 2013 on, and most laptops since
    "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+popcnt,"
    "+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave"
)
TARGETS = {  # name: (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES, (WIDE_REGISTERS, FUSED_MADD) expected)
    "avx2": ("haswell", HASWELL, (False, False)),
    "avx512 without vnni": (
        "skylake-avx512", HASWELL + ",+avx512f,+avx512bw,+avx512cd,+avx512dq,+avx512vl",
        (True, False),
    ),
}  # fmt: skip


@pytest.mark.parametrize("target", TARGETS)
def test_kernel_tests_pass_compiled_for(target):
    name, features, expected_choices = TARGETS[target]
    needed = {f for f in features.split(",") if f.startswith("+")}
    if not needed <= target_features():
        pytest.skip(f"this CPU cannot run code for {target}")
    env = os.environ | {"NUMBA_CPU_NAME": name, "NUMBA_CPU_FEATURES": features}
    choices = subprocess.run(
        [sys.executable, "-c", "from llamette.kernels import simd; "
         "print(simd.WIDE_REGISTERS, simd.FUSED_MADD)"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert choices == [str(choice) for choice in expected_choices]
    tests = Path(__file__).resolve().parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_kernels.py",
         "test_weight_types.py", "test_kv_cache.py"],
        env=env, cwd=tests, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
