"""The KV cache's types: store_kv writes NumPy's halves and gguf-py's Q8_0 blocks, in the memory
the cache type says."""

import numpy as np
import pytest

from conftest import kv_cache_of, randn
from llamette.kernels.layers import store_kv
from llamette.model import new_kv_cache
from llamette.weights import ModelConfig

CONFIG = ModelConfig(dim=256, hidden_dim=512, n_layers=2, n_heads=4, n_kv_heads=2,
                     vocab_size=32, seq_len=512)  # heads of 64  # fmt: skip


def stored_by_store_kv(kv_type: str, keys: np.ndarray, values: np.ndarray):
    """A cache of kv_type with keys and values (positions, kv_dim) stored at layer 1 of slot 0."""
    kv = new_kv_cache(CONFIG, 1, kv_type, exact=False)
    positions = np.arange(len(keys))
    store_kv(kv, 1, np.zeros(len(keys), np.int64), positions, keys, values)
    return kv


def by_head(x: np.ndarray) -> np.ndarray:
    """(positions, n_kv_heads * n) as the cache lays it out: (n_kv_heads, positions, n)."""
    return x.reshape(len(x), CONFIG.n_kv_heads, -1).transpose(1, 0, 2)


def random_floats(n: int) -> np.ndarray:
    """float32 values of every exponent: random bits (but NaN), and the edges of halves."""
    bits = np.random.default_rng(5).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values[np.isnan(values)] = 1.0
    edges = [0.0, -0.0, 65504, 65519.996, 65520, -65520, 2**-14, 2**-24, 2**-25, 3 * 2**-26,
             6.0e-8, 1e-9, np.inf, -np.inf, 1e30, 0.1, 1 / 3]  # fmt: skip
    values[: len(edges)] = edges
    return values


def test_f16_caches_hold_numpys_halves_rounded_to_nearest_even():
    keys = random_floats(512 * 128).reshape(512, 128)
    values = np.ascontiguousarray(keys[::-1]) * np.float32(1e-4)  # many subnormal halves
    kv = stored_by_store_kv("f16", keys, values)
    for ours, theirs in ((kv.keys, keys), (kv.values, values)):
        with np.errstate(over="ignore"):  # beyond the largest half: infinity, as expected
            halves = theirs.astype(np.float16).view(np.uint16)
        np.testing.assert_array_equal(ours[0, 1], by_head(halves))
    assert not kv.keys[0, 0].any() and kv.key_scales.shape[-1] == 0


def test_q8_0_caches_hold_gguf_pys_blocks():
    keys, values = randn(300, 128), randn(300, 128) * np.float32(0.01)
    keys[7, :32] = 0.0  # a block of zeros: scale 0
    kv = stored_by_store_kv("q8_0", keys, values)
    for quants, scales, x in ((kv.keys, kv.key_scales, keys), (kv.values, kv.value_scales, values)):
        theirs, _, _ = kv_cache_of(x, x, "q8_0")  # gguf-py's int8 values and float16 scales
        np.testing.assert_array_equal(quants[0, 1, :, :300], by_head(theirs.keys))
        np.testing.assert_array_equal(scales[0, 1, :, :300].astype(np.float16),
                                      by_head(theirs.key_scales))  # fmt: skip
    assert kv.keys.dtype == np.int8 and kv.key_scales.shape == (1, 2, 2, 512, 2)


@pytest.mark.parametrize(("kv_type", "bytes_per_value"), [("f32", 4), ("f16", 2), ("q8_0", 1.125)])
def test_each_type_takes_its_share_of_memory(kv_type, bytes_per_value):
    kv = new_kv_cache(CONFIG, 3, kv_type, exact=False)
    values = 2 * 3 * CONFIG.n_layers * CONFIG.n_kv_heads * CONFIG.seq_len * CONFIG.head_size
    assert sum(array.nbytes for array in kv) == values * bytes_per_value


def test_unknown_types_exact_runs_and_partial_blocks_are_refused():
    import llamette

    with pytest.raises(llamette.LlametteError, match="'q4_0' is not one of f32, f16, q8_0"):
        new_kv_cache(CONFIG, 1, "q4_0", exact=False)
    with pytest.raises(llamette.LlametteError, match="--exact keeps run.c's float32 KV cache"):
        new_kv_cache(CONFIG, 1, "f16", exact=True)
    odd_heads = ModelConfig(dim=80, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=4,
                            vocab_size=32, seq_len=8)  # fmt: skip
    with pytest.raises(llamette.LlametteError, match="heads of 20 values are not whole blocks"):
        new_kv_cache(odd_heads, 1, "q8_0", exact=False)


@pytest.mark.parametrize("f16c", [True, False], ids=["f16c", "by their bits"])
def test_every_finite_half_reads_back_exactly(monkeypatch, f16c):
    """Attention's 16-lane reads of an F16 cache: F16C's conversion where the CPU has it, else
    the halves' bits moved into floats (the choice is made when a kernel compiles)."""
    from numba import njit

    from llamette.kernels import simd

    monkeypatch.setattr(simd, "HALF_CONVERSION", f16c and simd.HALF_CONVERSION)
    if f16c and not simd.HALF_CONVERSION:
        pytest.skip("this CPU has no F16C")

    @njit
    def read(bits, out):
        for i in range(0, bits.shape[0], 16):
            simd.store_lanes(out, i, simd.load_lanes(bits, i))

    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    halves = halves[(halves & 0x7C00) != 0x7C00]  # finite: no infinities, no NaN
    out = np.empty(len(halves), np.float32)
    read(halves, out)
    np.testing.assert_array_equal(out, halves.view(np.float16).astype(np.float32))
