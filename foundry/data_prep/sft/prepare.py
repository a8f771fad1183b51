"""`prepare_sft()`: chat / prompt-response datasets -> tokenized SFT windows with loss masks, atomically.

  1. read every dataset; workers validate, render, tokenize and mask each record (encode.py); the
     accepted conversations wait on disk (store.py), the rejected ones are counted by reason
  2. per dataset, hold out a validation set and subsample the rest (select.py)
  3. pack the training conversations of all datasets together, and each dataset's validation
     conversations on their own (packing.py), into windows of seq_len with loss_mask and seq_ids
     columns (foundry/data/sft_format.py)

Output (built in DIR.tmp-*, renamed to DIR when complete):
  DIR/manifest.json             everything below, per dataset and in total
  DIR/tokenizer/                the tokenizer used (special tokens added), with its chat template
  DIR/train/                    MDS windows of every dataset's training conversations
  DIR/val/<dataset>/            MDS windows of one dataset's held-out conversations
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import time
import zlib
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from foundry.data.sft_format import COLUMNS, KIND, LOSS_MASK, PAD_SEQ_ID
from foundry.data_prep.mds import MDSWindowWriter
from foundry.data_prep.pipeline import PrepareResult, default_num_workers
from foundry.data_prep.sft.encode import ConversationEncoder, EncodedChats, EncoderConfig
from foundry.data_prep.sft.packing import iter_windows, one_per_window, pack_best_fit
from foundry.data_prep.sft.reading import DatasetReader
from foundry.data_prep.sft.records import SKIP_REASONS
from foundry.data_prep.sft.select import choose
from foundry.data_prep.sft.spec import DatasetSpec, SFTOptions, check_unique_names
from foundry.data_prep.sft.store import ConversationStore
from foundry.data_prep.sft.tokenizer import ChatTokenizer, load_chat_tokenizer, save_tokenizer
from foundry.data_prep.workers import OrderedPool, Progress
from foundry.data_prep.writer import (
    FORMAT,
    MANIFEST,
    SHARD_HASHES,
    AtomicOutput,
    fingerprint,
    read_manifest,
    write_json,
)
from foundry.errors import ConfigError, DataError

log = logging.getLogger("foundry.data_prep")

WORK = ".work"  # the conversation store, inside the temporary output folder


@dataclasses.dataclass
class _Tally:
    """One dataset's counts while reading."""

    records: int = 0
    truncated: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    assistant: list = dataclasses.field(default_factory=list)  # per conversation
    trained: list = dataclasses.field(default_factory=list)  # per conversation: mask sum

    def add(self, enc: EncodedChats) -> None:
        self.records += enc.records
        self.truncated += enc.truncated
        self.skipped.update(enc.skipped)
        self.assistant.append(enc.assistant_tokens)
        bounds = np.concatenate([[0], np.cumsum(enc.lengths)])
        sums = np.add.reduceat(enc.mask.astype(np.int64), bounds[:-1]) if len(enc.lengths) else np.zeros(0)
        self.trained.append(sums.astype(np.int64))


def _cat(arrays: list) -> np.ndarray:
    return np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)


def _token_stats(lengths: np.ndarray) -> dict[str, Any]:
    if not len(lengths):
        return {"total": 0, "min": 0, "max": 0, "mean": 0.0}
    return {
        "total": int(lengths.sum()),
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 1),
    }


def _args(specs, readers, tok: ChatTokenizer, opts: SFTOptions) -> dict[str, Any]:
    """Everything that determines the output bytes (not num_workers, not progress)."""
    return {
        "format": FORMAT,
        "kind": KIND,
        "datasets": [
            {**dataclasses.asdict(s), "source": r.description} for s, r in zip(specs, readers, strict=True)
        ],
        "tokenizer_fingerprint": tok.fingerprint,
        "seq_len": opts.seq_len,
        "template": opts.template,
        "mask": opts.mask.describe(),
        "too_long": opts.too_long,
        "pack": opts.pack,
        "seed": opts.seed,
        "compression": opts.compression,
    }


