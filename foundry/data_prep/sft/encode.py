"""Conversations -> token ids and a loss mask (the workers' job).

Each record is validated (records.py), rendered with the template (templates.py), tokenized whole
with offsets, and its mask is built from the assistant spans: a token is an assistant token when its
characters overlap a reply's span. A token can straddle a span's edge only where the tokenizer merges
across the template's separator (plain prompts without a trailing newline; never at ChatML's special
tokens); it then counts as the reply's, so no character of a reply goes unlearned. A conversation longer than seq_len is cut after the last
assistant turn that fits (too_long="truncate") or dropped (too_long="drop"), and counted either way.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from foundry.data_prep.sft.records import ASSISTANT, Message, Shape, to_messages
from foundry.data_prep.sft.templates import TemplateError, make_template
from foundry.data_prep.sft.tokenizer import ChatTokenizer
from foundry.data_prep.sources import JsonArray, JsonLines

MASK_MODES = ("assistant", "last_assistant", "all")
TOO_LONG = ("truncate", "drop")


@dataclass(frozen=True)
class MaskPolicy:
    """Which tokens are learned.

    mode: assistant (every assistant reply with its end-of-turn token), last_assistant (only the final
    reply), all (every token). prompt_min_tokens: also learn a prompt, i.e. the tokens from the end of
    one reply to the start of the next (system and user turns and the turn headers in between), when it
    is at least this long; llm-foundry's `target_prompts: length>=N`.
    """

    mode: str = "assistant"
    prompt_min_tokens: int | None = None

    def describe(self) -> dict:
        return {"mode": self.mode, "prompt_min_tokens": self.prompt_min_tokens}


@dataclass(frozen=True)
class EncoderConfig:
    tokenizer: ChatTokenizer
    template: str
    seq_len: int
    mask: MaskPolicy
    too_long: str
    shapes: tuple[Shape, ...]  # per dataset
    min_assistant_tokens: tuple[int, ...]  # per dataset


@dataclass
class Rows:
    """Records already read into dicts (parquet rows, Hugging Face dataset rows)."""

    rows: list
    nbytes: int


@dataclass
class EncodedChats:
    """One chunk of one dataset, tokenized: accepted conversations only, in input order."""

    dataset: int
    tokens: np.ndarray  # int32, the conversations back to back
    mask: np.ndarray  # uint8, aligned with tokens
    lengths: np.ndarray  # int64 tokens per conversation
    assistant_tokens: np.ndarray  # int64 per conversation: tokens of its assistant turns
    records: int  # records read, accepted or not
    truncated: int
    skipped: Counter
    nbytes: int


def _records(chunk) -> tuple[list, Counter]:
    """The chunk's records (or, for unparsable lines, None) and the count of unparsable ones."""
    bad: Counter = Counter()
    if isinstance(chunk, Rows):
        return chunk.rows, bad
    if isinstance(chunk, JsonLines):
        records = []
        for line in chunk.data.split(b"\n"):
            line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM is an encoding marker, not JSON
            if not line or line.isspace():
                continue  # blank lines separate nothing; they are not records
            try:
                records.append(json.loads(line))
            except UnicodeDecodeError:
                bad["invalid_utf8"] += 1
            except ValueError:
                bad["bad_json"] += 1
        return records, bad
    if isinstance(chunk, JsonArray):
        try:
            records = json.loads(chunk.data)
        except UnicodeDecodeError:
            bad["invalid_utf8"] += 1
            return [], bad
        except ValueError:
            bad["bad_json"] += 1
            return [], bad
        return (records if isinstance(records, list) else [records]), bad
    raise TypeError(f"unknown chunk type {type(chunk).__name__}")


