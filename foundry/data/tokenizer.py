"""The run's tokenizer: the one place a transformers tokenizer is loaded (training, convert, eval, generate).

Data preparation tokenizes with the Rust `tokenizers` library directly, for speed
(foundry/data_prep/tokenization.py); everything else goes through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from foundry.config.schema import TokenizerConfig, TrainConfig
from foundry.errors import ConfigError, FoundryError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(name_or_path: str, **kwargs: Any):
    """A transformers tokenizer from a local folder, or from a hub name (needs a network the first time)."""
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise FoundryError(f"{path} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else name_or_path, **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, ... with pages of text
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "folder" if path.exists() else "hub name (needs a network the first time)"
        raise FoundryError(f"cannot load tokenizer {name_or_path!r} ({where}): {first}") from None


def run_tokenizer(cfg: TokenizerConfig):
    if not cfg.name:
        raise ConfigError("no tokenizer: set tokenizer.name to a folder or hub name", "tokenizer.name")
    return load_tokenizer(cfg.name, **cfg.kwargs)


def resolve_vocab_size(cfg: TrainConfig) -> int:
    """The model's vocabulary: model.vocab_size if set, else the size of the run's tokenizer."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    if not cfg.tokenizer.name:
        raise ConfigError(
            "set model.vocab_size or tokenizer.name (the model's vocabulary comes from one of them)",
            "model.vocab_size",
        )
    return len(run_tokenizer(cfg.tokenizer))
