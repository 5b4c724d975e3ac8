"""The in-memory description of a model that every file format reads into: config + named tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

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

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's name and shape (Meta's names; matrices are (out_features, in_features))."""
        d, h, kv = self.dim, self.hidden_dim, self.kv_dim
        per_layer = {
            "attention_norm.weight": (d,),
            "attention.wq.weight": (d, d),
            "attention.wk.weight": (kv, d),
            "attention.wv.weight": (kv, d),
            "attention.wo.weight": (d, d),
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
        return shapes


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
