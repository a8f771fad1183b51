"""Data preparation as an array of tasks plus one merge: the same dataset as one local run, made by many.

    plan_array()  (on the submitting machine) resolves the inputs into the file list a local run would
                  read, with the identities its val split hashes, cut into K contiguous slices of about
                  equal bytes (a map-style HF dataset: K row ranges), and writes WORK/plan.json.
    prepare_part(plan, i)  (array task i) tokenizes slice i into WORK/parts/part-0000i/: one raw token
                  stream per split (documents and their EOS, in input order, not yet cut into windows)
                  and the slice's counts.
    merge_parts(plan)  (the job that waits for all of them) cuts the concatenated streams into windows
                  with the local run's own writer and writes its manifest from the summed counts.

Why streams and not finished datasets per part: windows run across document and file boundaries, so
where slice i's windows start depends on how many tokens every earlier slice made. Parts cut on their
own would shift every window and drop one tail per part; cutting after the concatenation gives the
same windows, shards and manifest as the local command (only timings differ), and a later local run
of the same command finds the dataset already prepared. The merge writes the data once more; the
tokenizing, the expensive part, is what the array spreads.

The split is over the input list, so any verb whose inputs are files (or rows) can use it: a verb
opts in by listing itself in ARRAY_VERBS with how its options become a source.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foundry.data_prep.hf import HFSource, iter_hf_chunks, load_hf_dataset
from foundry.data_prep.pipeline import (
    FileSource,
    PrepareOptions,
    PrepareResult,
    _args,
    _finish,
    _Plan,
    _Router,
    _validate,
    check_existing,
    tokenize_into,
)
from foundry.data_prep.sources import InputFile, iter_file_chunks, iter_parquet_chunks
from foundry.data_prep.tokenization import load_tokenizer_spec
from foundry.data_prep.writer import AtomicOutput, fingerprint, length_histogram, write_json
from foundry.errors import ConfigError, DataError

log = logging.getLogger("foundry.data_prep")

PLAN = "plan.json"
PART = "part.json"
PLAN_FORMAT = "foundry-prep-plan-v1"
PART_FORMAT = "foundry-token-stream-v1"

# Verbs that can run as an array, and what splits: their input files, or the rows of a dataset.
ARRAY_VERBS = {"text": "files", "jsonl": "files", "parquet": "files", "hf": "rows"}


def options_from_params(params: dict[str, Any]) -> PrepareOptions:
    """A verb's parsed command-line options (names as in foundry.cli.data_prep) -> PrepareOptions."""
    names = {f.name for f in dataclasses.fields(PrepareOptions)}
    kwargs = {k: v for k, v in params.items() if k in names}
    kwargs["out"] = Path(kwargs["out"]).expanduser().absolute()
    return PrepareOptions(**kwargs)


def source_from_params(verb: str, params: dict[str, Any]) -> FileSource | HFSource:
    if ARRAY_VERBS.get(verb) == "files":
        return FileSource(
            tuple(params["inputs"]), verb, tuple(params.get("glob") or ()), tuple(params.get("exclude") or ())
        )
    if verb == "hf":
        keys = ("subset", "split", "streaming", "limit", "cache_dir")
        return HFSource(params["name"], **{k: params[k] for k in keys if k in params})
    raise ConfigError(
        f"`data-prep {verb}` cannot be split into array tasks yet (these can: {', '.join(ARRAY_VERBS)}); "
        "submit it with --tasks 1",
        "--tasks",
    )


@dataclass
class ArrayPlan:
    verb: str
    params: dict[str, Any]  # the verb's options, as parsed on the submitting machine
    work: str  # WORK: plan.json, parts/, the job scripts and logs
    description: list  # the whole source, as a local run describes it in its manifest
    slices: list  # per task: [[path, ident, size], ...] (files) or [start, stop] (rows)
    skipped: dict[str, int]  # what discovering the files skipped (counted once, by the merge)
    format: str = PLAN_FORMAT

    @property
    def tasks(self) -> int:
        return len(self.slices)

    @property
    def fingerprint(self) -> str:
        return fingerprint([self.verb, self.params, self.description, self.slices])

    def part_dir(self, index: int) -> Path:
        return Path(self.work) / "parts" / f"part-{index:05d}"

    def save(self) -> Path:
        path = Path(self.work) / PLAN
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, dataclasses.asdict(self))
        return path

    @classmethod
    def load(cls, path: Path) -> ArrayPlan:
        path = Path(path)
        if path.is_dir():
            path = path / PLAN
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the data-prep plan {path}: {e}") from None
        if data.get("format") != PLAN_FORMAT:
            raise DataError(f"{path} is not a foundry data-prep plan ({PLAN_FORMAT})")
        return cls(**data)


