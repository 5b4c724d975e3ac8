"""File formats, each read into (and later written from) the same `Weights` description."""

from __future__ import annotations

import os

from llamette.formats.llama2c import read_llama2c
from llamette.weights import Weights


def load_weights(path: str | os.PathLike) -> Weights:
    """Read a model file, memory-mapped."""
    return read_llama2c(path)
