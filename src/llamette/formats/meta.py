"""Meta's Llama checkpoints: a folder with params.json and consolidated.NN.pth shards.

Each shard holds one model-parallel slice of every matrix: column-parallel ones (wq, wk, wv, w1,
w3, output) are split along their rows, row-parallel ones (wo, w2) and the token embedding along
their columns; norms are repeated in every shard. Tensors are joined one at a time, on demand.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from llamette.errors import LlametteError
from llamette.formats.jsonfile import read_json_object
from llamette.formats.pytorch import TorchTensor, read_torch_state_dict
from llamette.weights import LazyTensors, ModelConfig, Weights, llama3_rope_divisors

# Meta's reference code allocates its caches for 2048 positions unless told otherwise; export.py
# writes that into every converted header.
DEFAULT_SEQ_LEN = 2048
SPLIT_ALONG_COLUMNS = ("tok_embeddings.weight", ".attention.wo.weight", ".feed_forward.w2.weight")
# use_scaled_rope (Llama 3.1 and later): the constants of Meta's reference code, whatever the
# model: factor, low and high frequency factors, original context
META_ROPE_SCALING = (8.0, 1.0, 4.0, 8192)


def is_meta_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "params.json"))


def read_meta(folder: str | os.PathLike, seq_len: int | None = None) -> Weights:
    """A Meta checkpoint folder as lazily joined float32 tensors."""
    folder = os.fspath(folder)
    params = _read_params(folder)
    shard_paths = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    if not shard_paths:
        raise LlametteError(f"{folder}: no consolidated.*.pth shards beside params.json")
    shards = [read_torch_state_dict(path) for path in shard_paths]

    def joined(name: str) -> np.ndarray:
        parts: list[TorchTensor] = []
        for path, shard in zip(shard_paths, shards, strict=True):
            if name not in shard:
                raise LlametteError(f"{path}: has no tensor {name}")
            parts.append(shard[name])
        if len(parts) == 1 or len(parts[0].shape) == 1:
            return parts[0].to_float32()
        axis = 1 if name.endswith(SPLIT_ALONG_COLUMNS) else 0
        return np.concatenate([part.to_float32() for part in parts], axis=axis)

    def joined_rows(name: str) -> int:
        if name not in shards[0]:
            raise LlametteError(f"{shard_paths[0]}: has no tensor {name}")
        return sum(shard[name].shape[0] for shard in shards if name in shard)

    try:
        dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    except (KeyError, TypeError, ValueError) as error:
        raise LlametteError(f"{folder}/params.json: missing or malformed {error}") from None
    vocab_size = int(params.get("vocab_size", -1))
    if vocab_size <= 0:
        vocab_size = shards[0]["tok_embeddings.weight"].shape[0]
    has_output = "output.weight" in shards[0]
    config = ModelConfig(
        dim=dim,
        hidden_dim=joined_rows("layers.0.feed_forward.w1.weight"),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(params.get("n_kv_heads") or n_heads),
        vocab_size=vocab_size,
        seq_len=seq_len or DEFAULT_SEQ_LEN,
        shared_classifier=not has_output
        or np.array_equal(joined("output.weight"), joined("tok_embeddings.weight")),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_scaled=bool(params.get("use_scaled_rope")),
    )

    def load(name: str) -> np.ndarray:
        if name == "rope_freqs.weight":  # not a tensor of the shards: Meta's fixed scaling
            return llama3_rope_divisors(config.head_size, config.rope_theta, *META_ROPE_SCALING)
        return joined(name)

    stored_type = shards[0]["layers.0.attention.wq.weight"].weight_type
    return Weights(config, LazyTensors(config.tensor_shapes(), load, folder), folder, stored_type)


def _read_params(folder: str) -> dict:
    path = os.path.join(folder, "params.json")
    params = read_json_object(path)
    if params.get("rope_scaling"):
        raise LlametteError(f"{path}: rope_scaling is not supported (use_scaled_rope is)")
    if params.get("moe") or params.get("vision_chunk_size"):
        raise LlametteError(f"{path}: not a plain Llama transformer (mixture or vision model)")
    return params
