"""Choosing the next token from logits, with run.c's xorshift RNG so seeds reproduce run.c's tokens."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from llamette.errors import BadParameter
from llamette.kernels.sampling import argmax, sample_logits

MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Adjustments:
    """Changes to the logits before run.c's sampling (temperature, top-k, top-p), applied in
    this order, as llama.cpp applies those it has: `logit_bias` added to its tokens' logits;
    penalties on the tokens among the last `repeat_last_n` (the prompt's included; -1: all):
    a logit above 0 divided by `repeat_penalty`, one below multiplied, then less
    `frequency_penalty` times the token's count and `presence_penalty` once; `min_p` keeps the
    tokens whose probability is at least min_p times the likeliest's. With none set, sampling
    is run.c's to the bit."""

    logit_bias: dict[int, float] = field(default_factory=dict)
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_p: float = 0.0

    def __post_init__(self):
        checks = {
            "repeat_penalty": (self.repeat_penalty > 0, "must be above 0"),
            "repeat_last_n": (self.repeat_last_n >= -1, "must be -1 (all), 0 (none) or more"),
            "frequency_penalty": (-2 <= self.frequency_penalty <= 2, "must be within [-2, 2]"),
            "presence_penalty": (-2 <= self.presence_penalty <= 2, "must be within [-2, 2]"),
            "min_p": (0 <= self.min_p <= 1, "must be within [0, 1]"),
        }  # as llama.cpp and OpenAI's API bound them
        for name, (fine, rule) in checks.items():
            if not fine:
                raise BadParameter(name, f"{rule}, not {getattr(self, name)}")
        for token, bias in self.logit_bias.items():
            if not (-100 <= bias <= 100 or bias == -math.inf):  # -inf: never, as llama.cpp has it
                raise BadParameter("logit_bias", f"the bias of {token} must be within [-100, 100]")

    @property
    def penalizes(self) -> bool:
        return bool(
            self.repeat_last_n
            and (self.repeat_penalty != 1.0 or self.frequency_penalty or self.presence_penalty)
        )

    @property
    def active(self) -> bool:
        return bool(self.logit_bias or self.penalizes or self.min_p > 0.0)


def adjusted_logits(logits: np.ndarray, recent: Iterable[int], adjust: Adjustments) -> np.ndarray:
    """A copy of logits (V,) changed as `adjust` says (see Adjustments), `recent` the tokens
    the penalties look at."""
    out = np.array(logits, np.float32)
    if adjust.logit_bias:
        ids = np.fromiter(adjust.logit_bias, np.int64)
        out[ids] += np.fromiter(adjust.logit_bias.values(), np.float32, len(ids))
    recent = np.fromiter(recent, np.int64)
    if adjust.penalizes and recent.size:
        tokens, counts = np.unique(recent, return_counts=True)
        penalized = out[tokens]
        penalized = np.where(penalized > 0, penalized / np.float32(adjust.repeat_penalty),
                             penalized * np.float32(adjust.repeat_penalty))  # fmt: skip
        penalized -= (counts * adjust.frequency_penalty + adjust.presence_penalty).astype(
            np.float32
        )
        out[tokens] = penalized
    if adjust.min_p > 0.0:  # p >= min_p * p_max, in logits: l >= l_max + ln(min_p)
        out[out < out.max() + np.float32(math.log(adjust.min_p))] = -np.inf
    return out


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
        adjust: Adjustments | None = None,
    ):
        if vocab_size < 1:
            raise BadParameter("vocab_size", f"must be positive, not {vocab_size}")
        if not temperature >= 0.0:
            raise BadParameter("temperature", f"must be 0 (greedy) or more, not {temperature}")
        if not 0.0 <= topp <= 1.0:
            raise BadParameter("top_p", f"must be within [0, 1], not {topp}")
        if topk < 0:
            raise BadParameter("top_k", f"must be 0 (off) or more, not {topk}")
        if seed is None:
            seed = int(time.time())
        self.vocab_size = vocab_size
        self.temperature = np.float32(temperature)
        self.topp = np.float32(topp)
        self.topk = topk
        self.rng_state = rng_state(seed)
        if adjust is not None and any(not 0 <= t < vocab_size for t in adjust.logit_bias):
            raise BadParameter("logit_bias", f"token ids must be within 0..{vocab_size - 1}")
        self.adjust = adjust if adjust is not None and adjust.active else None
        window = None if adjust is None or adjust.repeat_last_n < 0 else adjust.repeat_last_n
        self.recent: deque[int] = deque(maxlen=window)  # the tokens penalties look at
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

    def accept(self, tokens: Iterable[int]) -> None:
        """Tokens of the sequence that were not sampled here (a prompt), for the penalties."""
        if self.adjust is not None and self.adjust.penalizes:
            self.recent.extend(tokens)

    def sample(self, logits: np.ndarray) -> int:
        """The next token for these logits (V,); the caller's array is left unchanged."""
        if self.adjust is not None:
            logits = adjusted_logits(logits, self.recent, self.adjust)
        if self.temperature == 0.0:
            token = int(argmax(logits))
        else:
            self._work[:] = logits
            coin = self.random_f32()
            token = int(sample_logits(self._work, self.temperature, self.topp, self.topk, coin))
        if self.adjust is not None and self.adjust.penalizes:
            self.recent.append(token)
        return token

    def warm_up(self) -> None:
        """Load the sampling kernels before a run is timed: one draw, thrown away, with the RNG
        left where it was."""
        state, recent = self.rng_state, list(self.recent)
        self.sample(np.zeros(self.vocab_size, np.float32))
        self.rng_state = state
        self.recent.clear()
        self.recent.extend(recent)

    def skip(self, n: int) -> None:
        """Advance the RNG as n calls to sample() would (run.c's chat samples on prompt tokens too)."""
        if self.temperature != 0.0:
            for _ in range(n):
                self.random_u32()


MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's API bounds them


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's logits (before any adjustment; None for a
    prompt's first token) and the `top` alternatives as (id, log-probability), likeliest first."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log(softmax(logits)) in float64 (V,)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max()
    return z - math.log(np.exp(z).sum())


def token_logprob(logits: np.ndarray, token: int, top_n: int) -> TokenLogprob:
    """`token`'s log-probability under logits (V,) and the top_n likeliest tokens'."""
    logprobs = log_softmax(logits)
    n = min(top_n, len(logprobs))
    top = np.argpartition(-logprobs, n - 1)[:n] if n > 0 else []
    top = sorted(((int(t), float(logprobs[t])) for t in top), key=lambda pair: -pair[1])
    return TokenLogprob(token, float(logprobs[token]), tuple(top))
