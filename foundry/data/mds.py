"""Reading token windows from MDS folders: ours (foundry-mds-v1) and llm-foundry's two layouts.

A prepared folder holds Streaming's ``index.json`` and shards with one column, ``tokens``: either
``ndarray:int32`` (ours, llm-foundry's current converters) or ``bytes`` holding raw int64 ids
(llm-foundry's older converters). Each sample is one fixed-length window of token ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from foundry.config.schema import StreamConfig
from foundry.errors import DataError

MANIFEST = "manifest.json"
INDEX = "index.json"
TOKENS_COLUMN = "tokens"


def stream_dir(stream: StreamConfig) -> Path | None:
    """The local folder that holds (or will cache) this stream's index.json, or None if only remote."""
    if not stream.local:
        return None
    return Path(stream.local) / (stream.split or "")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def read_manifest(stream: StreamConfig) -> dict[str, Any] | None:
    """foundry's manifest for this stream's folder, if it is on this machine.

    The manifest beside index.json describes that folder. A summary manifest one level up (the
    data-prep output folder) is used only when it describes this split by name.
    """
    folder = stream_dir(stream)
    if folder is None:
        return None
    manifest = _read_json(folder / MANIFEST)
    if manifest is not None or not stream.split:
        return manifest
    parent = _read_json(Path(stream.local) / MANIFEST)
    if parent is None:
        return None
    if isinstance(parent.get("splits"), dict) and isinstance(parent["splits"].get(stream.split), dict):
        return parent["splits"][stream.split]
    return parent if parent.get("split") == stream.split else None


def check_local_streams(streams: dict[str, StreamConfig], path: str) -> None:
    """Each local-only stream has its index.json where the config says (before Streaming sees it)."""
    for name, stream in streams.items():
        folder = stream_dir(stream)
        if stream.remote is None and folder is not None and not (folder / INDEX).is_file():
            raise DataError(
                f"{path}.{name}: no {INDEX} in {folder} and no remote to download it from; "
                "prepare the data there (foundry data-prep) or fix `local`/`split`"
            )


def read_index(folder: Path) -> dict[str, Any] | None:
    return _read_json(folder / INDEX)


def column_names(stream: StreamConfig) -> list[str] | None:
    """The MDS columns of the stream's local data (index.json), or None if it is not on this machine."""
    folder = stream_dir(stream)
    index = read_index(folder) if folder is not None else None
    shards = index.get("shards") if index is not None else None
    return list(shards[0].get("column_names") or []) if shards else None


def index_samples(index: dict[str, Any]) -> int:
    return sum(int(shard["samples"]) for shard in index.get("shards", []))


def tokens_of(sample: dict[str, Any], where: str = "dataset") -> np.ndarray:
    """The token ids of one decoded MDS sample, as a 1-D integer array (no copy when possible)."""
    try:
        value = sample[TOKENS_COLUMN]
    except KeyError:
        raise DataError(
            f"{where}: samples have no {TOKENS_COLUMN!r} column (columns: {', '.join(sample)}); "
            f"prepare it with `foundry data-prep` or llm-foundry's convert_dataset scripts"
        ) from None
    if isinstance(value, np.ndarray):
        return value.reshape(-1)
    if isinstance(value, bytes | bytearray | memoryview):
        # llm-foundry's older layout: the int64 ids' raw bytes.
        if len(value) % 8:
            raise DataError(
                f"{where}: a 'bytes' tokens sample of {len(value)} bytes is not a whole number of int64 ids"
            )
        return np.frombuffer(value, dtype=np.int64)
    raise DataError(f"{where}: unsupported {TOKENS_COLUMN!r} column type {type(value).__name__}")


def first_local_sample(folder: Path, index: dict[str, Any]) -> dict[str, Any] | None:
    """Decode the first sample of the first shard, if that shard is on this machine (plain or compressed:
    llm-foundry's converters write ``.zstd`` shards and no manifest)."""
    from streaming.base.format import reader_from_json

    shards = [s for s in index.get("shards", []) if int(s.get("samples", 0)) > 0]
    if not shards:
        return None
    reader = reader_from_json(str(folder), None, shards[0])
    raw_info, zip_info = reader.file_pairs[0]
    raw = folder / raw_info.basename
    if raw.is_file():
        return reader.get_item(0)
    if zip_info is None or not (folder / zip_info.basename).is_file() or not hasattr(reader, "decode_sample"):
        return None
    from streaming.base.compression import decompress

    try:
        data = decompress(shards[0]["compression"], (folder / zip_info.basename).read_bytes())
    except Exception as e:  # a damaged shard: say which, not a zstd traceback
        raise DataError(f"cannot decompress {folder / zip_info.basename}: {e}") from None
    # MDS shard layout: sample count (u32), then count + 1 offsets (u32) into the shard, then the samples.
    begin, end = np.frombuffer(data, dtype=np.uint32, count=2, offset=4)
    return reader.decode_sample(data[int(begin) : int(end)])


