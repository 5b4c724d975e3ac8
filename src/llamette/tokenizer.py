"""Text <-> token ids, for each tokenizer a Llama-family model file carries.

- `Tokenizer`: SentencePiece-style BPE pieces with merge scores, as llama2.c's `tokenizer.bin` and
  GGUF's `llama` tokenizers hold them, encoding exactly as run.c does.
- `SentencePieceTokenizer`: a SentencePiece `tokenizer.model`, encoded by the library itself.
- `BPETokenizer`: byte-level BPE (GGUF's `gpt2`: Llama 3, SmolLM2, Mistral Nemo), split into
  pre-tokens by the expressions llama.cpp names by `tokenizer.ggml.pre`, merged by Hugging Face's
  `tokenizers` library.

Each knows its special tokens from its file (`SpecialTokens`): BOS and EOS, the control tokens
(parsed only in a chat template's own text, never printed) and the ids that end a generation.
"""

from __future__ import annotations

import codecs
import functools
import heapq
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from llamette.errors import LlametteError
from llamette.weights import BOS_ID, EOS_ID

BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
BYTE_FALLBACK_OFFSET = 3  # llama2.c's ids 3..258 are the pieces <0x00>..<0xFF>
WORDS = re.compile(r" *[^ ]+| +")  # text split before each space that follows a non-space
WORD_CACHE_LIMIT = 1 << 16
# GGUF's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# tokens that end a generation when a file has them, besides its EOS, EOT and EOM (llama.cpp's list)
END_OF_GENERATION_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                           "<|endoftext|>", "<|end_of_text|>", "<EOT>")  # fmt: skip


@dataclass(frozen=True)
class SpecialTokens:
    """A vocabulary's special tokens and rules; llama2.c's (the defaults) are run.c's constants."""

    bos_id: int | None = BOS_ID
    eos_id: int | None = EOS_ID
    add_bos: bool = True  # whether a prompt starts with BOS
    add_eos: bool = False
    control: dict[str, int] = field(default_factory=lambda: {"<s>": BOS_ID, "</s>": EOS_ID})
    user_defined: dict[str, int] = field(default_factory=dict)  # parsed in any text, printed
    end_ids: frozenset[int] | None = None  # what ends a generation; None: run.c's rules
    eot_id: int | None = None
    eom_id: int | None = None
    padding_id: int | None = None

    @classmethod
    def from_gguf(
        cls, value, tokens: list[str], token_types: list[int], add_bos: bool, source: str = ""
    ) -> SpecialTokens:
        """The special tokens a GGUF's tokenizer.ggml.* keys give (`value(key, default)` reads
        one); `add_bos` where the file does not say."""
        if len(token_types) != len(tokens):
            raise LlametteError(
                f"{source}: tokenizer.ggml.token_type has {len(token_types)} entries for "
                f"{len(tokens)} tokens"
            )
        ids = {}
        for key in ("bos", "eos", "eot", "eom", "padding"):
            token = value(f"tokenizer.ggml.{key}_token_id")
            ids[key] = token if isinstance(token, int) and 0 <= token < len(tokens) else None
        typed = list(zip(tokens, token_types, strict=True))
        by_text = {text: i for i, text in enumerate(tokens) if text in END_OF_GENERATION_TEXTS}
        return cls(
            bos_id=ids["bos"],
            eos_id=ids["eos"],
            add_bos=bool(value("tokenizer.ggml.add_bos_token", add_bos)),
            add_eos=bool(value("tokenizer.ggml.add_eos_token", False)),
            control={text: i for i, (text, kind) in enumerate(typed) if kind in (CONTROL, UNKNOWN)},
            user_defined={text: i for i, (text, kind) in enumerate(typed) if kind == USER_DEFINED},
            end_ids=frozenset({ids["eos"], ids["eot"], ids["eom"], *by_text.values()} - {None}),
            eot_id=ids["eot"],
            eom_id=ids["eom"],
            padding_id=ids["padding"],
        )


