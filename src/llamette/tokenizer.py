"""Text <-> token ids: a llama2.c `tokenizer.bin` encoding exactly as run.c does, or a SentencePiece
`tokenizer.model` encoding exactly as the sentencepiece library does (it does the encoding)."""

from __future__ import annotations

import codecs
import heapq
import os
import re
import struct
from collections.abc import Iterable

from llamette.errors import LlametteError
from llamette.weights import BOS_ID, EOS_ID

BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
BYTE_FALLBACK_OFFSET = 3  # ids 3..258 are the pieces <0x00>..<0xFF>
WORDS = re.compile(r" *[^ ]+| +")  # text split before each space that follows a non-space
WORD_CACHE_LIMIT = 1 << 16


class Tokenizer:
    """A vocabulary of byte-string pieces with merge scores (SentencePiece BPE, as llama2.c stores it)."""

    def __init__(self, pieces: list[bytes], scores: list[float], source: str = ""):
        self.pieces = pieces
        self.scores = scores
        self.source = source
        self.piece_ids = {piece: i for i, piece in enumerate(pieces)}
        # What each id stands for in text: its piece, or the single raw byte of a <0xHH> piece.
        self.token_bytes = [_piece_bytes(piece) for piece in pieces]
        # When no piece holds a non-space followed by a space, no merge crosses such a point:
        # words can then be merged one at a time, and each distinct word only once.
        self._merges_stay_in_words = not any(re.search(rb"[^ ] ", piece) for piece in pieces)
        self._word_ids: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a llama2.c tokenizer.bin, a SentencePiece model (a name ending in .model), the
        tokenizer inside a GGUF file, or the tokenizer.model of a model folder."""
        from llamette.formats.gguf import GGUFModel, is_gguf  # the GGUF reader uses this module

        path = os.fspath(path)
        if os.path.isdir(path):
            inside = os.path.join(path, "tokenizer.model")
            if not os.path.isfile(inside):
                raise LlametteError(f"{path}: a folder without a tokenizer.model")
            return SentencePieceTokenizer.load(inside)
        if not os.path.isfile(path):
            raise LlametteError(f"{path}: no such file")
        if path.endswith(".model"):
            return SentencePieceTokenizer.load(path)
        if is_gguf(path):
            return GGUFModel(path).tokenizer()
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < 4:
            raise LlametteError(f"{path}: too short for a tokenizer.bin")
        (max_token_length,) = struct.unpack_from("<I", data)
        pieces, scores, offset = [], [], 4
        while offset < len(data):
            if offset + 8 > len(data):
                raise LlametteError(f"{path}: truncated after {len(pieces)} pieces")
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            if length < 0 or length > max_token_length or offset + length > len(data):
                raise LlametteError(
                    f"{path}: piece {len(pieces)} has length {length} "
                    f"(max {max_token_length}, {len(data) - offset} bytes left): "
                    "truncated, or not a tokenizer.bin"
                )
            pieces.append(data[offset : offset + length])
            scores.append(score)
            offset += length
        if len(pieces) <= BYTE_FALLBACK_OFFSET + 255:
            raise LlametteError(f"{path}: only {len(pieces)} pieces, too few for a Llama tokenizer")
        return cls(pieces, scores, source=path)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids for text: run.c's encoder (dummy-prefix space, code points, byte fallback, merges)."""
        ids = [BOS_ID] if bos else []
        if text:
            if b" " in self.piece_ids:
                text = " " + text  # the dummy prefix
            words = WORDS.findall(text) if self._merges_stay_in_words else [text]
            for word in words:
                ids.extend(self._encode_word(word))
        if eos:
            ids.append(EOS_ID)
        return ids

    def _encode_word(self, word: str) -> list[int]:
        cached = self._word_ids.get(word)
        if cached is None:
            ids = []
            for char in word:
                encoded = char.encode("utf-8", "surrogateescape")
                piece_id = self.piece_ids.get(encoded)
                if piece_id is not None:
                    ids.append(piece_id)
                else:
                    ids.extend(byte + BYTE_FALLBACK_OFFSET for byte in encoded)
            cached = self._merge(ids)
            if len(self._word_ids) >= WORD_CACHE_LIMIT:
                self._word_ids.clear()
            self._word_ids[word] = cached
        return cached

    def _merge(self, ids: list[int]) -> list[int]:
        """Merge adjacent pairs, best score first and leftmost on ties, until none merges.

        run.c rescans the whole sequence for every merge (quadratic); a heap of candidate pairs gives
        the same merges in O(n log n). Entries go stale when a neighbour merges; they are checked
        when popped against the tokens they were made from.
        """
        n = len(ids)
        tokens = list(ids)
        right = list(range(1, n + 1))  # index of the next live token; n marks the end
        left = list(range(-1, n - 1))
        alive = [True] * n

        def candidate(i: int) -> tuple[float, int, int, int, int] | None:
            """Heap entry for merging token i with its right neighbour, if that makes a piece."""
            j = right[i]
            if j < n:
                merged = self.piece_ids.get(self.pieces[tokens[i]] + self.pieces[tokens[j]])
                if merged is not None:
                    return -self.scores[merged], i, tokens[i], tokens[j], merged
            return None

        heap = [entry for i in range(n - 1) if (entry := candidate(i))]
        heapq.heapify(heap)
        while heap:
            _, i, left_token, right_token, merged = heapq.heappop(heap)
            j = right[i]
            if not alive[i] or j >= n or tokens[i] != left_token or tokens[j] != right_token:
                continue  # stale: one side has merged since this entry was made
            tokens[i] = merged
            alive[j] = False
            right[i] = right[j]
            if right[j] < n:
                left[right[j]] = i
            for k in (left[i], i):
                if k >= 0 and (entry := candidate(k)):
                    heapq.heappush(heap, entry)
        return [t for t, live in zip(tokens, alive, strict=True) if live]

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ids as SentencePiece decodes it: byte pieces joined into UTF-8, BOS/EOS dropped,
        the leading space of the first piece (and of any piece after BOS) removed."""
        decoder = StreamDecoder(self)
        return "".join(decoder.push(token) for token in ids) + decoder.flush()

    def save(self, path: str | os.PathLike) -> None:
        """Write as a llama2.c tokenizer.bin: the longest piece's length, then (score, length, bytes)."""
        from llamette.formats.output import atomic_output

        with atomic_output(path) as temporary, open(temporary, "wb") as f:
            f.write(struct.pack("<I", max(len(piece) for piece in self.pieces)))
            for piece, score in zip(self.pieces, self.scores, strict=True):
                f.write(struct.pack("<fI", score, len(piece)))
                f.write(piece)

    def check_vocab_size(self, vocab_size: int, model: str) -> None:
        """Refuse a tokenizer made for another vocabulary."""
        if self.vocab_size != vocab_size:
            raise LlametteError(
                f"{self.source}: has {self.vocab_size} pieces but {model} has a vocabulary of "
                f"{vocab_size}: wrong tokenizer for this model"
            )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model: pieces spelled as in tokenizer.bin, encoding by the library itself
    (so normalization rules such as tok512.model's collapsed spaces hold too)."""

    def __init__(self, processor, source: str):
        pieces, scores = [], []
        for i in range(processor.get_piece_size()):
            piece = processor.id_to_piece(i)
            if i in (processor.bos_id(), processor.eos_id()):
                piece = f"\n{piece}\n"  # as llama2.c's tokenizer.py exports <s> and </s>
            pieces.append(piece.replace("\u2581", " ").encode("utf-8"))
            scores.append(processor.get_score(i))
        super().__init__(pieces, scores, source)
        self.processor = processor

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        """Read a SentencePiece tokenizer.model."""
        import sentencepiece

        path = os.fspath(path)
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.Load(path)
        except (OSError, RuntimeError):
            raise LlametteError(f"{path}: not a SentencePiece model") from None
        if processor.bos_id() != BOS_ID or processor.eos_id() != EOS_ID:
            raise LlametteError(f"{path}: BOS and EOS are not ids {BOS_ID} and {EOS_ID} (Llama's)")
        return cls(processor, path)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids for text, as SentencePiece encodes it."""
        ids = self.processor.encode(text) if text else []
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])


class StreamDecoder:
    """Turns tokens into text one at a time, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer, prev_token: int = BOS_ID):
        self.tokenizer = tokenizer
        self.prev_token = prev_token
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """Text completed by this token (maybe empty)."""
        prev, self.prev_token = self.prev_token, token
        if token in (BOS_ID, EOS_ID):
            return ""
        data = self.tokenizer.token_bytes[token]
        if prev == BOS_ID and data.startswith(b" "):
            data = data[1:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is left, incomplete sequences as U+FFFD."""
        return self._utf8.decode(b"", final=True)


def _piece_bytes(piece: bytes) -> bytes:
    match = BYTE_PIECE.fullmatch(piece)
    return bytes([int(match.group(1), 16)]) if match else piece
