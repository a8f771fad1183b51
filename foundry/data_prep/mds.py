"""MDS shards of fixed-length windows: writing them byte for byte as `streaming.MDSWriter` does, and
reading them back without Streaming (for `foundry data-prep inspect`).

Why not MDSWriter itself: `import streaming` imports torch and transformers, ~4.5 CPU-seconds; on a
2-core machine that is a third of the time to tokenize the whole CPython stdlib. And since every
window has the same length, a shard is one numpy buffer instead of one Python call per sample.

The layout (streaming's MDS version 2; every column a dynamic-shape 1-D ndarray of a fixed dtype,
columns in sorted name order, as MDSWriter sorts them):
  shard  = u32 num_samples | u32 offsets[num_samples + 1] | config JSON | samples
  sample = u32 size per column | per column: u8 (ndim << 2 | shape dtype code) | shape | values
  index.json = {"shards": [config + {"samples", "raw_data", "zip_data"}], "version": 2}
Pretraining data has one column, `tokens` (ndarray:int32), which is what llm-foundry's converters
write; SFT data adds `loss_mask` and `seq_ids` (see foundry/data/sft_format.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from foundry.data.mds import file_hash
from foundry.errors import DataError

COLUMN = "tokens"
ENCODING = "ndarray:int32"
SIZE_LIMIT = 1 << 26  # MDSWriter's default shard size limit (uncompressed bytes)
_SHAPE_DTYPES = ((1 << 8, np.uint8, 0), (1 << 16, np.uint16, 1), (1 << 32, np.uint32, 2))
_SHAPE_CODES = {0: np.uint8, 1: np.uint16, 2: np.uint32, 3: np.uint64}
# Streaming's ndarray value dtype codes (for arrays whose dtype is stored per sample).
_VALUE_CODES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
                34: "float32", 64: "uint64", 65: "int64", 66: "float64"}  # fmt: skip
_SCALARS = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
            "float16", "float32", "float64")  # fmt: skip


def _compress(name: str, data: bytes) -> bytes:
    if name == "zstd":
        try:
            import zstd  # streaming's own zstd binding, so the bytes match MDSWriter's
        except ImportError:  # any zstd frame decodes the same; only the bytes differ
            import zstandard

            return zstandard.ZstdCompressor(level=3).compress(data)
        return zstd.compress(data, 3)
    raise ValueError(f"unsupported compression {name!r}")


def _column_header(window_len: int) -> bytes:
    for bound, dtype, code in _SHAPE_DTYPES:
        if window_len < bound:
            return bytes([(1 << 2) | code]) + np.array([window_len], dtype).tobytes()
    raise ValueError(f"window of {window_len} tokens is too long for one MDS sample")


class MDSWindowWriter:
    """Appends windows (one [n, window_len] array per column) to shards in `folder`; finish() writes
    index.json. `columns` maps column names to numpy dtypes."""

    def __init__(
        self,
        folder: Path,
        window_len: int,
        columns: Mapping[str, Any],
        compression: str | None = None,
        size_limit: int = SIZE_LIMIT,
        hashes: tuple[str, ...] = (),
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.compression = compression
        self.columns = {name: np.dtype(columns[name]) for name in sorted(columns)}
        self.config = {
            "column_encodings": [f"ndarray:{dtype.name}" for dtype in self.columns.values()],
            "column_names": list(self.columns),
            "column_sizes": [None] * len(self.columns),
            "compression": compression,
            "format": "mds",
            "hashes": sorted(hashes),  # Streaming's order; it checks files against these on download
            "size_limit": size_limit,
            "version": 2,
        }
        self._config_bytes = json.dumps(self.config, sort_keys=True).encode("utf-8")
        header = _column_header(window_len)
        sizes = [len(header) + dtype.itemsize * window_len for dtype in self.columns.values()]
        self._head = np.frombuffer(np.array(sizes, np.uint32).tobytes(), np.uint8)
        self._header = np.frombuffer(header, np.uint8)
        self.window_len = window_len
        self.sample_bytes = len(self._head) + sum(sizes)
        # MDSWriter starts a new shard when the next sample would pass size_limit, counting 4 bytes of
        # offset per sample and 8 + len(config) per shard.
        room = size_limit - (8 + len(self._config_bytes))
        self.samples_per_shard = max(1, room // (self.sample_bytes + 4))
        self.shards: list[dict] = []
        self._pending: dict[str, list[np.ndarray]] = {name: [] for name in self.columns}
        self._pending_rows = 0

    def write_columns(self, arrays: Mapping[str, np.ndarray]) -> None:
        """arrays: one [n, window_len] array per column, of the column's dtype."""
        if set(arrays) != set(self.columns):
            raise ValueError(f"expected columns {sorted(self.columns)}, got {sorted(arrays)}")
        n = None
        for name, dtype in self.columns.items():
            a = arrays[name]
            if (
                a.ndim != 2
                or a.shape[1] != self.window_len
                or a.dtype != dtype
                or (n is not None and len(a) != n)
            ):
                raise ValueError(
                    f"column {name!r}: expected {dtype} windows of shape [n, {self.window_len}], "
                    f"got {a.dtype} {a.shape}"
                )
            n = len(a)
        done = 0
        while done < n:
            take = min(n - done, self.samples_per_shard - self._pending_rows)
            for name in self.columns:
                self._pending[name].append(arrays[name][done : done + take])
            self._pending_rows += take
            done += take
            if self._pending_rows == self.samples_per_shard:
                self._flush()

    def _flush(self) -> None:
        n = self._pending_rows
        offsets = np.arange(n + 1, dtype=np.int64) * self.sample_bytes
        offsets += 4 + 4 * (n + 1) + len(self._config_bytes)
        samples = np.empty((n, self.sample_bytes), np.uint8)
        samples[:, : len(self._head)] = self._head
        at = len(self._head)
        for name, dtype in self.columns.items():
            parts = self._pending[name]
            rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
            samples[:, at : at + len(self._header)] = self._header
            at += len(self._header)
            width = dtype.itemsize * self.window_len
            samples[:, at : at + width] = np.ascontiguousarray(rows).view(np.uint8).reshape(n, -1)
            at += width
        raw = b"".join(
            (
                np.uint32(n).tobytes(),
                offsets.astype(np.uint32).tobytes(),
                self._config_bytes,
                samples.tobytes(),
            )
        )
        raw_name = f"shard.{len(self.shards):05}.mds"
        algos = self.config["hashes"]
        raw_info = {"basename": raw_name, "bytes": len(raw), "hashes": {a: file_hash(a, raw) for a in algos}}
        zip_info = None
        data, name = raw, raw_name
        if self.compression:
            data = _compress(self.compression, raw)
            name = f"{raw_name}.{self.compression}"
            zip_info = {
                "basename": name,
                "bytes": len(data),
                "hashes": {a: file_hash(a, data) for a in algos},
            }
        with open(self.folder / name, "wb") as f:
            f.write(data)
        self.shards.append({"samples": n, "raw_data": raw_info, "zip_data": zip_info, **self.config})
        self._pending = {name: [] for name in self.columns}
        self._pending_rows = 0

    def finish(self) -> None:
        if self._pending_rows:
            self._flush()
        tmp = self.folder / "index.json.tmp"
        with open(tmp, "w") as f:
            json.dump({"version": 2, "shards": self.shards}, f, sort_keys=True)
        os.replace(tmp, self.folder / "index.json")


