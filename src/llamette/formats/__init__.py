"""File formats, each read into (and written from) the same `Weights` description."""

from __future__ import annotations

import os

from llamette.errors import LlametteError
from llamette.formats.gguf import GGUFModel, is_gguf, read_gguf
from llamette.formats.huggingface import is_hf_folder, read_hf
from llamette.formats.llama2c import read_llama2c
from llamette.formats.meta import is_meta_folder, read_meta
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
