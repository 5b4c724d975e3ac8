"""The Llama transformer: its weights, KV cache and the forward pass, written once for a batch of
rows (a decode step is a batch of one), in the flavour the model was loaded with."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import sys
import time
from dataclasses import replace
from typing import NamedTuple

import numba
import numpy as np
from numba import literal_unroll, typeof, types
from numba.typed import List

from llamette.ahead import (
    CompileAhead,
    compile_input_quantization,
    compile_products,
    compile_steps,
    compile_type_kernels,
    products_compiled_by,
    quantizing_process,
    shared_products,
)
from llamette.errors import LlametteError
from llamette.formats import load_weights
from llamette.kernels import (
    aligned_empty,
    entry_point,
    flavour,
    inlined_kernel,
    kernel,
    last_level_cache_bytes,
)
from llamette.kernels import timing as t
from llamette.kernels.dispatch import product
from llamette.kernels.int8 import Int8Inputs, new_input
from llamette.kernels.kv_cache import KV_TYPES, Q8_BLOCK, KVCache, scale_columns
from llamette.kernels.layers import (
    add,
    attention,
    embed,
    gather_rows,
    rmsnorm,
    rope,
    rope_angles,
    store_kv,
    swiglu,
)
from llamette.threads import ThreadChooser, first_count
from llamette.weight_types import Q8Tensor, Tensor, nbytes, smallest_input_group
from llamette.weights import LAYER_TENSORS, ModelConfig, Weights

log = logging.getLogger("llamette")

PREFILL_CHUNK = 512  # prompt tokens per batched forward pass


class Layer(NamedTuple):
    """One transformer block's weights, each matrix in its file's type."""

    attention_norm: np.ndarray  # (dim,)
    wq: Tensor  # (q_dim, dim)
    wk: Tensor  # (kv_dim, dim)
    wv: Tensor  # (kv_dim, dim)
    wo: Tensor  # (dim, q_dim)
    ffn_norm: np.ndarray  # (dim,)
    w1: Tensor  # (hidden_dim, dim), gate
    w2: Tensor  # (dim, hidden_dim), down
    w3: Tensor  # (hidden_dim, dim), up


class Tensors(NamedTuple):
    """The weights as compiled code takes them. Blocks whose weights have the same types form a
    group, so that compiled code holds one block of each kind, whatever the number of blocks:
    block i is layer_groups[layer_group[i]][layer_index[i]]."""

    tok_embeddings: Tensor  # (vocab_size, dim)
    layer_groups: tuple  # of typed Lists of Layer, each group's layers of one set of types
    layer_group: np.ndarray  # int64 (n_layers,): each layer's group
    layer_index: np.ndarray  # int64 (n_layers,): its place in the group
    norm: np.ndarray  # (dim,)
    output: Tensor  # (vocab_size, dim), the classifier
    rope_divisors: np.ndarray  # (head_size / 2,) of the rotary frequencies: ones, or Llama 3.1's

    @classmethod
    def of(cls, weights: Weights) -> Tensors:
        groups: dict[types.Type, list[Layer]] = {}  # by the numba type of the layer
        layer_group, layer_index = [], []
        for layer in layers_of(weights):
            group = groups.setdefault(typeof(layer), [])
            layer_group.append(list(groups).index(typeof(layer)))
            layer_index.append(len(group))
            group.append(layer)
        # Typed lists, not tuples: a tuple of every layer's arrays is one struct, whose size (and
        # compile time) grows with the number of layers. A list's type does not depend on its
        # length, so models that differ only in depth share their compiled code.
        c = weights.config
        rope_divisors = (weights["rope_freqs.weight"] if c.rope_scaled
                         else np.ones(c.head_size // 2, np.float32))  # fmt: skip
        return cls(weights["tok_embeddings.weight"],
                   tuple(typed_list(g) for g in groups.values()),
                   np.array(layer_group, np.int64), np.array(layer_index, np.int64),
                   weights["norm.weight"], weights.classifier,
                   np.ascontiguousarray(rope_divisors, np.float32))  # fmt: skip


def layers_of(weights: Weights) -> list[Layer]:
    """The blocks' weights in order."""
    return [
        Layer(*(weights.layer(i, name) for name in LAYER_TENSORS))  # Layer's order
        for i in range(weights.config.n_layers)
    ]


