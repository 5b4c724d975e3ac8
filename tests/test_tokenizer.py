"""The tokenizer against run.c's encoder (recorded ids) and against UTF-8 itself."""

import random

import pytest

from conftest import expected_rows, shared_path
from llamette import LlametteError, Tokenizer
from llamette.tokenizer import StreamDecoder

_tokenizers = {}


def load(name: str) -> Tokenizer:
    if name not in _tokenizers:
        _tokenizers[name] = Tokenizer.load(shared_path("models", name))
    return _tokenizers[name]


@pytest.mark.parametrize(
    "row", expected_rows("tokenize.jsonl", keep=lambda row: row["tokenizer"].endswith(".bin"))
)
def test_encode_equals_run_c(row):
    assert load(row["tokenizer"]).encode(row["text"]) == row["run_c_ids"]


@pytest.mark.parametrize("row", expected_rows("tokenize.jsonl"))
def test_sentencepiece_model_encodes_as_sentencepiece(row):
    """tokenizer.model and tok512.model, loaded directly: SentencePiece's ids, normalization
    included (tok512.model collapses runs of spaces, where run.c's encoder does not)."""
    model = load(row["tokenizer"].replace(".bin", ".model"))
    assert model.encode(row["text"]) == row["sentencepiece_ids"]
    assert model.decode(row["sentencepiece_ids"]) == model.processor.decode(
        row["sentencepiece_ids"]
    )


def test_sentencepiece_model_has_the_pieces_of_tokenizer_bin():
    for name in ("tokenizer", "tok512"):
        model, llama2c = load(f"{name}.model"), load(f"{name}.bin")
        assert model.pieces == llama2c.pieces and model.scores == llama2c.scores


def test_vocab_size_is_the_number_of_pieces():
    assert load("tokenizer.bin").vocab_size == 32000
    assert load("tok512.bin").vocab_size == 512


def test_bos_and_eos_flags():
    tok = load("tokenizer.bin")
    ids = tok.encode("Hello world", bos=False, eos=True)
    assert ids[-1] == 2 and 1 not in ids
    assert tok.encode("") == [1] and tok.encode("", bos=False) == []


@pytest.mark.parametrize(
    "text", ["Hello, world!", "안녕하세요 🦙 café\ttab\nnewline", "  two  spaces "]
)
def test_decode_inverts_encode_including_byte_fallback(text):
    for name in ("tokenizer.bin", "tok512.bin"):
        assert load(name).decode(load(name).encode(text)) == text


def test_byte_pieces_join_into_utf8():
    tok = load("tokenizer.bin")
    llama = [b + 3 for b in "🦙".encode()]  # four byte-fallback pieces
    assert tok.decode(llama) == "🦙"
    decoder = StreamDecoder(tok)
    assert [decoder.push(t) for t in llama] == ["", "", "", "🦙"]
    assert decoder.flush() == ""


def test_incomplete_utf8_becomes_a_replacement_character():
    tok = load("tokenizer.bin")
    assert tok.decode([0xF0 + 3, 0x9F + 3]) == "\ufffd"


def test_leading_space_dropped_only_after_bos():
    tok = load("tokenizer.bin")
    hello, world = tok.encode("Hello world", bos=False)[-2:]  # " Hello" then " world"
    decoder = StreamDecoder(tok, prev_token=1)
    assert decoder.push(world) == "world" and decoder.push(world) == " world"


def test_long_text_encodes_as_sentencepiece():
    """100 KB of sentences: the same ids as SentencePiece's own encoder of tokenizer.model."""
    sentencepiece = pytest.importorskip("sentencepiece")
    tok = load("tokenizer.bin")
    processor = sentencepiece.SentencePieceProcessor(
        model_file=str(shared_path("models", "tokenizer.model"))
    )
    text = sample_text(tok, 100_000)
    ids = tok.encode(text)
    assert ids == [1] + processor.encode(text)
    assert tok.decode(ids) == text


def sample_text(tok: Tokenizer, n_chars: int, seed: int = 0) -> str:
    """Random sentences of the tokenizer's own ASCII words, n_chars long."""
    rng = random.Random(seed)
    words = [p.decode().strip() for p in tok.pieces[1000:9000] if p.isascii() and len(p) > 2]
    text = ""
    while len(text) < n_chars:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        text += sentence.capitalize() + rng.choice([". ", "! ", "? ", ".\n"])
    return text[:n_chars]


def test_merging_word_by_word_equals_merging_the_whole_text():
    tok = Tokenizer(load("tokenizer.bin").pieces, load("tokenizer.bin").scores)
    text = "The  quick brown fox, jumps; over the lazy dog... 123 ünïcödé   end  "
    by_word = tok.encode(text)
    tok._merges_stay_in_words = False
    assert tok.encode(text) == by_word


def test_a_gguf_and_a_model_folder_hold_their_tokenizers():
    text = "Once upon a time, a tiny ünicorn 🦄 said hi."
    in_gguf = Tokenizer.load(shared_path("models", "stories260K.gguf"))
    assert in_gguf.encode(text) == load("tok512.bin").encode(text)
    in_folder = Tokenizer.load(shared_path("models", "hf-mha"))
    assert in_folder.encode(text) == load("tokenizer.model").encode(text)


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(LlametteError, match="no such file"):
        Tokenizer.load(tmp_path / "absent.bin")
    data = shared_path("models", "tok512.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-3])
    with pytest.raises(LlametteError, match="cut.bin.*truncated"):
        Tokenizer.load(tmp_path / "cut.bin")
    (tmp_path / "model.bin").write_bytes(shared_path("models", "stories260K.bin").read_bytes())
    with pytest.raises(LlametteError, match="model.bin"):
        Tokenizer.load(tmp_path / "model.bin")
    with pytest.raises(LlametteError, match="folder without a tokenizer.model"):
        Tokenizer.load(tmp_path)


def test_wrong_vocabulary_size_is_refused():
    with pytest.raises(LlametteError, match="512 pieces.*vocabulary of 32000"):
        load("tok512.bin").check_vocab_size(32000, "rand-gqa.v0.bin")


def test_byte_fallback_finds_the_byte_pieces_wherever_they_are():
    """Mistral's vocabularies keep control tokens before the <0xHH> pieces: a character without a
    piece of its own falls back to those pieces' ids, not to 3 + byte."""
    llama = load("tokenizer.bin")
    controls = [f"<control_{i}>".encode() for i in range(8)]
    shifted = Tokenizer(llama.pieces[:3] + controls + llama.pieces[3:],
                        llama.scores[:3] + [0.0] * 8 + llama.scores[3:])  # fmt: skip
    text = "a \U0001f999 b"  # a llama emoji: no piece, four bytes
    assert [t - 8 if t >= 11 else t for t in shifted.encode(text)] == llama.encode(text)