def _fixed_window_len(index: dict[str, Any]) -> int | None:
    """The window length when the index itself fixes it: a shaped ``ndarray:<dtype>:<len>`` tokens column."""
    for shard in index.get("shards", [])[:1]:
        names, encodings = shard.get("column_names", []), shard.get("column_encodings", [])
        if TOKENS_COLUMN in names:
            parts = str(encodings[names.index(TOKENS_COLUMN)]).split(":")
            if len(parts) == 3 and parts[0] == "ndarray" and parts[2]:
                return int(np.prod([int(d) for d in parts[2].split(",")]))
    return None


def local_window_len(stream: StreamConfig) -> int | None:
    """The stream's window length from its manifest or its first local sample; None if not on this machine."""
    manifest = read_manifest(stream)
    if manifest is not None and manifest.get("window_len"):
        return int(manifest["window_len"])
    folder = stream_dir(stream)
    index = read_index(folder) if folder is not None else None
    if index is None:
        return None
    fixed = _fixed_window_len(index)
    if fixed:
        return fixed
    sample = first_local_sample(folder, index)
    return None if sample is None else len(tokens_of(sample, str(folder)))


# --- checking shards before training ---------------------------------------------------------------------


def rebuild_hint(stream: StreamConfig) -> str:
    """How to make this stream's folder again: the data-prep command its summary manifest records."""
    folder = stream_dir(stream)
    summary = None
    for candidate in (Path(stream.local or ""), folder.parent if folder is not None else None):
        if candidate is not None:
            m = _read_json_quiet(candidate / MANIFEST)
            if m is not None and isinstance(m.get("args"), dict):
                summary, out = m, candidate
                break
    if summary is None:
        return "prepare it again (foundry data-prep ... --overwrite) or restore it from a good copy"
    args, source = summary["args"], (summary["args"].get("source") or [{}])[0]
    if "kind" not in source or "inputs" not in source:
        return f"prepare {out} again with the same `foundry data-prep` command and --overwrite"
    cmd = ["foundry data-prep", source["kind"], *source["inputs"], "--out", str(out)]
    cmd += ["--tokenizer", str((summary.get("tokenizer") or {}).get("path", "TOKENIZER"))]
    cmd += ["--seq-len", str(args.get("seq_len"))]
    cmd += [f"--glob '{g}'" for g in source.get("globs", [])]
    cmd += [f"--exclude '{e}'" for e in source.get("exclude", [])]
    for key, flag, default in (
        ("text_field", "--text-field", "text"),
        ("val_fraction", "--val-fraction", 0.0),
        ("seed", "--seed", 0),
        ("min_tokens", "--min-tokens", 1),
        ("max_tokens", "--max-tokens", None),
        ("long_min_tokens", "--long-min-tokens", None),
        ("compression", "--compression", "zstd"),
    ):
        if args.get(key, default) != default:
            cmd += [flag, str(args[key])]
    return "rebuild it with: " + " ".join([*cmd, "--overwrite"])


def _read_json_quiet(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def check_shards(stream: StreamConfig, where: str, validate_hash: str | None = None) -> None:
    """Every shard of a local stream that is on disk has the size index.json gives it (cheap: no reading),
    and with `validate_hash` also its hash (reads every shard). Missing shards are an error only when
    there is no remote to download them from."""
    folder = stream_dir(stream)
    index = read_index(folder) if folder is not None else None
    if index is None:
        return
    for shard in index.get("shards", []):
        files = [(shard.get("raw_data") or {}), (shard.get("zip_data") or {})]
        files = [f for f in files if f.get("basename")]
        present = [f for f in files if (folder / f["basename"]).is_file()]
        # Without a remote, Streaming needs a compressed shard's own file (it drops a lone decompressed copy).
        needed = files[-1:] if stream.remote is None else []
        if any(f not in present for f in needed):
            raise DataError(
                f"{where}: shard {folder / needed[0]['basename']} is missing; {rebuild_hint(stream)}"
            )
        for info in present:
            path = folder / info["basename"]
            size = path.stat().st_size
            if "bytes" in info and size != int(info["bytes"]):
                raise DataError(
                    f"{where}: shard {path} has {size:,} bytes, {folder / INDEX} says {int(info['bytes']):,} "
                    f"(truncated or overwritten); {rebuild_hint(stream)}"
                )
            if validate_hash is not None:
                _check_hash(path, info, validate_hash, where, stream)


def file_hash(algo: str, data: bytes) -> str:
    """The hex digest Streaming's `get_hash` gives (hashlib's algorithms, or xxhash's xxh*)."""
    if algo.startswith("xxh"):
        import xxhash

        return getattr(xxhash, algo)(data).hexdigest()
    return hashlib.new(algo, data).hexdigest()


def _check_hash(path: Path, info: dict[str, Any], algo: str, where: str, stream: StreamConfig) -> None:
    expected = (info.get("hashes") or {}).get(algo)
    if expected is None:
        raise DataError(
            f"{where}: {path.parent / INDEX} records no {algo} hash for {path.name} (prepared without "
            f"hashes); {rebuild_hint(stream)}, or unset data.validate_hash"
        )
    if file_hash(algo, path.read_bytes()) != expected:
        raise DataError(
            f"{where}: shard {path} does not match its {algo} hash (corrupted); {rebuild_hint(stream)}"
        )
