"""`foundry data-prep inspect`: prepared samples with the tokens that are learned visibly marked.

SFT folders hold windows of packed conversations (foundry/data/sft_format.py); each conversation is
shown on its own, its trained tokens (loss_mask = 1) in colour on a terminal, or between {+ and +}
when the output is not a terminal (a pipe, a file, a CI log). Pretraining folders (a `tokens` column
only) show each window whole, every token trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from foundry.data.sft_format import LOSS_MASK, SEQ_IDS, TOKENS
from foundry.data_prep.mds import count_samples, iter_samples
from foundry.errors import DataError

OPEN, CLOSE = "{+", "+}"


@dataclass
class Sample:
    window: int
    sequence: int  # the conversation's index in its window (0 for pretraining windows)
    ids: list[int]
    loss_mask: list[int]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def resolve_folder(root: Path, split: str | None) -> tuple[Path, str]:
    """The MDS folder to show: root/split, root itself, or the dataset's main split (train, baseline)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root} does not exist")
    if split:
        folder = root / split
        if not (folder / "index.json").is_file():
            raise DataError(
                f"{folder} holds no index.json; splits here: {', '.join(list_splits(root)) or 'none'}"
            )
        return folder, split
    if (root / "index.json").is_file():
        return root, root.name
    for name in ("train", "baseline", *list_splits(root)):
        if (root / name / "index.json").is_file():
            return root / name, name
    raise DataError(f"{root} holds no MDS folder (no index.json here or in a split folder below it)")


def list_splits(root: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(root)) for p in Path(root).rglob("index.json") if p.parent != root)


def load_tokenizer(folder: Path, root: Path, given: str | None):
    """--tokenizer; else the dataset's own saved tokenizer (SFT); else the one its manifest names."""
    from tokenizers import Tokenizer

    candidates: list[Path] = []
    if given:
        p = Path(given).expanduser()
        candidates = [p / "tokenizer.json" if p.is_dir() else p]
        if not candidates[0].is_file():
            raise DataError(f"--tokenizer {given}: no tokenizer.json there")
    else:
        root = root.resolve()
        for p in (folder.resolve(), *folder.resolve().parents):  # the SFT dataset's own tokenizer/
            candidates.append(p / "tokenizer" / "tokenizer.json")
            if p == root:
                break
        for p in (folder, root):
            manifest = _read_json(p / "manifest.json") or {}
            source = (manifest.get("tokenizer") or {}).get("path")
            if source and Path(source).is_absolute():
                candidates.append(Path(source) / "tokenizer.json")
    for path in candidates:
        if path.is_file():
            return Tokenizer.from_file(str(path))
    raise DataError(f"cannot find the tokenizer of {folder}; pass --tokenizer DIR")


def read_samples(folder: Path, n: int, skip: int = 0) -> tuple[list[Sample], bool]:
    """Up to n samples after skipping `skip`: conversations of SFT windows, or whole pretraining windows."""
    out: list[Sample] = []
    is_sft = None
    seen = 0
    for w, sample in enumerate(iter_samples(folder)):
        if TOKENS not in sample:
            raise DataError(f"{folder}: samples have no 'tokens' column (columns: {', '.join(sample)})")
        tokens = sample[TOKENS]
        if isinstance(tokens, bytes):  # llm-foundry's older layout: raw int64 ids
            tokens = np.frombuffer(tokens, np.int64)
        tokens = np.asarray(tokens).reshape(-1)
        is_sft = LOSS_MASK in sample and SEQ_IDS in sample
        if is_sft:
            mask, seq = np.asarray(sample[LOSS_MASK]), np.asarray(sample[SEQ_IDS])
            parts = [(int(s), np.flatnonzero(seq == s)) for s in np.unique(seq[seq >= 0])]
        else:
            mask = np.ones(len(tokens), np.uint8)
            parts = [(0, np.arange(len(tokens)))]
        for s, where in parts:
            if seen >= skip:
                out.append(Sample(w, s, tokens[where].tolist(), mask[where].astype(int).tolist()))
                if len(out) >= n:
                    return out, is_sft
            seen += 1
    return out, bool(is_sft)


def runs(ids: list[int], mask: list[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive tokens with the same mask value, in order."""
    out: list[tuple[bool, list[int]]] = []
    for t, m in zip(ids, mask, strict=True):
        if out and out[-1][0] == bool(m):
            out[-1][1].append(t)
        else:
            out.append((bool(m), [t]))
    return out


def as_json(folder: Path, split: str, samples: list[Sample], is_sft: bool, tokenizer) -> dict:
    return {
        "folder": str(folder),
        "split": split,
        "kind": "sft" if is_sft else "pretraining",
        "samples_in_folder": count_samples(folder),
        "samples": [
            {
                "window": s.window,
                "sequence": s.sequence,
                "ids": s.ids,
                "loss_mask": s.loss_mask,
                "text": tokenizer.decode(s.ids, skip_special_tokens=False),
                "trained": [
                    tokenizer.decode(r, skip_special_tokens=False) for m, r in runs(s.ids, s.loss_mask) if m
                ],
            }
            for s in samples
        ],
    }


def render(samples: list[Sample], is_sft: bool, tokenizer, color: bool, split: str):
    """Lines to print: rich Text objects when colour is on, plain strings with {+ +} markers otherwise."""
    from rich.text import Text

    legend = (
        "trained tokens in bold green, the rest dim"
        if color
        else f"trained tokens between {OPEN} and {CLOSE}"
    )
    yield f"{split}: {len(samples)} {'conversations' if is_sft else 'windows'} ({legend})"
    for s in samples:
        trained = sum(s.loss_mask)
        what = f"window {s.window}, conversation {s.sequence}" if is_sft else f"window {s.window}"
        yield f"--- {what}: {len(s.ids)} tokens, {trained} trained ---"
        if color:
            text = Text()
            for m, ids in runs(s.ids, s.loss_mask):
                text.append(
                    tokenizer.decode(ids, skip_special_tokens=False), style="bold green" if m else "dim"
                )
            yield text
        else:
            pieces = []
            for m, ids in runs(s.ids, s.loss_mask):
                piece = tokenizer.decode(ids, skip_special_tokens=False)
                pieces.append(f"{OPEN}{piece}{CLOSE}" if m else piece)
            yield "".join(pieces)