def typed_list(items: list) -> List:
    """A typed List of items of one Numba type, by kernels compiled once per type and cached (the
    typed List's own methods, called from Python, compile anew in each process, for seconds;
    a kernel taking the items as a tuple would compile again for each number of items)."""
    out = list_of(items[0])
    for item in items[1:]:
        append_to(out, item)
    return out


@kernel
def list_of(item):
    out = List()
    out.append(item)
    return out


@kernel
def append_to(items, item):
    items.append(item)


class Buffers(NamedTuple):
    """Memory for the activations of a batch of up to `capacity` rows, kept from one pass to the
    next (fresh memory costs a page fault per 4 KiB at its first touch). Compiled code takes the
    views of each batch's rows (`Activations`)."""

    x: np.ndarray  # (capacity, dim) the residual stream
    xb: np.ndarray  # (capacity, dim) a block's input, normed
    q: np.ndarray  # (capacity, q_dim) queries
    k: np.ndarray  # (capacity, kv_dim) keys, stored into the KV cache after RoPE
    v: np.ndarray  # (capacity, kv_dim) values
    attended: np.ndarray  # (capacity, q_dim) attention's output
    out: np.ndarray  # (capacity, dim) a block's output, added to the residual stream
    gate: np.ndarray  # (capacity, hidden_dim) the feed-forward's hidden state
    up: np.ndarray  # (capacity, hidden_dim)
    cos: np.ndarray  # (capacity, head_size / 2) each row's rotary angles
    sin: np.ndarray
    scores: np.ndarray  # (n_heads, seq_len) one row's attention weights
    inputs: Int8Inputs  # products' inputs, quantized for int8 weights

    @classmethod
    def for_config(cls, c: ModelConfig, capacity: int, smallest_group: int,
                   weights_in_cache: bool) -> Buffers:  # fmt: skip
        def empty(*shape):
            return aligned_empty((capacity, *shape), np.float32)

        return cls(
            empty(c.dim), empty(c.dim), empty(c.q_dim), empty(c.kv_dim), empty(c.kv_dim),
            empty(c.q_dim), empty(c.dim), empty(c.hidden_dim), empty(c.hidden_dim),
            empty(c.head_size // 2), empty(c.head_size // 2),
            aligned_empty((c.n_heads, c.seq_len), np.float32),
            Int8Inputs.sized(capacity, max(c.dim, c.hidden_dim, c.q_dim), smallest_group,
                             weights_in_cache),
        )  # fmt: skip

    @property
    def capacity(self) -> int:
        return self.x.shape[0]


class Activations(NamedTuple):
    """The rows of a batch of n in Buffers (n, ...)."""

    x: np.ndarray
    xb: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    attended: np.ndarray
    out: np.ndarray
    gate: np.ndarray
    up: np.ndarray
    cos: np.ndarray
    sin: np.ndarray
    scores: np.ndarray
    inputs: Int8Inputs


@kernel  # not parallel itself: it calls its parallel kernels by symbol (see llamette.kernels)
def forward(w, kv, buffers, rows, logit_rows, logits, n_heads, norm_eps, rope_theta, exact,
            profile):  # fmt: skip
    """Tokens through the transformer: token rows[0, b] at position rows[1, b] of the sequence
    in KV-cache slot rows[2, b] (a sequence's rows in position order, after its earlier positions
    are cached); the logits of the rows logit_rows into logits (len(logit_rows), vocab_size).

    Rows attend causally within their own sequence, earlier rows of the batch included. exact:
    True, run.c's arithmetic to the bit, row by row, or None, the fast kernels (kernels.flavour).
    profile: empty, or cycle counts per part of the
    pass to add to (see kernels.timing).
    """
    n = rows.shape[1]
    tokens, positions, slots = rows[0], rows[1], rows[2]
    b = buffers
    a = Activations(b.x[:n], b.xb[:n], b.q[:n], b.k[:n], b.v[:n], b.attended[:n], b.out[:n],
                    b.gate[:n], b.up[:n], b.cos[:n], b.sin[:n], b.scores, b.inputs)  # fmt: skip
    t.start(profile)
    embed(a.x, w.tok_embeddings, tokens)
    t.tick(profile, t.EMBEDDING)
    rope_angles(a.cos, a.sin, positions, 2 * a.cos.shape[1], rope_theta, w.rope_divisors)
    t.tick(profile, t.ROPE)
    for layer in range(w.layer_group.shape[0]):
        # literal_unroll compiles the block once per group (kind of layer); the group count
        # starts as an int64, not the literal 0, which would compile the block once more
        group, index = w.layer_group[layer], w.layer_index[layer]
        g = np.int64(0)
        for blocks in literal_unroll(w.layer_groups):
            if g == group:
                transformer_block(blocks[index], layer, a, kv, positions, slots, n_heads,
                                  norm_eps, exact, profile)  # fmt: skip
            g += 1  # noqa: SIM113
    if logit_rows.shape[0] == 0:  # a pass through part of a prompt
        return
    # the classifier, for the rows asked for
    final = a.xb[: logit_rows.shape[0]]  # (m, dim)
    gather_rows(final, a.x, logit_rows)
    rmsnorm(final, final, w.norm, norm_eps)
    t.tick(profile, t.FINAL_NORM)
    new_input(a.inputs)
    product(logits, final, w.output, a.inputs, exact)
    t.tick(profile, t.CLASSIFIER)


@inlined_kernel
def transformer_block(w, layer, a, kv, positions, slots, n_heads, norm_eps, exact, profile):
    """One block for the rows of a batch: attention, then a SwiGLU feed-forward, each on the
    RMS-normed residual stream a.x and added back to it."""
    # attention: x += wo @ attention(rope(wq @ norm(x)), rope(wk @ norm(x)), wv @ norm(x))
    rmsnorm(a.xb, a.x, w.attention_norm, norm_eps)
    t.tick(profile, t.ATTENTION_NORM)
    new_input(a.inputs)  # q, k and v share it: int8 weights quantize it once
    product(a.q, a.xb, w.wq, a.inputs, exact)
    product(a.k, a.xb, w.wk, a.inputs, exact)
    product(a.v, a.xb, w.wv, a.inputs, exact)
    t.tick(profile, t.QKV)
    rope(a.q, a.k, a.cos, a.sin)
    t.tick(profile, t.ROPE)
    store_kv(kv, layer, slots, positions, a.k, a.v)
    attention(a.attended, a.q, kv, layer, slots, positions, n_heads, a.scores, exact)
    t.tick(profile, t.ATTENTION)
    new_input(a.inputs)
    product(a.out, a.attended, w.wo, a.inputs, exact)
    t.tick(profile, t.WO)
    add(a.x, a.out)
    t.tick(profile, t.RESIDUALS)

    # feed-forward (SwiGLU): x += w2 @ (silu(w1 @ norm(x)) * (w3 @ norm(x)))
    rmsnorm(a.xb, a.x, w.ffn_norm, norm_eps)
    t.tick(profile, t.FFN_NORM)
    new_input(a.inputs)  # shared by w1 and w3
    product(a.gate, a.xb, w.w1, a.inputs, exact)
    product(a.up, a.xb, w.w3, a.inputs, exact)
    t.tick(profile, t.W1_W3)
    swiglu(a.gate, a.up, exact)
    t.tick(profile, t.SWIGLU)
    new_input(a.inputs)
    product(a.out, a.gate, w.w2, a.inputs, exact)
    t.tick(profile, t.W2)
    add(a.x, a.out)
    t.tick(profile, t.RESIDUALS)


def lazily_mapped_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Zeros (float32 by default) in memory that becomes resident 4 KiB page by page as it is
    written, and that release_pages gives back.

    For the KV cache, whose memory is taken as positions are written (as an operating system
    pages in what a process touches): NumPy would ask for 2 MiB pages, and the first position
    written to a kv head's run of seq_len positions would fault in the whole run. The mapping
    reserves no swap, so that many slots' worth of addresses can stand behind a smaller budget.
    """
    if not hasattr(mmap, "MAP_PRIVATE"):  # not a POSIX system
        return np.zeros(shape, dtype)
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
    try:
        memory = mmap.mmap(-1, max(size, 1), flags=flags)
    except OSError as error:
        raise LlametteError(
            f"a KV cache of {size / 2**30:.1f} GiB of addresses cannot be mapped "
            f"({error.strerror}): fewer slots or a shorter context"
        ) from None
    _advise(memory, "MADV_NOHUGEPAGE")  # also where huge pages are the system's default
    return np.ndarray(shape, dtype, buffer=memory)


# Linux's flag (Python's mmap module has no name for it before 3.13): addresses without swap
# reserved, which the overcommit heuristic would otherwise count in full
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)


def release_pages(array: np.ndarray, start: int, stop: int) -> None:
    """Give the whole pages within bytes start..stop of a lazily_mapped_zeros array back to the
    system: they read as zeros after, and take memory again when written."""
    memory = array.base
    if not isinstance(memory, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return  # memory that cannot be given back stays as it is
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = stop // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        memory.madvise(mmap.MADV_DONTNEED, first, last - first)


def _advise(memory: mmap.mmap, advice: str) -> None:
    if hasattr(mmap, advice):  # Linux; a kernel without huge pages refuses (EINVAL): no matter
        with contextlib.suppress(OSError):
            memory.madvise(getattr(mmap, advice))


# At most this much of the last-level cache is counted on: a virtual machine reports its host's
# whole cache (480 MB for 2 cores of a Xeon), of which its own share is a small part.
TRUSTED_CACHE_BYTES = 64 << 20


def fits_in_cache(weight_bytes: int) -> bool:
    """Whether a decode step's weights stay in the last-level cache from one step to the next,
    with a quarter of it left for the rest (the KV cache, activations, other programs)."""
    return weight_bytes <= min(last_level_cache_bytes(), TRUSTED_CACHE_BYTES) * 3 // 4


def new_kv_cache(config: ModelConfig, n_slots: int, kv_type: str, exact: bool) -> KVCache:
    """An empty KV cache of `kv_type` for n_slots sequences, taking memory as it is written."""
    if kv_type not in KV_TYPES:
        raise LlametteError(f"--cache-type: {kv_type!r} is not one of {', '.join(KV_TYPES)}")
    if kv_type != "f32" and exact:
        raise LlametteError(f"--cache-type {kv_type}: --exact keeps run.c's float32 KV cache")
    if kv_type == "q8_0" and config.head_size % Q8_BLOCK:
        raise LlametteError(f"--cache-type q8_0: heads of {config.head_size} values are not "
                            f"whole blocks of {Q8_BLOCK}")  # fmt: skip
    shape = (n_slots, config.n_layers, config.n_kv_heads, config.seq_len)
    values_shape = (*shape, config.head_size)
    scales_shape = (*shape, scale_columns(kv_type, config.head_size))
    dtype = KV_TYPES[kv_type]
    return KVCache(lazily_mapped_zeros(values_shape, dtype), lazily_mapped_zeros(values_shape, dtype),
                   lazily_mapped_zeros(scales_shape), lazily_mapped_zeros(scales_shape))  # fmt: skip


class Transformer:
    """A model ready to run: weights, KV cache and activation buffers.

    `exact=True` selects the reference kernels, which reproduce run.c's and runq.c's arithmetic
    to the bit, in every call (batches too); the default kernels are faster and agree with them.
    The KV cache holds `n_slots` sequences of up to `seq_len` positions (default: the model's
    context), which forward_batch can advance together, in `kv_type` ("f32", or "f16" and
    "q8_0" in half and a quarter of the memory; kernels.kv_cache). Its memory is taken as
    positions are written (`kv_held` counts them per slot) and given back by release_positions.

    Passes run with the threads the calling thread is set to (kernels.set_threads), or with
    `adapt_threads` with that many or one, whichever recent passes of the kind found faster
    (llamette.threads: on a machine where other programs hold cores, far fewer is far faster).
    """

    adapt_threads = True

    def __init__(
        self, weights: Weights, exact: bool = False, n_slots: int = 1, seq_len: int | None = None,
        kv_type: str = "f32",
    ):  # fmt: skip
        c = self.config = replace(weights.config, seq_len=seq_len or weights.config.seq_len)
        self.weights = weights
        self.exact = exact
        self._own_products, self._helper_products = shared_products(weights)  # (llamette.ahead)
        self._compile_ahead = CompileAhead(weights.source, kv_type, exact,
                                           bool(self._helper_products))  # fmt: skip
        # typed lists are the first compile of a cold run
        with self._compile_ahead.watching(cold_start=True):
            self.tensors = Tensors.of(weights)
        self.weights_in_cache = fits_in_cache(sum(self._weight_bytes_per_part().values()))
        self.buffers = self._buffers(1)
        self.kv_cache = new_kv_cache(c, n_slots, kv_type, exact)
        self.kv_held = np.zeros(n_slots, np.int64)  # per slot: positions 0.. whose memory it holds
        # a decode step's row, logit row and logits, written over by each step
        self._step_rows, self._step_logit_rows = np.zeros((3, 1), np.int64), np.zeros(1, np.int64)
        self._step_logits = np.zeros((1, c.vocab_size), np.float32)
        self.profile = self._no_profile = np.zeros(0, np.int64)  # cycles per part of a decode step
        self.profiled_steps = 0
        self._forward = None  # the compiled forward, once it is loaded
        self._thread_choosers: dict[bool, ThreadChooser] = {}  # by whether a pass is a batch
        if not exact:
            self._note_misaligned_groups()

    @classmethod
    def load(cls, path: str | os.PathLike, exact: bool = False, n_slots: int = 1,
             kv_type: str = "f32") -> Transformer:  # fmt: skip
        """Load a model file (memory-mapped) and make it ready to run."""
        return cls(load_weights(path), exact=exact, n_slots=n_slots, kv_type=kv_type)

    def warm_up(self) -> None:
        """Load (or compile) the kernels of a run before it is timed: a batched pass and a decode
        step, in slot 0 at positions 0 and 1 (which the run then writes over)."""
        self.forward_batch([1, 1], [0, 1], [0, 0], [-1])
        self.forward(1, 0)

    def forward(self, token: int, pos: int, slot: int = 0) -> np.ndarray:
        """Logits (vocab_size,) for the token at position pos, after positions 0..pos-1 are cached.

        The returned array is reused by the next call.
        """
        c = self.config
        if not (0 <= token < c.vocab_size and 0 <= pos < c.seq_len and 0 <= slot < self.n_slots):
            self._check_rows(np.array([[token], [pos], [slot]]))
        rows = self._step_rows
        rows[0, 0], rows[1, 0], rows[2, 0] = token, pos, slot
        self._run(rows, self._step_logit_rows, self._step_logits, self.profile)
        if pos >= self.kv_held[slot]:
            self.kv_held[slot] = pos + 1
        self.profiled_steps += len(self.profile) > 0
        return self._step_logits[0]

    def prefill(self, tokens: list[int], start_pos: int, slot: int = 0) -> np.ndarray:
        """Run tokens at positions start_pos.. through the model, PREFILL_CHUNK at a time; the
        last one's logits (vocab_size,)."""
        for chunk in range(0, len(tokens), PREFILL_CHUNK):
            batch = tokens[chunk : chunk + PREFILL_CHUNK]
            positions = np.arange(start_pos + chunk, start_pos + chunk + len(batch))
            last = len(tokens) - chunk - 1 < PREFILL_CHUNK
            logits = self.forward_batch(
                batch, positions, np.full(len(batch), slot), [-1] if last else []
            )
        return logits[-1]

    def embedding(self, tokens: list[int], slot: int = 0, normalize: bool = True) -> np.ndarray:
        """The mean of the final (normed) hidden states over the tokens (dim,), llama.cpp's mean
        pooling; at unit length if `normalize`. Runs them from position 0 of `slot`,
        PREFILL_CHUNK at a time."""
        if not tokens:
            raise LlametteError("an embedding needs at least one token")
        c = self.config
        norm = np.asarray(self.weights["norm.weight"], np.float64)
        total = np.zeros(c.dim, np.float64)
        for chunk in range(0, len(tokens), PREFILL_CHUNK):
            batch = tokens[chunk : chunk + PREFILL_CHUNK]
            positions = np.arange(chunk, chunk + len(batch))
            self.forward_batch(batch, positions, np.full(len(batch), slot), [])
            x = self.buffers.x[: len(batch)].astype(np.float64)  # (n, dim) the residual stream
            total += (x / np.sqrt((x * x).mean(axis=1, keepdims=True) + c.norm_eps) * norm).sum(0)
        mean = total / len(tokens)
        return (mean / np.linalg.norm(mean) if normalize else mean).astype(np.float32)

    def copy_positions(self, from_slot: int, to_slot: int, n: int) -> None:
        """Give to_slot the KV cache's first n positions of from_slot (a shared prompt)."""
        for cache in self.kv_cache:  # (slots, layers, kv heads, positions, values or scales)
            cache[to_slot, :, :, :n] = cache[from_slot, :, :, :n]
        self.kv_held[to_slot] = max(self.kv_held[to_slot], n)

    def release_positions(self, slot: int, keep: int = 0) -> None:
        """Give the memory of slot's KV positions from `keep` on back to the system (whole pages
        of each kv head's run of positions); they read as zeros until written again."""
        if self.kv_held[slot] <= keep:
            return
        c = self.config
        for cache in self.kv_cache:  # (slots, layers, kv heads, positions, values or scales)
            position_bytes = cache.shape[4] * cache.itemsize
            if position_bytes == 0:  # no scales in this type
                continue
            run_bytes = c.seq_len * position_bytes  # a kv head's positions in one layer
            runs = c.n_layers * c.n_kv_heads  # per slot
            if keep == 0:  # the slot's runs are one stretch of memory
                release_pages(cache, slot * runs * run_bytes, (slot + 1) * runs * run_bytes)
                continue
            for run in range(slot * runs, (slot + 1) * runs):
                release_pages(cache, run * run_bytes + keep * position_bytes, (run + 1) * run_bytes)
        self.kv_held[slot] = keep

    def forward_batch(
        self, tokens, positions, slots, logit_rows: list[int] | None = None
    ) -> np.ndarray:
        """Several tokens in one pass: token b at positions[b] of sequence slots[b].

        Rows attend causally within their own sequence, including earlier rows of the batch; a
        sequence's rows must be in position order. Returns the logits (len(logit_rows), vocab_size)
        of the rows asked for (default: all; -1 is the last), a fresh array.
        """
        rows = np.array([tokens, positions, slots], np.int64).reshape(3, -1)  # (3, B)
        self._check_rows(rows)
        n = rows.shape[1]
        wanted = np.arange(n) if logit_rows is None else np.asarray(logit_rows, np.int64) % n
        logits = np.empty((len(wanted), self.config.vocab_size), np.float32)
        if n > self.buffers.capacity:
            self.buffers = self._buffers(n)
        self._run(rows, wanted, logits, self._no_profile)
        np.maximum.at(self.kv_held, rows[2], rows[1] + 1)
        return logits

    @property
    def n_slots(self) -> int:
        return self.kv_held.shape[0]

    def _check_rows(self, rows: np.ndarray) -> None:
        """A LlametteError naming the first token, position or slot of rows (3, B) out of the
        model's range: compiled code reads and writes where they point, unchecked."""
        c = self.config
        limits = (("token", c.vocab_size, "the vocabulary"),
                  ("position", c.seq_len, f"the context of {c.seq_len}"),
                  ("slot", self.n_slots, f"the {self.n_slots} KV cache slots"))  # fmt: skip
        for values, (what, limit, range_name) in zip(rows, limits, strict=True):
            outside = values[(values < 0) | (values >= limit)]
            if outside.size:
                raise LlametteError(f"{what} {outside[0]} is outside {range_name}")

    def compile_pass(self):
        """The forward pass compiled (or loaded) for this model's arguments (every pass gives
        arguments of the same types: a decode step's)."""
        return entry_point(forward, self._pass_arguments(self._step_rows, self._step_logit_rows,
                                                         self._step_logits, self.profile))  # fmt: skip

    def _pass_arguments(self, rows, logit_rows, logits, profile) -> tuple:
        c = self.config
        return (self.tensors, self.kv_cache, self.buffers, rows, logit_rows, logits, c.n_heads,
                c.norm_eps, c.rope_theta, flavour(self.exact), profile)  # fmt: skip

    def _run(self, rows, logit_rows, logits, profile) -> None:
        args = self._pass_arguments(rows, logit_rows, logits, profile)
        if self._forward is None:  # every call passes arguments of the same types
            self._forward = self._compile_ahead.forward_compiled(
                self._compile_own_share, self.compile_pass
            )
        if not self.adapt_threads:
            self._forward(*args)
            return
        n_rows = rows.shape[1]
        chooser = self._thread_choosers.get(n_rows > 1)
        if chooser is None:  # the most threads: what the caller set before the first pass
            most = numba.get_num_threads()
            chooser = ThreadChooser(most, first=first_count(most))
            self._thread_choosers[n_rows > 1] = chooser
        threads, most = chooser.choose(n_rows), numba.get_num_threads()
        numba.set_num_threads(threads)
        start = time.perf_counter()
        try:
            self._forward(*args)
        finally:
            numba.set_num_threads(most)  # the caller's setting stays the caller's
        chooser.record(threads, (time.perf_counter() - start) / n_rows)

    def _compile_own_share(self) -> None:
        """A cold start's share of the kernels beside its helper's (llamette.ahead): the
        products with this process's weight types, their own kernels first, and before them the
        input's quantization that the int8 family's products share, unless the helper compiles
        it; then the products of the helper's int8-family types (whose kernels the helper
        compiles) and, where the helper takes products, the feed-forward's gate, the residual's
        addition, rotary embedding and the KV cache's store."""
        own, helpers = self._own_products, self._helper_products
        if quantizing_process(own, helpers) == "first":
            compile_input_quantization()  # the helper's products load it
        compile_type_kernels(own)
        compile_products(products_compiled_by(own, helpers)[0], self.buffers.inputs, self.exact)
        if helpers:
            compile_steps(self.buffers, self.kv_cache, self.exact)

    def _buffers(self, capacity: int) -> Buffers:
        smallest_group = smallest_input_group(self.weights.tensors.values())
        return Buffers.for_config(self.config, capacity, smallest_group, self.weights_in_cache)

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
        layers = layers_of(self.weights)

        def total(*names: str) -> int:
            return sum(nbytes(getattr(layer, name)) for layer in layers for name in names)

        return {
            "q k v": total("wq", "wk", "wv"),
            "wo": total("wo"),
            "w1 w3": total("w1", "w3"),
            "w2": total("w2"),
            "classifier": nbytes(self.tensors.output),
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
