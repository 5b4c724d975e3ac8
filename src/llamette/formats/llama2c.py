"""llama2.c checkpoints: v0 (run.c's legacy fp32), v1 (fp32 with a header) and v2 (Q8_0, runq.c).

Facts: ../shared/docs/llama2c-format.md. Reading: every header field is checked against the file's
size before the file is mapped; tensors are views into the mapping, never copies. Writing: tensor
by tensor, as llama2.c's export.py lays files out, into a temporary file renamed at the end.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import struct
from collections.abc import Iterator

import numpy as np

from llamette.errors import LlametteError
from llamette.formats.output import atomic_output
from llamette.weight_types import Q8Tensor, quantize_q8, to_float32
from llamette.weights import ModelConfig, Weights

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32; the bytes on disk are b"24ka"
log = logging.getLogger("llamette")
HEADER_BYTES = 256  # v1 and v2
V0_HEADER_BYTES = 28  # seven int32


def read_llama2c(path: str | os.PathLike) -> Weights:
    """Memory-map a llama2.c checkpoint of any version."""
    path = os.fspath(path)
    size = _file_size(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) >= 8 and struct.unpack_from("<I", head)[0] == MAGIC:
        version = struct.unpack_from("<i", head, 4)[0]
        if version not in (1, 2):
            raise LlametteError(f"{path}: llama2.c version {version} is not supported (1 or 2)")
        if len(head) < HEADER_BYTES:
            raise LlametteError(
                f"{path}: truncated: {size} bytes, shorter than the 256-byte header"
            )
        config, group_size = _parse_v1_v2_header(path, head, version)
    else:
        if head[:4] == b"GGUF":
            raise LlametteError(f"{path}: is a GGUF file; llamette reads llama2.c checkpoints")
        if len(head) < V0_HEADER_BYTES:
            raise LlametteError(f"{path}: {size} bytes, too short for a llama2.c checkpoint")
        version, group_size = 0, 0
        config = _parse_v0_header(path, head)

    layout = list(_layout(config, version, group_size))
    expected = sum(nbytes for _, _, _, nbytes in layout)
    if size < expected:
        raise LlametteError(
            f"{path}: truncated: its header describes {expected} bytes, the file has {size}"
        )
    if size > expected:
        raise LlametteError(
            f"{path}: {size - expected} bytes beyond what its header describes "
            f"(not a llama2.c v{version} checkpoint?)"
        )
    # v2's int8 groups are closest to GGUF's Q8_0 (int8 in blocks of 32)
    stored_type = "q8_0" if version == 2 else "f32"
    return Weights(config, _map_tensors(path, layout, group_size), path, stored_type)


def _file_size(path: str) -> int:
    if not os.path.exists(path):
        raise LlametteError(f"{path}: no such file")
    if os.path.isdir(path):
        raise LlametteError(f"{path}: is a directory, not a llama2.c checkpoint")
    return os.path.getsize(path)


def _check_config(path: str, config: ModelConfig) -> ModelConfig:
    c = config
    sizes = (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len)
    if min(sizes) <= 0 or max(sizes) > 1 << 24:
        raise LlametteError(f"{path}: not a llama2.c checkpoint (implausible header {sizes})")
    if c.dim % c.n_heads or c.n_heads % c.n_kv_heads or c.head_size % 2:
        raise LlametteError(
            f"{path}: not a llama2.c checkpoint (dim {c.dim}, {c.n_heads} heads and "
            f"{c.n_kv_heads} kv heads do not make whole, even-sized heads)"
        )
    return config


def _parse_v0_header(path: str, head: bytes) -> ModelConfig:
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", head)
    config = ModelConfig(
        dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, shared_classifier=vocab > 0
    )
    return _check_config(path, config)


def _parse_v1_v2_header(path: str, head: bytes, version: int) -> tuple[ModelConfig, int]:
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", head, 8)
    shared = head[36]
    if shared not in (0, 1):
        raise LlametteError(f"{path}: shared-classifier flag is {shared}, not 0 or 1")
    config = _check_config(
        path,
        ModelConfig(
            dim, hidden, layers, heads, kv_heads, vocab, seq_len, shared_classifier=shared == 1
        ),
    )
    group_size = 0
    if version == 2:
        group_size = struct.unpack_from("<i", head, 37)[0]
        if group_size <= 0:
            raise LlametteError(f"{path}: group size {group_size} in the header is not positive")
        for name, shape in config.tensor_shapes().items():
            numel = int(np.prod(shape))
            if len(shape) == 2 and numel % group_size:
                raise LlametteError(
                    f"{path}: group size {group_size} does not divide {name} "
                    f"({shape[0]}x{shape[1]} values)"
                )
    return config, group_size


# A layout entry: (name, shape, kind, bytes); kind is "f32", "q8" or "skip".
Entry = tuple[str, tuple[int, ...], str, int]


def _layout(c: ModelConfig, version: int, group_size: int) -> Iterator[Entry]:
    """The file's contents in order, header included."""
    shapes = c.tensor_shapes()

    def f32(name: str) -> Entry:
        return name, shapes[name], "f32", 4 * int(np.prod(shapes[name]))

    def q8(name: str) -> Entry:
        numel = int(np.prod(shapes[name]))
        return name, shapes[name], "q8", numel + 4 * (numel // group_size)

    def each_layer(suffix: str) -> list[str]:
        return [f"layers.{i}.{suffix}" for i in range(c.n_layers)]

    norms = [*each_layer("attention_norm.weight"), *each_layer("ffn_norm.weight"), "norm.weight"]
    matrices = [
        name
        for suffix in (
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
        )
        for name in each_layer(suffix + ".weight")
    ]
    output = [] if c.shared_classifier else ["output.weight"]

    if version == 0:
        yield "header", (), "skip", V0_HEADER_BYTES
        yield f32("tok_embeddings.weight")
        yield from map(f32, each_layer("attention_norm.weight"))
        yield from map(f32, matrices[: 4 * c.n_layers])  # wq, wk, wv, wo
        yield from map(f32, each_layer("ffn_norm.weight"))
        yield from map(f32, matrices[4 * c.n_layers :])  # w1, w2, w3
        yield f32("norm.weight")
        # freq_cis_real and freq_cis_imag: seq_len * head_size / 2 floats each, read by no one
        yield "freq_cis", (), "skip", 4 * c.seq_len * c.head_size
        yield from map(f32, output)
    elif version == 1:
        yield "header", (), "skip", HEADER_BYTES
        yield from map(f32, [*norms, "tok_embeddings.weight", *matrices, *output])
    else:
        yield "header", (), "skip", HEADER_BYTES
        yield from map(f32, norms)
        yield from map(q8, ["tok_embeddings.weight", *matrices, *output])


def _map_tensors(
    path: str, layout: list[Entry], group_size: int
) -> dict[str, np.ndarray | Q8Tensor]:
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    tensors: dict[str, np.ndarray | Q8Tensor] = {}
    offset = 0
    for name, shape, kind, nbytes in layout:
        numel = int(np.prod(shape))
        if kind == "f32":
            tensors[name] = np.frombuffer(buffer, np.float32, numel, offset).reshape(shape)
        elif kind == "q8":
            values = np.frombuffer(buffer, np.int8, numel, offset).reshape(shape)
            scales = np.frombuffer(buffer, np.float32, numel // group_size, offset + numel)
            tensors[name] = Q8Tensor.of(values, scales, group_size)
        offset += nbytes
    return tensors


def write_llama2c(
    weights: Weights, path: str | os.PathLike, version: int = 0, group_size: int | None = None
) -> None:
    """Write a llama2.c checkpoint; v2 quantizes each matrix as export.py does (scale max|w| / 127).

    The v2 group size defaults to export.py's: 64, halved until it divides dim. Tensors are
    fetched one at a time from weights.tensors, so a lazily filled mapping streams.
    """
    if version not in (0, 1, 2):
        raise LlametteError(f"llama2.c version {version} does not exist (0, 1 or 2)")
    c = weights.config
    if group_size is None:
        group_size = 64
        while c.dim % group_size:
            group_size //= 2
    if version == 2:
        for name, shape in c.tensor_shapes().items():
            if len(shape) == 2 and shape[0] * shape[1] % group_size:
                raise LlametteError(f"group size {group_size} does not divide {name} {shape}")
        _note_groups_across_rows(c, group_size)
    with atomic_output(path) as temporary, open(temporary, "wb") as f:
        for name, _, kind, _ in _layout(c, version, group_size):
            if name == "header":
                f.write(_header(c, version, group_size))
            elif name == "freq_cis":
                f.write(_rope_tables(c).tobytes())
            elif kind == "f32":
                f.write(np.ascontiguousarray(to_float32(weights[name]), np.float32).tobytes())
            else:
                tensor = weights[name]
                if not isinstance(tensor, Q8Tensor) or tensor.group_size != group_size:
                    tensor = quantize_q8(to_float32(tensor), group_size)
                f.write(tensor.values.tobytes())
                f.write(tensor.scales.astype(np.float32).tobytes())


def _note_groups_across_rows(c: ModelConfig, group_size: int) -> None:
    """Say, once at writing, when groups straddle rows: runq.c computes such files wrongly."""
    for name, (_, cols) in ((n, s) for n, s in c.tensor_shapes().items() if len(s) == 2):
        if cols % group_size:
            log.warning(
                f"group size {group_size} does not divide the {cols} columns of {name}: runq.c "
                f"will misread this file (llamette reads it right); --group-size "
                f"{math.gcd(c.dim, c.hidden_dim)} divides every row"
            )
            return


def _header(c: ModelConfig, version: int, group_size: int) -> bytes:
    sizes = (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads)
    if version == 0:
        vocab = c.vocab_size if c.shared_classifier else -c.vocab_size
        return struct.pack("<7i", *sizes, vocab, c.seq_len)
    header = struct.pack(
        "<Ii7iB", MAGIC, version, *sizes, c.vocab_size, c.seq_len, c.shared_classifier
    )
    if version == 2:
        header += struct.pack("<i", group_size)
    return header.ljust(HEADER_BYTES, b"\0")


def _rope_tables(c: ModelConfig) -> np.ndarray:
    """v0's freq_cis_real then freq_cis_imag (seq_len, head_size / 2): no reader uses them."""
    exponents = np.arange(0, c.head_size, 2)[: c.head_size // 2].astype(np.float32) / c.head_size
    freqs = (1.0 / (np.float32(c.rope_theta) ** exponents)).astype(np.float32)
    angles = np.outer(np.arange(c.seq_len, dtype=np.float32), freqs)
    return np.concatenate([np.cos(angles).ravel(), np.sin(angles).ravel()]).astype(np.float32)