def _overlap(starts: np.ndarray, ends: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Tokens whose characters overlap [lo, hi); zero-width tokens (added by a post-processor) never do."""
    return (starts < hi) & (ends > lo)


class ConversationEncoder:
    """Tokenizes chunks of one dataset at a time; one per worker process."""

    def __init__(self, config: EncoderConfig):
        from tokenizers import Tokenizer

        tok = config.tokenizer
        self.config = config
        self.tokenizer = Tokenizer.from_str(tok.json)
        self.template = make_template(config.template, tok.eos_token, tok.chat_template, tok.special_map)
        self.prefix = np.array(tok.prefix_ids, dtype=np.int64)
        # One pass over each text finds any special token's string (Llama 3 has 256 of them).
        self.special = re.compile("|".join(map(re.escape, tok.special_texts))) if tok.special_texts else None

    def _render(self, messages: list[Message], skipped: Counter):
        try:
            return self.template.render(messages)
        except TemplateError:
            skipped["template_error"] += 1
            return None

    def _encode(self, texts: list[str]) -> list:
        try:
            return self.tokenizer.encode_batch(texts, add_special_tokens=False)
        except Exception:  # one bad string fails the whole batch; find it
            out = []
            for text in texts:
                try:
                    out.append(self.tokenizer.encode(text, add_special_tokens=False))
                except Exception:
                    out.append(None)
            return out

    def _arrays(self, rendered, encoding) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """ids, starts, ends (characters), and the assistant-token mask, the prefix (BOS) included."""
        k = len(self.prefix)
        ids = np.concatenate([self.prefix, np.asarray(encoding.ids, dtype=np.int64)])
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        starts = np.concatenate([np.zeros(k, np.int64), offsets[:, 0]])
        ends = np.concatenate([np.zeros(k, np.int64), offsets[:, 1]])
        assistant = np.zeros(len(ids), dtype=bool)
        for lo, hi in rendered.spans:
            assistant |= _overlap(starts, ends, lo, hi)
        return ids, starts, ends, assistant

    def _mask(self, rendered, starts, ends, assistant) -> np.ndarray:
        policy = self.config.mask
        if policy.mode == "all":
            mask = np.ones(len(starts), dtype=bool)
        elif policy.mode == "last_assistant":
            mask = _overlap(starts, ends, *rendered.spans[-1])
        else:
            mask = assistant.copy()
        if policy.prompt_min_tokens is not None and policy.mode != "all":
            lo = 0
            for start, end in rendered.spans:
                prompt = _overlap(starts, ends, lo, start) & ~assistant
                if lo == 0:
                    prompt[: len(self.prefix)] = True  # a BOS belongs to the first prompt
                if prompt.sum() >= policy.prompt_min_tokens:
                    mask |= prompt
                lo = end
        mask[0] = False  # nothing of its own conversation comes before the first token
        return mask

    def _fit(self, messages, rendered, starts, skipped):
        """A shorter conversation of whole turns, ending with an assistant turn, that fits; or None."""
        if self.config.too_long == "truncate":
            limit = self.config.seq_len
            for n in range(len(messages) - 1, 0, -1):
                if messages[n - 1][0] != ASSISTANT:
                    continue
                # Tokens that start before turn n ends: the first n turns (a boundary token counted in).
                if int((starts < rendered.turn_ends[n - 1]).sum()) > limit:
                    continue
                shorter = messages[:n]
                again = self._render(shorter, Counter())
                if again is None:
                    break
                encoding = self._encode([again.text])[0]
                if encoding is not None and len(encoding.ids) + len(self.prefix) <= limit:
                    return again, encoding
        skipped["too_long"] += 1
        return None

    def __call__(self, item) -> EncodedChats:
        dataset, chunk = item
        cfg = self.config
        shape = cfg.shapes[dataset]
        records, skipped = _records(chunk)
        n_records = len(records) + sum(skipped.values())  # the unparsable lines are records too
        conversations: list[tuple[list[Message], object]] = []
        for record in records:
            messages = to_messages(record, shape)
            if isinstance(messages, str):
                skipped[messages] += 1
                continue
            if self.special and any(self.special.search(text) for _, text in messages):
                skipped["special_token_in_text"] += 1
                continue
            rendered = self._render(messages, skipped)
            if rendered is not None:
                conversations.append((messages, rendered))
        encodings = self._encode([r.text for _, r in conversations])
        tokens, masks, lengths, assistant_counts = [], [], [], []
        truncated = 0
        for (messages, rendered), encoding in zip(conversations, encodings, strict=True):
            if encoding is None:
                skipped["invalid_utf8"] += 1
                continue
            ids, starts, ends, assistant = self._arrays(rendered, encoding)
            if len(ids) > cfg.seq_len:
                fitted = self._fit(messages, rendered, starts, skipped)
                if fitted is None:
                    continue
                rendered, encoding = fitted
                ids, starts, ends, assistant = self._arrays(rendered, encoding)
                truncated += 1
            n_assistant = int(assistant.sum())
            if n_assistant < cfg.min_assistant_tokens[dataset]:
                skipped["too_few_assistant_tokens"] += 1
                continue
            tokens.append(ids)
            masks.append(self._mask(rendered, starts, ends, assistant))
            lengths.append(len(ids))
            assistant_counts.append(n_assistant)
        return EncodedChats(
            dataset=dataset,
            tokens=np.concatenate(tokens).astype(np.int32) if tokens else np.zeros(0, np.int32),
            mask=np.concatenate(masks).astype(np.uint8) if masks else np.zeros(0, np.uint8),
            lengths=np.array(lengths, dtype=np.int64),
            assistant_tokens=np.array(assistant_counts, dtype=np.int64),
            records=n_records,
            truncated=truncated,
            skipped=skipped,
            nbytes=chunk.nbytes,
        )
