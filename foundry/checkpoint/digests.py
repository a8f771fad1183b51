"""Checksums of checkpoint files: taken as the bytes are written, checked when a resume reads them.

A save never reads its own files back. DCP writes every shard through ``HashingFileSystem``, whose
streams hash each buffer on its way to the file, so a shard's checksum costs one pass over memory
that is being written anyway; the small files foundry writes itself (RNG, trainer state, config) are
hashed the same way. Only a resume reads whole files to check them (``hash_files``, several threads).

The hash is xxh3_64 (xxhash, a dependency of mosaicml-streaming): about 10x zlib's crc32 per core,
which matters twice: a 10 GB checkpoint's crc32 took seconds of CPU on every save, and as long again
at every resume. A marker records which hash it used; markers written before this module
(``crc32``: {name: int}) still verify. Without xxhash, new markers fall back to crc32.
"""

from __future__ import annotations

import io
import os
import threading
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

try:
    import xxhash
except ImportError:  # pragma: no cover - xxhash comes with mosaicml-streaming
    xxhash = None

XXH3 = "xxh3_64"
CRC32 = "crc32"
DEFAULT_ALGO = XXH3 if xxhash is not None else CRC32
_CHUNK = 16 << 20


class Hasher:
    """One running checksum; ``hexdigest()`` is what a marker stores."""

    def __init__(self, algo: str = DEFAULT_ALGO):
        if algo == XXH3:
            if xxhash is None:
                raise RuntimeError("this checkpoint's checksums are xxh3_64: pip install xxhash")
            self._h = xxhash.xxh3_64()
        elif algo != CRC32:
            raise ValueError(f"unknown checksum {algo!r}")
        self.algo = algo
        self._crc = 0

    def update(self, data) -> None:
        if self.algo == XXH3:
            self._h.update(data)
        else:
            self._crc = zlib.crc32(data, self._crc)

    def hexdigest(self) -> str:
        return self._h.hexdigest() if self.algo == XXH3 else f"{self._crc:08x}"


def hash_bytes(data, algo: str = DEFAULT_ALGO) -> str:
    h = Hasher(algo)
    h.update(data)
    return h.hexdigest()


def hash_file(path: Path, algo: str = DEFAULT_ALGO) -> str:
    h = Hasher(algo)
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def hash_files(
    folder: Path, names: Iterable[str], algo: str = DEFAULT_ALGO, threads: int = 4
) -> dict[str, str]:
    """name -> hexdigest, several files at a time (the hash and the reads release the GIL)."""
    names = list(names)
    if len(names) <= 1 or threads <= 1:
        return {n: hash_file(Path(folder) / n, algo) for n in names}
    with ThreadPoolExecutor(max_workers=min(threads, len(names))) as pool:
        return dict(zip(names, pool.map(lambda n: hash_file(Path(folder) / n, algo), names), strict=True))


class HashingWriter(io.RawIOBase):
    """A binary file opened for writing that hashes every buffer written to it, in order.

    What DCP and torch.save need of a stream: write, tell, flush, fileno (for fsync), close.
    """

    def __init__(self, fh, algo: str = DEFAULT_ALGO):
        super().__init__()
        self._fh = fh
        self._hasher = Hasher(algo)
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
        written = self._fh.write(view)
        written = view.nbytes if written is None else written
        self._hasher.update(view[:written])
        self.size += written
        return written

    def tell(self) -> int:
        return self._fh.tell()

    def flush(self) -> None:
        if not self._fh.closed:
            self._fh.flush()

    def fileno(self) -> int:
        return self._fh.fileno()

    def close(self) -> None:
        if not self.closed:
            self._fh.close()
        super().close()

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


def write_file(path: Path, data: bytes, algo: str = DEFAULT_ALGO, fsync: bool = True) -> list:
    """Write `data` to `path` (durable with fsync); return its [size, checksum]."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    return [len(data), hash_bytes(data, algo)]


def hashing_filesystem(algo: str = DEFAULT_ALGO):
    """A DCP ``FileSystem`` whose write streams record [size, checksum] of each file in ``.digests``.

    Keys are file names (DCP's checkpoint folders are flat); a rename (DCP writes ``.metadata.tmp``
    and renames it) moves the entry. Files opened for reading pass through untouched.
    """
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        def __init__(self) -> None:
            super().__init__()
            self.digests: dict[str, list] = {}
            self._lock = threading.Lock()

        @contextmanager
        def create_stream(self, path, mode: str) -> Iterator[io.IOBase]:
            if "w" not in mode and "a" not in mode:
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            path = Path(path)
            with open(path, mode) as fh, HashingWriter(fh, algo) as stream:
                yield stream
                # DCP closes the stream itself once written (and fsynced); the digest is final here.
                digest = [stream.size, stream.hexdigest()]
            with self._lock:
                self.digests[path.name] = digest

        def rename(self, path, new_path) -> None:
            super().rename(path, new_path)
            with self._lock:
                if Path(path).name in self.digests:
                    self.digests[Path(new_path).name] = self.digests.pop(Path(path).name)

    return HashingFileSystem()
