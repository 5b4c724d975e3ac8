"""The story model that ships in the package, against what PyTorch recorded when it was trained."""

import json
import re
from pathlib import Path

import pytest

import llamette
from llamette import Sampler, Tokenizer, Transformer, generate
from llamette.cli import main
from llamette.perplexity import evaluate
from llamette.training.corpus import make_corpus
from llamette.training.train import token_stream

BUNDLED = Path(llamette.__file__).parent / "bundled"


@pytest.fixture(scope="module")
def log() -> dict:
    with open(BUNDLED / "train-log.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer.load(BUNDLED / "model.bin")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(BUNDLED / "tokenizer.bin")


def test_fits_the_size_budget():
    assert (BUNDLED / "model.bin").stat().st_size + (
        BUNDLED / "tokenizer.bin"
    ).stat().st_size < 10e6


def test_greedy_tokens_equal_pytorch_s(model, tokenizer, log):
    """PyTorch's greedy continuation, recorded at training, up to where generation stops (BOS)."""
    recorded = log["greedy"]
    expected = recorded["ids"]
    if 1 in expected:
        expected = expected[: expected.index(1) + 1]
    steps = len(recorded["prompt_ids"]) + len(expected) - 1
    result = generate(
        model, tokenizer, Sampler(model.config.vocab_size, 0.0), recorded["prompt"], steps
    )
    assert result.prompt_tokens == recorded["prompt_ids"]
    assert result.tokens == expected


def test_heldout_perplexity_is_the_recorded_one(model, tokenizer, log):
    c = log["config"]
    heldout = make_corpus(c["train_stories"] + c["heldout_stories"], c["seed"])[
        c["train_stories"] :
    ]
    tokens = token_stream(heldout, tokenizer)[1:].tolist()  # with tokenizer.bin's encoder
    result = evaluate(model, tokens, c["seq_len"])
    assert result.perplexity == pytest.approx(log["heldout_perplexity"], rel=0.05)


@pytest.mark.parametrize("flags", [["-t", "0"], ["-t", "0.8", "-s", "1"]])
def test_run_without_a_model_tells_a_story(capsys, flags):
    assert main(["run", *flags, "-n", "256", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["tokens"]) >= 200
    sentences = [s.strip() for s in re.split(r"[.!?]", result["text"]) if s.strip()]
    assert len(sentences) >= 10
    assert len(set(sentences)) >= 0.8 * len(sentences)  # no loop on one phrase
    words = re.findall(r"[a-z]+", result["text"].lower())
    assert {"the", "and", "she", "he"} & set(words) and len(set(words)) >= 40
