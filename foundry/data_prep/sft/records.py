"""Raw records -> validated conversations, or the reason a record cannot be one.

Two shapes of record are read:
  chat             {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}; ShareGPT's
                   {"conversations": [{"from": "human|gpt", "value": "..."}]} reads too (--messages-field
                   conversations), its role names mapped by ROLE_ALIASES
  prompt_response  {"prompt": "...", "response": "..."} with configurable field names; several prompt
                   fields (Dolly's instruction + context) are joined by a blank line, empty ones left out

A bad record is never dropped silently: its first problem is returned as one of SKIP_REASONS and
the caller counts it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
# Other datasets' names for the same roles (ShareGPT, OpenAssistant, Gemini-style exports).
ROLE_ALIASES = {"human": USER, "prompter": USER, "gpt": ASSISTANT, "bot": ASSISTANT, "model": ASSISTANT}

SKIP_REASONS = (
    "unreadable",  # a file that cannot be opened or parsed (a corrupt parquet footer)
    "invalid_utf8",  # undecodable bytes, or text that is not valid Unicode (a lone surrogate)
    "bad_json",  # a line that is not JSON, or JSON that is not an object
    "missing_field",  # the messages / prompt / response field is absent
    "not_a_conversation",  # messages is not a list of objects
    "empty_conversation",  # messages is an empty list
    "missing_role",
    "unknown_role",
    "missing_content",  # a turn without text (absent, null, or not a string)
    "empty_turn",  # a turn whose text is empty or only whitespace
    "binary",  # text with NUL bytes or mostly control characters
    "special_token_in_text",  # text containing a special token's string (it would become that token)
    "not_ending_with_assistant",  # the last turn is not the assistant's: nothing to learn at the end
    "template_error",  # the tokenizer's chat template refused the conversation
    "too_long",  # longer than --seq-len, and no shorter prefix of whole turns ends with an assistant turn
    "too_few_assistant_tokens",  # fewer assistant tokens than --min-assistant-tokens
)

Message = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class Shape:
    """How the records of one dataset are laid out."""

    kind: str = "chat"  # chat | prompt_response
    messages_field: str = "messages"
    prompt_fields: tuple[str, ...] = ("prompt",)
    response_field: str = "response"

    def columns(self) -> tuple[str, ...]:
        """The fields a record needs (columnar inputs read only these)."""
        if self.kind == "chat":
            return (self.messages_field,)
        return (*self.prompt_fields, self.response_field)


# C0 control characters other than \t \n \v \f \r: in text they are rare, in binary data common.
_CONTROLS = re.compile("[\x00-\x08\x0e-\x1f]")


def check_text(text: str) -> str | None:
    """The reason this turn text cannot be trained on, or None."""
    if not text or text.isspace():
        return "empty_turn"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
        return "invalid_utf8"
    if "\x00" in text:
        return "binary"
    if _CONTROLS.search(text) and len(_CONTROLS.findall(text)) * 10 > len(text):
        return "binary"  # a few ANSI escapes are text; a tenth of the characters is not
    return None


def _as_text(value) -> str | None:
    """A turn's text: a string, UTF-8 bytes, or OpenAI-style parts [{"type": "text", "text": ...}]."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value  # decoded (or rejected) by the caller
    if (
        isinstance(value, list)
        and value
        and all(isinstance(p, dict) and p.get("type") == "text" for p in value)
    ):
        texts = [p.get("text") for p in value]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    return None


def _text(value) -> tuple[str, None] | tuple[None, str]:
    """(text, None), or (None, the reason it is unusable)."""
    text = _as_text(value)
    if text is None:
        return None, "missing_content"
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
    reason = check_text(text)
    return (None, reason) if reason else (text, None)


def _chat(record: dict, shape: Shape) -> list[Message] | str:
    if shape.messages_field not in record or record[shape.messages_field] is None:
        return "missing_field"
    turns = record[shape.messages_field]
    if not isinstance(turns, list):
        return "not_a_conversation"
    if not turns:
        return "empty_conversation"
    messages: list[Message] = []
    for turn in turns:
        if not isinstance(turn, dict):
            return "not_a_conversation"
        role = turn.get("role", turn.get("from"))
        if role is None:
            return "missing_role"
        if not isinstance(role, str):
            return "unknown_role"
        role = role.strip().lower()
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            return "unknown_role"
        text, reason = _text(turn.get("content", turn.get("value")))
        if reason:
            return reason
        messages.append((role, text))
    if messages[-1][0] != ASSISTANT:
        return "not_ending_with_assistant"
    return messages


def _prompt_response(record: dict, shape: Shape) -> list[Message] | str:
    parts = []
    for field in shape.prompt_fields:
        if field not in record:
            return "missing_field"
        value = record[field]
        if value is None or (isinstance(value, str) and (not value or value.isspace())):
            continue  # an empty secondary field (Dolly's context) is simply left out
        text, reason = _text(value)
        if reason:
            return reason
        parts.append(text)
    if not parts:
        return "empty_turn"
    if shape.response_field not in record:
        return "missing_field"
    response, reason = _text(record[shape.response_field])
    if reason:
        return reason
    return [(USER, "\n\n".join(parts)), (ASSISTANT, response)]


def to_messages(record, shape: Shape) -> list[Message] | str:
    """The record as (role, content) turns ending with the assistant's, or a SKIP_REASONS entry."""
    if not isinstance(record, dict):
        return "bad_json"
    if shape.kind == "chat":
        return _chat(record, shape)
    return _prompt_response(record, shape)
