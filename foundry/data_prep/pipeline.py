"""`prepare()`: text / jsonl / parquet / HF datasets -> tokenized MDS windows, atomically, with a manifest.

The main process reads inputs into chunks and keeps up to a few chunks in flight per tokenizer
worker; results come back in input order, so the output is the same for any number of workers (the
concatenation of all documents, cut into windows) and only one tail per split is dropped. Workers
return token arrays rather than writing shards themselves: the main process then needs no merge
step, the windows do not depend on the number of workers, and writing (numpy buffers, zstd) costs
the main process little.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from foundry.data_prep.hf import HFSource, iter_hf_chunks
from foundry.data_prep.sources import (
    SKIP_REASONS,
    Chunk,
    discover_files,
    iter_file_chunks,
    iter_parquet_chunks,
)
from foundry.data_prep.tokenization import (
    DocumentEncoder,
    Encoded,
    EncodeOptions,
    TokenizerSpec,
    load_tokenizer_spec,
    text_ids,
)
from foundry.data_prep.workers import OrderedPool, Progress
from foundry.data_prep.writer import (
    FORMAT,
    MANIFEST,
    AtomicOutput,
    SplitWriter,
    fingerprint,
    histogram_labels,
    read_manifest,
    write_json,
)
from foundry.errors import ConfigError, DataError

log = logging.getLogger("foundry.data_prep")

COMPRESSIONS = ("zstd", "none")


@dataclass(frozen=True)
class FileSource:
    """Files, folders (walked recursively) or glob patterns. kind: text | jsonl | parquet."""

    inputs: tuple[str, ...]
    kind: str = "text"
    globs: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class PrepareOptions:
    out: Path
    tokenizer: str
    seq_len: int
    text_field: str = "text"
    val_fraction: float = 0.0
    num_workers: int | None = None  # None: one per CPU core; 0: tokenize in the main process
    compression: str = "zstd"
    long_min_tokens: int | None = None
    min_tokens: int = 1
    max_tokens: int | None = None
    overwrite: bool = False
    seed: int = 0
    progress: bool = True
    # llm-foundry's convert_dataset_* --bos_text/--eos_text: text tokenized and put before / after each
    # document. None: no BOS text, and the tokenizer's EOS after each document; "" for eos_text: nothing.
    bos_text: str | None = None
    eos_text: str | None = None


@dataclass
class PrepareResult:
    out: Path
    status: str  # "prepared" | "already_prepared"
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def default_num_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _validate(opts: PrepareOptions) -> None:
    if opts.seq_len < 1:
        raise ConfigError(f"--seq-len must be at least 1, got {opts.seq_len}")
    if not 0.0 <= opts.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    if opts.compression not in COMPRESSIONS:
        raise ConfigError(f"--compression must be one of {COMPRESSIONS}, got {opts.compression!r}")
    if opts.min_tokens < 0:
        raise ConfigError(f"--min-tokens must be >= 0, got {opts.min_tokens}")
    if opts.max_tokens is not None and opts.max_tokens < max(opts.min_tokens, 1):
        raise ConfigError(
            f"--max-tokens ({opts.max_tokens}) must be >= --min-tokens ({opts.min_tokens}) and >= 1"
        )
    if opts.long_min_tokens is not None and opts.long_min_tokens < 1:
        raise ConfigError(f"--long-min-tokens must be >= 1, got {opts.long_min_tokens}")
    if opts.num_workers is not None and opts.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {opts.num_workers}")


class _Plan:
    """A source resolved into: chunks to read, progress total, manifest description, fingerprint."""

    def __init__(self, source: FileSource | HFSource, text_field: str):
        self.skipped: Counter = Counter()
        if isinstance(source, FileSource):
            if source.kind not in ("text", "jsonl", "parquet"):
                raise ConfigError(f"unknown input kind {source.kind!r}: text, jsonl or parquet")
            files, self.skipped = discover_files(source.inputs, source.kind, source.globs, source.exclude)
            self.files = files
            self.total = sum(f.size for f in files)
            listing = "\n".join(f"{f.path}\t{f.size}" for f in files)
            self.description = [
                {
                    "kind": source.kind,
                    "inputs": [os.path.abspath(os.path.expanduser(i)) for i in source.inputs],
                    "globs": list(source.globs),
                    "exclude": list(source.exclude),
                    "files": len(files),
                    "bytes": self.total,
                    "files_digest": hashlib.sha256(listing.encode()).hexdigest(),
                }
            ]
            self._source = source
        else:
            self.files = []
            self.total = None
            self.description = [source.describe()]
            self._source = source
        self._text_field = text_field

    def chunks(self) -> Iterator[Chunk]:
        src = self._source
        if isinstance(src, HFSource):
            chunks, self.total = iter_hf_chunks(src, self._text_field)
            return chunks
        if src.kind == "parquet":
            return iter_parquet_chunks(self.files, self._text_field, self.skipped)
        return iter_file_chunks(self.files, src.kind, self.skipped)


def _select(enc: Encoded, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if mask.all():
        return enc.tokens, enc.lengths
    token_mask = np.repeat(mask, enc.lengths + enc.overhead)
    return enc.tokens[token_mask], enc.lengths[mask]


def split_names(opts: PrepareOptions) -> list[str]:
    names = ["baseline", "long"] if opts.long_min_tokens else ["train"]
    if opts.val_fraction > 0:
        names.append("val")
    return names


class _Router:
    """Sends each chunk's documents to the splits they belong to."""

    def __init__(self, root: Path, opts: PrepareOptions, writer=None):
        """writer(folder, split): a split's writer; default: MDS windows (SplitWriter)."""
        compression = None if opts.compression == "none" else opts.compression
        self.main = split_names(opts)[0]  # train, or baseline with a long split
        make = writer or (lambda folder, name: SplitWriter(folder, name, opts.seq_len, compression))
        self.writers = {n: make(root / n, n) for n in split_names(opts)}
        self.long_min = opts.long_min_tokens

    @property
    def every_document(self) -> list[SplitWriter]:
        """The splits that together hold each kept document once (`long` repeats part of `baseline`)."""
        return [w for n, w in self.writers.items() if n != "long"]

    @property
    def documents(self) -> int:
        return sum(w.documents for w in self.every_document)

    @property
    def doc_tokens(self) -> int:
        return sum(w.doc_tokens for w in self.every_document)

    def add(self, enc: Encoded) -> None:
        main = ~enc.is_val
        if self.long_min:
            self.writers["baseline"].add(*_select(enc, main))
            self.writers["long"].add(*_select(enc, main & (enc.lengths >= self.long_min)))
        else:
            self.writers["train"].add(*_select(enc, main))
        if "val" in self.writers and enc.is_val.any():
            self.writers["val"].add(*_select(enc, enc.is_val))


