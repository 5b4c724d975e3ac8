"""Random-weight models of real shapes, written once into the benchmark cache.

Each model exists as llama2.c files (v0 fp32, v2 Q8_0 with groups of 64) for llamette and GGUF
files (F32, Q8_0) of the same weights for llama.cpp. Weights are drawn tensor by tensor from a
seed per tensor name, so files of any size are written in bounded memory and are identical on
every machine. The K-quant files (Q4_K_M, Q6_K) are llama.cpp's own: its quantizer applied to the
F32 GGUF (for Llama-2-7B, whose F32 file would take 27 GB, to the Q8_0 GGUF), and both engines run
that same file.
"""

from __future__ import annotations

import os
import subprocess
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from llamette.formats.gguf import write_gguf
from llamette.formats.llama2c import write_llama2c
from llamette.tokenizer import Tokenizer
from llamette.weights import ModelConfig, Weights

SHAPES = {
    "stories15M": ModelConfig(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6,
                              vocab_size=32000, seq_len=256),
    "stories110M": ModelConfig(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12,
                               vocab_size=32000, seq_len=1024),
    "llama2-7b": ModelConfig(dim=4096, hidden_dim=11008, n_layers=32, n_heads=32, n_kv_heads=32,
                             vocab_size=32000, seq_len=4096, shared_classifier=False),
}  # fmt: skip

# (file suffix, who runs it, how it is written)
FORMATS = {
    "f32": {"llamette": ".f32.bin", "llama.cpp": ".f32.gguf"},
    "q8_0": {"llamette": ".q80.bin", "llama.cpp": ".q8_0.gguf"},
    "q4_k_m": {"llamette": ".q4_k_m.gguf", "llama.cpp": ".q4_k_m.gguf"},
    "q6_k": {"llamette": ".q6_k.gguf", "llama.cpp": ".q6_k.gguf"},
}
QUANTIZED_BY_LLAMA_CPP = {"q4_k_m": "Q4_K_M", "q6_k": "Q6_K"}  # weight type: llama.cpp file type

# llama.cpp's quantizer, run in the peer's venv: python -c QUANTIZE SOURCE OUT FILE_TYPE
QUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
params.allow_requantize = True
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


class RandomTensors(Mapping):
    """Tensors drawn on demand: N(0, 0.02) matrices, norm weights near 1."""

    def __init__(self, config: ModelConfig):
        self.shapes = config.tensor_shapes()

    def __getitem__(self, name: str) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        shape = self.shapes[name]
        if len(shape) == 1:
            return (1.0 + 0.1 * rng.standard_normal(shape, np.float32)).astype(np.float32)
        return rng.standard_normal(shape, np.float32) * np.float32(0.02)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def quantize_with_llama_cpp(peer_python: Path, source: Path, out: Path, file_type: str) -> Path:
    """source (a GGUF) quantized by llama.cpp's quantizer into its file type (e.g. "Q4_K_M")."""
    partial = out.with_suffix(".partial")
    subprocess.run([str(peer_python), "-c", QUANTIZE, str(source), str(partial), file_type],
                   check=True, capture_output=True)  # fmt: skip
    partial.rename(out)
    return out


def cache_dir() -> Path:
    path = Path(os.environ.get("LLAMETTE_BENCH_DIR", Path.home() / ".cache" / "llamette-bench"))
    (path / "models").mkdir(parents=True, exist_ok=True)
    return path


def model_path(name: str, weight_type: str, runner: str) -> Path:
    return cache_dir() / "models" / f"{name}{FORMATS[weight_type][runner]}"


def ensure_model(name: str, weight_type: str, tokenizer_path: Path,
                 peer_python: Path | None = None, log=print) -> dict[str, Path]:  # fmt: skip
    """Both runners' files for one model and weight type, written if missing (the K-quant files
    by llama.cpp's quantizer, in the venv of peer_python)."""
    if weight_type in QUANTIZED_BY_LLAMA_CPP:
        out = model_path(name, weight_type, "llama.cpp")
        if not out.exists():
            source = ensure_model(name, "q8_0" if name == "llama2-7b" else "f32", tokenizer_path,
                                  peer_python, log)["llama.cpp"]  # fmt: skip
            log(f"writing {out} with llama.cpp's quantizer")
            quantize_with_llama_cpp(peer_python, source, out, QUANTIZED_BY_LLAMA_CPP[weight_type])
        return {"llamette": out, "llama.cpp": out}
    config = SHAPES[name]
    weights = Weights(config, RandomTensors(config), source=f"random {name}")
    paths = {runner: model_path(name, weight_type, runner) for runner in FORMATS[weight_type]}
    if not paths["llamette"].exists():
        log(f"writing {paths['llamette']}")
        write_llama2c(weights, paths["llamette"], version=0 if weight_type == "f32" else 2)
    if not paths["llama.cpp"].exists():
        log(f"writing {paths['llama.cpp']}")
        write_gguf(weights, paths["llama.cpp"], Tokenizer.load(tokenizer_path), weight_type)
    return paths