class Tokenizer:
    """A vocabulary of byte-string pieces with merge scores (SentencePiece BPE, as llama2.c stores it)."""

    strips_space_after_bos = True  # SentencePiece's dummy prefix, dropped when decoding

    def __init__(
        self,
        pieces: list[bytes],
        scores: list[float],
        source: str = "",
        specials: SpecialTokens | None = None,
    ):
        self.pieces = pieces
        self.scores = scores
        self.source = source
        self.specials = specials or SpecialTokens()
        self.piece_ids = {piece: i for i, piece in enumerate(pieces)}
        # a byte's piece <0xHH>, wherever the vocabulary keeps it (Mistral's after its controls)
        self._byte_ids = [
            self.piece_ids.get(b"<0x%02X>" % byte, byte + BYTE_FALLBACK_OFFSET)
            for byte in range(256)
        ]
        # What each id stands for in text: its piece, or the single raw byte of a <0xHH> piece.
        self.token_bytes = [_piece_bytes(piece) for piece in pieces]
        # When no piece holds a non-space followed by a space, no merge crosses such a point:
        # words can then be merged one at a time, and each distinct word only once.
        self._merges_stay_in_words = not any(re.search(rb"[^ ] ", piece) for piece in pieces)
        self._word_ids: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def bos_id(self) -> int | None:
        return self.specials.bos_id

    @property
    def add_bos(self) -> bool:
        """Whether a prompt starts with BOS (the file says; llama2.c's always do)."""
        return self.specials.add_bos and self.specials.bos_id is not None

    @property
    def follows_run_c(self) -> bool:
        """llama2.c's tokenizers keep run.c's rules: BOS ends a generation, EOS a chat's turn,
        and a piece after any BOS loses its leading space."""
        return self.specials.end_ids is None

    def end_ids(self, chat: bool = False) -> frozenset[int]:
        """The ids that end a generation (a chat's turn): every end-of-text or end-of-turn token
        the file marks; for llama2.c's tokenizers run.c's rules, BOS in generate, EOS in chat."""
        if not self.follows_run_c:
            return self.specials.end_ids
        return frozenset({EOS_ID if chat else BOS_ID})

    def special_text(self, token: int | None) -> str:
        """How text writes a special token (a template's `bos_token`): "" for none."""
        if token is None:
            return ""
        texts = {i: text for text, i in self.specials.control.items()}
        return texts.get(token) or self.pieces[token].decode("utf-8", "replace").strip("\n")

    def is_control(self, token: int) -> bool:
        """A control token: never printed (BOS, EOS, a template's markers)."""
        return token in self._control_ids

    @functools.cached_property
    def _control_ids(self) -> frozenset[int]:
        s = self.specials
        return frozenset({*s.control.values(), s.bos_id, s.eos_id} - {None})

    @functools.cached_property
    def _specials_longest_first(self) -> list[tuple[str, int, bool]]:
        """(text, id, is a control token), the longest text first, as llama.cpp searches them."""
        found = [(t, i, True) for t, i in self.specials.control.items()]
        found += [(t, i, False) for t, i in self.specials.user_defined.items()]
        return sorted((entry for entry in found if entry[0]), key=lambda e: -len(e[0]))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a llama2.c tokenizer.bin, a SentencePiece model (a name ending in .model), the
        tokenizer inside a GGUF file, or a model folder's tokenizer.model or tokenizer.json."""
        from llamette.formats.gguf import GGUFModel, is_gguf  # the GGUF reader uses this module

        path = os.fspath(path)
        if os.path.isdir(path):
            from llamette.formats.huggingface import has_bpe_tokenizer, read_tokenizer

            if has_bpe_tokenizer(path):
                return read_tokenizer(path, 0)
            inside = os.path.join(path, "tokenizer.model")
            if not os.path.isfile(inside):
                raise LlametteError(f"{path}: a folder without a tokenizer.model or tokenizer.json")
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

    def encode(
        self, text: str, bos: bool = True, eos: bool = False, special: bool = False
    ) -> list[int]:
        """Token ids for text, BOS first and EOS last if asked; with `special`, control tokens
        written in the text (`<s>`, `<|im_end|>`) become their ids, else they are text."""
        return self.encode_parts([(text, special)], bos, eos)

    def encode_parts(
        self, parts: Sequence[tuple[str, bool]], bos: bool = False, eos: bool = False
    ) -> list[int]:
        """Token ids for one text given in parts, each (text, whether control tokens in it are
        parsed): a chat template's own text is, its messages are not. Text between special
        tokens is encoded whole, across parts, so the ids are those of the joined text."""
        ids = [self.specials.bos_id] if bos and self.specials.bos_id is not None else []
        for fragment in self._fragments(parts):
            if isinstance(fragment, int):
                ids.append(fragment)
            else:
                ids.extend(self._encode_text(fragment))
        if eos and self.specials.eos_id is not None:
            ids.append(self.specials.eos_id)
        return ids

    def _fragments(self, parts: Sequence[tuple[str, bool]]) -> list[str | int]:
        """Text and special token ids, partitioned as llama.cpp does: each special token, the
        longest first, split out of the text around it by exact search; control tokens only in
        parts that parse them, user-defined ones in every part."""
        fragments: list[tuple[str, bool] | int] = [part for part in parts if part[0]]
        for text, token, is_control in self._specials_longest_first:
            split: list[tuple[str, bool] | int] = []
            for fragment in fragments:
                if (
                    isinstance(fragment, int)
                    or (is_control and not fragment[1])
                    or text not in fragment[0]
                ):
                    split.append(fragment)
                    continue
                for index, piece in enumerate(fragment[0].split(text)):
                    if index:
                        split.append(token)
                    if piece:
                        split.append((piece, fragment[1]))
            fragments = split
        joined: list[str | int] = []
        for fragment in fragments:
            if isinstance(fragment, int):
                joined.append(fragment)
            elif joined and isinstance(joined[-1], str):
                joined[-1] += fragment[0]
            else:
                joined.append(fragment[0])
        return joined

    def _encode_text(self, text: str) -> list[int]:
        """Ids for text without special tokens: run.c's encoder (dummy-prefix space, code points,
        byte fallback, merges)."""
        ids = []
        if b" " in self.piece_ids:
            text = " " + text  # the dummy prefix
        words = WORDS.findall(text) if self._merges_stay_in_words else [text]
        for word in words:
            ids.extend(self._encode_word(word))
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
                    ids.extend(self._byte_ids[byte] for byte in encoded)
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

    def spell(self, text: str) -> list[int]:
        """Ids whose bytes are exactly text's UTF-8: each character's piece, else its bytes'
        pieces; no merges, no dummy prefix."""
        ids = []
        for char in text:
            data = char.encode("utf-8", "surrogateescape")
            piece_id = self.piece_ids.get(data)
            ids += [piece_id] if piece_id is not None else [self._byte_ids[b] for b in data]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ids as SentencePiece decodes it: byte pieces joined into UTF-8, BOS/EOS dropped,
        the leading space of a piece after BOS removed (see StreamDecoder)."""
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

    def _encode_text(self, text: str) -> list[int]:
        """Ids for text without special tokens, as SentencePiece encodes it."""
        return self.processor.encode(text)


LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp cuts text into pre-tokens before merging, for one `tokenizer.ggml.pre`."""

    splits: tuple[str, ...]  # regular expressions, applied in turn; text between matches stays
    ignore_merges: bool = False  # a pre-token that is a token is taken whole, unmerged
    add_bos: bool = False  # where the file has no add_bos_token


