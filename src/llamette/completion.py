"""One completion request, however it arrives (`llamette.Llama`, the server): its limits and
sampling settings checked in one place, and OpenAI's response objects for what it produced.

A bad value raises BadParameter naming the parameter: a ValueError in Python, a 400 from the
server, a one-line error from the CLI.
"""

from __future__ import annotations

import functools
import json
import math
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence

from llamette.chat_template import Message
from llamette.errors import BadParameter
from llamette.sampler import Adjustments, Sampler, TokenLogprob
from llamette.tokenizer import StreamDecoder, Tokenizer

COMPLETION_MAX_TOKENS = 16  # OpenAI's and llama-cpp-python's default for completions
MAX_STOP_STRINGS = 16


def max_tokens_for(
    max_tokens: int | None, n_prompt: int, context: int, default: int | None, clamp: bool = False,
    prompt_name: str = "prompt",
) -> int:  # fmt: skip
    """How many tokens a request may generate: `max_tokens`, else `default` (None: until the
    context is full), within the room the prompt leaves. Beyond that room: `clamp`ed (as
    llama-cpp-python does), or refused (as OpenAI's API does)."""
    room = context - n_prompt
    if room < 1:
        raise BadParameter(
            prompt_name,
            f"{n_prompt} tokens leave no room to answer in the context of {context}",
        )
    if max_tokens is None or (clamp and max_tokens <= 0):  # llama-cpp-python: <= 0 is no limit
        max_tokens = default
    if max_tokens is None:
        return room
    if max_tokens < 1:
        raise BadParameter("max_tokens", f"must be at least 1, not {max_tokens}")
    if max_tokens > room and not clamp:
        raise BadParameter(
            "max_tokens",
            f"{max_tokens} and the prompt's {n_prompt} tokens exceed the context of {context}",
        )
    return min(max_tokens, room)


def make_sampler(
    vocab_size: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    logit_bias: Mapping[int, float] | None = None,
    repeat_penalty: float = 1.0,
    repeat_last_n: int = 64,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
) -> Sampler:
    """The sampler for a request's settings (see sampler.Adjustments for the order they apply
    in); temperature 0 or top_p 0 is greedy; no seed draws one at random."""
    if not 0.0 <= temperature < math.inf:
        raise BadParameter("temperature", f"must be 0 (greedy) or more, not {temperature}")
    try:  # llama-cpp-python's callers may give ids as strings, as JSON has them
        bias = {int(token): float(value) for token, value in (logit_bias or {}).items()}
    except (TypeError, ValueError, OverflowError):
        raise BadParameter("logit_bias", "must map token ids to numbers") from None
    adjust = Adjustments(
        logit_bias=bias,
        repeat_penalty=repeat_penalty,
        repeat_last_n=repeat_last_n,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        min_p=min_p,
    )
    greedy = temperature == 0.0 or top_p == 0.0
    seed = secrets.randbits(63) if seed is None else seed
    return Sampler(vocab_size, 0.0 if greedy else temperature, top_p, seed, top_k, adjust)


def stop_strings(stop: str | list[str] | tuple[str, ...] | None,
                 most: int = MAX_STOP_STRINGS) -> tuple[str, ...]:  # fmt: skip
    """`stop` as a tuple of strings: one string, or up to `most` of them."""
    stop = [stop] if isinstance(stop, str) else list(stop or ())
    if len(stop) > most or not all(isinstance(s, str) for s in stop):
        raise BadParameter("stop", f"must be a string or up to {most} strings")
    return tuple(stop)


def are_token_ids(values: Sequence, vocab_size: int) -> bool:
    """Whether every value is an integer (not a boolean) within 0..vocab_size - 1."""
    return all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
               for t in values)  # fmt: skip


def stop_token_set(stop_token_ids: Sequence[int] | None, vocab_size: int) -> frozenset[int]:
    """Token ids that end a request beside the model's own end ids, checked."""
    ids = list(stop_token_ids or ())
    if not are_token_ids(ids, vocab_size):
        raise BadParameter("stop_token_ids", f"must be token ids within 0..{vocab_size - 1}")
    return frozenset(ids)


class StopStrings:
    """Strings that end a generation: where the first one starts in growing text, and how much of
    the text is safe to show (no tail of it could begin a stop string)."""

    def __init__(self, strings: tuple[str, ...] = ()):
        self.strings = tuple(s for s in strings if s)
        self.longest = max((len(s) for s in self.strings), default=0)

    def find(self, text: str, shown: int = 0) -> int | None:
        """Index of the earliest stop string in text (none starts before `shown`), or None."""
        hits = [text.find(s, shown) for s in self.strings]
        return min((hit for hit in hits if hit >= 0), default=None)

    def safe_length(self, text: str) -> int:
        """Length of text's longest prefix whose remainder is no stop string's beginning."""
        for start in range(max(0, len(text) - self.longest + 1), len(text)):
            tail = text[start:]
            if any(s.startswith(tail) for s in self.strings):
                return start
        return len(text)


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """How a token reads in logprobs: its text (a control token's marker), a lone byte of a
    longer UTF-8 sequence as U+FFFD."""
    if tokenizer.is_control(token):
        return tokenizer.special_text(token)
    return tokenizer.token_bytes[token].decode("utf-8", "replace")


