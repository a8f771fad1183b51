"""Finding input files and reading them into chunks of raw documents, with bad-input accounting.

The main process reads (it is cheap: disk and decompression run at hundreds of MB/s) and hands
chunks of raw bytes or strings to the tokenizer workers, which decode, parse and tokenize (the
expensive part). A chunk carries the identity of its documents (path + index) so that the val split
can be assigned by a hash that does not depend on how the input was chunked or how many workers ran.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import gzip
import io
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from foundry.errors import DataError

log = logging.getLogger("foundry.data_prep")

SKIP_REASONS = (
    "invalid_utf8",
    "binary",
    "empty",
    "bad_json",
    "missing_field",
    "too_short",
    "too_long",
    "unreadable",
)

COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
JSON_SUFFIXES = (".jsonl", ".json")
TEXT_LIKE_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org") + JSON_SUFFIXES
PARQUET_SUFFIXES = (".parquet",)

# Which files a folder walk picks up when no --glob is given, per input kind.
DEFAULT_SUFFIXES = {"text": TEXT_LIKE_SUFFIXES, "jsonl": JSON_SUFFIXES, "parquet": PARQUET_SUFFIXES}

# A chunk this big takes a single-threaded worker ~0.1-0.3 s: small enough that the last chunks
# balance across workers, big enough that inter-process traffic is noise.
CHUNK_BYTES = 1 << 19
CHUNK_MAX_DOCS = 1024


@dataclass(frozen=True)
class InputFile:
    path: Path  # absolute
    ident: str  # identity for the val-split hash: "<folder name>/<path in folder>", or the path as given
    size: int


# Chunks: plain picklable records sent to tokenizer workers.
@dataclass
class TextFiles:
    """Whole files, one document each."""

    items: list[tuple[str, bytes]]  # (identity, raw bytes)
    nbytes: int


@dataclass
class JsonLines:
    """A block of complete JSON lines from one file; line numbers start at first_line."""

    ident: str
    first_line: int
    data: bytes
    nbytes: int


@dataclass
class JsonArray:
    """A .json file holding one JSON array of records."""

    ident: str
    data: bytes
    nbytes: int


@dataclass
class Texts:
    """Already-extracted values of the text column (parquet, HF datasets); None = field missing."""

    ident: str
    first_index: int
    texts: list
    nbytes: int


Chunk = TextFiles | JsonLines | JsonArray | Texts


def strip_compression(name: str) -> str:
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def has_suffix(name: str, suffixes: Sequence[str]) -> bool:
    return strip_compression(name.lower()).endswith(tuple(suffixes))


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _walk(root: Path, globs: Sequence[str], exclude: Sequence[str], suffixes, skipped: Counter):
    """Files under root, sorted by relative path; hidden folders and excluded folders are pruned."""

    def on_error(err: OSError) -> None:
        log.warning("cannot read %s: %s", err.filename, err.strerror)
        skipped["unreadable"] += 1

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        dirnames[:] = [
            d
            for d in dirnames
            if not d.startswith(".") and not (exclude and _matches(rel_dir + d + "/", exclude))
        ]
        for name in filenames:
            rel = rel_dir + name
            if exclude and _matches(rel, exclude):
                continue
            if globs:
                if not _matches(rel, globs):
                    continue
            elif not has_suffix(name, suffixes):
                continue
            found.append((rel, Path(dirpath) / name))
    found.sort()
    # The folder's own name keeps identities apart when two input folders hold the same relative paths.
    prefix = root.resolve().name + "/"
    return [(path, prefix + rel) for rel, path in found]


def discover_files(
    inputs: Sequence[str | os.PathLike],
    kind: str,
    globs: Sequence[str] = (),
    exclude: Sequence[str] = (),
    max_files: int | None = None,
) -> tuple[list[InputFile], Counter]:
    """Resolve INPUTS (files, folders walked recursively, or glob patterns) into a sorted, de-duplicated
    file list. A missing input is a user error (a typo), not bad data, so it raises."""
    if not inputs:
        raise DataError("no inputs given: pass files, folders or glob patterns")
    suffixes = DEFAULT_SUFFIXES[kind]
    skipped: Counter = Counter()
    found: list[tuple[Path, str]] = []
    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text).expanduser()
        if path.is_dir():
            found.extend(_walk(path, globs, exclude, suffixes, skipped))
        elif path.exists():
            found.append((path, os.path.normpath(text)))
        elif any(c in text for c in "*?["):
            matches = sorted(globlib.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise DataError(f"the pattern {text!r} matches no files")
            for m in matches:
                if os.path.isdir(m):
                    found.extend(_walk(Path(m), globs, exclude, suffixes, skipped))
                elif not (exclude and _matches(m.replace(os.sep, "/"), exclude)):
                    found.append((Path(m), os.path.normpath(m)))
        else:
            raise DataError(
                f"input {text!r} does not exist (pass a file, a folder, or a quoted glob pattern)"
            )

    files: list[InputFile] = []
    seen: set[Path] = set()
    for path, ident in found:
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        try:
            size = resolved.stat().st_size
        except OSError as e:
            log.warning("cannot read %s: %s", path, e.strerror)
            skipped["unreadable"] += 1
            continue
        files.append(InputFile(resolved, ident, size))
        if max_files is not None and len(files) >= max_files:
            break
    if not files:
        where = ", ".join(os.fspath(i) for i in inputs)
        hint = f"--glob {list(globs)}" if globs else f"the default filter ({', '.join(suffixes)})"
        raise DataError(f"no input files found in {where} with {hint}; pass --glob to choose files")
    return files, skipped


def open_binary(path: Path):
    """Open a file for reading bytes, decompressing .gz / .zst transparently."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _read_all(path: Path) -> bytes:
    with open_binary(path) as f:
        return f.read()


