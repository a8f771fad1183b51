"""A run folder in object storage (`save_folder: s3://bucket/run`, or any fsspec URL).

Checkpoints are always written to a local staging folder first (DCP wants a file system, and a
local write is what makes the save fast); once one is complete there, its files go up and its
completion marker goes up LAST, so a remote folder with a marker is complete. A fresh node with an
empty disk lists the remote, downloads the newest complete checkpoint and resumes from it.

Only a handful of fsspec calls are used (put_file, get_file, find, cat, rm), so any fsspec backend
works: s3fs (endpoint from AWS_ENDPOINT_URL_S3 or the usual AWS settings), gcsfs, adlfs, ...
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from foundry.errors import CheckpointError

log = logging.getLogger("foundry")
T = TypeVar("T")

# Small files of the run folder that live beside the checkpoints; a fresh node fetches them too, so the
# metrics file continues and a resumed wandb run keeps its id.
RUN_FILES = ("config.yaml", "metrics.jsonl", "wandb_id")


def is_remote(folder: str | None) -> bool:
    """A URL with a scheme other than file:// (a local path is not remote)."""
    return bool(folder) and "://" in folder and not folder.startswith("file://")


def local_path(folder: str) -> str:
    return folder[len("file://") :] if folder.startswith("file://") else folder


def staging_dir(url: str, local_dir: str | None = None) -> Path:
    """Where a remote run is staged on this node: `local_dir` if given, else a folder under the cache
    ($FOUNDRY_CACHE_DIR, default ~/.cache/foundry) named after the URL, the same on every rerun."""
    if local_dir:
        return Path(local_dir)
    cache = Path(os.environ.get("FOUNDRY_CACHE_DIR", Path.home() / ".cache" / "foundry"))
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", url.rstrip("/").rsplit("/", 1)[-1])[:40] or "run"
    return cache / "runs" / f"{tail}-{hashlib.sha1(url.encode()).hexdigest()[:12]}"


def _retry(what: str, fn: Callable[[], T], attempts: int = 4) -> T:
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except Exception as e:  # object stores fail transiently (throttling, resets): back off, retry
            if attempt == attempts:
                raise CheckpointError(f"{what} failed after {attempts} attempts: {e}") from e
            log.warning("%s failed (%s); retrying", what, e)
            time.sleep(min(0.5 * 2**attempt, 10))
    raise AssertionError("unreachable")


class RemoteDir:
    """A folder at a URL, addressed by paths relative to it ("checkpoints/step-00000010/COMPLETE")."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def put(self, local: Path, rel: str) -> None:
        _retry(f"upload of {local} to {self.url}/{rel}", lambda: self.fs.put_file(str(local), self._abs(rel)))

    def get(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        _retry(f"download of {self.url}/{rel}", lambda: self.fs.get_file(self._abs(rel), str(local)))

    def read_text(self, rel: str) -> str | None:
        try:
            return _retry(f"read of {self.url}/{rel}", lambda: self.fs.cat_file(self._abs(rel)).decode())
        except FileNotFoundError:
            return None

    def files(self, rel: str = "") -> dict[str, int]:
        """Every file under `rel`, recursively: path relative to `rel` -> size in bytes."""
        self.fs.invalidate_cache()  # listings are cached by some backends (s3fs); we need the truth
        base = self._abs(rel).rstrip("/")
        try:
            found = _retry(f"listing of {self.url}/{rel}", lambda: self.fs.find(base, detail=True))
        except FileNotFoundError:
            return {}
        out = {}
        for name, info in found.items():
            name = name.rstrip("/")
            if info.get("type") == "directory" or not name.startswith(base + "/"):
                continue
            out[name[len(base) + 1 :]] = int(info.get("size") or 0)
        return out

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm(self._abs(rel), recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:  # leftovers cost storage, not correctness
            log.warning("could not delete %s/%s: %s", self.url, rel, e)

    def upload_run_files(self, run_dir: Path) -> None:
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                self.put(run_dir / name, name)

    def download_missing_run_files(self, run_dir: Path) -> None:
        for name in RUN_FILES:
            if not (run_dir / name).exists() and self.read_text(name) is not None:
                self.get(name, run_dir / name)
