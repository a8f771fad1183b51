"""safetensors files read by slice without memory-mapping them.

A rank that loads its FSDP2 shard needs a band of rows of each tensor. `safetensors.safe_open` maps the
whole file and every page it touches counts in the process's resident memory until the file is
closed; reading the band with one positioned read (the format is an 8-byte header length, a JSON
header with each tensor's dtype, shape and byte range, then the raw little-endian bytes) costs only
the band.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from foundry.errors import FoundryError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            (length,) = memoryview(os.pread(self._fd, 8, 0)).cast("Q")
            header = json.loads(os.pread(self._fd, length, 8))
        except (ValueError, TypeError, OSError) as e:
            os.close(self._fd)
            raise FoundryError(f"{self.path} is not a readable safetensors file: {e}") from None
        header.pop("__metadata__", None)
        self._start = 8 + length
        self.tensors = header

    def close(self) -> None:
        os.close(self._fd)

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def read(self, name: str, region: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The tensor, or the box `region` of it (slices with step 1), reading only its band of rows."""
        info = self.tensors[name]
        dtype, shape = _DTYPES[info["dtype"]], list(info["shape"])
        begin, end = info["data_offsets"]
        if not shape:  # a scalar
            return self._bytes(begin, end, dtype).reshape(())
        region = region or tuple(slice(0, n) for n in shape)
        rows = region[0].indices(shape[0])
        row_bytes = (end - begin) // shape[0] if shape[0] else 0
        band = self._bytes(begin + rows[0] * row_bytes, begin + rows[1] * row_bytes, dtype)
        band = band.reshape([rows[1] - rows[0], *shape[1:]])
        return band[(slice(None), *region[1:])]

    def _bytes(self, begin: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        size = end - begin
        buffer = bytearray(size)
        view, done = memoryview(buffer), 0
        while done < size:  # pread may return less than asked for on large reads
            n = os.preadv(self._fd, [view[done:]], self._start + begin + done)
            if n <= 0:
                raise FoundryError(f"{self.path} is truncated (tensor bytes {begin}-{end} missing)")
            done += n
        if size == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype)