def _json_lines_blocks(f, ident: str) -> Iterator[JsonLines]:
    """Blocks of about CHUNK_BYTES cut at line ends, so no JSON line straddles two chunks."""
    line = 0
    carry = b""
    while True:
        block = f.read(CHUNK_BYTES)
        if not block:
            break
        data = carry + block
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            carry = data
            continue
        carry = data[cut:]
        yield JsonLines(ident, line, data[:cut], cut)
        line += data.count(b"\n", 0, cut)
    if carry:
        yield JsonLines(ident, line, carry, len(carry))


def _is_json_array(path: Path) -> bool:
    with open_binary(path) as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")  # a UTF-8 BOM, then whitespace
    return head[:1] == b"["


def iter_file_chunks(files: Sequence[InputFile], kind: str, skipped: Counter) -> Iterator[Chunk]:
    """Chunks of documents from files, in file order. Files that cannot be read or are empty are
    counted in `skipped` here; everything else is judged by the workers."""
    batch: list[tuple[str, bytes]] = []
    batch_bytes = 0
    for file in files:
        as_json = kind == "jsonl" or (kind == "text" and has_suffix(file.path.name, JSON_SUFFIXES))
        try:
            if as_json:
                if batch:
                    yield TextFiles(batch, batch_bytes)
                    batch, batch_bytes = [], 0
                yield from _json_file_chunks(file, skipped)
                continue
            data = _read_all(file.path)
        except (OSError, EOFError) as e:
            log.warning("cannot read %s: %s", file.path, e)
            skipped["unreadable"] += 1
            continue
        if not data or data.isspace():
            skipped["empty"] += 1
            continue
        batch.append((file.ident, data))
        batch_bytes += file.size
        if batch_bytes >= CHUNK_BYTES or len(batch) >= CHUNK_MAX_DOCS:
            yield TextFiles(batch, batch_bytes)
            batch, batch_bytes = [], 0
    if batch:
        yield TextFiles(batch, batch_bytes)


def _json_file_chunks(file: InputFile, skipped: Counter) -> Iterator[Chunk]:
    if file.size == 0:
        skipped["empty"] += 1
        return
    if strip_compression(file.path.name.lower()).endswith(".json") and _is_json_array(file.path):
        yield JsonArray(file.ident, _read_all(file.path), file.size)
        return
    with open_binary(file.path) as f:
        compressed = file.path.name.lower().endswith(COMPRESSED_SUFFIXES)
        emitted = 0
        for chunk in _json_lines_blocks(f, file.ident):
            if compressed:
                # Progress is measured in on-disk bytes; spread the compressed size over the blocks.
                chunk.nbytes = min(chunk.nbytes, max(0, file.size - emitted))
                emitted += chunk.nbytes
            yield chunk


def iter_parquet_chunks(files: Sequence[InputFile], text_field: str, skipped: Counter) -> Iterator[Texts]:
    """Chunks of the text column of parquet files, read in record batches with pyarrow."""
    import pyarrow.parquet as pq

    for file in files:
        try:
            pf = pq.ParquetFile(file.path)
        except Exception as e:  # pyarrow raises several types for a corrupt footer
            log.warning("cannot read parquet %s: %s", file.path, e)
            skipped["unreadable"] += 1
            continue
        if pf.metadata.num_rows == 0:
            skipped["empty"] += 1
            continue
        if text_field not in pf.schema_arrow.names:
            log.warning(
                "%s has no column %r (columns: %s); its %d rows are skipped",
                file.path,
                text_field,
                pf.schema_arrow.names,
                pf.metadata.num_rows,
            )
            skipped["missing_field"] += pf.metadata.num_rows
            continue
        row = 0
        per_row = file.size / max(1, pf.metadata.num_rows)
        texts: list = []
        text_bytes = 0
        try:
            for batch in pf.iter_batches(batch_size=256, columns=[text_field]):
                values = batch.column(0).to_pylist()
                texts.extend(values)
                text_bytes += sum(len(v) for v in values if v is not None)
                if text_bytes >= CHUNK_BYTES or len(texts) >= CHUNK_MAX_DOCS:
                    yield Texts(file.ident, row, texts, int(per_row * len(texts)))
                    row += len(texts)
                    texts, text_bytes = [], 0
        except Exception as e:
            log.warning("cannot read parquet %s after row %d: %s", file.path, row + len(texts), e)
            skipped["unreadable"] += 1
        if texts:
            yield Texts(file.ident, row, texts, int(per_row * len(texts)))
