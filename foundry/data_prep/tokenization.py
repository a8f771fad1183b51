"""Loading the tokenizer and turning chunks of raw documents into token arrays (the workers' job).

Workers use the Rust `tokenizers.Tokenizer` directly (`encode_batch_fast`: no offsets, ~2x faster than
`encode_batch`), never the Python PreTrainedTokenizer wrapper, and hand back one flat int32 array per
chunk: every kept document's tokens followed by EOS, plus each document's length and split.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from foundry.data_prep.sources import Chunk, JsonArray, JsonLines, TextFiles, Texts
from foundry.errors import DataError, FoundryError

log = logging.getLogger("foundry.data_prep")

# Tried in order when the tokenizer folder does not name its EOS token (gpt-neox/gpt2, llama, others).
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything a worker needs to rebuild the tokenizer, and what the manifest records about it."""

    path: str
    json: str  # the tokenizer.json text
    eos_id: int
    vocab_size: int
    fingerprint: str  # sha256 of the tokenizer.json text
    appends_eos: bool  # the tokenizer's post-processor already ends every encoding with EOS

    def manifest(self) -> dict:
        from foundry.data.tokenizer import vocab_fingerprint

        return {
            "path": self.path,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "fingerprint": self.fingerprint,
            # What training compares with its own tokenizer (foundry/train/preflight.py).
            "vocab_fingerprint": vocab_fingerprint(self.json),
        }


def _token_content(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<|endoftext|>", ...} (AddedToken serialization)
        value = value.get("content")
    return value if isinstance(value, str) else None


def _eos_from_folder(folder: Path, tokenizer) -> int | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg_path = folder / name
        if cfg_path.is_file():
            try:
                token = _token_content(json.loads(cfg_path.read_text()).get("eos_token"))
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read {cfg_path}: {e}") from e
            if token is not None and tokenizer.token_to_id(token) is not None:
                return tokenizer.token_to_id(token)
    for token in _EOS_CANDIDATES:
        if tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return None


def load_tokenizer_spec(name_or_path: str) -> TokenizerSpec:
    """A tokenizer folder (with tokenizer.json), a tokenizer.json file, or a Hugging Face hub name
    (loaded with transformers; needs a network the first time)."""
    from tokenizers import Tokenizer

    from foundry.data.tokenizer import has_tokenizer_files, no_tokenizer_message

    path = Path(name_or_path).expanduser()
    if path.is_dir() and not has_tokenizer_files(path):  # say so now, not after transformers' search
        raise DataError(no_tokenizer_message(path) + "; pass the folder a tokenizer was saved to")
    json_path = path / "tokenizer.json" if path.is_dir() else path
    if json_path.is_file():
        text = json_path.read_text(encoding="utf-8")
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as e:
            raise DataError(f"{json_path} is not a tokenizers JSON file: {e}") from e
        eos_id = _eos_from_folder(json_path.parent, tokenizer)
        shown = str(path.resolve())
    else:
        tokenizer, text, eos_id = _load_with_transformers(name_or_path, path)
        shown = str(path.resolve()) if path.exists() else name_or_path
    if eos_id is None:
        raise DataError(
            f"tokenizer {name_or_path} names no EOS token: set eos_token in its tokenizer_config.json"
        )
    probe = tokenizer.encode("a", add_special_tokens=True).ids
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    return TokenizerSpec(
        path=shown,
        json=text,
        eos_id=int(eos_id),
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        fingerprint=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        appends_eos=bool(probe) and probe[-1] == eos_id and (not plain or plain[-1] != eos_id),
    )


def load_fast_tokenizer(name: str):
    """foundry.data.tokenizer.load_tokenizer for data-prep: a fast (Rust) tokenizer, else DataError."""
    from foundry.data.tokenizer import load_tokenizer

    try:
        hf = load_tokenizer(name)
    except FoundryError as e:
        raise DataError(str(e)) from None
    if not getattr(hf, "is_fast", False):
        raise DataError(f"tokenizer {name!r} has no fast (Rust) version; data-prep needs one")
    return hf


def _load_with_transformers(name: str, path: Path):
    from tokenizers import Tokenizer

    hf = load_fast_tokenizer(name)
    text = hf.backend_tokenizer.to_str()
    return Tokenizer.from_str(text), text, hf.eos_token_id


@dataclass(frozen=True)
class EncodeOptions:
    text_field: str = "text"
    val_fraction: float = 0.0
    seed: int = 0
    min_tokens: int = 0
    max_tokens: int | None = None
    # llm-foundry's converters' --bos_text/--eos_text, as token ids: put before / after every document.
    # eos_ids None: the tokenizer's EOS ends each document (unless its post-processor adds it already).
    bos_ids: tuple[int, ...] = ()
    eos_ids: tuple[int, ...] | None = None


def text_ids(spec: TokenizerSpec, text: str | None) -> tuple[int, ...] | None:
    """The token ids of a --bos-text/--eos-text string (no special tokens added), None for None."""
    if text is None:
        return None
    from tokenizers import Tokenizer

    return tuple(Tokenizer.from_str(spec.json).encode(text, add_special_tokens=False).ids)


@dataclass
class Encoded:
    """One chunk, tokenized: kept documents only, in input order."""

    tokens: np.ndarray  # int32: doc0 tokens, EOS, doc1 tokens, EOS, ...
    lengths: np.ndarray  # int64 tokens per document, EOS (and BOS/EOS text) not counted
    is_val: np.ndarray  # bool per document
    skipped: Counter
    nbytes: int
    overhead: int = 1  # tokens each document takes in `tokens` beyond its length (EOS, BOS/EOS text)


def is_val_document(ident: str, index: int, fraction: float, seed: int) -> bool:
    """A document's split, from a hash of its identity: the same on every rerun, for any chunking."""
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}:{ident}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0**64


