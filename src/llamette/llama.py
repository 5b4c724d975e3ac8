"""`llamette.Llama`: llama-cpp-python's `Llama` class over llamette, so that code written for
it runs after `from llama_cpp import Llama` becomes `from llamette import Llama`.

The same methods, argument names and defaults, and the same OpenAI-shaped dicts (streams as
iterators of chunks). Requests run through the server's engine (engine.Engine.stream) on the
calling thread: one generation loop and one set of stop rules for both. What llama.cpp offers and
llamette does not (mirostat, typical-p, GBNF grammars, tools) is refused with a ValueError naming
the argument; settings about llama.cpp's own machinery (GPU offload, batch sizes) are accepted
and ignored.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence

from llamette.chat_template import Llama2Template, chat_template_for
from llamette.compiling import report_to_stderr
from llamette.completion import (
    Answer,
    StopStrings,
    chat_messages,
    make_sampler,
    max_tokens_for,
    stop_strings,
    stop_token_set,
)
from llamette.engine import Engine, Event, Request
from llamette.errors import BadParameter
from llamette.formats import find_tokenizer, load_weights
from llamette.kernels import set_threads
from llamette.model import Transformer
from llamette.sampler import MAX_TOP_LOGPROBS
from llamette.structured import Grammars

log = logging.getLogger("llamette")

DEFAULT_SEED = 0xFFFFFFFF  # llama-cpp-python's LLAMA_DEFAULT_SEED: a fresh random seed per call

# Llama() arguments about llama.cpp's machinery (GPU layers, batch sizes, memory mapping, NUMA):
# they do not change what is computed, and llamette has no equivalent.
IGNORED_OPTIONS = frozenset({
    "n_gpu_layers", "split_mode", "main_gpu", "tensor_split", "use_mmap", "use_mlock",
    "n_batch", "n_ubatch", "n_threads_batch", "logits_all", "embedding", "offload_kqv",
    "flash_attn", "op_offload", "swa_full", "no_perf", "numa",
    "pooling_type", "attention_type", "rope_scaling_type",
})  # fmt: skip
# type_k and type_v: ggml's type numbers of the KV-cache types llamette has
GGML_KV_TYPES = {0: "f32", 1: "f16", 8: "q8_0"}


def kv_type_of(type_k: int | None, type_v: int | None) -> str:
    """The KV-cache type of Llama()'s type_k and type_v (ggml's type numbers; default f32)."""
    for name, value in (("type_k", type_k), ("type_v", type_v)):
        if value is not None and value not in GGML_KV_TYPES:
            raise BadParameter(name, f"{value} is not a KV-cache type llamette has: "
                               + ", ".join(f"{n} ({t})" for n, t in GGML_KV_TYPES.items()))  # fmt: skip
    if type_v is not None and type_k is not None and type_v != type_k:
        raise BadParameter("type_v", "must be type_k: llamette keeps keys and values alike")
    chosen = type_k if type_k is not None else type_v
    return GGML_KV_TYPES[chosen] if chosen is not None else "f32"


class Llama:
    """A model file (GGUF, llama2.c or a Hugging Face folder) ready to complete, chat and embed.

    `n_ctx` positions of context (0: the model's own; beyond it, the model's), `n_threads` for
    the kernels (default: llamette's choice), `seed` for every call that gives none (the
    default: a random one each call), `verbose` for compile notes and timings on stderr;
    `type_k`/`type_v` (ggml's numbers, one type for both) a KV cache in F16 or Q8_0.
    """

    def __init__(
        self,
        model_path: str,
        *,
        n_ctx: int = 512,
        n_threads: int | None = None,
        seed: int = DEFAULT_SEED,
        verbose: bool = True,
        chat_format: str | None = None,
        last_n_tokens_size: int = 64,
        tokenizer_path: str | None = None,
        exact: bool = False,
        type_k: int | None = None,
        type_v: int | None = None,
        **options,
    ):
        unknown = sorted(set(options) - IGNORED_OPTIONS)
        if unknown:
            raise TypeError(f"Llama() got unexpected keyword arguments: {', '.join(unknown)}")
        if chat_format not in (None, "llama-2"):
            raise BadParameter("chat_format", f"{chat_format!r}: llamette uses the model's own "
                               "chat template (or 'llama-2')")  # fmt: skip
        if n_ctx < 0:
            raise BadParameter("n_ctx", f"must be 0 (the model's) or more, not {n_ctx}")
        kv_type = kv_type_of(type_k, type_v)
        if verbose:
            report_to_stderr()
        self.model_path = os.fspath(model_path)
        self.verbose = verbose
        weights = load_weights(self.model_path)
        context = min(n_ctx or weights.config.seq_len, weights.config.seq_len)
        self.model = Transformer(weights, exact=exact, seq_len=context, kv_type=kv_type)
        if n_threads is not None:
            set_threads(n_threads)
            self.model.adapt_threads = False
        self.tokenizer = find_tokenizer(
            self.model_path, tokenizer_path, self.model.config.vocab_size, "tokenizer_path"
        )
        self.template = Llama2Template() if chat_format else chat_template_for(self.model_path)
        self.engine = Engine(self.model, self.tokenizer)
        self.grammars = Grammars(self.tokenizer, self.engine.end_ids)
        self.last_n_tokens_size = last_n_tokens_size
        self._seed = seed

    # The model's sizes and special tokens

    def n_ctx(self) -> int:
        return self.model.config.seq_len

    def n_vocab(self) -> int:
        return self.model.config.vocab_size

    def n_embd(self) -> int:
        return self.model.config.dim

    def token_bos(self) -> int:
        return -1 if self.tokenizer.bos_id is None else self.tokenizer.bos_id

    def token_eos(self) -> int:
        eos_id = self.tokenizer.specials.eos_id
        return -1 if eos_id is None else eos_id

    def set_seed(self, seed: int) -> None:
        """The seed of calls that give none."""
        self._seed = seed

    # Text and tokens

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """UTF-8 text's tokens; BOS first if `add_bos` and the model adds one; `special` parses
        special tokens' text (such as "<|eot_id|>") as those tokens."""
        return self.tokenizer.encode(
            text.decode("utf-8", errors="replace"), bos=add_bos and self.tokenizer.add_bos,
            special=special,
        )  # fmt: skip

    def detokenize(
        self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None,
        special: bool = False,
    ) -> bytes:  # fmt: skip
        """The bytes of the tokens' text; control tokens' text only with `special`. After a
        first BOS, a leading space is dropped (SentencePiece's dummy prefix), as llama.cpp does."""
        tok = self.tokenizer
        pieces = []
        for token in tokens:
            if not 0 <= token < tok.vocab_size:
                raise BadParameter(
                    "tokens", f"{token} is not a token id within 0..{tok.vocab_size - 1}"
                )
            if tok.is_control(token):
                pieces.append(tok.special_text(token).encode() if special else b"")
            else:
                pieces.append(tok.token_bytes[token])
        text = b"".join(pieces)
        if tokens and tokens[0] == tok.bos_id and text.startswith(b" "):
            text = text[1:]
        return text

    # Completions

    def create_completion(
        self,
        prompt: str | list[int],
        suffix: str | None = None,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: int | None = None,
        echo: bool = False,
        stop: str | list[str] | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: int | None = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        stopping_criteria=None,
        logits_processor=None,
        grammar=None,
        logit_bias: dict[int, float] | None = None,
        response_format: dict | None = None,
        stop_token_ids: list[int] | None = None,
    ) -> dict | Iterator[dict]:
        """Continue `prompt` (text, or token ids): an OpenAI text_completion, or with `stream`
        an iterator of its chunks. max_tokens None or <= 0 runs to the end of the context;
        `response_format` (as in chat) makes the text JSON and `stop_token_ids` end it (both
        llamette's additions)."""
        _refuse(suffix=suffix, stopping_criteria=stopping_criteria,
                logits_processor=logits_processor, grammar=grammar)  # fmt: skip
        _refuse_sampling(typical_p, mirostat_mode)
        if isinstance(prompt, str):
            prompt_tokens = self.tokenize(prompt.encode(), special=True) if prompt else []
            if not prompt_tokens and self.tokenizer.bos_id is not None:
                prompt_tokens = [self.tokenizer.bos_id]
        else:
            prompt_tokens = list(prompt)
            self.detokenize(prompt_tokens)  # checks the ids
        if not prompt_tokens:
            raise BadParameter("prompt", "empty, and the model has no BOS token to start from")
        request = self._request(
            prompt_tokens, "prompt", max_tokens=max_tokens, stop=stop,
            stop_token_ids=stop_token_ids, logprobs=logprobs, echo=echo,
            response_format=response_format,
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
            logit_bias=logit_bias, repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        )  # fmt: skip
        echoed = self.tokenizer.decode(prompt_tokens) if echo else ""
        answer = Answer.for_prompt(model or self.model_path, False, prompt_tokens,
                                   self.tokenizer, logprobs is not None, echo)  # fmt: skip
        if stream:
            return self._chunks(request, answer, echoed)
        return self._whole(request, answer, echoed)

    __call__ = create_completion

    def create_chat_completion(
        self,
        messages: list[dict],
        functions=None,
        function_call=None,
        tools=None,
        tool_choice=None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        response_format: dict | None = None,
        max_tokens: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        logits_processor=None,
        grammar=None,
        logit_bias: dict[int, float] | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        stop_token_ids: list[int] | None = None,
    ) -> dict | Iterator[dict]:
        """Answer `messages` (OpenAI's role and content dicts) in the model's chat template: an
        OpenAI chat.completion, or with `stream` an iterator of its chunks."""
        _refuse(functions=functions, function_call=function_call, tools=tools,
                tool_choice=tool_choice, logits_processor=logits_processor, grammar=grammar)  # fmt: skip
        if top_logprobs is not None and not logprobs:
            raise BadParameter("top_logprobs", "needs logprobs=True")
        _refuse_sampling(typical_p, mirostat_mode)
        prompt_tokens = self.template.tokens(chat_messages(messages), self.tokenizer)
        top = (top_logprobs or 0) if logprobs else None
        request = self._request(
            prompt_tokens, "messages", max_tokens=max_tokens, stop=stop,
            stop_token_ids=stop_token_ids, logprobs=top, echo=False,
            response_format=response_format,
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
            logit_bias=logit_bias, repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        )  # fmt: skip
        answer = Answer.for_prompt(model or self.model_path, True, prompt_tokens,
                                   self.tokenizer, top is not None, echo=False)  # fmt: skip
        if stream:
            return self._chunks(request, answer, "")
        return self._whole(request, answer, "")

    def _request(
        self, prompt_tokens: list[int], prompt_name: str, *, max_tokens: int | None,
        stop: str | list[str] | None, stop_token_ids: list[int] | None, logprobs: int | None,
        echo: bool, response_format: dict | None, seed: int | None, **sampling,
    ) -> Request:  # fmt: skip
        """The engine's request for a prompt and a call's settings (checked here); no
        max_tokens (or one <= 0) runs to the end of the context, as in llama-cpp-python."""
        max_tokens = max_tokens_for(max_tokens, len(prompt_tokens), self.n_ctx(), None,
                                    clamp=True, prompt_name=prompt_name)  # fmt: skip
        if seed is None and self._seed != DEFAULT_SEED:
            seed = self._seed
        sampler = make_sampler(self.n_vocab(), seed=seed,
                               repeat_last_n=self.last_n_tokens_size, **sampling)  # fmt: skip
        sampler.accept(prompt_tokens)
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise BadParameter("logprobs", f"must be within 0..{MAX_TOP_LOGPROBS}, not {logprobs}")
        return Request(prompt_tokens, max_tokens, sampler, lambda event: None,
                       StopStrings(stop_strings(stop)), logprobs=logprobs,
                       echo_logprobs=echo and logprobs is not None,
                       end_ids=self.engine.end_ids | stop_token_set(stop_token_ids, self.n_vocab()),
                       constraint=self.grammars.constraint(response_format))  # fmt: skip

    def _events(self, request: Request) -> Iterator[Event]:
        """The request's events from the engine; its timings on stderr when verbose."""
        start = time.perf_counter()
        first = None
        for event in self.engine.stream(request):
            first = first or time.perf_counter()
            if event.finish_reason == "error":
                raise RuntimeError(f"generation failed: {event.error}")
            if event.finish_reason and self.verbose:
                self._log_timings(request, start, first)
            yield event

    @staticmethod
    def _log_timings(request: Request, start: float, first: float) -> None:
        end, n = time.perf_counter(), len(request.tokens)
        rate = f", then {(n - 1) / (end - first):.1f} tok/s" if n > 1 and end > first else ""
        log.info(f"{len(request.prompt_tokens)} prompt tokens, {n} generated: {end - start:.2f} s "
                 f"(the first after {first - start:.2f} s{rate})")  # fmt: skip

    def _whole(self, request: Request, answer: Answer, echoed: str) -> dict:
        text, logprobs = [echoed], []
        for event in self._events(request):
            text.append(event.text)
            logprobs += event.logprobs
            if event.finish_reason:
                choice = "".join(text), event.finish_reason, logprobs
                return answer.whole([choice], event.completion_tokens)
        raise AssertionError("the engine ended a request without a finish_reason")

    def _chunks(self, request: Request, answer: Answer, echoed: str) -> Iterator[dict]:
        if answer.chat:
            yield answer.chunk(None, role=True)
        for event in self._events(request):
            text, echoed = echoed + event.text, ""
            yield from answer.event_chunks(text, event.finish_reason, event.logprobs)

    # Embeddings

    def embed(
        self, input: str | list[str], normalize: bool = False, truncate: bool = True,
        return_count: bool = False,
    ):  # fmt: skip
        """The mean of the final hidden states over each input's tokens (llama.cpp's mean
        pooling): one list of floats for a string, a list of them for a list; with
        `return_count`, also the number of tokens. `normalize` scales each to unit length."""
        texts = [input] if isinstance(input, str) else list(input)
        vectors, count = [], 0
        for text in texts:
            tokens = self.tokenize(text.encode())
            if truncate:
                tokens = tokens[: self.n_ctx()]
            if not tokens or len(tokens) > self.n_ctx():
                raise BadParameter("input", f"{len(tokens)} tokens; 1 to {self.n_ctx()} fit")
            count += len(tokens)
            request = Request(tokens, 0, make_sampler(self.n_vocab(), 0.0), lambda e: None,
                              embed=True, normalize=normalize)  # fmt: skip
            vectors.append(next(e for e in self._events(request) if e.finish_reason).embedding)
        output = vectors[0] if isinstance(input, str) else vectors
        return (output, count) if return_count else output

    def create_embedding(self, input: str | list[str], model: str | None = None) -> dict:
        """OpenAI's embeddings response: each input's embedding at unit length."""
        vectors, count = self.embed(input, normalize=True, return_count=True)
        vectors = [vectors] if isinstance(input, str) else vectors
        return {
            "object": "list",
            "data": [{"object": "embedding", "embedding": v, "index": i}
                     for i, v in enumerate(vectors)],
            "model": model or self.model_path,
            "usage": {"prompt_tokens": count, "total_tokens": count},
        }  # fmt: skip


def _refuse(**arguments) -> None:
    """A ValueError naming the first argument given that llamette does not support."""
    for name, value in arguments.items():
        if value is not None:
            raise BadParameter(name, "not supported by llamette")


def _refuse_sampling(typical_p: float, mirostat_mode: int) -> None:
    if typical_p != 1.0:
        raise BadParameter("typical_p", "not supported by llamette (1.0: off)")
    if mirostat_mode != 0:
        raise BadParameter("mirostat_mode", "not supported by llamette (0: off)")
