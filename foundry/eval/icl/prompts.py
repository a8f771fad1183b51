"""Prompt text and token ids shared by the task types: llm-foundry's context layout and tokenization.

A prompt is `prompt_string`, then the few-shot examples, then the example under test:

    prompt_string [delim] prelimiter context continuation_delimiter answer   <- each few-shot example
                  delim   prelimiter context continuation_delimiter          <- the example (then rstripped)

`delim` (example_delimiter) comes before an example only when text precedes it. The few-shot part is
tokenized with the tokenizer's special tokens (a BOS, if it adds one, but never a trailing EOS), the rest
without, and an answer gets a leading space when the tokenizer is a GPT-2-style BPE (" a" is one token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from foundry.config.icl import ICLTaskConfig
from foundry.errors import DataError


@dataclass
class Row:
    """One sequence to score: the log-likelihood of `continuation` after `context` (token ids), and the
    text each came from (for people reading results, and for independent checks)."""

    context: list[int]
    continuation: list[int]
    context_text: str
    continuation_text: str


class PromptTokenizer:
    """The few tokenizer operations ICL needs, on a transformers tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix_space = len(tokenizer(" a", add_special_tokens=False)["input_ids"]) == 1
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id

    def preamble(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text)["input_ids"])
        if self.eos_id is not None and len(ids) > 1 and ids[-1] == self.eos_id:
            ids = ids[:-1]  # a tokenizer that ends every text with EOS would put one mid-prompt
        return ids

    def plain(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def answer_text(self, text: str) -> str:
        return f" {text}" if self.prefix_space and not text.startswith(" ") else text

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def empty_context(self) -> list[int]:
        """What conditions a continuation with no context at all (as lm-eval does): BOS, else EOS."""
        token = self.bos_id if self.bos_id is not None else self.eos_id
        if token is None:
            raise DataError("an example has an empty context and the tokenizer has neither BOS nor EOS")
        return [token]


def example_context(task: ICLTaskConfig, context: str, preceding: str, answer: str | None = None) -> str:
    """One example in the prompt: [delim] prelimiter context continuation_delimiter [answer]."""
    text = task.effective_prelimiter + context
    if preceding:
        text = task.example_delimiter + text
    text += task.continuation_delimiter
    return text + answer if answer is not None else text


def fewshot_prompt(task: ICLTaskConfig, shots: list[dict], render: Callable[[dict, str], str]) -> str:
    """prompt_string followed by each shot, rendered knowing the text before it."""
    text = task.prompt_string
    for shot in shots:
        text += render(shot, text)
    return text


def fit(context: list[int], continuation: list[int], max_len: int, what: str) -> list[int]:
    """`context` cut from the left so that context + continuation fit in `max_len` tokens."""
    room = max_len - len(continuation)
    if room < 1:
        raise DataError(
            f"{what}: a continuation of {len(continuation)} tokens leaves no room for context in "
            f"max_seq_len {max_len}; raise the task's max_seq_len"
        )
    return context[-room:] if len(context) > room else context


def scored_row(
    ptok: PromptTokenizer, preamble: str, context: str, continuation: str, max_len: int, what: str
) -> Row:
    """The tokens of (preamble + context, continuation) as llm-foundry forms them."""
    context_ids = ptok.preamble(preamble) + ptok.plain(context)
    continuation_ids = ptok.plain(continuation)
    if not continuation_ids:
        raise DataError(f"{what}: the continuation {continuation!r} has no tokens")
    if not context_ids:
        context_ids = ptok.empty_context
    return Row(
        fit(context_ids, continuation_ids, max_len, what), continuation_ids, preamble + context, continuation
    )