def _args(source_desc: list, spec: TokenizerSpec, opts: PrepareOptions) -> dict[str, Any]:
    """Everything that determines the output bytes (not num_workers: the output does not depend on it)."""
    return {
        "format": FORMAT,
        "source": source_desc,
        "tokenizer_fingerprint": spec.fingerprint,
        "seq_len": opts.seq_len,
        "text_field": opts.text_field,
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "min_tokens": opts.min_tokens,
        "max_tokens": opts.max_tokens,
        "long_min_tokens": opts.long_min_tokens,
        "compression": opts.compression,
        **({"bos_text": opts.bos_text} if opts.bos_text is not None else {}),
        **({"eos_text": opts.eos_text} if opts.eos_text is not None else {}),
    }


def prepare(source: FileSource | HFSource, opts: PrepareOptions) -> PrepareResult:
    """Tokenize `source` into MDS windows under opts.out (see the module docstring and DESIGN.md)."""
    start = time.perf_counter()
    _validate(opts)
    spec = load_tokenizer_spec(opts.tokenizer)
    plan = _Plan(source, opts.text_field)
    args = _args(plan.description, spec, opts)
    args_fp = fingerprint(args)

    output = AtomicOutput(opts.out)
    done = check_existing(output, args_fp, opts.overwrite)
    if done is not None:
        return done

    output.clean_stale()
    tmp = output.begin()
    router = _Router(tmp, opts)
    try:
        skipped = tokenize_into(router, plan, spec, opts)
        return _finish(router, output, spec, plan, skipped, args, args_fp, opts, start)
    except BaseException:
        output.abort()
        raise


def check_existing(output: AtomicOutput, args_fp: str, overwrite: bool) -> PrepareResult | None:
    """A finished output with these arguments (returned as already prepared), or nothing in the way;
    anything else in the way is refused unless overwrite."""
    state = output.existing_state(args_fp)
    if state == "same" and not overwrite:
        return PrepareResult(output.out, "already_prepared", read_manifest(output.out) or {})
    if state in ("different", "foreign") and not overwrite:
        why = (
            "was prepared with different arguments or input files"
            if state == "different"
            else "exists and is not a finished foundry dataset"
        )
        raise DataError(f"{output.out} {why}; pass --overwrite to replace it, or choose another --out")
    return None


