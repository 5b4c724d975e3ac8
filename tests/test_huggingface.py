"""Hugging Face folders: models converted from transformers' LlamaForCausalLM give its logits."""

import numpy as np
import pytest

from conftest import shared_path, tiny_llama, transformers_logits
from llamette import Transformer
from llamette.cli import main
from llamette.formats import read_model
from llamette.formats.huggingface import read_hf

torch = pytest.importorskip("torch", reason="torch is a test dependency (pip install -e .[test])")


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "pytorch_bin"])
@pytest.mark.parametrize("n_kv_heads, tied", [(8, False), (2, False), (4, True), (1, True)])
def test_converted_model_gives_transformers_logits(tmp_path, n_kv_heads, tied, safetensors):
    model = tiny_llama(n_kv_heads, tied, seed=n_kv_heads)
    folder = tmp_path / "hf"
    model.save_pretrained(folder, safe_serialization=safetensors)
    out = tmp_path / "model.bin"
    assert main(["convert", str(folder), str(out), "--format", "llama2c-v1"]) == 0

    tokens = [1, 17, 230, 5, 99, 311, 42, 7, 7, 260]
    expected = transformers_logits(model, tokens)
    ours = Transformer.load(out)
    assert ours.config.shared_classifier == tied and ours.config.n_kv_heads == n_kv_heads
    for pos, token in enumerate(tokens):
        logits = ours.forward(token, pos)
        scale = np.abs(expected[pos]).max()
        assert np.abs(logits - expected[pos]).max() / scale < 1e-4, pos


def test_hf_mha_folder_gives_the_recorded_logits(tmp_path):
    reference = np.load(shared_path("expected", "hf-mha.logits.npz"))
    out = tmp_path / "hf-mha.bin"
    assert main(["convert", str(shared_path("models", "hf-mha")), str(out)]) == 0
    model = Transformer.load(out)
    for pos, token in enumerate(reference["input_ids"].reshape(-1)):
        expected = reference["logits"].reshape(-1, model.config.vocab_size)[pos]
        logits = model.forward(int(token), pos)
        assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-4


def test_bf16_checkpoint_reads_as_its_float32_values(tmp_path):
    model = tiny_llama(2, False, seed=3).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    weights = read_hf(tmp_path)
    embedding = model.model.embed_tokens.weight.float().detach().numpy()
    np.testing.assert_array_equal(weights["tok_embeddings.weight"], embedding)
    assert weights.stored_type == "bf16"  # what converting it to GGUF keeps by default


def test_refuses_rope_scaling(tmp_path):
    model = tiny_llama(2, False, seed=4)
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rope scaling 'linear' is not supported"):
        read_model(tmp_path)


def test_llama3_rope_scaling_and_heads_of_their_own_size_give_transformers_logits(tmp_path):
    """Llama 3.1's RoPE scaling (its short original context puts frequencies in each of the
    three bands) and heads of 16 values where dim / heads is 8, converted to GGUF."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
    model = tiny_llama(
        2,
        True,
        seed=5,
        head_dim=16,
        rope_parameters=rope,
        max_position_embeddings=128,
        vocab_size=512,
    )
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "model.gguf"
    assert main(["convert", str(tmp_path / "hf"), str(out), "--tokenizer",
                 str(shared_path("models", "tok512.bin")), "--type", "f32"]) == 0  # fmt: skip
    tokens = [1, 17, 230, 5, 99, 311, 42, 7, 7, 260] * 6  # past the original context
    expected = transformers_logits(model, tokens)
    ours = Transformer.load(out)
    assert ours.config.rope_scaled and ours.config.head_size == 16
    for pos, token in enumerate(tokens):
        logits = ours.forward(token, pos)
        scale = np.abs(expected[pos]).max()
        assert np.abs(logits - expected[pos]).max() / scale < 1e-4, pos
