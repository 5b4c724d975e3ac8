"""Writing llama.cpp's file types (q4_k_m and the rest) with llamette's own quantizer: the same
type for every tensor as llama.cpp's quantizer chooses, the same blocks it makes, and the same
quality, on random models of whole 256-value blocks and on the bundled trained model (whose rows
fall back to 32-value types)."""

from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import (
    BUNDLED,
    llama_cpp_logits,
    mean_kl,
    quantized_by_llama_cpp,
    random_model_of_whole_k_blocks,
)
from llamette import Transformer
from llamette.cli import main
from llamette.weight_types import file_types, iq4_nl, iq4_xs, q4_k, q5_k, q6_k

FILE_TYPES = ["q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "iq4_xs", "iq4_nl"]
TOKENS = [1, *np.random.default_rng(3).integers(3, 1024, 255).tolist()]


def stored_types(path: Path) -> dict[str, str]:
    return {
        t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(path).tensors
    }


def quantized_by_llamette(source: Path, out: Path, file_type: str) -> Path:
    assert main(["quantize", str(source), str(out), "--type", file_type]) == 0
    return out


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    """Sixteen layers: each of llama.cpp's rules on layer positions picks some layers."""
    return random_model_of_whole_k_blocks(tmp_path_factory.mktemp("deep") / "deep.f32.gguf", 16)


@pytest.fixture(scope="module")
def bundled_f32(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundled") / "bundled.f32.gguf"
    assert main(["convert", str(BUNDLED / "model.bin"), str(out), "--tokenizer",
                 str(BUNDLED / "tokenizer.bin")]) == 0  # fmt: skip
    return out


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("model", ["deep_model", "bundled_f32"])
def test_each_tensor_takes_the_type_llama_cpp_gives_it(tmp_path, request, model, file_type):
    source = request.getfixturevalue(model)
    theirs = quantized_by_llama_cpp(source, tmp_path / "theirs.gguf", file_type.upper())
    ours = quantized_by_llamette(source, tmp_path / "ours.gguf", file_type)
    assert stored_types(ours) == stored_types(theirs)


@pytest.mark.parametrize("file_type", ["q4_k", "q5_k"])
def test_one_type_files_are_llama_cpp_s_pure_files(tmp_path, deep_model, file_type):
    theirs = quantized_by_llama_cpp(deep_model, tmp_path / "theirs.gguf", f"{file_type.upper()}_S",
                                    pure=True)  # fmt: skip
    ours = quantized_by_llamette(deep_model, tmp_path / "ours.gguf", file_type)
    assert stored_types(ours) == stored_types(theirs)
    assert set(stored_types(ours).values()) == {"F32", file_type.upper()}


def test_uses_more_bits_in_the_first_and_last_eighths_and_every_third_layer():
    chosen = [layer for layer in range(16) if file_types.uses_more_bits(layer, 16)]
    assert chosen == [0, 1, 4, 7, 10, 13, 14, 15]


@pytest.mark.parametrize("kind", [q4_k, q5_k, q6_k, iq4_nl, iq4_xs])
def test_blocks_are_those_of_llama_cpp_s_quantizer(tmp_path, deep_model, kind):
    """The same search for scales and minimums as llama.cpp's reference quantizer: the same
    blocks but where float sums in another order round a trial's error the other way."""
    file_type = {q4_k: "Q4_K_S", q5_k: "Q5_K_S", q6_k: "Q6_K", iq4_nl: "IQ4_NL", iq4_xs: "IQ4_XS"}[
        kind
    ]
    theirs = quantized_by_llama_cpp(deep_model, tmp_path / "theirs.gguf", file_type, pure=True)
    source = {t.name: t for t in gguf.GGUFReader(deep_model).tensors}
    for tensor in gguf.GGUFReader(theirs).tensors[:12]:
        if tensor.tensor_type != kind.GGUF_TYPE:
            continue
        w = np.asarray(source[tensor.name].data, np.float32)
        ours = kind.quantize(w).reshape(-1, kind.BLOCK_BYTES)
        expected = np.asarray(tensor.data).reshape(-1, kind.BLOCK_BYTES)
        assert (ours == expected).all(axis=1).mean() > 0.95, tensor.name
        our_error, their_error = (rms_error(b, tensor.tensor_type, w) for b in (ours, expected))
        assert our_error < 1.001 * their_error, tensor.name


def rms_error(blocks: np.ndarray, qtype, w: np.ndarray) -> float:
    """The RMS difference between w and its blocks' values."""
    return float(
        np.sqrt(np.mean(np.square(gguf.quants.dequantize(blocks, qtype).reshape(w.shape) - w)))
    )


@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_files_are_as_close_to_f32_as_llama_cpp_s(tmp_path, model_of_whole_k_blocks, file_type):
    """KL from the F32 model's next-token distributions over 256 positions: llamette's file no
    more than 1.1 times llama.cpp's, run by llamette and by llama.cpp."""
    theirs = quantized_by_llama_cpp(model_of_whole_k_blocks, tmp_path / "theirs.gguf",
                                    file_type.upper())  # fmt: skip
    ours = quantized_by_llamette(model_of_whole_k_blocks, tmp_path / "ours.gguf", file_type)
    f32 = forward(model_of_whole_k_blocks)
    assert mean_kl(f32, forward(ours)) < 1.1 * mean_kl(f32, forward(theirs))
    assert mean_kl(f32, llama_cpp_logits(ours, TOKENS)) < 1.1 * mean_kl(
        f32, llama_cpp_logits(theirs, TOKENS)
    )


def forward(path: Path) -> np.ndarray:
    """llamette's logits (256, vocab) for TOKENS."""
    return Transformer.load(path).forward_batch(TOKENS, np.arange(len(TOKENS)),
                                                np.zeros(len(TOKENS), np.int64))  # fmt: skip