def _write_split(root: Path, split: str, items, store, opts: SFTOptions, tok: ChatTokenizer, common) -> dict:
    """Pack items ((dataset index, conversation index) pairs) into windows under root/split."""
    datasets, indices, lengths = items
    rng = np.random.default_rng([opts.seed, zlib.crc32(split.encode())])
    bins = pack_best_fit(lengths, opts.seq_len, rng) if opts.pack else one_per_window(len(lengths))
    compression = None if opts.compression == "none" else opts.compression
    writer = MDSWindowWriter(root / split, opts.seq_len, COLUMNS, compression, hashes=SHARD_HASHES)
    trained = 0

    def conversation(i: int):
        return store.conversation(int(datasets[i]), int(indices[i]))

    for block in iter_windows(bins, conversation, opts.seq_len, tok.pad_id, rng):
        writer.write_columns(block)
        trained += int(block[LOSS_MASK].sum(dtype=np.int64))
    writer.finish()
    windows = len(bins)
    real = int(lengths.sum())
    slots = windows * opts.seq_len
    manifest = {
        "format": FORMAT,
        "kind": KIND,
        "split": split,
        "documents": len(lengths),  # conversations
        "windows": windows,
        "window_len": opts.seq_len,
        "tokens": slots,  # what training counts: window slots, padding included
        "real_tokens": real,
        "trained_tokens": trained,
        "packing_efficiency": round(real / slots, 4) if slots else 0.0,
        "packed": opts.pack,
        **common,
    }
    write_json(root / split / MANIFEST, manifest)
    return manifest


def prepare_sft(specs: list[DatasetSpec], opts: SFTOptions) -> PrepareResult:
    """Prepare `specs` into opts.out (see the module docstring)."""
    start = time.perf_counter()
    opts.validate()
    if not specs:
        raise ConfigError("give at least one dataset (a file, folder or hub name)", "INPUTS")
    check_unique_names(specs)
    tok, hf = load_chat_tokenizer(opts.tokenizer, opts.template)
    readers = [DatasetReader(s) for s in specs]
    args = _args(specs, readers, tok, opts)
    args_fp = fingerprint(args)

    output = AtomicOutput(opts.out)
    state = output.existing_state(args_fp)
    if state == "same" and not opts.overwrite:
        return PrepareResult(output.out, "already_prepared", read_manifest(output.out) or {})
    if state in ("different", "foreign") and not opts.overwrite:
        why = (
            "was prepared with different arguments or input files"
            if state == "different"
            else "exists and is not a finished foundry dataset"
        )
        raise DataError(f"{output.out} {why}; pass --overwrite to replace it, or choose another --out")

    output.clean_stale()
    tmp = output.begin()
    store = ConversationStore(tmp / WORK, len(specs))
    tallies = [_Tally() for _ in specs]
    config = EncoderConfig(
        tokenizer=tok,
        template=opts.template,
        seq_len=opts.seq_len,
        mask=opts.mask,
        too_long=opts.too_long,
        shapes=tuple(s.record_shape for s in specs),
        min_assistant_tokens=tuple(s.min_assistant_tokens for s in specs),
    )
    num_workers = default_num_workers() if opts.num_workers is None else opts.num_workers
    progress = None
    try:
        items = ((d, chunk) for d, reader in enumerate(readers) for chunk in reader.chunks())
        with OrderedPool(functools.partial(ConversationEncoder, config), num_workers) as pool:
            totals = [r.total for r in readers]
            progress = Progress(opts.progress, None if None in totals else sum(totals), unit="conversations")
            for enc in pool.map(items):
                store.add(enc.dataset, enc.tokens, enc.mask, enc.lengths)
                tallies[enc.dataset].add(enc)
                progress.update(enc.nbytes, len(enc.lengths), len(enc.tokens))
        progress.close()
        store.seal()
        return _finish(specs, readers, tallies, store, tok, hf, output, args, args_fp, opts, start)
    except BaseException:
        if progress is not None:
            progress.close()
        store.close()
        output.abort()
        raise


