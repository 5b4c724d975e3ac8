"""Perplexity and KL divergence, against the same sums over transformers' logits."""

import json
from pathlib import Path

import numpy as np
import pytest

import llamette
from conftest import shared_path, tiny_llama
from llamette import Transformer
from llamette.cli import main
from llamette.perplexity import evaluate, windows

TOKENS = [17, 230, 5, 99, 311, 42, 7, 7, 260, 3, 150, 151, 152, 9, 88, 301, 44, 2, 19, 200]


def converted(model, folder):
    model.save_pretrained(folder)
    out = folder / "model.bin"
    assert main(["convert", str(folder), str(out), "--format", "llama2c-v1"]) == 0
    return Transformer.load(out)


def transformers_logprobs(model, window):
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([window])).logits[0].double(), dim=-1)


def test_windows_start_with_bos_and_cover_every_token():
    parts = list(windows(TOKENS, 8))
    assert all(part[0] == 1 and len(part) <= 8 for part in parts)
    assert sum((part[1:] for part in parts), []) == TOKENS


def test_without_bos_windows_overlap_by_one_and_score_all_but_the_first_token():
    parts = list(windows(TOKENS, 8, bos_id=None))
    assert all(len(part) <= 8 and part[0] in TOKENS for part in parts)
    assert sum((part[1:] for part in parts), []) == TOKENS[1:]


@pytest.mark.parametrize("context", [8, 64])
def test_nll_and_kl_match_transformers(tmp_path, context):
    torch = pytest.importorskip(
        "torch", reason="torch is a test dependency (pip install -e .[test])"
    )
    hf_model, hf_reference = tiny_llama(2, False, seed=11), tiny_llama(2, False, seed=12)
    model = converted(hf_model, tmp_path / "model")
    reference = converted(hf_reference, tmp_path / "reference")

    nll, kl, count = 0.0, 0.0, 0
    for window in windows(TOKENS, context):
        logprobs = transformers_logprobs(hf_model, window)[:-1]
        reference_logprobs = transformers_logprobs(hf_reference, window)[:-1]
        nll -= logprobs[torch.arange(len(window) - 1), torch.tensor(window[1:])].sum().item()
        kl += (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum().item()
        count += len(window) - 1

    result = evaluate(model, TOKENS, context, reference)
    assert result.tokens == count == len(TOKENS)
    assert result.mean_nll == pytest.approx(nll / count, rel=1e-5)
    assert result.mean_kl == pytest.approx(kl / count, rel=1e-4)
    assert result.perplexity == pytest.approx(np.exp(nll / count), rel=1e-5)


def test_command_scores_a_text_against_a_quantized_copy(tmp_path, capsys):
    models = shared_path("models")
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. She loved to play." * 4)
    quantized = tmp_path / "q80.bin"
    assert (
        main(["quantize", str(models / "stories260K.bin"), str(quantized), "--type", "q8_0"]) == 0
    )
    capsys.readouterr()
    for model in (models / "stories260K.bin", quantized):
        status = main(["perplexity", str(model), "--text", str(text), "-z", str(models / "tok512.bin"),
                       "--reference", str(models / "stories260K.bin"), "--json"])  # fmt: skip
        assert status == 0
    same, q80 = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert same["mean_kl"] == pytest.approx(0, abs=1e-9) and same["tokens"] > 60
    # a trained model finds a children's story likely: far below its 512-token vocabulary
    assert 0 < q80["mean_kl"] < 0.01 and same["perplexity"] < 10 and q80["perplexity"] < 10


def test_cache_types_show_their_kl_from_the_float32_cache(tmp_path, capsys):
    """`--cache-type` against the same model with run.c's float32 cache as the reference."""
    bundled = Path(llamette.__file__).parent / "bundled" / "model.bin"
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. She loved to play. " * 8)
    kl = {}
    for kv_type in ("f32", "f16", "q8_0"):
        argv = ["perplexity", bundled, "--text", text, "--reference", bundled, "--json"]
        assert main([str(a) for a in [*argv, "--cache-type", kv_type]]) == 0
        kl[kv_type] = json.loads(capsys.readouterr().out)["mean_kl"]
    assert kl["f32"] == pytest.approx(0, abs=1e-9)
    assert 0 < kl["f16"] < kl["q8_0"] < 1e-3


def test_reference_with_another_vocabulary_is_refused(tmp_path, capsys):
    models = shared_path("models")
    text = tmp_path / "t.txt"
    text.write_text("Hello")
    status = main(["perplexity", str(models / "stories260K.bin"), "--text", str(text),
                   "--reference", str(models / "rand-gqa.v1.bin")])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "vocabulary (32000) is not the model's (512)" in err


def test_a_window_beyond_the_context_is_clamped_and_said(tmp_path, capsys):
    models = shared_path("models")
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. " * 20)
    argv = ["perplexity", str(models / "stories260K.bin"), "--text", str(text),
            "-z", str(models / "tok512.bin"), "--json"]  # fmt: skip
    assert main(argv) == 0
    whole_context = json.loads(capsys.readouterr().out)
    assert main([*argv, "--ctx", "4096"]) == 0
    out, err = capsys.readouterr()
    assert "--ctx: 4096 is beyond the model's context of 512; using 512" in err
    assert json.loads(out)["perplexity"] == whole_context["perplexity"]
