"""Structured output: answers that are JSON (of a schema, or any object), made so by masking,
before each draw, every token that cannot continue a valid answer.

llguidance computes the masks (as llama.cpp does with LLAMA_LLGUIDANCE): its Rust matcher walks a
trie of the model's own vocabulary, built once per tokenizer, in well under a millisecond a token,
with no dependency of its own (xgrammar, the other well-kept choice, needs torch, transformers
and triton). It releases the GIL, so the engine computes the masks of a pass while the model runs.
"""

from __future__ import annotations

import json

import numpy as np

from llamette.errors import BadParameter
from llamette.tokenizer import Tokenizer

CONTROL_MARK = b"\xff"  # how llguidance tells a special token from text


def schema_of(response_format: dict | None) -> dict | None:
    """The JSON schema an OpenAI `response_format` asks for: None for text; any object for
    {"type": "json_object"} (llama-cpp-python's "schema" beside it narrows it); the schema of
    {"type": "json_schema", "json_schema": {"schema": ...}}."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise BadParameter("response_format", "must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema", {"type": "object"})
    elif kind == "json_schema":
        described = response_format.get("json_schema")
        if not isinstance(described, dict) or not isinstance(described.get("schema", {}), dict):
            raise BadParameter("response_format", "json_schema must be an object whose schema "
                               "is a JSON schema", "response_format.json_schema")  # fmt: skip
        schema = described.get("schema", {})
    else:
        raise BadParameter("response_format", f"type must be text, json_object or json_schema, "
                           f"not {json.dumps(kind)}", "response_format.type")  # fmt: skip
    if not isinstance(schema, dict):
        raise BadParameter("response_format", "the schema must be an object")
    return schema


class JsonConstraint:
    """One answer's matcher: which tokens may come next, and the tokens it has taken."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.allowed: np.ndarray | None = None  # (vocab_size,) bool, for the next draw

    def prepare(self) -> None:
        """Compute the mask of the next draw (llguidance releases the GIL meanwhile)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), np.uint8)
        self.allowed = np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)

    def masked(self, logits: np.ndarray) -> np.ndarray:
        """A copy of logits (V,) with every token that cannot come next at -inf."""
        if self.allowed is None:
            self.prepare()
        out = np.where(self.allowed, logits, np.float32(-np.inf)).astype(np.float32)
        self.allowed = None
        return out

    def accept(self, token: int) -> str | None:
        """Take the token drawn; what went wrong if the grammar cannot (None: it could)."""
        if self.matcher.consume_token(token):
            return None
        return f"the answer left its grammar: {self.matcher.get_error()}"

    @property
    def finished(self) -> bool:
        """The answer is complete: nothing but its end may follow."""
        return self.matcher.is_stopped()

    def copy(self) -> JsonConstraint:
        return JsonConstraint(self.matcher.deep_copy(), self.vocab_size)


class Grammars:
    """Constraints for one tokenizer's answers; llguidance's view of the vocabulary (about a
    second for 128k tokens) is made at the first request that needs it."""

    def __init__(self, tokenizer: Tokenizer, end_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.end_ids = sorted(end_ids)
        self._vocabulary = None

    def constraint(self, response_format: dict | None) -> JsonConstraint | None:
        """The constraint `response_format` asks for (None: free text)."""
        schema = schema_of(response_format)
        if schema is None:
            return None
        llguidance = _llguidance()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False}
            )
        except ValueError as error:
            raise BadParameter("response_format", f"not a usable JSON schema: {error}") from None
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise BadParameter("response_format", f"not a usable JSON schema: "
                               f"{matcher.get_error()}")  # fmt: skip
        return JsonConstraint(matcher, self.tokenizer.vocab_size)

    def _llg_tokenizer(self):
        if self._vocabulary is None:
            llguidance = _llguidance()
            self._vocabulary = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(_Vocabulary(self.tokenizer, self.end_ids[0])),
                n_vocab=self.tokenizer.vocab_size,
                eos_token=self.end_ids,
            )
        return self._vocabulary


class _Vocabulary:
    """The model's vocabulary as llguidance reads it: each token's bytes (special tokens
    marked), and text to tokens with exactly the text's bytes."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int):
        self.tokenizer = tokenizer
        self.eos_token_id = eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [
            CONTROL_MARK + tokenizer.special_text(i).encode() if tokenizer.is_control(i) else data
            for i, data in enumerate(tokenizer.token_bytes)
        ]
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_control(i)]

    def __call__(self, text: bytes) -> list[int]:
        tok = self.tokenizer
        ids = tok.encode(text.decode("utf-8", "replace"), bos=False)
        if b"".join(tok.token_bytes[i] for i in ids) == text:
            return ids
        # a SentencePiece encoder adds a space in front: spell the text piece by piece instead
        return tok.spell(text.decode("utf-8", "surrogateescape"))


def _llguidance():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a dependency; said plainly if it is missing
        raise BadParameter("response_format", "structured output needs llguidance "
                           "(pip install llguidance)") from None  # fmt: skip
    return llguidance
