"""Durable writes: what an atomic rename needs to survive a power cut (no torch; data-prep uses it too)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Every file under `path`, then `path` itself: its contents are on disk before a rename publishes it."""
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)