# C0 control characters that text does not hold (tab, newlines, form feed and ESC of coloured logs do).
_BINARY_CONTROLS = frozenset(chr(c) for c in range(32) if chr(c) not in "\t\n\r\f\v\x1b") | {"\x7f"}
_SNIFF = 8192  # characters looked at, from the start: what git and file(1) do


def looks_binary(text: str) -> bool:
    """Valid UTF-8 that is not text: a NUL byte, or more than 10% control characters, near the start."""
    sample = text[:_SNIFF]
    if "\x00" in sample:
        return True
    return sum(ch in _BINARY_CONTROLS for ch in sample) > 0.1 * len(sample)


def _text_value(value, skipped: Counter) -> str | None:
    if value is None or not isinstance(value, str | bytes):
        skipped["missing_field"] += 1
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            skipped["invalid_utf8"] += 1
            return None
    if not value or value.isspace():
        skipped["empty"] += 1
        return None
    if looks_binary(value):
        skipped["binary"] += 1
        return None
    return value


def _record_text(record, field: str, skipped: Counter) -> str | None:
    if not isinstance(record, dict):
        skipped["bad_json"] += 1
        return None
    return _text_value(record.get(field), skipped)


def parse_chunk(chunk: Chunk, text_field: str) -> tuple[list[tuple[str, int]], list[str], Counter]:
    """Documents of a chunk as (identity, index) and text; undecodable or malformed ones are counted."""
    skipped: Counter = Counter()
    keys: list[tuple[str, int]] = []
    texts: list[str] = []
    if isinstance(chunk, TextFiles):
        for ident, data in chunk.items:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                skipped["invalid_utf8"] += 1
                continue
            text = text.removeprefix("\ufeff")  # a BOM is an encoding marker, not content
            if not text or text.isspace():
                skipped["empty"] += 1
                continue
            if looks_binary(text):
                skipped["binary"] += 1
                continue
            keys.append((ident, 0))
            texts.append(text)
    elif isinstance(chunk, JsonLines):
        for i, line in enumerate(chunk.data.split(b"\n")):
            if not line or line.isspace():
                continue  # blank lines separate nothing; they are not documents
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                skipped["invalid_utf8"] += 1
                continue
            except ValueError:
                skipped["bad_json"] += 1
                continue
            text = _record_text(record, text_field, skipped)
            if text is not None:
                keys.append((chunk.ident, chunk.first_line + i))
                texts.append(text)
    elif isinstance(chunk, JsonArray):
        try:
            records = json.loads(chunk.data)
        except UnicodeDecodeError:
            skipped["invalid_utf8"] += 1
            records = []
        except ValueError:
            skipped["bad_json"] += 1
            records = []
        for i, record in enumerate(records if isinstance(records, list) else [records]):
            text = _record_text(record, text_field, skipped)
            if text is not None:
                keys.append((chunk.ident, i))
                texts.append(text)
    elif isinstance(chunk, Texts):
        for i, value in enumerate(chunk.texts):
            text = _text_value(value, skipped)
            if text is not None:
                keys.append((chunk.ident, chunk.first_index + i))
                texts.append(text)
    else:
        raise TypeError(f"unknown chunk type {type(chunk).__name__}")
    return keys, texts, skipped