class MDSTokenWriter(MDSWindowWriter):
    """Pretraining windows: the one column `tokens` (ndarray:int32), as llm-foundry's converters write."""

    def __init__(
        self,
        folder: Path,
        window_len: int,
        compression: str | None = None,
        size_limit: int = SIZE_LIMIT,
        hashes: tuple[str, ...] = (),
    ):
        super().__init__(folder, window_len, {COLUMN: np.int32}, compression, size_limit, hashes)

    def write(self, windows: np.ndarray) -> None:
        """windows: int32 array [n, window_len]."""
        self.write_columns({COLUMN: windows})


# --- reading ---------------------------------------------------------------------------------------


def _decompress(name: str, data: bytes, where: Path) -> bytes:
    algo = name.split(":")[0]
    if algo == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if algo == "gz":
        import gzip

        return gzip.decompress(data)
    if algo == "bz2":
        import bz2

        return bz2.decompress(data)
    raise DataError(f"{where}: shards compressed with {name!r} cannot be read here (zstd, gz or bz2 only)")


def _decode(encoding: str, data: memoryview) -> Any:
    parts = encoding.split(":")
    if parts[0] == "ndarray":
        at = 0
        if len(parts) > 1:
            dtype = np.dtype(parts[1])
        else:
            dtype = np.dtype(_VALUE_CODES[data[0]])
            at = 1
        if len(parts) > 2:
            shape = tuple(int(x) for x in parts[2].split(","))
        else:
            ndim, code = data[at] >> 2, data[at] & 3
            shape_dtype = np.dtype(_SHAPE_CODES[code])
            shape = tuple(np.frombuffer(data, shape_dtype, ndim, at + 1).tolist())
            at += 1 + ndim * shape_dtype.itemsize
        return np.frombuffer(data, dtype, int(np.prod(shape)), at).reshape(shape)
    if encoding == "bytes":
        return bytes(data)
    if encoding == "str":
        return bytes(data).decode("utf-8")
    if encoding == "json":
        return json.loads(bytes(data))
    if encoding == "int":
        return int(np.frombuffer(data, np.int64, 1)[0])
    if encoding in _SCALARS:
        return np.frombuffer(data, np.dtype(encoding), 1)[0].item()
    return None  # an encoding this reader does not know (images, pickles): the column is left out


