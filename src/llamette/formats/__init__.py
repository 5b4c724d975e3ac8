"""File formats, each read into (and written from) the same `Weights` description."""

from __future__ import annotations

import os

from llamette.errors import LlametteError
from llamette.formats.gguf import GGUFModel, is_gguf, read_gguf
from llamette.formats.huggingface import has_bpe_tokenizer, is_hf_folder, read_hf, read_tokenizer
from llamette.formats.llama2c import read_llama2c
from llamette.formats.meta import is_meta_folder, read_meta
from llamette.tokenizer import Tokenizer
from llamette.weights import Weights


def read_model(path: str | os.PathLike, seq_len: int | None = None) -> Weights:
    """Any model llamette reads: a llama2.c or GGUF file, a Meta or Hugging Face folder.

    Folders and non-F32 GGUF tensors come as lazily made float32 tensors, for conversion.
    `seq_len` overrides the context length where a Meta folder does not state one.
    """
    path = os.fspath(path)
    if is_meta_folder(path):
        return read_meta(path, seq_len)
    if is_hf_folder(path):
        return read_hf(path)
    if os.path.isdir(path):
        raise LlametteError(f"{path}: a folder with neither params.json (Meta) nor config.json")
    if is_gguf(path):
        return read_gguf(path)
    return read_llama2c(path)


def load_weights(path: str | os.PathLike, dequantize: bool = False) -> Weights:
    """A model file to run, memory-mapped: a llama2.c checkpoint or a GGUF file.

    GGUF weight types without a kernel yet are refused, or with `dequantize` expanded to float32.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise LlametteError(
            f"{path}: is a folder; convert it first (llamette convert {path} model.bin)"
        )
    if is_gguf(path):
        return GGUFModel(path).runnable_weights(dequantize)
    return read_llama2c(path)


def find_tokenizer(model_path: str, given: str | None, vocab_size: int, flag: str) -> Tokenizer:
    """The tokenizer named by `flag` (`given`), else a GGUF's own, else the first one of the
    model's vocabulary size inside a model folder or beside the model file."""
    model_path = os.fspath(model_path)
    if not given and os.path.isdir(model_path) and has_bpe_tokenizer(model_path):
        return read_tokenizer(model_path, vocab_size)
    if given or is_gguf(model_path):
        tokenizer = Tokenizer.load(given) if given else GGUFModel(model_path).tokenizer()
        tokenizer.check_vocab_size(vocab_size, os.path.basename(model_path))
        return tokenizer
    folders = [model_path] if os.path.isdir(model_path) else []
    folders.append(os.path.dirname(os.path.abspath(model_path)))
    names = ("tokenizer.bin", f"tok{vocab_size}.bin", "tokenizer.model", f"tok{vocab_size}.model")
    tried = []
    for folder in folders:
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                tried.append(f"no {name}")
                continue
            tokenizer = Tokenizer.load(path)
            if tokenizer.vocab_size == vocab_size:
                return tokenizer
            tried.append(f"{name} has {tokenizer.vocab_size} pieces")
    raise LlametteError(
        f"{model_path}: no tokenizer for its {vocab_size}-token vocabulary beside it "
        f"({', '.join(tried)}); name one with {flag}"
    )
