"""Choosing the next token from logits, with run.c's xorshift RNG so seeds reproduce run.c's tokens."""

from __future__ import annotations

import time

import numpy as np

from llamette.kernels.sampling import argmax, sample_logits

MASK64 = (1 << 64) - 1


ZERO_SEED_STATE = 0x9E3779B97F4A7C15  # for a seed of 0 mod 2^64, where xorshift would stay at 0


def rng_state(seed: int) -> int:
    """The RNG state for a seed: the seed modulo 2^64 (run.c's, for its positive seeds), but
    never 0, xorshift's fixed point."""
    return seed & MASK64 or ZERO_SEED_STATE


class Sampler:
    """Greedy (temperature 0), temperature, top-p and top-k sampling, one random draw per token.

    With the same seed and settings it returns the same tokens as llama2.c's run.c (top-k aside,
    which run.c lacks). A seed of None uses the current time, as run.c does for seeds <= 0; any
    other integer seeds the RNG (see rng_state), as OpenAI's API takes any.
    """

    def __init__(
        self,
        vocab_size: int,
        temperature: float = 1.0,
        topp: float = 0.9,
        seed: int | None = None,
        topk: int = 0,
    ):
        if vocab_size < 1:
            raise ValueError(f"vocab_size {vocab_size} must be positive")
        if not temperature >= 0.0:
            raise ValueError(f"temperature {temperature} must be 0 or more")
        if not 0.0 <= topp <= 1.0:
            raise ValueError(f"top-p {topp} must be within [0, 1]")
        if topk < 0:
            raise ValueError(f"top-k {topk} must be 0 (off) or more")
        if seed is None:
            seed = int(time.time())
        self.vocab_size = vocab_size
        self.temperature = np.float32(temperature)
        self.topp = np.float32(topp)
        self.topk = topk
        self.rng_state = rng_state(seed)
        self._work = np.empty(vocab_size, np.float32)

    def random_u32(self) -> int:
        """xorshift64* as in run.c: the state's next value, top 32 bits of its product."""
        s = self.rng_state
        s ^= s >> 12
        s ^= (s << 25) & MASK64
        s ^= s >> 27
        self.rng_state = s
        return ((s * 0x2545F4914F6CDD1D) & MASK64) >> 32

    def random_f32(self) -> np.float32:
        """A float32 in [0, 1) with 24 random bits."""
        return np.float32((self.random_u32() >> 8) / 16777216.0)

    def sample(self, logits: np.ndarray) -> int:
        """The next token for these logits (V,); the caller's array is left unchanged."""
        if self.temperature == 0.0:
            return int(argmax(logits))
        self._work[:] = logits
        coin = self.random_f32()
        return int(sample_logits(self._work, self.temperature, self.topp, self.topk, coin))

    def warm_up(self) -> None:
        """Load the sampling kernels before a run is timed: one draw, thrown away, with the RNG
        left where it was."""
        state = self.rng_state
        self.sample(np.zeros(self.vocab_size, np.float32))
        self.rng_state = state

    def skip(self, n: int) -> None:
        """Advance the RNG as n calls to sample() would (run.c's chat samples on prompt tokens too)."""
        if self.temperature != 0.0:
            for _ in range(n):
                self.random_u32()