def _static_size(encoding: str) -> int | None:
    parts = encoding.split(":")
    if parts[0] == "ndarray" and len(parts) == 3:
        return int(np.prod([int(x) for x in parts[2].split(",")])) * np.dtype(parts[1]).itemsize
    if encoding in _SCALARS:
        return np.dtype(encoding).itemsize
    if encoding == "int":
        return 8
    return None


def read_index(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / "index.json").read_text())
    except FileNotFoundError:
        raise DataError(f"{folder} holds no index.json: it is not an MDS folder") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {folder}/index.json: {e}") from None


def iter_samples(folder: Path, start: int = 0) -> Iterator[dict[str, Any]]:
    """The samples of a local MDS folder, in order, from sample `start` on, decoded column by column."""
    folder = Path(folder)
    index = read_index(folder)
    seen = 0
    for shard in index.get("shards", []):
        samples = int(shard.get("samples", 0))
        if seen + samples <= start:
            seen += samples
            continue
        if shard.get("format") != "mds":
            raise DataError(f"{folder}: only MDS shards can be read here, not {shard.get('format')!r}")
        raw_path = folder / shard["raw_data"]["basename"]
        if raw_path.is_file():
            data = raw_path.read_bytes()
        elif shard.get("zip_data"):
            zip_path = folder / shard["zip_data"]["basename"]
            try:
                data = _decompress(shard["compression"], zip_path.read_bytes(), zip_path)
            except OSError as e:
                raise DataError(f"cannot read {zip_path}: {e}") from None
        else:
            raise DataError(f"{raw_path} is missing")
        names, encodings = shard["column_names"], shard["column_encodings"]
        sizes = [_static_size(e) for e in encodings]
        dynamic = sum(s is None for s in sizes)
        view = memoryview(data)
        n = int(np.frombuffer(data, np.uint32, 1)[0])
        offsets = np.frombuffer(data, np.uint32, n + 1, 4)
        for i in range(max(0, start - seen), n):
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            heads = iter(np.frombuffer(data, np.uint32, dynamic, lo).tolist())
            at = lo + 4 * dynamic
            sample = {}
            for name, encoding, size in zip(names, encodings, sizes, strict=True):
                size = next(heads) if size is None else size
                value = _decode(encoding, view[at : at + size])
                if value is not None:
                    sample[name] = value
                at += size
            if at != hi:
                raise DataError(f"{folder}: sample {seen + i} does not match its shard's column layout")
            yield sample
        seen += samples


def count_samples(folder: Path) -> int:
    return sum(int(s.get("samples", 0)) for s in read_index(folder).get("shards", []))
