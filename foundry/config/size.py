"""Byte sizes as people write them: "5GB", "200KB", "80GiB", "1.5e9" (decimal units are powers of 1000,
binary ones of 1024, as transformers' max_shard_size and the GPU data sheets use them)."""

from __future__ import annotations

import re

from foundry.errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(?P<number>[0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(?P<unit>[a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float, path: str = "size") -> int:
    """Bytes in ``text``; a ConfigError naming ``path`` (an option or key) if it is not a size."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        number, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if not match or match.group("unit").lower() not in _UNITS:
            raise ConfigError(
                f"{text!r} is not a size; write e.g. 5GB, 200MB, 80GiB or a number of bytes", path
            )
        number, unit = float(match.group("number")), match.group("unit").lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"must be more than 0 bytes, got {text!r}", path)
    return size


def human_bytes(n: float, binary: bool = True) -> str:
    """``n`` bytes in GiB/MiB/KiB (or GB/MB/KB), 1 decimal."""
    base, units = (1024, ("KiB", "MiB", "GiB", "TiB")) if binary else (1000, ("KB", "MB", "GB", "TB"))
    value, unit = float(n), "B"
    for u in units:
        if abs(value) < base:
            break
        value, unit = value / base, u
    return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
