"""Writing MDS shards of fixed-length token windows, byte for byte what `streaming.MDSWriter` writes
for `columns={"tokens": "ndarray:int32"}` (tests compare the files with MDSWriter's).

Why not MDSWriter itself: `import streaming` imports torch and transformers, ~4.5 CPU-seconds; on a
2-core machine that is a third of the time to tokenize the whole CPython stdlib. And since every
window has the same length, a shard is one numpy buffer instead of one Python call per sample.

The layout (streaming's MDS version 2, one column of dynamic-shape ndarray:int32):
  shard = u32 num_samples | u32 offsets[num_samples + 1] | config JSON | samples
  sample = u32 column size | u8 (ndim << 2 | shape dtype code) | shape | int32 values
  index.json = {"shards": [config + {"samples", "raw_data", "zip_data"}], "version": 2}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from foundry.data.mds import file_hash

COLUMN = "tokens"
ENCODING = "ndarray:int32"
SIZE_LIMIT = 1 << 26  # MDSWriter's default shard size limit (uncompressed bytes)
_SHAPE_DTYPES = ((1 << 8, np.uint8, 0), (1 << 16, np.uint16, 1), (1 << 32, np.uint32, 2))


def _compress(name: str, data: bytes) -> bytes:
    if name == "zstd":
        try:
            import zstd  # streaming's own zstd binding, so the bytes match MDSWriter's
        except ImportError:  # any zstd frame decodes the same; only the bytes differ
            import zstandard

            return zstandard.ZstdCompressor(level=3).compress(data)
        return zstd.compress(data, 3)
    raise ValueError(f"unsupported compression {name!r}")


def _sample_prefix(window_len: int) -> bytes:
    for bound, dtype, code in _SHAPE_DTYPES:
        if window_len < bound:
            shape = np.array([window_len], dtype).tobytes()
            header = bytes([(1 << 2) | code]) + shape
            return np.uint32(len(header) + 4 * window_len).tobytes() + header
    raise ValueError(f"window of {window_len} tokens is too long for one MDS sample")


class MDSTokenWriter:
    """Appends windows (int32 arrays of window_len tokens) to shards in `folder`; finish() writes index.json."""

    def __init__(
        self,
        folder: Path,
        window_len: int,
        compression: str | None = None,
        size_limit: int = SIZE_LIMIT,
        hashes: tuple[str, ...] = (),
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.compression = compression
        self.config = {
            "column_encodings": [ENCODING],
            "column_names": [COLUMN],
            "column_sizes": [None],
            "compression": compression,
            "format": "mds",
            "hashes": sorted(hashes),  # Streaming's order; it checks files against these on download
            "size_limit": size_limit,
            "version": 2,
        }
        self._config_bytes = json.dumps(self.config, sort_keys=True).encode("utf-8")
        prefix = np.frombuffer(_sample_prefix(window_len), np.uint8)
        self._prefix = prefix
        self.window_len = window_len
        self.sample_bytes = len(prefix) + 4 * window_len
        # MDSWriter starts a new shard when the next sample would pass size_limit, counting 4 bytes of
        # offset per sample and 8 + len(config) per shard.
        room = size_limit - (8 + len(self._config_bytes))
        self.samples_per_shard = max(1, room // (self.sample_bytes + 4))
        self.shards: list[dict] = []
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    def write(self, windows: np.ndarray) -> None:
        """windows: int32 array [n, window_len]."""
        if windows.ndim != 2 or windows.shape[1] != self.window_len or windows.dtype != np.int32:
            raise ValueError(
                f"expected int32 windows of shape [n, {self.window_len}], got {windows.dtype} {windows.shape}"
            )
        while len(windows):
            take = min(len(windows), self.samples_per_shard - self._pending_rows)
            self._pending.append(windows[:take])
            self._pending_rows += take
            windows = windows[take:]
            if self._pending_rows == self.samples_per_shard:
                self._flush()

    def _flush(self) -> None:
        rows = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        n = len(rows)
        offsets = np.arange(n + 1, dtype=np.int64) * self.sample_bytes
        offsets += 4 + 4 * (n + 1) + len(self._config_bytes)
        samples = np.empty((n, self.sample_bytes), np.uint8)
        samples[:, : len(self._prefix)] = self._prefix
        samples[:, len(self._prefix) :] = np.ascontiguousarray(rows).view(np.uint8).reshape(n, -1)
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
        self._pending = []
        self._pending_rows = 0

    def finish(self) -> None:
        if self._pending_rows:
            self._flush()
        tmp = self.folder / "index.json.tmp"
        with open(tmp, "w") as f:
            json.dump({"version": 2, "shards": self.shards}, f, sort_keys=True)
        os.replace(tmp, self.folder / "index.json")
