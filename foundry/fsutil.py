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


def why_unwritable(path: Path, error: OSError | None = None) -> str | None:
    """Why files cannot be written under `path` (read-only file system, no permission, disk full), or None
    if nothing says so. Looks at the folder itself (or its nearest existing parent), and at `error`'s errno."""
    import errno
    import shutil

    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    code = getattr(error, "errno", None)
    try:
        stat = os.statvfs(folder)
        if stat.f_flag & os.ST_RDONLY or code == errno.EROFS:
            return "the file system is read-only"
        if code in (errno.EACCES, errno.EPERM) or (os.geteuid() != 0 and not os.access(folder, os.W_OK)):
            return f"no permission to write in {folder}"
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if code in (errno.ENOSPC, errno.EDQUOT) or free < FULL_BELOW:
        return f"no space left on the device ({_size(free)} free)"
    return None


FULL_BELOW = 16 << 20  # a checkpoint write that failed with less free than this ran out of space


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
