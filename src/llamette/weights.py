"""The in-memory description of a model that every file format reads into: config + named tensors."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from llamette.errors import LlametteError
from llamette.weight_types import Tensor

BOS_ID = 1
EOS_ID = 2

LAYER_TENSORS = (
    "attention_norm.weight",
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "attention.wo.weight",
    "ffn_norm.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
)


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama transformer."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    head_dim: int | None = None  # where a head's size is not dim / n_heads
    rope_scaled: bool = False  # RoPE frequencies divided by the tensor rope_freqs (Llama 3.1's)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        """The queries' size: every head's."""
        return self.n_heads * self.head_size

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's name and shape (Meta's names; matrices are (out_features, in_features))."""
        d, h, kv, q = self.dim, self.hidden_dim, self.kv_dim, self.q_dim
        per_layer = {
            "attention_norm.weight": (d,),
            "attention.wq.weight": (q, d),
            "attention.wk.weight": (kv, d),
            "attention.wv.weight": (kv, d),
            "attention.wo.weight": (d, q),
            "ffn_norm.weight": (d,),
            "feed_forward.w1.weight": (h, d),
            "feed_forward.w2.weight": (d, h),
            "feed_forward.w3.weight": (h, d),
        }
        shapes = {"tok_embeddings.weight": (self.vocab_size, d)}
        for layer in range(self.n_layers):
            for name in LAYER_TENSORS:
                shapes[f"layers.{layer}.{name}"] = per_layer[name]
        shapes["norm.weight"] = (d,)
        if not self.shared_classifier:
            shapes["output.weight"] = (self.vocab_size, d)
        if self.rope_scaled:
            shapes["rope_freqs.weight"] = (self.head_size // 2,)
        return shapes


def llama3_rope_divisors(
    head_size: int, theta: float, factor: float, low_freq_factor: float,
    high_freq_factor: float, original_context: int,
) -> np.ndarray:  # fmt: skip
    """Llama 3.1's RoPE scaling as one divisor per rotary frequency (head_size / 2,): 1 for
    wavelengths shorter than original_context / high_freq_factor, `factor` for those longer than
    original_context / low_freq_factor, and a smooth blend between."""
    divisors = []
    for j in range(0, head_size, 2):
        wavelength = 2 * math.pi * theta ** (j / head_size)
        if wavelength < original_context / high_freq_factor:
            divisors.append(1.0)
        elif wavelength > original_context / low_freq_factor:
            divisors.append(factor)
        else:
            smooth = (original_context / wavelength - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, np.float32)


class LazyTensors(Mapping):
    """Tensors by name, each made by `load(name)` when asked for and not kept: converters stream.

    Each tensor's shape is checked against `shapes` (its config's) as it is made.
    """

    def __init__(
        self, shapes: dict[str, tuple[int, ...]], load: Callable[[str], Tensor], source: str
    ):
        self.shapes = shapes
        self.load = load
        self.source = source

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        tensor = self.load(name)
        if tuple(tensor.shape) != self.shapes[name]:
            raise LlametteError(
                f"{self.source}: {name} has shape {tuple(tensor.shape)}, "
                f"its config says {self.shapes[name]}"
            )
        return tensor

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


@dataclass
class Weights:
    """A model as read from a file: its config and its tensors by name, memory-mapped where possible."""

    config: ModelConfig
    tensors: Mapping[str, Tensor]
    source: str = ""
    stored_type: str = "f32"  # its matrices' type, or llama.cpp's file type of their mix

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def layer(self, index: int, name: str) -> Tensor:
        return self.tensors[f"layers.{index}.{name}"]

    @property
    def classifier(self) -> Tensor:
        """The output projection (V, dim): its own matrix, or the token embedding when shared."""
        if self.config.shared_classifier:
            return self.tensors["tok_embeddings.weight"]
        return self.tensors["output.weight"]