def tokenize_into(router, plan, spec: TokenizerSpec, opts: PrepareOptions) -> Counter:
    """Every chunk of `plan`, tokenized in input order, into the router's split writers; the skip counts."""
    num_workers = default_num_workers() if opts.num_workers is None else opts.num_workers
    enc_opts = EncodeOptions(
        opts.text_field,
        opts.val_fraction,
        opts.seed,
        opts.min_tokens,
        opts.max_tokens,
        bos_ids=text_ids(spec, opts.bos_text) or (),
        eos_ids=text_ids(spec, opts.eos_text),
    )
    skipped = plan.skipped
    progress = None
    try:
        chunks = plan.chunks()
        with OrderedPool(functools.partial(DocumentEncoder, spec, enc_opts), num_workers) as pool:
            progress = Progress(opts.progress, plan.total)
            for enc in pool.map(chunks):
                skipped.update(enc.skipped)
                router.add(enc)
                progress.update(enc.nbytes, len(enc.lengths), len(enc.tokens))
    finally:
        if progress is not None:
            progress.close()
    return skipped


def _finish(router, output, spec, plan, skipped, args, args_fp, opts, start) -> PrepareResult:
    warnings: list[str] = []
    main_split = router.main
    main = router.writers[main_split]
    if main.windows == 0:
        raise DataError(
            f"no {main_split} window: {router.documents} documents gave {main.doc_tokens} tokens, fewer than "
            f"one --seq-len window of {opts.seq_len} (skipped: {dict(skipped) or 'none'}); "
            "use a smaller --seq-len or more data"
        )
    skipped_all = {reason: int(skipped.get(reason, 0)) for reason in SKIP_REASONS}
    skipped_all.update({k: int(v) for k, v in skipped.items() if k not in skipped_all})
    wall = time.perf_counter() - start
    common = {
        "tokenizer": spec.manifest(),
        "source": plan.description,
        "skipped": skipped_all,
        "args_fingerprint": args_fp,
        "wall_time_s": round(wall, 3),
    }
    splits = {}
    for name, writer in router.writers.items():
        manifest = writer.finish(common)
        splits[name] = {
            k: manifest[k] for k in ("split", "documents", "tokens", "windows", "window_len", "max_token_id")
        }
        splits[name]["path"] = name
        if writer.windows == 0:
            warnings.append(
                f"split {name!r} is empty: its {writer.documents} documents ({writer.doc_tokens} tokens) "
                f"fill no window of {opts.seq_len}"
            )
    histogram = sum((w.histogram for w in router.every_document), Counter())
    summary = {
        "format": FORMAT,
        "splits": splits,
        "documents": router.documents,
        "document_tokens": router.doc_tokens,
        "tokens": sum(s["tokens"] for n, s in splits.items() if n != "long"),
        "window_len": opts.seq_len,
        "max_token_id": max(w.max_token_id for w in router.writers.values()),
        "tokenizer": spec.manifest(),
        "source": plan.description,
        "skipped": skipped_all,
        "tokens_per_document_histogram": histogram_labels(histogram),
        "args": args,
        "args_fingerprint": args_fp,
        "wall_time_s": round(wall, 3),
        "tokens_per_s": round(router.doc_tokens / max(wall, 1e-9)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(output.tmp / MANIFEST, summary)
    output.commit()
    for w in warnings:
        log.warning(w)
    return PrepareResult(output.out, "prepared", summary, warnings)


def format_summary(result: PrepareResult) -> str:
    m = result.manifest
    if result.status == "already_prepared":
        return f"{result.out} is already prepared with these arguments (pass --overwrite to redo it)"
    lines = [
        f"prepared {result.out} in {m['wall_time_s']:.1f} s: {m['documents']:,} documents, "
        f"{m['document_tokens']:,} tokens ({m['tokens_per_s']:,} tokens/s)"
    ]
    for name, s in m["splits"].items():
        lines.append(
            f"  {name:<9} {s['documents']:>10,} docs {s['windows']:>10,} windows {s['tokens']:>14,} tokens"
        )
    bad = {k: v for k, v in m["skipped"].items() if v}
    lines.append("skipped: " + (", ".join(f"{k}={v:,}" for k, v in bad.items()) if bad else "nothing"))
    lines.extend(f"warning: {w}" for w in result.warnings)
    return "\n".join(lines)