def work_dir_for(out: Path) -> Path:
    out = Path(out).expanduser().absolute()
    return out.with_name(out.name + ".slurm")


def _cut(sizes: list[int], tasks: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of about equal total size, none empty."""
    tasks = max(1, min(tasks, len(sizes)))
    total = sum(sizes)
    bounds, acc, k = [0], 0, 1
    for i, size in enumerate(sizes):
        acc += size
        left_items, left_tasks = len(sizes) - (i + 1), tasks - k
        if k < tasks and (acc >= total * k / tasks or left_items == left_tasks):
            bounds.append(i + 1)
            k += 1
    bounds.append(len(sizes))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def plan_array(verb: str, params: dict[str, Any], tasks: int) -> ArrayPlan:
    """Check everything a local run would check first, then cut the input into `tasks` slices."""
    if tasks < 1:
        raise ConfigError(f"must be >= 1, got {tasks}", "--tasks")
    source = source_from_params(verb, params)
    opts = options_from_params(params)
    _validate(opts)
    spec = load_tokenizer_spec(opts.tokenizer)
    work = work_dir_for(opts.out)
    if isinstance(source, FileSource):
        plan = _Plan(source, opts.text_field)
        ranges = _cut([max(f.size, 1) for f in plan.files], tasks)
        slices = [[[str(f.path), f.ident, f.size] for f in plan.files[a:b]] for a, b in ranges]
        description, skipped = plan.description, dict(plan.skipped)
    else:
        if source.streaming:
            raise ConfigError(
                "--streaming reads rows in one pass and cannot be cut into row ranges; drop it (the "
                "dataset is then downloaded once, into --cache-dir, which every task must see)",
                "--streaming",
            )
        rows = len(load_hf_dataset(source))
        if source.limit is not None:
            rows = min(rows, source.limit)
        if rows == 0:
            raise DataError(f"dataset {source.name!r} has no rows")
        tasks = min(tasks, rows)
        slices = [[rows * i // tasks, rows * (i + 1) // tasks] for i in range(tasks)]
        description, skipped = [source.describe()], {}
    if len(slices) < tasks:
        log.warning("only %d input files: %d tasks instead of %d", len(slices), len(slices), tasks)
    # The output would be refused (or is already there) at the merge: say so before anything is queued.
    args_fp = fingerprint(_args(description, spec, opts))
    if check_existing(AtomicOutput(opts.out), args_fp, opts.overwrite) is not None:
        raise DataError(f"{opts.out} is already prepared with these arguments (pass --overwrite to redo it)")
    params = dict(params, out=str(opts.out))
    return ArrayPlan(verb, _jsonable(params), str(work), description, slices, skipped)


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(params, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


# --- one task ----------------------------------------------------------------------------------


class _StreamWriter:
    """A split's documents (with their EOS) appended to one raw token file, with the split's counts."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.split, self.dtype = folder, split, np.dtype(dtype)
        self._file = open(folder / "tokens.bin", "wb")
        self.documents = 0
        self.doc_tokens = 0
        self.histogram: Counter = Counter()

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if len(lengths) == 0:
            return
        self.documents += len(lengths)
        self.doc_tokens += len(tokens)
        self.histogram.update(length_histogram(lengths))
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())

    def finish(self) -> dict[str, Any]:
        self._file.close()
        return {
            "documents": self.documents,
            "doc_tokens": self.doc_tokens,
            "histogram": {str(k): int(v) for k, v in self.histogram.items()},
        }


class _SlicePlan:
    """The pipeline's plan (chunks, progress total, skip counts) for one slice of an ArrayPlan."""

    def __init__(self, plan: ArrayPlan, index: int, opts: PrepareOptions):
        self.skipped: Counter = Counter()
        self._plan, self._index, self._opts = plan, index, opts
        piece = plan.slices[index]
        if ARRAY_VERBS[plan.verb] == "files":
            self.files = [InputFile(Path(p), ident, size) for p, ident, size in piece]
            self.total = sum(f.size for f in self.files)
        else:
            self.files, self.total = [], piece[1] - piece[0]

    def chunks(self):
        verb = self._plan.verb
        if verb == "parquet":
            return iter_parquet_chunks(self.files, self._opts.text_field, self.skipped)
        if ARRAY_VERBS[verb] == "files":
            return iter_file_chunks(self.files, verb, self.skipped)
        source = source_from_params(verb, self._plan.params)
        chunks, _ = iter_hf_chunks(source, self._opts.text_field, rows=tuple(self._plan.slices[self._index]))
        return chunks


def _part_done(folder: Path, plan_fp: str) -> bool:
    try:
        info = json.loads((folder / PART).read_text())
    except (OSError, ValueError):
        return False
    return info.get("format") == PART_FORMAT and info.get("plan_fingerprint") == plan_fp


