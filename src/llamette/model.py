"""The Llama transformer: one decode step over a KV cache, as llama2.c's run.c writes it."""

from __future__ import annotations

import logging
import os

import numpy as np

from llamette.formats import load_weights
from llamette.kernels import fast, reference
from llamette.quant import Q8Tensor
from llamette.weights import LAYER_TENSORS, Tensor, Weights

log = logging.getLogger("llamette")


class Layer:
    """One transformer block's tensors, named as Meta names them."""

    def __init__(self, weights: Weights, index: int):
        t = {name: weights.layer(index, name) for name in LAYER_TENSORS}
        self.attention_norm = t["attention_norm.weight"]  # (dim,)
        self.wq = t["attention.wq.weight"]  # (dim, dim)
        self.wk = t["attention.wk.weight"]  # (kv_dim, dim)
        self.wv = t["attention.wv.weight"]  # (kv_dim, dim)
        self.wo = t["attention.wo.weight"]  # (dim, dim)
        self.ffn_norm = t["ffn_norm.weight"]  # (dim,)
        self.w1 = t["feed_forward.w1.weight"]  # (hidden_dim, dim), gate
        self.w2 = t["feed_forward.w2.weight"]  # (dim, hidden_dim), down
        self.w3 = t["feed_forward.w3.weight"]  # (hidden_dim, dim), up


class Transformer:
    """A model ready to run: weights, KV cache and activation buffers.

    `exact=True` selects the reference kernels, which reproduce run.c's and runq.c's arithmetic
    to the bit; the default kernels are faster and agree with them.
    """

    def __init__(self, weights: Weights, exact: bool = False):
        c = self.config = weights.config
        self.weights = weights
        self.exact = exact
        self.kernels = reference if exact else fast
        self.tok_embeddings = weights["tok_embeddings.weight"]  # (vocab_size, dim)
        self.layers = [Layer(weights, i) for i in range(c.n_layers)]
        self.norm = weights["norm.weight"]  # (dim,)
        self.output = weights.classifier  # (vocab_size, dim)

        # KV cache: every layer's keys and values for every position so far.
        self.key_cache = np.zeros((c.n_layers, c.seq_len, c.kv_dim), np.float32)
        self.value_cache = np.zeros((c.n_layers, c.seq_len, c.kv_dim), np.float32)
        # Activations of the token being computed.
        widest = max(c.dim, c.hidden_dim)
        self.x = np.zeros(c.dim, np.float32)  # residual stream
        self.xb = np.zeros(c.dim, np.float32)  # normed input / attention output
        self.xb2 = np.zeros(c.dim, np.float32)
        self.q = np.zeros(c.dim, np.float32)
        self.hb = np.zeros(c.hidden_dim, np.float32)  # feed-forward hidden
        self.hb2 = np.zeros(c.hidden_dim, np.float32)
        self.att = np.zeros((c.n_heads, c.seq_len), np.float32)  # attention scores
        self.logits = np.zeros(c.vocab_size, np.float32)
        self.xq = np.zeros(widest, np.int8)  # Q8 activations and their group scales
        self.xs = np.zeros(widest, np.float32)

        if not exact:
            self._note_misaligned_groups()

    @classmethod
    def load(cls, path: str | os.PathLike, exact: bool = False) -> Transformer:
        """Load a model file (memory-mapped) and make it ready to run."""
        return cls(load_weights(path), exact=exact)

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits (vocab_size,) for the token at position pos, after positions 0..pos-1 are cached.

        The returned array is reused by the next call.
        """
        c, k = self.config, self.kernels
        x = self.x
        self._embed(x, token)
        for i, layer in enumerate(self.layers):
            key_cache, value_cache = self.key_cache[i], self.value_cache[i]  # (seq_len, kv_dim)
            key, value = key_cache[pos], value_cache[pos]  # this position's rows (kv_dim,)

            # attention: x += wo @ attention(rope(wq @ norm(x)), rope(wk @ norm(x)), wv @ norm(x))
            k.rmsnorm(self.xb, x, layer.attention_norm, c.norm_eps)
            self._matmul((self.q, key, value), self.xb, (layer.wq, layer.wk, layer.wv))
            k.rope(self.q, key, pos, c.head_size, c.rope_theta)
            k.attention(self.xb, self.q, key_cache, value_cache, pos, c.n_heads, self.att)
            self._matmul((self.xb2,), self.xb, (layer.wo,))
            k.add(x, self.xb2)

            # feed-forward (SwiGLU): x += w2 @ (silu(w1 @ norm(x)) * (w3 @ norm(x)))
            k.rmsnorm(self.xb, x, layer.ffn_norm, c.norm_eps)
            self._matmul((self.hb, self.hb2), self.xb, (layer.w1, layer.w3))
            k.swiglu(self.hb, self.hb2)
            self._matmul((self.xb,), self.hb, (layer.w2,))
            k.add(x, self.xb)

        k.rmsnorm(x, x, self.norm, c.norm_eps)
        self._matmul((self.logits,), x, (self.output,))
        return self.logits

    def _embed(self, out: np.ndarray, token: int) -> None:
        table = self.tok_embeddings
        if isinstance(table, Q8Tensor):
            self.kernels.q8_dequantize_row(out, table.values, table.scales, token, table.group_size)
        else:
            out[:] = table[token]

    def _matmul(
        self, outs: tuple[np.ndarray, ...], x: np.ndarray, weights: tuple[Tensor, ...]
    ) -> None:
        """outs[i] = weights[i] @ x for matrices that share their input (Q8: quantized once)."""
        k = self.kernels
        if isinstance(weights[0], Q8Tensor):
            group_size = weights[0].group_size
            xq, xs = self.xq[: x.shape[0]], self.xs
            k.q8_quantize(xq, xs, x, group_size)
            for out, w in zip(outs, weights, strict=True):
                k.q8_matmul(out, xq, xs, w.values, w.scales, group_size)
        else:
            for out, w in zip(outs, weights, strict=True):
                k.matmul(out, x, w)

    def _note_misaligned_groups(self) -> None:
        """Say once when runq.c would compute this file's rows wrongly and llamette does not."""
        for name, tensor in self.weights.tensors.items():
            if isinstance(tensor, Q8Tensor) and not tensor.rows_aligned:
                rows, cols = tensor.shape
                log.warning(
                    "%s: group size %d does not divide the %d columns of %s: runq.c skips the last "
                    "%d of each row and misreads scales; llamette computes the full product "
                    "(--exact reproduces runq.c)",
                    self.weights.source,
                    tensor.group_size,
                    cols,
                    name,
                    cols % tensor.group_size,
                )
                return