# llama.cpp's expressions for each pre-tokenizer name (their original forms, where llama.cpp
# rewrote them for its own regex engine, would split some letters differently)
PRE_TOKENIZERS = {
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")),
    "gpt-2": PreTokenizer((GPT2_SPLIT,)),
    "llama-bpe": PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True, add_bos=True),
    "smollm": PreTokenizer((r"\p{N}", GPT2_SPLIT)),
    "qwen2": PreTokenizer((LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"),)),
    "tekken": PreTokenizer(
        (
            r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
            r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
            r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        ignore_merges=True,
        add_bos=True,
    ),  # fmt: skip
}
# the names llama.cpp gives the same pre-tokenizers
PRE_TOKENIZERS |= {"llama3": PRE_TOKENIZERS["llama-bpe"], "llama-v3": PRE_TOKENIZERS["llama-bpe"]}
PRE_TOKENIZERS |= {name: PRE_TOKENIZERS["smollm"] for name in ("starcoder", "refact", "command-r")}


def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's spelling of bytes as characters: printable Latin-1 bytes stand for themselves, the
    rest for the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {byte: chr(byte) for byte in printable}
    for n, byte in enumerate(b for b in range(256) if b not in chars):
        chars[byte] = chr(256 + n)
    return chars


BYTE_OF_CHAR = {char: byte for byte, char in gpt2_byte_chars().items()}


class BPETokenizer(Tokenizer):
    """Byte-level BPE: text split into pre-tokens (PRE_TOKENIZERS), each spelled as GPT-2's byte
    characters and merged by rank. Hugging Face's `tokenizers` does the split and the merges: it
    reproduces llama.cpp's given the same expressions and ignore_merges; llamette does the part
    it would do differently, finding special tokens (llama.cpp's longest-first exact search, and
    only outside a message's text)."""

    strips_space_after_bos = False

    def __init__(
        self,
        tokens: list[str],
        token_types: list[int],
        merges: list[str],
        pre: str,
        specials: SpecialTokens,
        source: str = "",
    ):
        if pre not in PRE_TOKENIZERS:
            raise LlametteError(
                f"{source}: pre-tokenizer {pre!r} is not one llamette knows "
                f"({', '.join(sorted(PRE_TOKENIZERS))})"
            )
        self.tokens, self.token_types, self.merges, self.pre = tokens, token_types, merges, pre
        self.source = source
        self.specials = specials
        self.pieces = [token.encode("utf-8") for token in tokens]
        self.scores = [0.0] * len(tokens)
        self.token_bytes = [
            _bpe_token_bytes(t, kind) for t, kind in zip(tokens, token_types, strict=True)
        ]

    @classmethod
    def from_gguf(cls, value, source: str) -> BPETokenizer:
        """The tokenizer of a GGUF whose tokenizer.ggml.model is gpt2 (`value(key, default)`
        reads a key)."""
        tokens, merges = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.merges")
        if not tokens or not merges:
            raise LlametteError(
                f"{source}: a gpt2 tokenizer without tokenizer.ggml.tokens and merges"
            )
        token_types = value("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        pre = value("tokenizer.ggml.pre")
        if pre is None:
            raise LlametteError(
                f"{source}: has no tokenizer.ggml.pre; llama.cpp would guess 'default' and encode "
                "some text differently from the model's training: reconvert the model"
            )
        specials = SpecialTokens.from_gguf(
            value, tokens, token_types, PRE_TOKENIZERS.get(pre, PreTokenizer(())).add_bos, source
        )
        return cls(tokens, token_types, merges, pre, specials, source)

    def save(self, path: str | os.PathLike) -> None:
        raise LlametteError(f"{path}: a byte-level BPE tokenizer has no tokenizer.bin form")

    @functools.cached_property
    def _merger(self):
        """The Hugging Face tokenizer that splits and merges text without special tokens."""
        from tokenizers import Regex, models, pre_tokenizers
        from tokenizers import Tokenizer as HuggingFaceTokenizer

        pre = PRE_TOKENIZERS[self.pre]
        vocabulary = {token: i for i, token in enumerate(self.tokens)}
        merges = [tuple(merge.split(" ", 1)) for merge in self.merges]
        try:
            model = models.BPE(vocabulary, merges, ignore_merges=pre.ignore_merges)
        except Exception as error:  # tokenizers reports bad merges as a plain Exception
            raise LlametteError(f"{self.source}: tokenizer.ggml.merges: {error}") from None
        merger = HuggingFaceTokenizer(model)
        splits = [pre_tokenizers.Split(Regex(pattern), "isolated") for pattern in pre.splits]
        merger.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        return merger

    def _encode_text(self, text: str) -> list[int]:
        return self._merger.encode(text, add_special_tokens=False).ids


def _bpe_token_bytes(token: str, token_type: int) -> bytes:
    """What a byte-level BPE token stands for in text: its characters as GPT-2's bytes; a
    user-defined token's own text; nothing for control and unused tokens."""
    if token_type in (CONTROL, UNKNOWN, UNUSED):
        return b""
    if token_type == USER_DEFINED:
        return token.encode("utf-8")
    if token_type == BYTE and (match := BYTE_PIECE.fullmatch(token.encode("utf-8"))):
        return bytes([int(match.group(1), 16)])
    return b"".join(
        bytes([BYTE_OF_CHAR[c]]) if c in BYTE_OF_CHAR else c.encode("utf-8") for c in token
    )


class StreamDecoder:
    """Turns tokens into text one at a time, holding back incomplete UTF-8 sequences. A piece
    right after BOS loses its leading space (SentencePiece's dummy prefix) at the start of the
    text, as llama.cpp decodes, or anywhere, as run.c does for llama2.c's tokenizers."""

    def __init__(self, tokenizer: Tokenizer, prev_token: int | None = None):
        self.tokenizer = tokenizer
        self.prev_token = tokenizer.bos_id if prev_token is None else prev_token
        self.at_start = True  # no text yet
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """Text completed by this token (maybe empty)."""
        prev, self.prev_token = self.prev_token, token
        tokenizer = self.tokenizer
        if tokenizer.is_control(token):
            return ""
        data = tokenizer.token_bytes[token]
        if (
            prev == tokenizer.bos_id
            and tokenizer.strips_space_after_bos
            and data.startswith(b" ")
            and (self.at_start or tokenizer.follows_run_c)
        ):
            data = data[1:]
        self.at_start = self.at_start and not data
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is left, incomplete sequences as U+FFFD."""
        return self._utf8.decode(b"", final=True)


def _piece_bytes(piece: bytes) -> bytes:
    match = BYTE_PIECE.fullmatch(piece)
    return bytes([int(match.group(1), 16)]) if match else piece