def _finish(specs, readers, tallies, store, tok, hf, output, args, args_fp, opts, start) -> PrepareResult:
    tmp = output.tmp
    datasets: dict[str, dict] = {}
    train_parts = []
    val_parts = []
    for d, (spec, reader, tally) in enumerate(zip(specs, readers, tallies, strict=True)):
        lengths = store.lengths[d]
        trained = _cat(tally.trained)
        val_idx, train_idx = choose(
            len(lengths), spec.fraction, spec.val_split, spec.max_val_set, opts.seed, spec.name
        )
        train_parts.append((np.full(len(train_idx), d), train_idx, lengths[train_idx]))
        if len(val_idx):
            val_parts.append((spec.name, (np.full(len(val_idx), d), val_idx, lengths[val_idx])))
        skipped = tally.skipped + reader.skipped
        datasets[spec.name] = {
            "input": spec.input,
            "kind": spec.kind,
            "shape": spec.shape,
            "fraction": spec.fraction,
            "val_split": spec.val_split,
            "max_val_set": spec.max_val_set,
            "min_assistant_tokens": spec.min_assistant_tokens,
            "records": tally.records,
            "skipped": sum(skipped.values()),
            "skipped_by_reason": {r: int(skipped[r]) for r in SKIP_REASONS if skipped[r]},
            "accepted": len(lengths),
            "truncated": tally.truncated,
            "train": len(train_idx),
            "val": len(val_idx),
            "unused": len(lengths) - len(train_idx) - len(val_idx),
            "tokens_per_conversation": _token_stats(lengths),
            "assistant_tokens": int(_cat(tally.assistant).sum()),
            "train_tokens": int(lengths[train_idx].sum()),
            "train_trained_tokens": int(trained[train_idx].sum()),
            "val_tokens": int(lengths[val_idx].sum()),
            "source": reader.description,
        }
    train = tuple(np.concatenate([p[i] for p in train_parts]).astype(np.int64) for i in range(3))
    if not len(train[0]):
        skipped = sum((t.skipped for t in tallies), Counter())
        raise DataError(
            f"no conversation to train on: {sum(t.records for t in tallies)} records read, skipped by reason: "
            f"{dict(skipped) or 'none'}; see the reasons in `foundry data-prep sft --help`"
        )
    common = {
        "columns": {name: np.dtype(dtype).name for name, dtype in COLUMNS.items()},
        "pad_id": tok.pad_id,
        "pad_seq_id": PAD_SEQ_ID,
        "tokenizer": tok.manifest(),
        "args_fingerprint": args_fp,
    }
    splits = {"train": _write_split(tmp, "train", train, store, opts, tok, common)}
    for name, items in val_parts:
        splits[f"val/{name}"] = _write_split(tmp, f"val/{name}", items, store, opts, tok, common)
    store.close()
    shutil.rmtree(tmp / WORK)
    save_tokenizer(hf, tmp / "tokenizer")

    split_keys = (
        "split",
        "documents",
        "windows",
        "tokens",
        "real_tokens",
        "trained_tokens",
        "packing_efficiency",
    )
    all_lengths = np.concatenate(store.lengths)
    wall = time.perf_counter() - start
    summary = {
        "format": FORMAT,
        "kind": KIND,
        "splits": {name: {**{k: s[k] for k in split_keys}, "path": name} for name, s in splits.items()},
        "datasets": datasets,
        "total": {
            "records": sum(d["records"] for d in datasets.values()),
            "skipped": sum(d["skipped"] for d in datasets.values()),
            "accepted": int(len(all_lengths)),
            "truncated": sum(d["truncated"] for d in datasets.values()),
            "train": sum(d["train"] for d in datasets.values()),
            "val": sum(d["val"] for d in datasets.values()),
            "unused": sum(d["unused"] for d in datasets.values()),
            "tokens_per_conversation": _token_stats(all_lengths),
            "train_tokens": sum(d["train_tokens"] for d in datasets.values()),
            "train_trained_tokens": sum(d["train_trained_tokens"] for d in datasets.values()),
        },
        "window_len": opts.seq_len,
        "tokens": splits["train"]["tokens"],
        "packing": {
            "packed": opts.pack,
            "algorithm": "best-fit decreasing" if opts.pack else "one conversation per window",
            "efficiency": splits["train"]["packing_efficiency"],
        },
        "template": {
            "name": opts.template,
            "chat_template": tok.chat_template,
            "end_of_turn": tok.end_of_turn,
            "end_of_turn_id": tok.end_of_turn_id,
        },
        "mask": opts.mask.describe(),
        "too_long": opts.too_long,
        "seq_len": opts.seq_len,
        "seed": opts.seed,
        **common,
        "args": args,
        "wall_time_s": round(wall, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(tmp / MANIFEST, summary)
    output.commit()
    warnings = [
        f"dataset {name!r}: no conversation accepted ({d['records']} records read)"
        for name, d in datasets.items()
        if d["accepted"] == 0
    ]
    for w in warnings:
        log.warning(w)
    return PrepareResult(output.out, "prepared", summary, warnings)
