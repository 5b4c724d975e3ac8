"""Perplexity of a model over a text, and its KL divergence from a reference model."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from llamette.errors import LlametteError
from llamette.model import PREFILL_CHUNK, Transformer
from llamette.weights import BOS_ID


@dataclass
class Evaluation:
    """Scores over a text: next-token negative log-likelihood, and KL from a reference."""

    tokens: int  # predictions scored
    mean_nll: float  # nats per token
    mean_kl: float | None  # nats per token, KL(reference || model); None without a reference
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities (B, V), in float64 so that sums over a text stay exact."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def windows(tokens: list[int], context: int, bos_id: int | None = BOS_ID) -> Iterator[list[int]]:
    """The text's tokens in consecutive windows at most `context` long, each led by BOS; for a
    model without one (bos_id None), each led by the previous window's last token instead (the
    text's first token is then not scored)."""
    if bos_id is None:
        for start in range(0, max(len(tokens) - 1, 1), context - 1):
            yield tokens[start : start + context]
        return
    for start in range(0, len(tokens), context - 1):
        yield [bos_id, *tokens[start : start + context - 1]]


def all_logits(model: Transformer, window: list[int]) -> np.ndarray:
    """Logits (len(window), V) for every position of a window, from a fresh cache."""
    rows = []
    for start in range(0, len(window), PREFILL_CHUNK):
        batch = window[start : start + PREFILL_CHUNK]
        positions = np.arange(start, start + len(batch))
        rows.append(model.forward_batch(batch, positions, np.zeros(len(batch), np.int64)).copy())
    return np.concatenate(rows)


def evaluate(
    model: Transformer,
    tokens: list[int],
    context: int | None = None,
    reference: Transformer | None = None,
    progress: bool = False,
    bos_id: int | None = BOS_ID,
) -> Evaluation:
    """Score a text's tokens (no BOS) in windows of `context` positions (default: the model's),
    each led by `bos_id` (None for a model that adds no BOS, see windows)."""
    context = min(context or model.config.seq_len, model.config.seq_len)
    if reference is not None:
        if reference.config.vocab_size != model.config.vocab_size:
            raise LlametteError(
                f"the reference's vocabulary ({reference.config.vocab_size}) is not the model's "
                f"({model.config.vocab_size})"
            )
        context = min(context, reference.config.seq_len)
    if context < 2:
        raise LlametteError(f"--ctx: a window of {context} positions predicts nothing")
    if len(tokens) < (1 if bos_id is not None else 2):
        raise LlametteError("the text has no tokens to score")
    start = time.perf_counter()
    total_nll, total_kl, scored = 0.0, 0.0, 0
    parts = list(windows(tokens, context, bos_id))
    if progress:
        from tqdm import tqdm

        parts = tqdm(parts, desc="scoring", unit="window", leave=False)
    for window in parts:
        targets = np.asarray(window[1:])
        logprobs = log_softmax(all_logits(model, window)[:-1])  # (T-1, V)
        total_nll -= logprobs[np.arange(len(targets)), targets].sum()
        if reference is not None:
            reference_logprobs = log_softmax(all_logits(reference, window)[:-1])
            total_kl += (np.exp(reference_logprobs) * (reference_logprobs - logprobs)).sum()
        scored += len(targets)
    return Evaluation(
        tokens=scored,
        mean_nll=total_nll / scored,
        mean_kl=None if reference is None else total_kl / scored,
        seconds=time.perf_counter() - start,
    )
