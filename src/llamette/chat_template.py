"""Chat templates: a conversation (system, user and assistant messages) to prompt tokens.

Llama 2's own format is the default; a GGUF file may carry its own template (Jinja, as Hugging
Face writes it), rendered in a sandbox.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from llamette.errors import LlametteError
from llamette.formats.gguf import chat_template_of
from llamette.tokenizer import Tokenizer

BOS_TEXT, EOS_TEXT = "<s>", "</s>"  # Llama 2's special tokens, as templates write them
# a message's place in a rendered template: "\ue000<index>\ue001" (private-use characters),
# with the padding around it that the template kept (none where it trims the content)
PAD = "\x1f"  # whitespace to str.strip and Jinja's trim, written by no template
CONTENT_MARK = re.compile("(\x1f?)\ue000(\\d+)\ue001(\x1f?)")


def llama2_chat_prompt(user: str, system: str | None = None) -> str:
    """One user turn in Llama 2's chat template (BOS is added by the encoder)."""
    if system:
        return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
    return f"[INST] {user} [/INST]"


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


class Llama2Template:
    """Meta's chat format: each exchange `<s>[INST] user [/INST] answer </s>`, the system prompt
    inside the first `[INST]` between `<<SYS>>` and `<</SYS>>`, the last user turn left open."""

    name = "llama-2"

    def tokens(self, messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
        system = messages[0].content if messages and messages[0].role == "system" else None
        turns = messages[1:] if system is not None else messages
        expected = ("user", "assistant")
        for index, message in enumerate(turns):
            if message.role != expected[index % 2]:
                raise LlametteError(
                    "messages: after an optional system message, user and assistant must "
                    f"alternate, starting and ending with user (message {index + (system is not None)} "
                    f"is {message.role!r})"
                )
        if len(turns) % 2 == 0:
            raise LlametteError("messages: the last message must be the user's")
        tokens = []
        for index in range(0, len(turns), 2):
            user = llama2_chat_prompt(turns[index].content.strip(), system if index == 0 else None)
            if index + 1 < len(turns):
                answer = turns[index + 1].content.strip()
                tokens += tokenizer.encode(f"{user} {answer} ", bos=True, eos=True)
            else:
                tokens += tokenizer.encode(user, bos=True)
        return tokens


class JinjaTemplate:
    """A template in Jinja, as GGUF files and Hugging Face folders carry it, rendered as
    transformers' `apply_chat_template` renders it. The special tokens the template writes
    become their ids; the messages' own text never does."""

    name = "gguf"

    def __init__(self, source: str):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TemplateError(message)

        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.globals["raise_exception"] = raise_exception
        environment.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self.template = environment.from_string(source)
            self.source = source
        except TemplateError as error:
            raise LlametteError(f"chat template: {error}") from None

    def render(
        self, messages: Sequence[Message], bos_token: str = BOS_TEXT, eos_token: str = EOS_TEXT
    ) -> str:
        try:
            return self.template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                tools=None,  # as transformers passes them when there are none
                documents=None,
                bos_token=bos_token,
                eos_token=eos_token,
            )
        except Exception as error:  # a template is a program: any error is the template's
            raise LlametteError(f"messages: the model's chat template says: {error}") from None

    def tokens(self, messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
        """The conversation's prompt: the template's text with its special tokens parsed, the
        messages' text without. Found by rendering a mark in place of each message, padded each
        side with a character that trimming removes and no template writes, and checked against
        the rendering of the real messages; where a template does more with a message than
        print it (tests it, cuts it), the rendering is encoded whole, special tokens parsed."""
        bos, eos = (
            tokenizer.special_text(t) for t in (tokenizer.bos_id, tokenizer.specials.eos_id)
        )
        rendered = self.render(messages, bos, eos)
        marked = [Message(m.role, f"{PAD}\ue000{i}\ue001{PAD}") for i, m in enumerate(messages)]
        parts, start = [], 0
        with_marks = self.render(marked, bos, eos)
        for mark in CONTENT_MARK.finditer(with_marks):
            content = messages[int(mark.group(2))].content
            content = content if mark.group(1) else content.lstrip()  # the template trims it
            content = content if mark.group(3) else content.rstrip()
            parts += [(with_marks[start : mark.start()], True), (content, False)]
            start = mark.end()
        parts.append((with_marks[start:], True))
        if "".join(text for text, _ in parts) != rendered:
            return tokenizer.encode(rendered, bos=False, special=True)
        return tokenizer.encode_parts(parts)


ChatTemplate = Llama2Template | JinjaTemplate


def own_template(model_path: str | os.PathLike) -> JinjaTemplate | None:
    """The template the model's file carries (a GGUF's), if any."""
    source = chat_template_of(model_path)
    return JinjaTemplate(source) if source else None


def chat_template_for(model_path: str | os.PathLike) -> ChatTemplate:
    """The model's own template when its file has one (GGUF), else Llama 2's."""
    return own_template(model_path) or Llama2Template()
