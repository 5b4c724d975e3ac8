"""Byte-level BPE tokenizers, as GGUF files carry them, against llama.cpp's tokenizer.

Each tokenizer is trained here (Hugging Face `tokenizers`) on the project's story corpus and
some text of other scripts, pre-tokenized as one `tokenizer.ggml.pre` type splits, and written
into a small random model's GGUF by llamette; llama.cpp reads the same file.
"""

import json
import random

import pytest

from conftest import OTHER_SCRIPTS, bpe_tokenizer, llama_cpp_model, train_bpe, write_bpe_model
from llamette import LlametteError, Tokenizer
from llamette.tokenizer import NORMAL, BPETokenizer, SpecialTokens, StreamDecoder
from llamette.training.corpus import make_corpus

PRE_TYPES = ["llama-bpe", "smollm", "default", "gpt-2", "qwen2", "tekken"]


@pytest.fixture(scope="module", params=PRE_TYPES)
def bpe_file(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / f"{request.param}.gguf"
    return write_bpe_model(path, bpe_tokenizer(request.param))


def texts(n: int) -> list[str]:
    """n texts mixing the scripts above, special-token look-alikes, digits and whitespace runs."""
    rng = random.Random(11)
    pieces = OTHER_SCRIPTS + make_corpus(20, seed=5) + [
        "<|im_end|>", "<|eot_id|>", "<|im_start|>user\n", "<tool_call>", "<|not_a_token|>", "<s>",
        " xylophone", " quokka", "Zebra", "  ", "\n\n\n", " \t ", "007", "x1y22z333", "'s", "''", "...", "→←", "\u00a0", "\u3000",
    ]  # fmt: skip
    found = []
    for _ in range(n):
        words = [rng.choice(pieces) for _ in range(rng.randint(1, 5))]
        text = "".join(w if rng.random() < 0.5 else w[: rng.randint(0, len(w))] for w in words)
        found.append(text)
    return found


def test_encoding_equals_llama_cpp(bpe_file):
    ours = Tokenizer.load(bpe_file)
    theirs = llama_cpp_model(bpe_file, vocab_only=True)
    for text in texts(1000):
        for special in (False, True):
            expected = theirs.tokenize(text.encode(), add_bos=True, special=special)
            assert ours.encode(text, bos=ours.add_bos, special=special) == expected, (text, special)


def test_decoding_streams_whole_utf8(bpe_file):
    tokenizer = Tokenizer.load(bpe_file)
    for text in texts(200):
        ids = tokenizer.encode(text, bos=False)
        decoder = StreamDecoder(tokenizer, prev_token=-1)
        assert "".join(decoder.push(t) for t in ids) + decoder.flush() == text


def test_special_tokens_come_from_the_file(tmp_path):
    tokenizer = Tokenizer.load(
        write_bpe_model(tmp_path / "llama3.gguf", bpe_tokenizer("llama-bpe"))
    )
    ids = {t: i for i, t in enumerate(tokenizer.tokens)}
    assert tokenizer.bos_id == ids["<|begin_of_text|>"] and tokenizer.add_bos
    # llama.cpp stops on the file's EOS and on every end-of-turn token it holds
    expected = {ids["<|end_of_text|>"], ids["<|eot_id|>"], ids["<|im_end|>"]}
    assert tokenizer.end_ids() == tokenizer.end_ids(chat=True) == expected
    assert tokenizer.decode([ids["<|im_start|>"], ids["<tool_call>"]]) == "<tool_call>"
    # a control token typed in text is text, unless special tokens are parsed
    assert ids["<|im_end|>"] not in tokenizer.encode("a<|im_end|>b", special=False)
    assert tokenizer.encode("a<|im_end|>b", bos=False, special=True)[1] == ids["<|im_end|>"]


def test_a_message_is_text_inside_a_template(tmp_path):
    tokenizer = Tokenizer.load(write_bpe_model(tmp_path / "smollm.gguf", bpe_tokenizer("smollm")))
    im_end = tokenizer.tokens.index("<|im_end|>")
    parts = [("<|im_start|>user\n", True), ("hi <|im_end|> there", False), ("<|im_end|>\n", True)]
    ids = tokenizer.encode_parts(parts)
    assert ids.count(im_end) == 1 and ids[-2] == im_end
    # without special tokens in the message, the parts encode as their joined text
    parts[1] = ("hi there", False)
    assert tokenizer.encode_parts(parts) == tokenizer.encode(
        "".join(p for p, _ in parts), bos=False, special=True
    )


def test_an_unknown_or_missing_pre_tokenizer_is_refused(tmp_path):
    trained = train_bpe("gpt-2")
    with pytest.raises(LlametteError, match="pre-tokenizer 'made-up' is not one llamette knows"):
        BPETokenizer(trained["tokens"], [NORMAL] * len(trained["tokens"]), trained["merges"],
                     "made-up", SpecialTokens(), "x.gguf")  # fmt: skip


def test_a_folder_whose_pre_tokenizer_is_unknown_is_refused(tmp_path):
    spec = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []},
            "pre_tokenizer": {"type": "Whitespace"}}  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(LlametteError, match="tokenizer.json: its pre-tokenizer .Whitespace"):
        Tokenizer.load(tmp_path)
