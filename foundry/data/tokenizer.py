"""The run's tokenizer: the one place a transformers tokenizer is loaded (training, convert, eval, generate).

Data preparation tokenizes with the Rust `tokenizers` library directly, for speed
(foundry/data_prep/tokenization.py); everything else goes through here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from foundry.config.schema import TokenizerConfig
from foundry.errors import ConfigError, FoundryError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer_files(path: Path) -> bool:
    return any((Path(path) / f).is_file() for f in _TOKENIZER_FILES)


def no_tokenizer_message(path: Path) -> str:
    return f"{path} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)})"


def vocab_fingerprint(tokenizer_json: str) -> str:
    """sha256 of what decides the token ids (vocabulary and merges, added tokens, normalizer,
    pre-tokenizer), JSON-normalized: a tokenizer saved again elsewhere keeps its fingerprint."""
    data = json.loads(tokenizer_json)
    core = {k: data.get(k) for k in ("model", "normalizer", "pre_tokenizer")}
    core["added_tokens"] = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or [])
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def tokenizer_identity(name_or_path: str) -> tuple[int, str | None]:
    """(vocabulary size with added tokens, vocab_fingerprint) of a tokenizer folder or hub name."""
    path = Path(name_or_path).expanduser()
    json_path = path / "tokenizer.json" if path.is_dir() else path
    if json_path.is_file() and json_path.suffix == ".json":
        from tokenizers import Tokenizer

        text = json_path.read_text(encoding="utf-8")
        try:
            return Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True), vocab_fingerprint(text)
        except Exception:
            pass  # not a tokenizers file: let transformers try
    tokenizer = load_tokenizer(name_or_path)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return len(tokenizer), vocab_fingerprint(backend.to_str()) if backend is not None else None


def load_tokenizer(name_or_path: str, **kwargs: Any):
    """A transformers tokenizer from a folder, a bare tokenizer.json, or a hub name (needs a network
    the first time). Raises FoundryError with transformers' first line, not its pages."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not has_tokenizer_files(path):
        raise FoundryError(no_tokenizer_message(path))
    try:
        if path.is_file() or _generic_fast(path):
            # What AutoTokenizer would build here, without importing transformers' model registry:
            # about 5 CPU-seconds (scikit-learn and scipy included) in every process that loads one.
            from transformers import PreTrainedTokenizerFast

            if path.is_file():
                return PreTrainedTokenizerFast(tokenizer_file=str(path), **kwargs)
            return PreTrainedTokenizerFast.from_pretrained(str(path), **kwargs)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path) if path.exists() else name_or_path, **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, ... with pages of text
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "folder" if path.exists() else "hub name (needs a network the first time)"
        raise FoundryError(f"cannot load tokenizer {name_or_path!r} ({where}): {first}") from None


def _generic_fast(folder: Path) -> bool:
    """Whether AutoTokenizer would pick the generic PreTrainedTokenizerFast for `folder`: a tokenizer.json
    whose tokenizer_config.json names that class, or names none with no model config.json beside it to
    choose a model's own class (LlamaTokenizerFast, GPT2TokenizerFast: they add their own behaviour)."""
    if not (folder / "tokenizer.json").is_file():
        return False
    config = folder / "tokenizer_config.json"
    try:
        named = (
            json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
            if config.is_file()
            else None
        )
    except (OSError, ValueError, AttributeError):
        return False  # let AutoTokenizer read it and say what is wrong
    if named is None:
        return not (folder / "config.json").is_file()
    return named == "PreTrainedTokenizerFast"


def run_tokenizer(cfg: TokenizerConfig):
    if not cfg.name:
        raise ConfigError("no tokenizer: set tokenizer.name to a folder or hub name", "tokenizer.name")
    return load_tokenizer(cfg.name, **cfg.kwargs)
