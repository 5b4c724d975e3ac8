"""`llamette warm-up`: compile, into the kernel cache, what a model of each of llama.cpp's common file
types runs, so that the first run of a downloaded model loads its kernels instead of compiling them.

Kernels are compiled per weight type, and the forward pass per set of types of each kind of
layer, never per shape: a small model in a file type's mix of types, with 32 layers as most
7B-class models have (so that its layers fall into the same kinds, in the same order), compiles
what the large one needs."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from llamette.errors import LlametteError
from llamette.weights import ModelConfig, Weights

# the file types people download most (Ollama's and llama.cpp's default Q4_K_M first)
COMMON_FILE_TYPES = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16")
BUNDLED_TOKENIZER = Path(__file__).parent / "bundled" / "tokenizer.bin"


def stand_in_config(vocab_size: int, shared_classifier: bool) -> ModelConfig:
    """A small Llama whose rows are whole blocks of every type (256 values), with 32 layers."""
    return ModelConfig(dim=256, hidden_dim=256, n_layers=32, n_heads=2, n_kv_heads=2,
                       vocab_size=vocab_size, seq_len=64, shared_classifier=shared_classifier)  # fmt: skip


def write_stand_in(path: Path, file_type: str, shared_classifier: bool = False) -> None:
    """A GGUF of random weights in llama.cpp's mix of types for file_type (or all in one type)."""
    from llamette.formats.gguf import write_gguf
    from llamette.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(BUNDLED_TOKENIZER)
    config = stand_in_config(tokenizer.vocab_size, shared_classifier)
    rng = np.random.default_rng(0)
    tensors = {name: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
               for name, shape in config.tensor_shapes().items()}  # fmt: skip
    write_gguf(Weights(config, tensors), path, tokenizer, file_type)


def warm_up(file_type: str, kv_type: str = "f32") -> float:
    """Compile (or load from the cache) what a run of a model of file_type compiles: its forward
    pass over a prompt and a decode step, and the default sampler. Returns the seconds it took."""
    from llamette.model import Transformer
    from llamette.sampler import Sampler

    check_file_type(file_type)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llamette-warm-up-") as folder:
        for shared_classifier in classifier_variants(file_type):
            path = Path(folder) / f"stand-in.{file_type}.{shared_classifier}.gguf"
            write_stand_in(path, file_type, shared_classifier)
            model = Transformer.load(path, kv_type=kv_type)
            model.warm_up()
            Sampler(model.config.vocab_size).warm_up()
            del model  # its file's mapping, before the folder goes
    return time.perf_counter() - start


def check_file_type(file_type: str) -> None:
    """A LlametteError unless file_type is one llamette writes (a file type or a weight type)."""
    from llamette.formats.gguf import WRITTEN_TYPES

    if file_type not in WRITTEN_TYPES:
        raise LlametteError(f"{file_type}: not a file type; one of {', '.join(WRITTEN_TYPES)}")


def classifier_variants(file_type: str) -> tuple[bool, ...]:
    """Whether to warm up models with a classifier of their own (False) and with the embedding
    as classifier (True, as Llama 3.2 and SmolLM2): both where the embedding's type differs
    between them (Q4_K_M's is Q4_K, or Q6_K as the classifier's), else the first."""
    from llamette.weight_types import file_types

    if file_type not in file_types.MAIN_TYPE:
        return (False,)
    embedding = {shared: file_types.tensor_types(file_type, stand_in_config(256, shared))[
        "tok_embeddings.weight"] for shared in (False, True)}  # fmt: skip
    return (False, True) if embedding[False] != embedding[True] else (False,)
