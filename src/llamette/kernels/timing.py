"""Where a decode step's time goes: cycle counts per part of the forward pass, taken inside the
compiled step (the CPU's time-stamp counter), so that profiling adds no Python calls."""

from __future__ import annotations

import time

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from llamette.kernels import kernel

# Parts of a decode step; index 0 of a profile holds the last tick's cycle count.
PARTS = (
    "embedding",
    "attention norm",
    "q k v",
    "rope",
    "attention",
    "wo",
    "ffn norm",
    "w1 w3",
    "swiglu",
    "w2",
    "residuals",
    "final norm",
    "classifier",
)
(EMBEDDING, ATTENTION_NORM, QKV, ROPE, ATTENTION, WO, FFN_NORM, W1_W3, SWIGLU, W2, RESIDUALS,
 FINAL_NORM, CLASSIFIER) = range(1, len(PARTS) + 1)  # fmt: skip
MATMUL_PARTS = ("q k v", "wo", "w1 w3", "w2", "classifier")


@intrinsic
def cycles(typingctx):
    """The CPU's cycle counter (rdtsc on x86)."""

    def codegen(context, builder, signature, args):
        counter = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(64), []), "llvm.readcyclecounter"
        )
        return builder.call(counter, [])

    return types.int64(), codegen


@kernel
def tick(profile, part):
    """Charge the cycles since the last tick to `part`; nothing when profile is empty (off)."""
    if profile.shape[0]:
        now = cycles()
        profile[part] += now - profile[0]
        profile[0] = now


@kernel
def start(profile):
    if profile.shape[0]:
        profile[0] = cycles()


def new_profile() -> np.ndarray:
    return np.zeros(len(PARTS) + 1, np.int64)


@kernel
def _cycles_now():
    return cycles()


def cycles_per_second() -> float:
    """The cycle counter's rate, measured against the wall clock over 50 ms."""
    _cycles_now()
    wall, counter = time.perf_counter(), _cycles_now()
    time.sleep(0.05)
    return (_cycles_now() - counter) / (time.perf_counter() - wall)
