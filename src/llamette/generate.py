"""run.c's generate and chat: prompt, sampling, stop rules, the Llama 2 chat template, streaming,
timings.

Both follow llama2.c's run.c: `steps` counts positions, prompt included; `generate` stops when
it samples BOS; `chat` ends a turn on EOS and draws a random number after every forward, prompt
tokens included, so seeds give run.c's tokens. Both run through the engine's loop, the server's
and `Llama`'s: `generate` as one request, `chat` as one request a turn, whose slot keeps the
conversation's KV rows for the next (the engine's prompt cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from llamette.chat_template import JinjaTemplate, Message, llama2_chat_prompt
from llamette.completion import StopStrings
from llamette.engine import Engine, Request
from llamette.errors import LlametteError
from llamette.model import Transformer
from llamette.sampler import Sampler
from llamette.tokenizer import Tokenizer

TextSink = Callable[[str], None]


@dataclass
class Generation:
    """What a run produced, with its timings."""

    prompt_tokens: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # sampled, including a final BOS or EOS
    text: str = ""  # the sampled tokens' text
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    context_full: bool = False  # it stopped at the end of the model's context

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


def check_steps(steps: int | None, model: Transformer) -> int:
    """Positions to run: None or 0 means the whole context."""
    seq_len = model.config.seq_len
    if not steps:
        return seq_len
    if not 0 < steps <= seq_len:
        raise ValueError(f"steps {steps} must be within 1..{seq_len} (the model's context)")
    return steps


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    sampler: Sampler,
    prompt: str = "",
    steps: int | None = None,
    on_text: TextSink | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Iterable[int] = (),
) -> Generation:
    """Continue `prompt` for up to `steps` positions (prompt included); stop on the tokenizer's
    end ids (run.c's BOS for llama2.c's tokenizers) and `stop_token_ids`, or where the text
    first shows one of the `stop` strings (which the text leaves out).

    on_text receives the prompt's text, then each sampled token's text, as soon as it is known.
    """
    steps = check_steps(steps, model)
    emit = on_text or (lambda text: None)
    result = Generation(prompt_tokens=tokenizer.encode(prompt, bos=tokenizer.add_bos))
    prompt_tokens = result.prompt_tokens
    if not prompt_tokens:  # a model that adds no BOS, and no prompt: start from its BOS
        if tokenizer.bos_id is None:
            raise LlametteError("prompt: empty, and the model has no BOS token to start from")
        prompt_tokens.append(tokenizer.bos_id)
    _check_fits(len(prompt_tokens), model)

    shown = prompt_tokens[1 : steps + 1] if tokenizer.add_bos else prompt_tokens[: steps + 1]
    emit(tokenizer.decode(shown))  # what run.c prints while forcing the prompt
    if len(prompt_tokens) > steps:  # steps run out inside the prompt: nothing to sample
        start = time.perf_counter()
        model.prefill(prompt_tokens[:steps], 0)
        result.prefill_tokens, result.prefill_seconds = steps, time.perf_counter() - start
        result.context_full = steps == model.config.seq_len
        return result

    # The engine's loop, for one request: the prompt's pass, then a token at a time up to
    # position `steps` (the last token sampled there is shown, never fed).
    sampler.accept(prompt_tokens)  # for the penalties, where asked for
    request = Request(prompt_tokens, steps - len(prompt_tokens) + 1, sampler, lambda event: None,
                      StopStrings(tuple(stop)),
                      end_ids=tokenizer.end_ids() | frozenset(stop_token_ids))  # fmt: skip
    for event in Engine(model, tokenizer).stream(request):
        if event.finish_reason == "error":
            raise LlametteError(f"generation failed: {event.error}")
        emit(event.text)
        finish_reason = event.finish_reason
    end = [] if request.end_token is None else [request.end_token]
    result.tokens, result.text = request.tokens + end, request.text
    result.prefill_tokens = len(prompt_tokens)
    result.prefill_seconds = request.first_token_at - request.admitted_at
    result.decode_tokens = len(result.tokens) - 1
    result.decode_seconds = request.finished_at - request.first_token_at
    result.context_full = finish_reason == "length" and steps == model.config.seq_len
    return result


def chat(
    model: Transformer,
    tokenizer: Tokenizer,
    sampler: Sampler,
    read_user: Callable[[], str | None],
    system_prompt: str | None = None,
    steps: int | None = None,
    on_text: TextSink | None = None,
    template: JinjaTemplate | None = None,
) -> Generation:
    """A conversation for up to `steps` positions: in Llama 2's chat format as run.c writes it,
    or in the model's own `template` (a GGUF's), the whole conversation rendered each turn.

    read_user returns the next user message, or None to end. Each answer streams to on_text after
    "Assistant: " and ends with a newline when the model samples EOS.
    """
    steps = check_steps(steps, model)
    emit = on_text or (lambda text: None)
    result = Generation()
    answers = []  # the sampled tokens' text
    # One request a turn, through the engine's loop; its slot keeps the conversation's KV rows
    # from turn to turn (the engine's prompt cache), so a turn feeds only its new tokens.
    engine = Engine(model, tokenizer, chunked_prefill=True)
    context: list[int] = []  # the tokens the KV cache holds, or takes first thing next turn
    messages = [Message("system", system_prompt)] if template and system_prompt else []
    end_ids = tokenizer.end_ids(chat=True)
    while len(context) < steps:
        user = read_user()
        if user is None:
            break
        if template is None:
            first_turn = not context
            conversation = context + tokenizer.encode(
                llama2_chat_prompt(user, system_prompt if first_turn else None), bos=True
            )
        else:
            messages.append(Message("user", user))
            conversation = template.tokens(messages, tokenizer)
        if not result.prompt_tokens:
            _check_fits(len(conversation), model)
            result.prompt_tokens = conversation
        emit("Assistant: ")

        new = conversation[_shared_prefix(context, conversation) :]  # what run.c forwards now
        sampler.accept(new)
        sampler.skip(len(new) - 1)  # run.c samples after every prompt token too
        if len(conversation) > steps:  # the context ends inside the prompt
            model.prefill(conversation[:steps], 0)
            result.prefill_tokens += steps - len(conversation) + len(new)
            result.context_full = steps == model.config.seq_len
            break
        request = Request(conversation, steps - len(conversation) + 1, sampler, lambda e: None,
                          end_ids=end_ids)  # fmt: skip
        turn = []  # this answer's text
        for event in engine.stream(request):
            if event.finish_reason == "error":
                raise LlametteError(f"generation failed: {event.error}")
            turn.append(event.text)
            emit(event.text)
            finish_reason = event.finish_reason
        ended = [] if request.end_token is None else [request.end_token]
        result.tokens += request.tokens + ended
        result.prefill_tokens += len(new)
        result.prefill_seconds += request.first_token_at - request.admitted_at
        result.decode_tokens += len(request.tokens) + len(ended) - 1
        result.decode_seconds += request.finished_at - request.first_token_at
        answers += turn
        context = conversation + request.tokens + ended
        if ended:
            emit("\n")
            if len(context) <= steps:  # the model sees its end of turn, as in run.c: a draw
                sampler.skip(1)
        if finish_reason == "length":
            result.context_full = steps == model.config.seq_len
            break
        if template:
            messages.append(Message("assistant", "".join(turn).strip()))
    emit("\n")
    result.text = "".join(answers)
    return result


def _shared_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens a and b share from the start."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _check_fits(n_tokens: int, model: Transformer) -> None:
    if n_tokens > model.config.seq_len:
        raise LlametteError(
            f"prompt: {n_tokens} tokens do not fit the model's context of {model.config.seq_len}"
        )