class DocumentEncoder:
    """Tokenizes chunks. One per worker process (the Rust tokenizer is rebuilt from its JSON there)."""

    def __init__(self, spec: TokenizerSpec, options: EncodeOptions):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(spec.json)
        self.bos = list(options.bos_ids)
        if options.eos_ids is None:
            self.eos = [] if spec.appends_eos else [spec.eos_id]
            self.own_eos = spec.appends_eos  # the encoding's last token is the EOS, not the document
        else:
            self.eos = list(options.eos_ids)
            self.own_eos = False  # --eos-text given: whatever the tokenizer adds is the document's
        self.options = options

    def _encode(self, texts: list[str], skipped: Counter) -> list[list[int] | None]:
        try:
            return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=True)]
        except Exception:
            # One bad string (e.g. a lone surrogate from a JSON escape) fails the whole batch; find it.
            out: list[list[int] | None] = []
            for text in texts:
                try:
                    out.append(self.tokenizer.encode(text, add_special_tokens=True).ids)
                except Exception:
                    skipped["invalid_utf8"] += 1
                    out.append(None)
            return out

    def __call__(self, chunk: Chunk) -> Encoded:
        opts = self.options
        keys, texts, skipped = parse_chunk(chunk, opts.text_field)
        ids = self._encode(texts, skipped)
        kept: list[list[int]] = []
        val: list[bool] = []
        for (ident, index), doc in zip(keys, ids, strict=True):
            if doc is None:
                continue
            n = len(doc) - (1 if self.own_eos else 0)  # the length never counts EOS
            if n < opts.min_tokens:
                skipped["too_short"] += 1
            elif opts.max_tokens is not None and n > opts.max_tokens:
                skipped["too_long"] += 1
            else:
                kept.append(doc)
                val.append(is_val_document(ident, index, opts.val_fraction, opts.seed))
        lengths = np.fromiter(map(len, kept), dtype=np.int64, count=len(kept))
        if self.own_eos:
            lengths -= 1
        overhead = len(self.bos) + len(self.eos) + (1 if self.own_eos else 0)
        if self.bos or self.eos:
            pieces = itertools.chain.from_iterable(itertools.chain(self.bos, doc, self.eos) for doc in kept)
        else:
            pieces = itertools.chain.from_iterable(kept)
        total = int(lengths.sum()) + overhead * len(kept)
        tokens = np.fromiter(pieces, dtype=np.int32, count=total)
        return Encoded(tokens, lengths, np.array(val, dtype=bool), skipped, chunk.nbytes, overhead)
