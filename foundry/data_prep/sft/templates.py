"""Chat templates: a conversation -> one text plus the character spans of the assistant's replies.

The text is tokenized whole (never piece by piece: sentencepiece-style tokenizers would add a word
boundary at every piece) and the spans become per-token masks through the tokenizer's offsets.

  chatml     <|im_start|>{role}\\n{content}<|im_end|>\\n per turn. An assistant span is its content and
             its <|im_end|> (so the model learns to stop); the header and the newline after
             <|im_end|> are prompt.
  plain      the turns' contents back to back, each assistant reply followed by EOS (span: reply +
             EOS). For prompt/response data whose prompt already carries its own formatting, as
             mosaicml/dolly_hhrlhf's does ("### Response:\\n").
  tokenizer  the tokenizer's own Jinja `chat_template`, rendered as transformers renders it. The span of
             assistant turn i runs from the end of render(turns[:i], add_generation_prompt=True) to the
             end of render(turns[:i+1]), trailing whitespace excluded: the reply and the template's
             end-of-turn token. This needs a template whose renderings of a conversation's prefixes
             are prefixes of each other (almost all are); a record for which that fails is counted as
             template_error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from foundry.data_prep.sft.records import ASSISTANT, Message

TEMPLATES = ("chatml", "tokenizer", "plain")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TOKENS = (IM_START, IM_END)
# The same format as a Jinja chat template, saved with the tokenizer so that transformers'
# apply_chat_template (and `foundry generate --chat`) renders exactly what was trained on.
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateError(Exception):
    """The template cannot render this conversation (counted as template_error)."""


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # [start, end) characters of each assistant reply, in order
    turn_ends: list[int]  # the character where each turn's rendering ends


class ChatML:
    name = "chatml"

    def render(self, messages: list[Message]) -> Rendered:
        pieces: list[str] = []
        at = 0
        spans, ends = [], []
        for role, content in messages:
            head = f"{IM_START}{role}\n"
            start = at + len(head)
            end = start + len(content) + len(IM_END)
            pieces.append(f"{head}{content}{IM_END}\n")
            at = end + 1
            if role == ASSISTANT:
                spans.append((start, end))
            ends.append(at)
        return Rendered("".join(pieces), spans, ends)


class Plain:
    name = "plain"

    def __init__(self, eos_token: str):
        self.eos_token = eos_token

    def render(self, messages: list[Message]) -> Rendered:
        pieces: list[str] = []
        at = 0
        spans, ends = [], []
        for role, content in messages:
            start = at
            piece = content + self.eos_token if role == ASSISTANT else content
            pieces.append(piece)
            at += len(piece)
            if role == ASSISTANT:
                spans.append((start, at))
            ends.append(at)
        return Rendered("".join(pieces), spans, ends)


def _jinja_environment():
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %} (transformers' assistant-mask tags) renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    # The environment transformers' apply_chat_template uses, so a template renders the same here.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class JinjaTemplate:
    name = "tokenizer"

    def __init__(self, source: str, special_tokens: dict[str, str]):
        import jinja2

        try:
            self._template = _jinja_environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ValueError(f"the tokenizer's chat_template does not parse: {e}") from e
        self._special = dict(special_tokens)

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        if not messages and not add_generation_prompt:
            return ""
        turns = [{"role": role, "content": content} for role, content in messages]
        try:
            return self._template.render(
                messages=turns, add_generation_prompt=add_generation_prompt, **self._special
            )
        except Exception as e:  # raise_exception(), or a template bug on this input
            raise TemplateError(str(e)) from e

    def render(self, messages: list[Message]) -> Rendered:
        text = self._render(messages, False)
        spans, ends = [], []
        for i, (role, _) in enumerate(messages):
            upto = self._render(messages[: i + 1], False) if i + 1 < len(messages) else text
            if not text.startswith(upto):
                raise TemplateError("the chat template renders a conversation's prefix differently")
            if role == ASSISTANT:
                head = self._render(messages[:i], True)
                if not upto.startswith(head):
                    raise TemplateError("the generation prompt is not a prefix of the assistant's turn")
                spans.append((len(head), len(upto.rstrip())))
            ends.append(len(upto))
        return Rendered(text, spans, ends)


def make_template(name: str, eos_token: str, chat_template: str | None, special_tokens: dict[str, str]):
    if name == "chatml":
        return ChatML()
    if name == "plain":
        return Plain(eos_token)
    if name == "tokenizer":
        assert chat_template is not None
        return JinjaTemplate(chat_template, special_tokens)
    raise ValueError(f"unknown template {name!r}")