class Answer:
    """OpenAI's response objects for one request: whole, or as stream chunks, for one choice or
    several (`index`); with each token's log-probabilities when `tokenizer` is given (asked for).
    A completion's text_offsets count from `text_offset`, its first token following
    `prev_token` (None: the start of the text)."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int,
                 tokenizer: Tokenizer | None = None, text_offset: int = 0,
                 prev_token: int | None = None):  # fmt: skip
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.tokenizer, self.first_offset, self.prev_token = tokenizer, text_offset, prev_token
        self._offsets: dict[int, tuple[int, StreamDecoder]] = {}  # by choice: where text is
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    @classmethod
    def for_prompt(cls, model: str, chat: bool, prompt_tokens: list[int], tokenizer: Tokenizer,
                   logprobs: bool, echo: bool) -> Answer:  # fmt: skip
        """The answer to a prompt: with logprobs if asked for, their text offsets counted from
        the prompt's start when it is echoed, else from its end (as OpenAI counts them)."""
        return cls(model, chat, len(prompt_tokens), tokenizer if logprobs else None,
                   0 if echo else len(tokenizer.decode(prompt_tokens)),
                   None if echo else prompt_tokens[-1])  # fmt: skip

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}  # fmt: skip

    def _object(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip

    def logprobs(self, entries: Sequence[TokenLogprob], index: int = 0) -> dict | None:
        """A choice's `logprobs`: chat's list of content tokens, or the completions API's
        parallel lists (with each token's offset in the text)."""
        if self.tokenizer is None:
            return None
        tok = self.tokenizer
        text = functools.partial(token_text, tok)
        if self.chat:

            def described(token: int, logprob: float) -> dict:
                word = text(token)
                data = word.encode() if tok.is_control(token) else tok.token_bytes[token]
                return {"token": word, "logprob": logprob, "bytes": list(data)}

            content = [{**described(e.token, e.logprob),
                        "top_logprobs": [described(t, p) for t, p in e.top]} for e in entries]  # fmt: skip
            return {"content": content, "refusal": None}
        offset, decoder = self._offsets.get(index) or (
            self.first_offset,
            StreamDecoder(self.tokenizer, self.prev_token),
        )
        offsets = []
        for entry in entries:  # where each token's text starts in the text as decoded
            offsets.append(offset)
            offset += len(decoder.push(entry.token))
        self._offsets[index] = offset, decoder
        return {
            "tokens": [text(e.token) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text(t): p for t, p in e.top} if e.logprob is not None else None
                             for e in entries],
            "text_offset": offsets,
        }  # fmt: skip

    def whole(self, choices: Sequence[tuple[str, str, Sequence[TokenLogprob]]],
              completion_tokens: int) -> dict:  # fmt: skip
        """The response: each choice's (text, finish_reason, logprobs), the choices' tokens."""
        listed = []
        for index, (text, finish_reason, logprobs) in enumerate(choices):
            choice = {"index": index, "logprobs": self.logprobs(logprobs, index),
                      "finish_reason": finish_reason}  # fmt: skip
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            listed.append(choice)
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._object(kind, listed), "usage": self.usage(completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False,
              logprobs: Sequence[TokenLogprob] = (), index: int = 0) -> dict:  # fmt: skip
        """A stream's chunk: text, or the end (a finish_reason); a chat's first says the role."""
        choice = {"index": index, "logprobs": self.logprobs(logprobs, index) if logprobs else None,
                  "finish_reason": finish_reason}  # fmt: skip
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            return self._object("chat.completion.chunk", [{"delta": delta, **choice}])
        return self._object("text_completion", [{"text": text or "", **choice}])

    def event_chunks(self, text: str, finish_reason: str | None,
                     logprobs: Sequence[TokenLogprob], index: int = 0) -> list[dict]:  # fmt: skip
        """The stream chunks of one event of the engine: its text (and its tokens' logprobs),
        then, if it ends the choice, the chunk with the finish_reason."""
        chunks = []
        if text or (logprobs and not finish_reason):
            chunks.append(self.chunk(text, logprobs=logprobs, index=index))
            logprobs = ()
        if finish_reason:
            chunks.append(self.chunk(None, finish_reason, logprobs=logprobs, index=index))
        return chunks

    def usage_chunk(self, completion_tokens: int) -> dict:
        """The stream's last chunk when usage is asked for: no choices, the counts."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._object(kind, []), "usage": self.usage(completion_tokens)}


def chat_messages(messages: list) -> list[Message]:
    """OpenAI's chat messages (dicts of role and content; text parts joined) as Messages."""
    if not isinstance(messages, list) or not messages:
        raise BadParameter("messages", "must be a non-empty list of messages")
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadParameter("messages", "must be an object", where)
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise BadParameter("messages", "must be system, user or assistant, not "
                               f"{json.dumps(role)}", f"{where}.role")  # fmt: skip
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):  # fmt: skip
                raise BadParameter("messages", "only text parts are supported", f"{where}.content")
            content = "".join(part["text"] for part in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise BadParameter("messages", "must be a string", f"{where}.content")
        parsed.append(Message(role, content))
    return parsed