def prepare_part(plan: ArrayPlan, index: int, num_workers: int | None = None) -> Path:
    """Tokenize slice `index` into its part folder (whole or not at all); a finished part is kept."""
    if not 0 <= index < plan.tasks:
        raise ConfigError(f"task index {index} is outside 0..{plan.tasks - 1}", "--index")
    final = plan.part_dir(index)
    if _part_done(final, plan.fingerprint):
        log.info("part %d is already prepared: %s", index, final)
        return final
    start = time.perf_counter()
    opts = options_from_params(plan.params)
    if num_workers is not None:
        opts = dataclasses.replace(opts, num_workers=num_workers)
    spec = load_tokenizer_spec(opts.tokenizer)
    dtype = np.uint16 if spec.vocab_size <= 1 << 16 else np.int32
    output = AtomicOutput(final)
    output.clean_stale()
    tmp = output.begin()
    try:
        router = _Router(tmp, opts, writer=lambda folder, name: _StreamWriter(folder, name, dtype))
        slice_plan = _SlicePlan(plan, index, opts)
        skipped = tokenize_into(router, slice_plan, spec, opts)
        splits = {name: w.finish() for name, w in router.writers.items()}
        info = {
            "format": PART_FORMAT,
            "plan_fingerprint": plan.fingerprint,
            "index": index,
            "dtype": np.dtype(dtype).name,
            "splits": splits,
            "skipped": {k: int(v) for k, v in skipped.items()},
            "wall_time_s": round(time.perf_counter() - start, 3),
        }
        write_json(tmp / PART, info)
        output.commit()
    except BaseException:
        output.abort()
        raise
    docs = sum(s["documents"] for n, s in splits.items() if n != "long")
    toks = sum(s["doc_tokens"] for n, s in splits.items() if n != "long")
    log.info("part %d/%d: %s documents, %s tokens in %.1f s -> %s", index + 1, plan.tasks, f"{docs:,}",
             f"{toks:,}", info["wall_time_s"], final)  # fmt: skip
    return final


# --- the merge ---------------------------------------------------------------------------------

_MERGE_CHUNK = 1 << 24  # tokens read from a part's stream at a time


class _WholePlan:
    description: list

    def __init__(self, description: list):
        self.description = description


def merge_parts(plan: ArrayPlan, keep_parts: bool = False) -> PrepareResult:
    """All parts -> the dataset a local run writes: same windows, shards and manifest (timings aside)."""
    start = time.perf_counter()
    missing = [i for i in range(plan.tasks) if not _part_done(plan.part_dir(i), plan.fingerprint)]
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DataError(
            f"{len(missing)} of {plan.tasks} parts are missing or unfinished (tasks {shown}) under "
            f"{Path(plan.work) / 'parts'}; rerun those tasks (`foundry data-prep part {plan.work} --index N`)"
        )
    opts = options_from_params(plan.params)
    spec = load_tokenizer_spec(opts.tokenizer)
    args = _args(plan.description, spec, opts)
    args_fp = fingerprint(args)
    output = AtomicOutput(opts.out)
    done = check_existing(output, args_fp, opts.overwrite)
    if done is not None:
        return done
    output.clean_stale()
    tmp = output.begin()
    try:
        router = _Router(tmp, opts)
        skipped: Counter = Counter(plan.skipped)
        for i in range(plan.tasks):
            folder = plan.part_dir(i)
            info = json.loads((folder / PART).read_text())
            skipped.update(info["skipped"])
            for name, writer in router.writers.items():
                counts = info["splits"][name]
                writer.documents += counts["documents"]
                writer.doc_tokens += counts["doc_tokens"]
                writer.histogram.update({int(k): v for k, v in counts["histogram"].items()})
                _feed(writer, folder / name / "tokens.bin", np.dtype(info["dtype"]), counts["doc_tokens"])
        result = _finish(
            router, output, spec, _WholePlan(plan.description), skipped, args, args_fp, opts, start
        )
    except BaseException:
        output.abort()
        raise
    if not keep_parts:
        shutil.rmtree(Path(plan.work) / "parts", ignore_errors=True)
    return result


def _feed(writer, path: Path, dtype: np.dtype, expected: int) -> None:
    size = os.path.getsize(path)
    if size != expected * dtype.itemsize:
        raise DataError(f"{path} holds {size} bytes, expected {expected * dtype.itemsize}; rerun its task")
    if expected == 0:
        return
    stream = np.memmap(path, dtype=dtype, mode="r")
    for at in range(0, len(stream), _MERGE_CHUNK):
        chunk = np.asarray(stream[at : at + _MERGE_CHUNK], dtype=np.int32)
        writer.max_token_id = max(writer.max_token_id, int(chunk.max()))  # preflight's vocabulary check
        writer.add_tokens(chunk)
