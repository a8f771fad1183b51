"""The tokenizer of an SFT dataset: the given one, plus the template's special tokens when it lacks them.

The tokenizer actually used is saved into DIR/tokenizer (with the chat template it was used with), so
training, `foundry generate` and `convert to-hf` read exactly it; the manifest records the tokens that
were added and the vocabulary size before and after, which is how training knows to grow the
embedding.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from foundry.data_prep.sft.templates import CHATML_JINJA, CHATML_TOKENS, IM_END
from foundry.errors import ConfigError, DataError

log = logging.getLogger("foundry.data_prep")


@dataclass(frozen=True)
class ChatTokenizer:
    """What the workers need to tokenize conversations, and what the manifest records."""

    json: str  # tokenizer.json text, special tokens added
    source: str
    source_fingerprint: str  # sha256 of the given tokenizer's tokenizer.json
    base_vocab_size: int
    vocab_size: int
    added_tokens: tuple[str, ...]
    eos_id: int
    eos_token: str
    pad_id: int
    prefix_ids: tuple[int, ...]  # what the tokenizer puts before a text (a BOS), kept for chatml/plain
    special_texts: tuple[str, ...]  # special tokens' strings, which must not occur in a turn's text
    special_map: dict = field(default_factory=dict)  # bos_token, eos_token, ...: the template's variables
    chat_template: str | None = None
    end_of_turn: str | None = None  # the token that ends an assistant turn (generation stops there)
    end_of_turn_id: int | None = None

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256((self.json + "\0" + (self.chat_template or "")).encode()).hexdigest()

    def manifest(self) -> dict:
        return {
            "path": "tokenizer",  # relative to the dataset folder
            "source": self.source,
            "source_fingerprint": self.source_fingerprint,
            "fingerprint": self.fingerprint,
            "base_vocab_size": self.base_vocab_size,
            "vocab_size": self.vocab_size,
            "added_tokens": list(self.added_tokens),
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "end_of_turn": self.end_of_turn,
            "end_of_turn_id": self.end_of_turn_id,
        }


def _load_hf(name: str):
    from foundry.data_prep.tokenization import _eos_from_folder, load_fast_tokenizer

    path = Path(name).expanduser()
    hf = load_fast_tokenizer(name)
    if hf.eos_token is None:
        eos = _eos_from_folder(path.parent if path.is_file() else path, hf.backend_tokenizer)
        if eos is None:
            raise DataError(
                f"tokenizer {name!r} names no EOS token: set eos_token in its tokenizer_config.json"
            )
        hf.eos_token = hf.backend_tokenizer.id_to_token(eos)
    return hf


def _prefix_ids(tokenizer) -> tuple[int, ...]:
    """The ids the post-processor adds before a text (BOS for Llama-style tokenizers; none for GPT-2's)."""
    full = tokenizer.encode("a", add_special_tokens=True).ids
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return tuple(full[:k])
    return ()


def _is_special(hf, token: str) -> bool:
    return any(t.content == token and t.special for t in hf.added_tokens_decoder.values())


def _end_of_turn(hf) -> str | None:
    """The special token a template puts after an assistant reply (<|eot_id|>, <|im_end|>, </s>), if any."""
    from foundry.data_prep.sft.templates import JinjaTemplate, TemplateError

    reply = "Hello there"
    try:
        rendered = JinjaTemplate(hf.chat_template, hf.special_tokens_map).render(
            [("user", "Hi"), ("assistant", reply)]
        )
    except (TemplateError, ValueError):
        return None
    lo, hi = rendered.spans[-1]
    tail = rendered.text[lo:hi]
    at = tail.rfind(reply)
    suffix = tail[at + len(reply) :].strip() if at >= 0 else ""
    return suffix if suffix and _is_special(hf, suffix) else None


def _add_special(hf, tokens: list[str]) -> None:
    """Adds `tokens` beside the tokenizer's other special tokens (kept, never replaced). transformers 5 renamed
    the list `additional_special_tokens` -> `extra_special_tokens`, and its keyword with it."""
    import inspect

    if "replace_extra_special_tokens" in inspect.signature(hf.add_special_tokens).parameters:
        hf.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    else:
        hf.add_special_tokens({"additional_special_tokens": tokens}, replace_additional_special_tokens=False)


def load_chat_tokenizer(name: str, template: str) -> tuple[ChatTokenizer, object]:
    """The tokenizer, extended for `template`, and its transformers object (to save it)."""
    from tokenizers import Tokenizer

    hf = _load_hf(name)
    source_json = hf.backend_tokenizer.to_str()
    base_size = len(hf)
    added: list[str] = []
    end_of_turn = None
    if template == "chatml":
        missing = [t for t in CHATML_TOKENS if not _is_special(hf, t)]
        if missing:
            # Added as special tokens: never split, and one id each. A string already in the vocabulary
            # keeps its id (nothing grows); an absent one gets the next id.
            _add_special(hf, missing)
            added = [t for t in missing if hf.convert_tokens_to_ids(t) >= base_size]
        hf.chat_template = CHATML_JINJA
        end_of_turn = IM_END
    elif template == "tokenizer":
        if not getattr(hf, "chat_template", None):
            raise ConfigError(
                f"tokenizer {name!r} has no chat_template; use --template chatml (the default)", "--template"
            )
        if not isinstance(hf.chat_template, str):
            raise ConfigError(
                f"tokenizer {name!r} has several named chat templates; not supported", "--template"
            )
        end_of_turn = _end_of_turn(hf)
    elif template == "plain":
        end_of_turn = hf.eos_token
    text = hf.backend_tokenizer.to_str()
    backend = Tokenizer.from_str(text)
    special_texts = sorted({t.content for t in hf.added_tokens_decoder.values() if t.special and t.content})
    special_map = {
        k: v for k, v in hf.special_tokens_map.items() if isinstance(v, str) or isinstance(v, list)
    }
    pad_id = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
    spec = ChatTokenizer(
        json=text,
        source=str(Path(name).expanduser().resolve()) if Path(name).expanduser().exists() else name,
        source_fingerprint=hashlib.sha256(source_json.encode()).hexdigest(),
        base_vocab_size=base_size,
        vocab_size=len(hf),
        added_tokens=tuple(added),
        eos_id=int(hf.eos_token_id),
        eos_token=hf.eos_token,
        pad_id=int(pad_id),
        prefix_ids=_prefix_ids(backend) if template != "tokenizer" else (),
        special_texts=tuple(special_texts),
        special_map=special_map,
        chat_template=hf.chat_template
        if template == "tokenizer"
        else CHATML_JINJA
        if template == "chatml"
        else None,
        end_of_turn=end_of_turn,
        end_of_turn_id=hf.convert_tokens_to_ids(end_of_turn) if end_of_turn else None,
    )
    return spec, hf


def save_tokenizer(hf, folder: Path) -> None:
    """A transformers tokenizer folder (AutoTokenizer.from_pretrained reads it)."""
    hf.save_pretrained(str(folder))
