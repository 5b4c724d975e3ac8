"""The Llama transformer: its weights, KV cache and the forward pass of one token."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from llamette.formats import load_weights
from llamette.kernels import fast, ggml, last_level_cache_bytes, parallel_kernel
from llamette.kernels import timing as t
from llamette.kernels.linear import attention, embed, linear, swiglu
from llamette.kernels.reference import add, rmsnorm, rope, rope_angles, store_kv
from llamette.quant import BF16Tensor, HalfTensor, Q4Tensor, Q8_0Tensor, Q8Tensor, tensor_nbytes
from llamette.weights import Tensor, Weights

log = logging.getLogger("llamette")

PREFILL_CHUNK = 512  # prompt tokens per batched forward pass


class Tensors(NamedTuple):
    """The weights as compiled code takes them: per-layer tensors as tuples indexed by layer."""

    tok_embeddings: Tensor  # (vocab_size, dim)
    attention_norm: tuple  # (dim,) per layer
    wq: tuple  # (dim, dim)
    wk: tuple  # (kv_dim, dim)
    wv: tuple  # (kv_dim, dim)
    wo: tuple  # (dim, dim)
    ffn_norm: tuple  # (dim,)
    w1: tuple  # (hidden_dim, dim), gate
    w2: tuple  # (dim, hidden_dim), down
    w3: tuple  # (hidden_dim, dim), up
    norm: np.ndarray  # (dim,)
    output: Tensor  # (vocab_size, dim), the classifier

    @classmethod
    def of(cls, weights: Weights) -> Tensors:
        layers = range(weights.config.n_layers)

        def per_layer(name: str) -> tuple:
            return tuple(weights.layer(i, name) for i in layers)

        return cls(
            weights["tok_embeddings.weight"],
            per_layer("attention_norm.weight"),
            per_layer("attention.wq.weight"),
            per_layer("attention.wk.weight"),
            per_layer("attention.wv.weight"),
            per_layer("attention.wo.weight"),
            per_layer("ffn_norm.weight"),
            per_layer("feed_forward.w1.weight"),
            per_layer("feed_forward.w2.weight"),
            per_layer("feed_forward.w3.weight"),
            weights["norm.weight"],
            weights.classifier,
        )


class Buffers(NamedTuple):
    """Activations of the token being computed, allocated once."""

    x: np.ndarray  # (dim,) the residual stream
    xb: np.ndarray  # (dim,) normed input, attention output
    xb2: np.ndarray  # (dim,)
    q: np.ndarray  # (dim,) query
    k: np.ndarray  # (kv_dim,) key, stored into the KV cache after RoPE
    v: np.ndarray  # (kv_dim,) value
    hb: np.ndarray  # (hidden_dim,) feed-forward hidden state
    hb2: np.ndarray  # (hidden_dim,)
    att: np.ndarray  # (n_heads, seq_len) attention weights
    rope_cos: np.ndarray  # (head_size / 2,) this position's rotary angles
    rope_sin: np.ndarray
    logits: np.ndarray  # (vocab_size,)
    # A Q8 matmul's input, quantized (sizes: the widest input, max(dim, hidden_dim)):
    xq: np.ndarray  # int8 values
    xs: np.ndarray  # group scales
    x_dequantized: np.ndarray  # float32 values * scales
    x_sums: np.ndarray  # int32 sums of the values of each group of 32 (Q8_0)
    weights_in_cache: bool  # whether the weights stay in cache between steps (fast.q8_linear)

    @classmethod
    def for_config(cls, c, weights_in_cache: bool = False) -> Buffers:
        widest = max(c.dim, c.hidden_dim)

        def zeros(*shape, dtype=np.float32):
            return np.zeros(shape, dtype)

        return cls(
            zeros(c.dim), zeros(c.dim), zeros(c.dim), zeros(c.dim), zeros(c.kv_dim), zeros(c.kv_dim),
            zeros(c.hidden_dim), zeros(c.hidden_dim), zeros(c.n_heads, c.seq_len),
            zeros(c.head_size // 2), zeros(c.head_size // 2), zeros(c.vocab_size),
            zeros(widest, dtype=np.int8), zeros(widest), zeros(widest),
            zeros(-(-widest // 32), dtype=np.int32), weights_in_cache,
        )  # fmt: skip


@parallel_kernel  # it calls parallel kernels (see llamette.kernels)
def decode_step(
    w, s, key_cache, value_cache, token, pos, n_heads, norm_eps, rope_theta, exact, profile
):
    """One token at position pos through the transformer, as run.c's forward; logits in s.logits.

    key_cache, value_cache: (n_layers, n_kv_heads, seq_len, head_size); this step writes
    position pos of each layer.
    profile: empty, or cycle counts per part of the step to add to (see kernels.timing).
    """
    x = s.x
    t.start(profile)
    embed(x, w.tok_embeddings, token)
    t.tick(profile, t.EMBEDDING)
    rope_angles(s.rope_cos, s.rope_sin, pos, 2 * s.rope_cos.shape[0], rope_theta)  # every layer's
    t.tick(profile, t.ROPE)
    for layer in range(len(w.wq)):
        # attention: x += wo @ attention(rope(wq @ norm(x)), rope(wk @ norm(x)), wv @ norm(x))
        rmsnorm(s.xb, x, w.attention_norm[layer], norm_eps)
        t.tick(profile, t.ATTENTION_NORM)
        linear((s.q, s.k, s.v), s.xb, (w.wq[layer], w.wk[layer], w.wv[layer]), exact, s)
        t.tick(profile, t.QKV)
        rope(s.q, s.k, s.rope_cos, s.rope_sin)
        t.tick(profile, t.ROPE)
        store_kv(key_cache[layer], s.k, pos)
        store_kv(value_cache[layer], s.v, pos)
        attention(s.xb, s.q, key_cache[layer], value_cache[layer], pos, n_heads, s.att, exact)
        t.tick(profile, t.ATTENTION)
        linear((s.xb2,), s.xb, (w.wo[layer],), exact, s)
        t.tick(profile, t.WO)
        add(x, s.xb2)
        t.tick(profile, t.RESIDUALS)

        # feed-forward (SwiGLU): x += w2 @ (silu(w1 @ norm(x)) * (w3 @ norm(x)))
        rmsnorm(s.xb, x, w.ffn_norm[layer], norm_eps)
        t.tick(profile, t.FFN_NORM)
        linear((s.hb, s.hb2), s.xb, (w.w1[layer], w.w3[layer]), exact, s)
        t.tick(profile, t.W1_W3)
        swiglu(s.hb, s.hb2, exact)
        t.tick(profile, t.SWIGLU)
        linear((s.xb,), s.hb, (w.w2[layer],), exact, s)
        t.tick(profile, t.W2)
        add(x, s.xb)
        t.tick(profile, t.RESIDUALS)

    rmsnorm(x, x, w.norm, norm_eps)
    t.tick(profile, t.FINAL_NORM)
    linear((s.logits,), x, (w.output,), exact, s)
    t.tick(profile, t.CLASSIFIER)


class Activations:
    """Memory for forward_batch's arrays, kept from one pass to the next: fresh memory costs a page
    fault per 4 KiB at first touch (about 5,900 in a 256-token prefill of stories110M: 6% of it)."""

    def __init__(self) -> None:
        self._held: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """An uninitialized array: the memory of the last one of the same name, grown as needed."""
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        held = self._held.get(name)
        if held is None or held.size < size:
            held = self._held[name] = np.empty(size, np.uint8)
        return held[:size].view(dtype).reshape(shape)


def lazily_mapped_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """float32 zeros in memory that becomes resident 4 KiB page by page as it is written.

    For the KV cache: NumPy asks for 2 MiB pages, and the first position written to a kv head's
    run of seq_len positions would fault in the whole run (all of a 7B model's 4 GiB cache).
    `use_huge_pages` turns them back on where the whole cache is to be written anyway.
    """
    if not hasattr(mmap, "MAP_PRIVATE"):  # not a POSIX system
        return np.zeros(shape, np.float32)
    nbytes = int(np.prod(shape)) * np.dtype(np.float32).itemsize
    memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    _advise(memory, "MADV_NOHUGEPAGE")  # also where huge pages are the system's default
    return np.ndarray(shape, np.float32, buffer=memory)


def use_huge_pages(array: np.ndarray) -> None:
    """Ask for 2 MiB pages for the memory of a lazily_mapped_zeros array not yet written: fewer
    TLB misses when attention reads many sequences' caches."""
    if isinstance(array.base, mmap.mmap):
        _advise(array.base, "MADV_HUGEPAGE")


def _advise(memory: mmap.mmap, advice: str) -> None:
    if hasattr(mmap, advice):  # Linux; a kernel without huge pages refuses (EINVAL): no matter
        with contextlib.suppress(OSError):
            memory.madvise(getattr(mmap, advice))


def fits_in_cache(weight_bytes: int) -> bool:
    """Whether a decode step's weights stay in the last-level cache from one step to the next,
    with a quarter of it left for the rest (the KV cache, activations, other programs)."""
    return weight_bytes <= last_level_cache_bytes() * 3 // 4


class Transformer:
    """A model ready to run: weights, KV cache and activation buffers.

    `exact=True` selects the reference kernels, which reproduce run.c's and runq.c's arithmetic
    to the bit; the default kernels are faster and agree with them. The KV cache holds `n_slots`
    sequences of up to `seq_len` positions (default: the model's context), which forward_batch
    can advance together.
    """

    def __init__(
        self, weights: Weights, exact: bool = False, n_slots: int = 1, seq_len: int | None = None
    ):
        c = self.config = replace(weights.config, seq_len=seq_len or weights.config.seq_len)
        self.weights = weights
        self.exact = exact
        self.tensors = Tensors.of(weights)
        self.buffers = Buffers.for_config(
            c, fits_in_cache(sum(self._weight_bytes_per_part().values()))
        )
        self.activations = Activations()  # forward_batch's
        # KV cache: every layer's keys and values for every position so far, per sequence; each
        # kv head's positions in a row, so that attention reads one run of memory per head.
        cache_shape = (n_slots, c.n_layers, c.n_kv_heads, c.seq_len, c.head_size)
        self.key_cache = lazily_mapped_zeros(cache_shape)
        self.value_cache = lazily_mapped_zeros(cache_shape)
        self.profile = np.zeros(0, np.int64)  # cycle counts per part of a decode step, when on
        self.profiled_steps = 0
        if not exact:
            self._note_misaligned_groups()

    @classmethod
    def load(cls, path: str | os.PathLike, exact: bool = False, n_slots: int = 1) -> Transformer:
        """Load a model file (memory-mapped) and make it ready to run."""
        return cls(load_weights(path), exact=exact, n_slots=n_slots)

    def warm_up(self) -> None:
        """Load (or compile) the kernels of a run before it is timed: a batched pass and a decode
        step, in slot 0 at positions 0 and 1 (which the run then writes over)."""
        if not self.exact:
            self.forward_batch([1, 1], [0, 1], [0, 0], [-1])
        self.forward(1, 0)

    def forward(self, token: int, pos: int, slot: int = 0) -> np.ndarray:
        """Logits (vocab_size,) for the token at position pos, after positions 0..pos-1 are cached.

        The returned array is reused by the next call.
        """
        c = self.config
        decode_step(
            self.tensors, self.buffers, self.key_cache[slot], self.value_cache[slot], token, pos,
            c.n_heads, c.norm_eps, c.rope_theta, self.exact, self.profile,
        )  # fmt: skip
        self.profiled_steps += len(self.profile) > 0
        return self.buffers.logits

    def prefill(self, tokens: list[int], start_pos: int, slot: int = 0) -> np.ndarray:
        """Run tokens at positions start_pos.. through the model; the last one's logits (vocab_size,).

        The default path takes the prompt in batches of PREFILL_CHUNK tokens; --exact feeds it one
        token at a time, as run.c does.
        """
        if self.exact:
            for offset, token in enumerate(tokens):
                logits = self.forward(token, start_pos + offset, slot)
            return logits
        for chunk in range(0, len(tokens), PREFILL_CHUNK):
            batch = tokens[chunk : chunk + PREFILL_CHUNK]
            positions = np.arange(start_pos + chunk, start_pos + chunk + len(batch))
            last = len(tokens) - chunk - 1 < PREFILL_CHUNK
            logits = self.forward_batch(
                batch, positions, np.full(len(batch), slot), [-1] if last else []
            )
        return logits[-1]

    def forward_batch(
        self, tokens, positions, slots, logit_rows: list[int] | None = None
    ) -> np.ndarray:
        """Several tokens in one pass: token b at positions[b] of sequence slots[b].

        Rows attend causally within their own sequence, including earlier rows of the batch; a
        sequence's rows must be in position order. Returns the logits (len(logit_rows), vocab_size)
        of the rows asked for (default: all).
        """
        c, w = self.config, self.tensors
        tokens, positions, slots = (np.asarray(a, np.int64) for a in (tokens, positions, slots))
        n, a = len(tokens), self.activations
        x = a.get("x", (n, c.dim))  # the residual stream, one row per token
        e = w.tok_embeddings
        if isinstance(e, Q8Tensor):
            fast.embed_rows(x, e.values, e.scales, tokens, e.group_size)
        elif isinstance(e, HalfTensor | BF16Tensor):
            ggml.half_embed_rows(x, e.bits, tokens, isinstance(e, BF16Tensor))
        elif isinstance(e, Q4Tensor):
            ggml.q4_embed_rows(x, e.blocks, tokens)
        elif isinstance(e, Q8_0Tensor):
            ggml.q8_0_embed_rows(x, e.blocks, tokens)
        else:
            x[:] = w.tok_embeddings[tokens]
        xb, attended = a.get("xb", (n, c.dim)), a.get("attended", (n, c.dim))
        cos, sin = a.get("cos", (n, c.head_size // 2)), a.get("sin", (n, c.head_size // 2))
        fast.rope_angles_rows(cos, sin, positions, c.head_size, c.rope_theta)
        heads = (n, c.n_kv_heads, c.head_size)  # a row of keys or values, as the cache holds it
        for layer in range(c.n_layers):
            # attention
            fast.rmsnorm_rows(xb, x, w.attention_norm[layer], c.norm_eps)
            q, k, v = self._matmul(xb, (w.wq[layer], w.wk[layer], w.wv[layer]), ("q", "k", "v"))
            fast.rope_rows(q, k, cos, sin)
            self.key_cache[slots, layer, :, positions] = k.reshape(heads)
            self.value_cache[slots, layer, :, positions] = v.reshape(heads)
            fast.attention_rows(attended, q, self.key_cache, self.value_cache, layer, slots,
                                positions, c.n_heads)  # fmt: skip
            (out,) = self._matmul(attended, (w.wo[layer],), ("out",))
            x += out
            # feed-forward (SwiGLU)
            fast.rmsnorm_rows(xb, x, w.ffn_norm[layer], c.norm_eps)
            gate, up = self._matmul(xb, (w.w1[layer], w.w3[layer]), ("gate", "up"))
            fast.swiglu_rows(gate, up)
            (out,) = self._matmul(gate, (w.w2[layer],), ("out",))
            x += out
        if logit_rows is not None and len(logit_rows) == 0:  # a pass through part of a prompt
            return np.empty((0, c.vocab_size), np.float32)
        rows = x if logit_rows is None else x[logit_rows]
        fast.rmsnorm_rows(rows, rows, w.norm, c.norm_eps)
        (logits,) = self._matmul(rows, (w.output,))  # fresh: the caller keeps them
        return logits

    def _matmul(
        self, x: np.ndarray, weights: tuple[Tensor, ...], names: tuple[str, ...] | None = None
    ) -> list[np.ndarray]:
        """x (B, n) @ w.T for weights that share their input (Q8, Q8_0: quantized once); the
        outputs in the named activations, or fresh arrays."""
        a = self.activations
        shapes = [(x.shape[0], w.shape[0]) for w in weights]
        outs = ([a.get(name, shape) for name, shape in zip(names, shapes, strict=True)] if names
                else [np.empty(shape, np.float32) for shape in shapes])  # fmt: skip
        if isinstance(weights[0], Q8Tensor):
            scratch = fast.q8_scratch(x.shape[0], x.shape[1], weights[0].group_size, a.get)
            fast.q8_linear(tuple(outs), x, weights, scratch, self.buffers.weights_in_cache)
        elif isinstance(weights[0], Q8_0Tensor):
            scratch = ggml.q8_0_scratch(x.shape[0], x.shape[1], a.get)
            ggml.q8_0_linear(tuple(outs), x, weights, scratch, self.buffers.weights_in_cache)
        elif isinstance(weights[0], HalfTensor | BF16Tensor):
            for out, w in zip(outs, weights, strict=True):
                ggml.half_matmul(out, x, w.bits, isinstance(w, BF16Tensor))
        elif isinstance(weights[0], Q4Tensor):
            for out, w in zip(outs, weights, strict=True):
                ggml.q4_matmul(out, x, w.blocks)
        else:
            for out, w in zip(outs, weights, strict=True):
                fast.matmul_f32(out, x, w)
        return outs

    def start_profile(self) -> None:
        """From now on, count where the time of each decode step goes (see profile_report)."""
        self.profile = t.new_profile()
        self.profiled_steps = 0

    def profile_report(self) -> list[tuple[str, float, float]]:
        """Per part of a decode step: (part, microseconds per step, GB/s of weights read or 0)."""
        rate = t.cycles_per_second()
        bytes_read = self._weight_bytes_per_part()
        report = []
        for index, part in enumerate(t.PARTS, start=1):
            seconds = self.profile[index] / rate / max(self.profiled_steps, 1)
            throughput = bytes_read.get(part, 0) / seconds / 1e9 if seconds else 0.0
            report.append((part, seconds * 1e6, throughput))
        return report

    def _weight_bytes_per_part(self) -> dict[str, int]:
        w = self.tensors

        def nbytes(*tensors) -> int:
            return sum(tensor_nbytes(tensor) for tensor in tensors)

        return {
            "q k v": nbytes(*w.wq, *w.wk, *w.wv),
            "wo": nbytes(*w.wo),
            "w1 w3": nbytes(*w.w1, *w.w3),
            "w2": nbytes(*w.w2),
            "classifier": nbytes(w.output),
        }

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
